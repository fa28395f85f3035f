"""Burst memory: the daemon's peak RSS while one transaction changes 100,000 rows.

Target: 100,000 changes in one transaction: peak RSS ≤ 300 MB, all embedded.

The daemon runs as a real subprocess (LISTEN and webhook sources; nothing posts webhooks here, the
listener is simply on) against the test API (1536 dimensions, `VECTOR_SYNC_ENCODING_FORMAT=base64`)
and a database without the HNSW index (so storing is not the bottleneck). Phase 1: one statement
inserts `--rows` rows, one NOTIFY each; phase 2 (unless `--no-update`): one statement gives every
row a new description. Each phase runs until every row's vector is current. The daemon's VmRSS is
sampled every 100 ms from /proc/<pid>/status and VmHWM (the kernel's peak) read at the end, in MB
(10^6 bytes).

    .venv/bin/python bench/burst_memory.py --rows 100000
"""

from __future__ import annotations

import argparse
import asyncio
import linecache
import time
from pathlib import Path
from typing import Any

import asyncpg
from common import (
    DIMENSIONS,
    api_or_new,
    api_stats,
    daemon_metrics,
    embedded_postgres,
    fresh_database,
    markdown_table,
    print_result,
    process_memory_mb,
    progress,
    tests_import,
    verdict,
    wait_all_current,
    webhook_daemon,
)

TARGET_PEAK_MB = 300.0
DATABASE = "bench_burst"
SAMPLE_SECONDS = 0.1
PHASES = {
    "insert": (
        "insert into projects (name, description) select 'project ' || n, "
        "'description ' || n || ' revision 0 ' || repeat('lorem ipsum ', 20) from generate_series(1, $1) n",
        1,
    ),
    "update": ("update projects set description = replace(description, 'revision 0', 'revision 1')", 2),
}


class Sampler:
    """VmRSS of a process every `SAMPLE_SECONDS`, in the background."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float]] = []  # (monotonic, MB)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), process_memory_mb(self.pid)["VmRSS"]))
            await asyncio.sleep(SAMPLE_SECONDS)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def peak(self, since: float, until: float) -> tuple[float, float]:
        """(MB, seconds after `since`) of the highest sample in the interval."""
        window = [(mb, at - since) for at, mb in self.samples if since <= at <= until] or [(0.0, 0.0)]
        return max(window)


async def wait_stored(conn: asyncpg.Connection, rows: int, version: int, timeout: float) -> float:
    """Until `rows` vectors are at `version` or later (a cheap count every 0.5 s), then the exact
    check that every row is current; returns the monotonic time the count was reached."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stored = await conn.fetchval("select count(*) from vector_sync.project_embeddings where version >= $1", version)
        if stored >= rows:
            reached = time.monotonic()
            await wait_all_current(conn, timeout=60)
            return reached
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{rows} vectors at version {version} not stored within {timeout}s")


async def phase(
    name: str, conn: asyncpg.Connection, rows: int, api: str, url: str, sampler: Sampler, timeout: float
) -> dict[str, Any]:
    statement, version = PHASES[name]
    api_before, metrics_before = await api_stats(api), await daemon_metrics(url)
    rss_before = process_memory_mb(sampler.pid)["VmRSS"]
    started = time.monotonic()
    if name == "insert":
        await conn.execute(statement, rows)
    else:
        await conn.execute(statement)
    committed = time.monotonic()
    progress(f"burst_memory: {name} of {rows} rows committed in {committed - started:.1f}s; waiting for vectors")
    finished = await wait_stored(conn, rows, version, timeout)
    api_after, metrics_after = await api_stats(api), await daemon_metrics(url)
    peak, peak_at = sampler.peak(started, time.monotonic())

    def delta(key: str) -> int:
        return round(metrics_after.get(key, 0) - metrics_before.get(key, 0))

    seconds = finished - committed
    return {
        "changes": rows,
        "commit_seconds": round(committed - started, 2),
        "seconds": round(seconds, 1),
        "rows_per_s": round(rows / seconds),
        "requests": api_after["requests"] - api_before["requests"],
        "inputs": api_after["inputs"] - api_before["inputs"],
        "rss_before_mb": round(rss_before, 1),
        "peak_rss_sampled_mb": round(peak, 1),
        "peak_at_seconds": round(peak_at, 1),
        "rss_after_mb": round(process_memory_mb(sampler.pid)["VmRSS"], 1),
        "events_listen": delta('vector_sync_events_total{source="listen"}'),
        "offers_full": delta('vector_sync_offers_total{result="full"}'),
        "drift_passes": delta("vector_sync_drift_passes_total"),
        "drift_rows": delta("vector_sync_drift_rows_total"),
    }


