"""bench/run_all's body: run every benchmark in one embedded Postgres, then rewrite docs/benchmarks.md.

Each measure lives in its own script (importable `run`/`live`/... functions); this module only orders
them, shares the test API where the latency matches, samples throughput over time, draws the plots and
writes the document.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from common import ROOT, api_stats, embedded_postgres_with, embedding_api, progress

DOC = ROOT / "docs" / "benchmarks.md"
PLOTS = ROOT / "docs" / "benchmarks"
LATENCIES_MS = (0, 150)


@dataclass
class Sizes:
    throughput_rows: int = 20_000
    freshness_seconds: int = 60
    freshness_rate: int = 100
    efficiency_rows: int = 1_000
    efficiency_edits: int = 10
    idle_seconds: float = 60.0
    drift_rows: tuple[int, ...] = (100_000, 1_000_000)
    burst_rows: int = 100_000
    webhook_seconds: float = 10.0
    webhook_repeats: int = 1


QUICK = Sizes(
    throughput_rows=2_000,
    freshness_seconds=10,
    efficiency_rows=200,
    idle_seconds=10.0,
    drift_rows=(20_000,),
    burst_rows=10_000,
    webhook_seconds=3.0,
)


@dataclass
class Timeline:
    """API inputs answered over time, read from the test API's counters (no database query)."""

    points: list[tuple[float, int]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def sampled(api_url: str, every: float = 0.25) -> AsyncIterator[Timeline]:
    timeline = Timeline()
    started = time.monotonic()
    first = (await api_stats(api_url))["inputs"]

    async def sample() -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(f"{api_url.removesuffix('/v1')}/stats") as response:
                    inputs = (await response.json())["inputs"]
                timeline.points.append((time.monotonic() - started, inputs - first))
                await asyncio.sleep(every)

    task = asyncio.create_task(sample())
    try:
        yield timeline
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def timed(name: str, work: Awaitable[Any]) -> Any:
    progress(f"== {name}")
    started = time.monotonic()
    result = await work
    progress(f"== {name}: {time.monotonic() - started:.1f}s")
    return result


async def throughput_side_by_side(admin: str, sizes: Sizes) -> dict[str, Any]:
    import pgai_peer
    import raw_upsert_limit
    import throughput

    results: dict[str, Any] = {}
    for latency in LATENCIES_MS:
        async with embedding_api(latency) as api_url:
            async with sampled(api_url) as ours_timeline:
                ours = await timed(
                    f"vector-sync, {sizes.throughput_rows} rows, API {latency} ms",
                    throughput.live(admin, api_url, sizes.throughput_rows, OUR_BATCH),
                )
            async with sampled(api_url) as pgai_timeline:
                pgai = await timed(
                    f"pgai, {sizes.throughput_rows} rows, API {latency} ms",
                    pgai_peer.pgai_throughput(admin, api_url, sizes.throughput_rows),
                )
        results[f"latency_{latency}"] = {
            "ours": ours,
            "pgai": pgai,
            "ours_timeline": ours_timeline.points,
            "pgai_timeline": pgai_timeline.points,
        }
    results["raw"] = await timed("raw upsert", raw_upsert_limit.run(admin, sizes.throughput_rows, batch=RAW_BATCH))
    return results


# The daemon's batch size for the throughput runs: large batches are what a backlog wants, and pgai
# gets its own maximum (2048) in the same runs.
OUR_BATCH = 500
RAW_BATCH = 1000


async def freshness_runs(admin: str, sizes: Sizes) -> dict[str, Any]:
    import freshness

    results = {}
    for latency in LATENCIES_MS:
        results[f"latency_{latency}"] = await timed(
            f"freshness, {sizes.freshness_rate}/s for {sizes.freshness_seconds}s, API {latency} ms",
            freshness.drive(admin, sizes.freshness_rate, sizes.freshness_seconds, latency),
        )
    return results


async def efficiency_runs(admin: str, sizes: Sizes) -> dict[str, Any]:
    import api_efficiency

    return dict(
        await timed(
            f"API efficiency, {sizes.efficiency_rows} rows x {sizes.efficiency_edits} edits",
            api_efficiency.run(admin, rows=sizes.efficiency_rows, edits=sizes.efficiency_edits),
        )
    )


async def resource_runs(admin: str, sizes: Sizes) -> dict[str, Any]:
    import burst_memory
    import drift_pass
    import idle_cost
    import webhook_load

    return {
        "idle": await timed("idle cost", idle_cost.run(admin, seconds=sizes.idle_seconds)),
        "drift": await timed("drift pass", drift_pass.run(admin, rows=sizes.drift_rows)),
        # Inserts only: one 100,000-row transaction is the measure; the update pass would double the time.
        "burst": await timed("burst memory", burst_memory.run(admin, rows=sizes.burst_rows, update=False)),
        "webhook": await timed(
            "webhook listener", webhook_load.run(admin, seconds=sizes.webhook_seconds, repeats=sizes.webhook_repeats)
        ),
    }


async def everything(admin: str, sizes: Sizes) -> dict[str, Any]:
    return {
        "throughput": await throughput_side_by_side(admin, sizes),
        "freshness": await freshness_runs(admin, sizes),
        "efficiency": await efficiency_runs(admin, sizes),
        **await resource_runs(admin, sizes),
    }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(memory_gb, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Run every benchmark and rewrite docs/benchmarks.md")
    parser.add_argument("--quick", action="store_true", help="small sizes; prints the report, keeps the document")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()

    import pgai_peer

    pgai_peer.ensure_pgai_venv()
    started = time.monotonic()
    load_before = os.getloadavg()
    # One server for everything: logical decoding for the Realtime test server, pg_stat_statements for
    # the idle cost's exact query count.
    with embedded_postgres_with(
        "vs-run-all-", wal_level="logical", shared_preload_libraries="pg_stat_statements"
    ) as admin:
        results = asyncio.run(everything(admin, sizes))
    results["run"] = {
        "date": datetime.date.today().isoformat(),
        "wall_seconds": round(time.monotonic() - started),
        "load_before": [round(value, 2) for value in load_before],
        "load_after": [round(value, 2) for value in os.getloadavg()],
        "machine": machine(),
        "quick": args.quick,
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    import report

    document = report.render(results, PLOTS if not args.quick else Path("/tmp/vector-sync-bench-plots"))
    if args.quick:
        print(document)
    else:
        DOC.write_text(document)
        progress(f"wrote {DOC.relative_to(ROOT)} in {results['run']['wall_seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
