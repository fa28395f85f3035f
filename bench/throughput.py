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
    daemon,
    embedded_postgres,
    embedding_api,
    fresh_database,
    latencies,
    percentile,
    texts,
    wait_all_current,
)


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
    seconds = finished - started
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "requests": after["requests"] - before["requests"],
        "inputs": after["inputs"] - before["inputs"],
    }


async def live(admin: str, api_url: str, rows: int, batch: int) -> dict[str, float | int]:
    dsn = await fresh_database(admin, "bench_live", hnsw=False)
    conn = await asyncpg.connect(dsn)
    before = await api_stats(api_url)
    async with daemon(dsn, api_url, batch):
        await asyncio.sleep(2)  # let the daemon come up; the workload below is what is timed
        started = time.monotonic()
        for start in range(0, rows, 500):
            chunk = texts(rows, 0)[start : start + 500]
            await conn.executemany("insert into projects (name, description) values ($1, $2)", chunk)
        await wait_all_current(conn)
        for start in range(0, rows, 500):
            await conn.execute(
                "update projects set description = description || ' updated' where id > $1 and id <= $2",
                start,
                start + 500,
            )
        finished = await wait_all_current(conn)
        lat = await latencies(conn)
    after = await api_stats(api_url)
    await conn.close()
    seconds = finished - started
    return {
        "changes": 2 * rows,
        "seconds": round(seconds, 2),
        "changes_per_s": round(2 * rows / seconds),
        "requests": after["requests"] - before["requests"],
        "inputs": after["inputs"] - before["inputs"],
        "update_latency_p50_ms": round(percentile(lat, 0.5), 1),
        "update_latency_p99_ms": round(percentile(lat, 0.99), 1),
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
        f"{live_result['changes_per_s']:.0f} changes/s, {live_result['requests']} requests, "
        f"commit→stored p50 {live_result['update_latency_p50_ms']:.0f} ms p99 "
        f"{live_result['update_latency_p99_ms']:.0f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