async def run(
    admin_dsn: str,
    *,
    rows: int = 100_000,
    update: bool = True,
    batch: int = 100,
    api_url: str | None = None,
    timeout: float = 1800,
) -> dict[str, Any]:
    dsn = await fresh_database(admin_dsn, DATABASE, hnsw=False)
    conn = await asyncpg.connect(dsn)
    phases: dict[str, Any] = {}
    try:
        async with webhook_daemon(dsn, api_url, batch, VECTOR_SYNC_ENCODING_FORMAT="base64") as (url, api, process):
            await asyncio.sleep(1)  # the start-up drift pass (an empty table) is done
            sampler = Sampler(process.pid)
            sampler.start()
            try:
                for name in ["insert", "update"] if update else ["insert"]:
                    phases[name] = await phase(name, conn, rows, api, url, sampler, timeout)
                    progress(f"burst_memory: {name}: {phases[name]}")
            finally:
                await sampler.stop()
            memory = process_memory_mb(process.pid)
            all_current = await wait_all_current(conn, timeout=10) > 0
    finally:
        await conn.close()
    peak = max(memory["VmHWM"], *(p["peak_rss_sampled_mb"] for p in phases.values()))
    return {
        "rows": rows,
        "batch": batch,
        "encoding_format": "base64",
        "phases": phases,
        "peak_rss_vmhwm_mb": round(memory["VmHWM"], 1),
        "rss_end_mb": round(memory["VmRSS"], 1),
        "all_embedded": all_current,
        "target_met": peak <= TARGET_PEAK_MB and all_current,
    }


async def profile(admin_dsn: str, *, rows: int, api_url: str | None = None, top: int = 12) -> dict[str, Any]:
    """Where the memory goes: the daemon in this process under tracemalloc (slower, so a smaller burst
    does), one insert burst, then the allocation sites still alive once every row is current."""
    import tracemalloc

    support = tests_import("support")
    dsn = await fresh_database(admin_dsn, f"{DATABASE}_profile", hnsw=False)
    conn = await asyncpg.connect(dsn)
    try:
        async with api_or_new(api_url) as api:
            settings = support.make_settings(
                dsn,
                api,
                VECTOR_SYNC_EMBEDDING_DIMENSIONS=DIMENSIONS,
                VECTOR_SYNC_ENCODING_FORMAT="base64",
                VECTOR_SYNC_MAX_REQUESTS_PER_SECOND=1000,
                VECTOR_SYNC_REQUEST_TIMEOUT=30,
                VECTOR_SYNC_LOG_LEVEL="WARNING",
            )
            async with support.running(settings):
                tracemalloc.start()
                await conn.execute(PHASES["insert"][0], rows)
                await wait_stored(conn, rows, 1, timeout=1800)
                snapshot = tracemalloc.take_snapshot()
                current, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
    finally:
        await conn.close()
    sites = snapshot.statistics("lineno")
    return {
        "rows": rows,
        "traced_current_mb": round(current / 1e6, 1),
        "traced_peak_mb": round(peak / 1e6, 1),
        "top": [
            {
                "site": f"{Path(stat.traceback[0].filename).name}:{stat.traceback[0].lineno}",
                "mb": round(stat.size / 1e6, 1),
                "blocks": stat.count,
                "code": linecache.getline(stat.traceback[0].filename, stat.traceback[0].lineno).strip()[:90],
            }
            for stat in sites[:top]
        ],
    }


def render_profile(result: dict[str, Any]) -> str:
    rows: list[list[object]] = [
        [site["site"], f"{site['mb']:.1f}", f"{site['blocks']:,}", f"`{site['code']}`"] for site in result["top"]
    ]
    return "\n".join(
        [
            f"Profile (tracemalloc, daemon in-process, {result['rows']:,}-row insert burst): Python allocations "
            f"alive once all current {result['traced_current_mb']:.1f} MB, "
            f"traced peak {result['traced_peak_mb']:.1f} MB",
            "",
            markdown_table(["allocated at", "MB", "blocks", "code"], rows),
        ]
    )


def render(result: dict[str, Any]) -> str:
    rows: list[list[object]] = [
        [
            f"{name}: {p['changes']:,} rows, one transaction",
            f"{p['seconds']:.1f} s",
            f"{p['rows_per_s']:,}",
            f"{p['requests']:,} / {p['inputs']:,}",
            f"{p['rss_before_mb']:.0f} → {p['peak_rss_sampled_mb']:.0f} MB (at {p['peak_at_seconds']:.0f} s)",
            f"{p['offers_full']:,} full, {p['drift_passes']} passes ({p['drift_rows']:,} rows)",
        ]
        for name, p in result["phases"].items()
    ]
    return "\n".join(
        [
            f"Burst memory: {result['rows']:,} changes in one transaction, batch {result['batch']}, "
            f"{result['encoding_format']}, no HNSW index",
            "",
            markdown_table(
                ["phase", "commit → all current", "rows/s", "API requests / inputs", "RSS (sampled)", "scheduler"],
                rows,
            ),
            "",
            f"peak RSS (VmHWM, whole run): {result['peak_rss_vmhwm_mb']:.1f} MB; at the end "
            f"{result['rss_end_mb']:.1f} MB; all embedded: {result['all_embedded']}",
            f"target peak RSS ≤ {TARGET_PEAK_MB:.0f} MB, all embedded: {verdict(result['target_met'])}",
        ]
    )


def render_all(result: dict[str, Any]) -> str:
    """`render`, then `render_profile` when the run was profiled."""
    if "profile" not in result:
        return render(result)
    return f"{render(result)}\n\n{render_profile(result['profile'])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--no-update", action="store_true", help="only the insert burst")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="ROWS",
        default=0,
        help="also profile a ROWS-row burst with tracemalloc, the daemon in-process",
    )
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    args = parser.parse_args()
    started = time.monotonic()
    with embedded_postgres("vs-bench-burst-") as admin:
        result = asyncio.run(run(admin, rows=args.rows, update=not args.no_update, batch=args.batch))
        if args.profile:
            result["profile"] = asyncio.run(profile(admin, rows=args.profile))
    print_result(result, started, args.json, render_all)


if __name__ == "__main__":
    main()
