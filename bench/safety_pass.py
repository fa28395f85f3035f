"""What one safety-interval check costs on a large table, next to a full drift pass.

Builds `--rows` projects, each with a stored vector at its current version (8 dimensions and no
HNSW index: neither query touches the vectors), then times, with the daemon's own `DriftPass`:
- a full drift pass (the anti-join of the whole table against the vectors), nothing behind;
- a recent pass (the safety interval's check) after 0, 100 and 10,000 rows changed.
The write cost of the change log is measured too: the same bulk update with and without the
trigger's log insert.

    .venv/bin/python bench/safety_pass.py --rows 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from common import TABLE_SQL, embedded_postgres

DIMENSIONS = 8


async def prepare(admin: str, rows: int) -> str:
    from vector_sync.config import load_settings
    from vector_sync.migrations import migrate

    conn = await asyncpg.connect(admin)
    await conn.execute("create database safety")
    await conn.close()
    dsn = admin.replace("/postgres?", "/safety?", 1)
    conn = await asyncpg.connect(dsn)
    await conn.execute(TABLE_SQL)
    await migrate(
        conn, load_settings(require_embedder=False, DATABASE_URL=dsn, VECTOR_SYNC_EMBEDDING_DIMENSIONS=DIMENSIONS)
    )
    await conn.execute("drop index vector_sync.project_embeddings_embedding_idx")
    started = time.monotonic()
    await conn.execute(
        "insert into projects (name, description) select 'project ' || n, 'description ' || n "
        "from generate_series(1, $1) n",
        rows,
    )
    await conn.execute(
        "insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding) "
        "select id, version, 'sha', $1, array_fill(0.5::real, array[$2::int])::vector from projects",
        f"hash-{DIMENSIONS}",
        DIMENSIONS,
    )
    await conn.execute("vacuum analyze")
    print(f"prepared {rows} rows with vectors in {time.monotonic() - started:.1f}s")
    await conn.close()
    return dsn


async def timed(work: object, repeats: int = 5) -> float:
    """Median milliseconds of `repeats` runs of the coroutine function `work`."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        await work()  # type: ignore[operator]
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


@contextlib.asynccontextmanager
async def drift_pass_on(
    dsn: str, found: list[Any], max_pending: int
) -> AsyncIterator[tuple[asyncpg.Connection, Any, Any]]:
    """The daemon's own `DriftPass` on the database `prepare` made: yields (a connection, the `Store`,
    the `DriftPass`), every stale row the pass finds appended to `found`; all closed afterwards."""
    from vector_sync.config import load_settings
    from vector_sync.drift import DriftPass
    from vector_sync.migrations import read_catalog
    from vector_sync.scheduler import Scheduler
    from vector_sync.store import Store

    settings = load_settings(
        require_embedder=False,
        DATABASE_URL=dsn,
        VECTOR_SYNC_EMBEDDER="hash",
        VECTOR_SYNC_EMBEDDING_DIMENSIONS=DIMENSIONS,
    )
    conn = await asyncpg.connect(dsn)
    try:
        store = await Store.connect(settings, await read_catalog(conn, settings))
        try:
            scheduler = Scheduler(insert_delay=0, update_delay=0, max_pending=max_pending)
            yield conn, store, DriftPass(store, scheduler, found.append)
        finally:
            await store.close()
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()

    found: list[object] = []
    with embedded_postgres("vs-bench-safety-") as admin:
        dsn = await prepare(admin, args.rows)
        async with drift_pass_on(dsn, found, max_pending=1_000_000) as (conn, _, passes):
            await measure(conn, passes)


async def measure(conn: asyncpg.Connection, passes: Any) -> None:
    """The full pass, recent passes after 0, 100 and 10,000 changes, and the change log's write cost."""
    full_ms = await timed(passes.run_once)
    print(f"full drift pass, nothing behind: {full_ms:.0f} ms (median of 5)")
    results = {"full": full_ms}
    for changed in (0, 100, 10_000):
        if changed:
            await conn.execute(
                "update projects set stars = stars + 1 where id in "
                "(select id from projects order by random() limit $1)",
                changed,
            )
        # Every pass advances the watermark, so each timed run after the first sees no change:
        # time the first run on its own, then the steady state.
        started = time.perf_counter()
        await passes.run_recent("bench")
        first_ms = (time.perf_counter() - started) * 1000
        steady_ms = await timed(lambda: passes.run_recent("bench"))
        results[f"recent {changed}"] = first_ms
        print(f"recent pass after {changed} changed rows: {first_ms:.1f} ms; then idle: {steady_ms:.1f} ms")

    # The trigger's extra write: the same bulk update with and without the log insert, three
    # times each (the median), so cache warm-up does not favour the second.
    for label in ("with change log", "without change log"):
        if label.startswith("without"):
            await conn.execute("alter table vector_sync.webhook_logs rename to webhook_logs_off")
            await conn.execute(
                "create table vector_sync.webhook_logs (like vector_sync.webhook_logs_off including defaults)"
            )
            await conn.execute("create rule discard as on insert to vector_sync.webhook_logs do instead nothing")

        async def update() -> None:
            await conn.execute("update projects set stars = stars + 1 where id <= 100000")
            await conn.execute("vacuum projects")

        print(f"update of 100,000 rows {label}: {await timed(update, repeats=3):.0f} ms (median of 3, with vacuum)")


if __name__ == "__main__":
    asyncio.run(main())
