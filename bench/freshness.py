"""Commit → stored latency at a steady rate of changes, read from the database at both ends.

The daemon runs as a real subprocess (LISTEN source, no settle delays) against embedded Postgres and
the test API. With 10,000 rows already embedded, rows are inserted and updated at `--rate` changes a
second for `--seconds`; the latency of each stored vector is `embedded_at - committed_at`, both stamped by Postgres
(clock_timestamp() in the trigger and in the upsert).

    .venv/bin/python bench/freshness.py --rate 50 --seconds 30 --latency-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import asyncpg
from common import api_or_new, daemon, embedded_postgres, fresh_database, percentile, texts, wait_all_current

EXISTING_ROWS = 10_000


async def drive(admin: str, rate: int, seconds: int, latency_ms: int, api_url: str | None = None) -> dict[str, Any]:
    """`rate` changes a second for `seconds`; `api_url` shares a running test API (it must have `latency_ms`)."""
    dsn = await fresh_database(admin, "bench_fresh", hnsw=False)
    conn = await asyncpg.connect(dsn)
    samples: list[float] = []
    # A table in use: existing rows, embedded before the measured window, that updates pick from.
    await conn.copy_records_to_table("projects", records=texts(EXISTING_ROWS, 0), columns=["name", "description"])
    async with api_or_new(api_url, latency_ms) as url, daemon(dsn, url, 100):
        await wait_all_current(conn)
        window_start = await conn.fetchval("select clock_timestamp()")
        started = time.monotonic()
        count = 0
        inserted = EXISTING_ROWS
        rng = random.Random(7)
        while time.monotonic() - started < seconds:
            # Half inserts, half updates of a row picked at random among those inserted so far: an
            # update of a row whose previous version is still being embedded waits for that batch
            # (one flight per row is what keeps a change paid for once), as it would in production.
            if count % 2 == 0 or inserted == 0:
                await conn.execute("insert into projects (name, description) values ($1, $2)", f"p{count}", f"t{count}")
                inserted += 1
            else:
                row = rng.randint(1, inserted)
                await conn.execute("update projects set description = $1 where id = $2", f"u{count}", row)
            count += 1
            await asyncio.sleep(max(0.0, started + count / rate - time.monotonic()))
        await wait_all_current(conn)
        rows = await conn.fetch(
            "select (extract(epoch from embedded_at - committed_at) * 1000)::float8 as ms "
            "from vector_sync.project_embeddings where committed_at >= $1",
            window_start,
        )
        samples = sorted(row["ms"] for row in rows)
    await conn.close()
    return {
        "changes": count,
        "rate_per_s": round(count / seconds, 1),
        "vectors": len(samples),
        "p50_ms": round(percentile(samples, 0.5), 1),
        "p99_ms": round(percentile(samples, 0.99), 1),
        "max_ms": round(samples[-1], 1) if samples else float("nan"),
        "samples_ms": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--latency-ms", type=int, default=0)
    args = parser.parse_args()
    with embedded_postgres("vs-bench-fresh-") as admin:
        result = asyncio.run(drive(admin, args.rate, args.seconds, args.latency_ms))
    print(
        f"{result['changes']} changes at {result['rate_per_s']}/s, API latency {args.latency_ms} ms: "
        f"commit → stored p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {result['max_ms']} ms "
        f"({result['vectors']} vectors)"
    )


if __name__ == "__main__":
    main()
