"""End-to-end throughput of the daemon as a real subprocess, against embedded Postgres and the test API.

Two workloads, each on a fresh database:
  backlog  N rows exist before the daemon starts: the start-up drift pass finds them;
  live     the daemon runs while N rows are inserted (then updated) in transactions of 500,
           so every change arrives by NOTIFY.
It prints rows/s, API requests and inputs, and commit → stored latency percentiles read from the
database (embedded_at - committed_at).

    .venv/bin/python bench/throughput.py --rows 20000 --latency-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import asyncpg
from common import (
    api_stats,
    cpu_snapshot,
    cpu_used,
    daemon,
    embedded_postgres,
    embedding_api,
    free_port,
    fresh_database,
    latencies,
    percentile,
    texts,
    wait_all_current,
    wait_ready,
)

CHUNK = 500  # rows a transaction, as in pgai_peer.py


async def backlog(admin: str, api_url: str, rows: int, batch: int) -> dict[str, float | int]:
    dsn = await fresh_database(admin, "bench_backlog", hnsw=False)
    conn = await asyncpg.connect(dsn)
    await conn.copy_records_to_table("projects", records=texts(rows, 0), columns=["name", "description"])
    before = await api_stats(api_url)
    started = time.monotonic()
    async with daemon(dsn, api_url, batch):
        finished = await wait_all_current(conn)
    after = await api_stats(api_url)
    await conn.close()
    return counts(rows, finished - started, before, after)


def counts(rows: int, seconds: float, before: dict[str, int], after: dict[str, int]) -> dict[str, float | int]:
    """Rows, seconds, rows/s, and the API requests and inputs between the test API's stats `before` and `after`."""
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "requests": after["requests"] - before["requests"],
        "inputs": after["inputs"] - before["inputs"],
    }


def phase(
    rows: int, seconds: float, before: dict[str, int], after: dict[str, int], lat: list[float]
) -> dict[str, float]:
    return {
        **counts(rows, seconds, before, after),
        "latency_p50_ms": round(percentile(lat, 0.5), 1),
        "latency_p99_ms": round(percentile(lat, 0.99), 1),
    }


async def live(admin: str, api_url: str, rows: int, batch: int, **settings: str) -> dict[str, object]:
    """`rows` inserts, then an update of every row, in transactions of 500, while the daemon runs."""
    dsn = await fresh_database(admin, "bench_live", hnsw=False)
    conn = await asyncpg.connect(dsn)
    data = texts(rows, 0)
    port = free_port()
    async with daemon(dsn, api_url, batch, VECTOR_SYNC_HTTP_PORT=str(port), **settings):
        await wait_ready(f"http://127.0.0.1:{port}")
        before = await api_stats(api_url)
        cpu_before = await cpu_snapshot(conn)
        started = time.monotonic()
        for start in range(0, rows, CHUNK):
            await conn.executemany(
                "insert into projects (name, description) values ($1, $2)", data[start : start + CHUNK]
            )
        inserts_done = await wait_all_current(conn)
        after_inserts = await api_stats(api_url)
        insert_latencies = await latencies(conn)
        updates_started = time.monotonic()
        for start in range(0, rows, CHUNK):
            await conn.execute(
                "update projects set description = description || ' updated' where id > $1 and id <= $2",
                start,
                start + CHUNK,
            )
        finished = await wait_all_current(conn)
        cpu = cpu_used(cpu_before, await cpu_snapshot(conn))
        after = await api_stats(api_url)
        update_latencies = await latencies(conn)
    await conn.close()
    inserts = phase(rows, inserts_done - started, before, after_inserts, insert_latencies)
    updates = phase(rows, finished - updates_started, after_inserts, after, update_latencies)
    seconds = finished - started
    return {
        "changes": 2 * rows,
        "seconds": round(seconds, 2),
        "changes_per_s": round(2 * rows / seconds),
        "requests": after["requests"] - before["requests"],
        "inputs": after["inputs"] - before["inputs"],
        # Same keys as pgai_peer.py's result, for the side-by-side table.
        "insert": inserts,
        "update": updates,
        "cpu_seconds": cpu,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()

    with embedded_postgres("vs-bench-") as admin:
        async with embedding_api(args.latency_ms) as api_url:
            result = {
                "api_latency_ms": args.latency_ms,
                "batch": args.batch,
                "backlog": await backlog(admin, api_url, args.rows, args.batch),
                "live": await live(admin, api_url, args.rows, args.batch),
            }
    print(json.dumps(result, indent=2))
    backlog_result, live_result = result["backlog"], result["live"]
    assert isinstance(backlog_result, dict) and isinstance(live_result, dict)
    print(
        f"\nbacklog: {backlog_result['rows']} rows in {backlog_result['seconds']:.1f}s = "
        f"{backlog_result['rows_per_s']:.0f} rows/s, {backlog_result['requests']} requests"
    )
    print(
        f"live:    {live_result['changes']} changes in {live_result['seconds']:.1f}s = "
        f"{live_result['changes_per_s']:.0f} changes/s, {live_result['requests']} requests"
    )


if __name__ == "__main__":
    asyncio.run(main())
