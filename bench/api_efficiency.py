"""API efficiency: what a burst of edits costs at the embedding API when every change is announced three times.

Measure (from the issue): each change delivered by Realtime, webhook and NOTIFY; 10 edits per row in a burst;
30 % of the updates touch only a column that is not embedded. Bar: inputs sent = unique embedded texts,
exactly; requests = ceil(inputs / batch). Beside it, for the same workload: pgai Vectorizer (run, through
bench/pgai_peer.py) and the Supabase automatic-embeddings guide (computed, not run: its triggers are
`AFTER INSERT` and `AFTER UPDATE OF <embedded columns>` FOR EACH ROW, and its Edge Function sends one input
per request, so one request per inserted row and one per row an UPDATE names an embedded column of).

Setup: embedded Postgres with `wal_level = logical`; the OpenAI-compatible test API (tests/embedding_api.py,
base64 vectors); the Realtime test server (tests/realtime_server.py, logical decoding of the same
database); the pg_net stand-in (tests/pg_net_standin.py: schema `net`, and a worker in this process that
sends after commit), configured as `vector-sync webhook configure` does, so the migration's statement
trigger signs every change and posts it to the daemon's `/webhook`; the reconciler, which pg_cron runs
every 10 s in production, runs here every second (and the sender's timeout is 60 s, see HTTP_TIMEOUT_MS).
The daemon is a subprocess with the sources realtime, webhook and listen, settle delays of 2 s for inserts
and updates (--settle-delay), and batches of 100.

Workload (common.burst_rounds): `rows` inserts (texts(rows, 0), transactions of 500), then `edits` rounds,
each one transaction that edits every row once: a seeded random 30 % get `stars = stars + 1` only, the
others a new description; two set-based statements a round for the daemon (one statement per row costs
seconds a round in the migration's statement trigger), the same transactions one statement per row for
pgai. A row edited again while it settles waits the settle delay after its latest edit (up to five
delays after its first), so the burst is embedded once, after it ends. Per phase: wait until
every row is current, every logged change was delivered by webhook, the Realtime server has sent every
change, and the counters stay unchanged for 2 s.

Expected: the distinct texts (sha256 of store.content_text of the content columns) among rows whose final
text differs from the text embedded before the burst. Rows' texts are all different here, so inputs ==
that count, with every row current at its final text, also means no text was sent twice (the test API
gives counts over HTTP, not its list of inputs).

    .venv/bin/python bench/api_efficiency.py [--rows 1000] [--edits 10] [--seed 0] [--settle-delay 2s]
                                             [--no-pgai] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import asyncpg
from common import (
    STARS_ONLY_SHARE,
    Statement,
    api_or_new,
    api_stats,
    burst_rounds,
    daemon,
    daemon_metrics,
    embedded_postgres_with,
    free_port,
    fresh_database,
    markdown_table,
    print_result,
    progress,
    realtime_server,
    tests_import,
    texts,
    verdict,
    wait_all_current,
    wait_ready,
)

DATABASE = "bench_api_efficiency"
BATCH = 100
SETTLE_DELAY = "2s"  # VECTOR_SYNC_INSERT_DELAY and _UPDATE_DELAY: the documented way to coalesce a burst
INSERT_CHUNK = 500  # rows per insert transaction, as pgai_peer.pgai_efficiency loads them
CONTENT_COLUMNS = ("name", "description")  # the daemon's default VECTOR_SYNC_CONTENT_COLUMNS
SOURCES = ("realtime", "webhook", "listen")
RECONCILE_EVERY = 1.0
# The stand-in takes a new batch whenever a request finishes, without waiting for the last batch (pg_net
# waits, and sends about 200 a second), so in a burst thousands of requests queue for its 100 connections.
# With the sender's default 5 s timeout (vector_sync.config `http_timeout_ms`), which counts that wait, a
# third of them timed out, some after the daemon had taken them, and the reconciler resent those:
# duplicates that cost no API call but blur the per-source counts. A 60 s timeout lets them wait; the
# daemon's per-address limit (1,000 a second) may still answer part of a burst 429, which the reconciler
# retries after 2 s (reported under `attempts`).
PG_NET_POLL_SECONDS = 0.1
PG_NET_BATCH = 100
HTTP_TIMEOUT_MS = "60000"
QUIET_SECONDS = 2.0
PHASE_TIMEOUT = 600.0
INSERT_SQL = "insert into projects (name, description) values ($1, $2)"
SET_CLAUSE = re.compile(r"\bset\s+(.*?)\s+(?:from|where)\b", re.IGNORECASE | re.DOTALL)


# --- the webhook sender: pg_net stand-in and reconciler --------------------------------------------------


async def configure_webhooks(conn: asyncpg.Connection, url: str) -> str:
    """Install the pg_net stand-in and store the daemon's URL and a new secret where the migration's
    sender reads them (what `vector-sync webhook configure` does); returns the secret for the daemon."""
    from vector_sync.webhook_config import new_secret, store_webhook_target

    await tests_import("pg_net_standin").install(conn)
    secret = new_secret()
    await store_webhook_target(conn, url, secret)
    # A documented sender setting (docs/webhooks.md), changed with an update as the docs say.
    status = await conn.execute(
        "update vector_sync.config set value = $1 where key = 'http_timeout_ms'", HTTP_TIMEOUT_MS
    )
    if status != "UPDATE 1":
        raise RuntimeError(f"vector_sync.config has no http_timeout_ms row to change ({status})")
    return secret


@contextlib.asynccontextmanager
async def webhook_sender(dsn: str) -> AsyncIterator[Any]:
    """pg_net's worker (the stand-in, in this loop) and the reconciler, until the block ends; yields the worker.

    The reconciler is what marks an attempt delivered (a 2xx whose body echoes the webhook-id) and retries
    failures, so `delivered` in webhook_logs is the proof that the daemon accepted each change's webhook.
    """
    standin = tests_import("pg_net_standin")
    conn = await asyncpg.connect(dsn)

    async def reconcile_forever() -> None:
        while True:
            await conn.fetchval("select vector_sync.reconcile_webhooks()")
            await asyncio.sleep(RECONCILE_EVERY)

    try:
        async with standin.PgNetWorker(dsn, poll_interval=PG_NET_POLL_SECONDS, batch_size=PG_NET_BATCH) as worker:
            reconciler = asyncio.create_task(reconcile_forever(), name="bench-reconciler")
            try:
                yield worker
            finally:
                reconciler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reconciler
    finally:
        await conn.close()


async def webhook_delivery(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("select status, count(*)::int as n from vector_sync.webhook_logs group by 1")
    delivery = {row["status"]: row["n"] for row in rows}
    delivery["queued"] = await conn.fetchval("select count(*)::int from net.http_request_queue")
    attempts = await conn.fetch("select outcome, count(*)::int as n from vector_sync.webhook_attempts group by 1")
    delivery["attempts"] = {str(row["outcome"]): row["n"] for row in attempts}
    return delivery


# --- waiting until a phase is over -----------------------------------------------------------------------


async def realtime_flush(url: str) -> dict[str, Any]:
    """Make the Realtime server read its slot up to now and send what it read; returns its state."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_control/flush") as response:
        body: dict[str, Any] = await response.json()
        state: dict[str, Any] = body["state"]
        return state


async def poll_until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = PHASE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not reached within {timeout:.0f}s: {what}")
        await asyncio.sleep(0.1)


async def counters(daemon_url: str, api_url: str, realtime_url: str, worker: Any) -> dict[str, Any]:
    """Everything that moves while changes are still arriving somewhere."""
    metrics = await daemon_metrics(daemon_url)
    realtime = await realtime_flush(realtime_url)
    return {
        "daemon": {key: value for key, value in metrics.items() if key.startswith(WATCHED_METRICS)},
        "api": await api_stats(api_url),
        "realtime_events_sent": realtime["events_sent"],
        "realtime_changes": realtime["changes"],
        "webhooks_taken": len(worker.sent),
    }


WATCHED_METRICS = (
    "vector_sync_events_total",
    "vector_sync_offers_total",
    "vector_sync_embedding_requests",
    "vector_sync_embedding_inputs",
    "vector_sync_webhook_responses_total",
    "vector_sync_skipped_unchanged_total",
    "vector_sync_vectors_stored_total",
)


async def settle(
    conn: asyncpg.Connection, changes: int, daemon_url: str, api_url: str, realtime_url: str, worker: Any
) -> dict[str, Any]:
    """Wait until the phase is over on every path; returns the counters then.

    `changes` is how many row changes the database has logged so far (all phases). Conditions that are
    facts (rows current, webhooks delivered, Realtime caught up) first; then counters that stop changing
    for QUIET_SECONDS, because a late duplicate (a retried webhook, a Realtime frame in flight) may still
    be on its way after the facts hold, and the next phase must not be charged for it.
    """
    await wait_all_current(conn, timeout=PHASE_TIMEOUT)

    async def delivered() -> bool:
        delivery = await webhook_delivery(conn)
        return delivery.get("delivered", 0) == changes and delivery["queued"] == 0

    await poll_until(delivered, f"{changes} webhooks delivered")
    await worker.drained(timeout=PHASE_TIMEOUT)

    async def realtime_caught_up() -> bool:
        return int((await realtime_flush(realtime_url))["changes"]) >= changes

    await poll_until(realtime_caught_up, f"{changes} changes read by the Realtime server")
    last = await counters(daemon_url, api_url, realtime_url, worker)
    quiet_since = time.monotonic()
    deadline = quiet_since + PHASE_TIMEOUT
    while time.monotonic() - quiet_since < QUIET_SECONDS:
        if time.monotonic() > deadline:
            raise TimeoutError("counters never stopped changing")
        await asyncio.sleep(0.25)
        now = await counters(daemon_url, api_url, realtime_url, worker)
        if now != last:
            last, quiet_since = now, time.monotonic()
    # Rows may have been current before the last duplicate; still current after it is what counts.
    await wait_all_current(conn, timeout=PHASE_TIMEOUT)
    last["webhook_delivery"] = await webhook_delivery(conn)
    return last


# --- workload --------------------------------------------------------------------------------------------


async def run_workload(conn: asyncpg.Connection, workload: Sequence[Sequence[Statement]]) -> list[float]:
    """Each transaction as one transaction; a run of one SQL text goes as one pipelined executemany (the
    statements, their order and the transaction are the same; only the round trips are fewer). Returns the
    monotonic time of each commit."""
    commits = []
    for transaction in workload:
        async with conn.transaction():
            for sql, group in itertools.groupby(transaction, key=lambda statement: statement[0]):
                await conn.executemany(sql, [args for _, args in group])
        commits.append(time.monotonic())
    return commits


def rows_of(args: tuple[object, ...]) -> int:
    """How many rows a workload statement changes: one per id of an array first argument, else one."""
    return len(args[0]) if args and isinstance(args[0], list) else 1


def names_embedded_column(sql: str, columns: Sequence[str] = CONTENT_COLUMNS) -> bool:
    """Whether an UPDATE's SET list names a content column: what `AFTER UPDATE OF <columns>` fires on
    (Postgres fires it on the column being named, whether or not its value changes)."""
    match = SET_CLAUSE.search(sql)
    if match is None:
        return False
    named = {assignment.split("=", 1)[0].strip().lower() for assignment in match.group(1).split(",")}
    return bool(named & {column.lower() for column in columns})


def supabase_guide(rows: int, workload: Sequence[Sequence[Statement]]) -> dict[str, Any]:
    """The guide's cost, computed from the workload (not run): one request with one input per trigger fire."""
    fires = sum(rows_of(args) for transaction in workload for sql, args in transaction if names_embedded_column(sql))
    return {
        "tool": "Supabase automatic-embeddings guide",
        "how": "computed, not run: one request and one input per INSERT and per UPDATE naming an embedded column",
        "load": {"requests": rows, "inputs": rows},
        "burst": {"requests": fires, "inputs": fires},
    }


# --- expected values from the database -------------------------------------------------------------------


async def embedded_shas(conn: asyncpg.Connection) -> dict[int, str]:
    rows = await conn.fetch("select project_id, content_sha256 from vector_sync.project_embeddings")
    return {row["project_id"]: row["content_sha256"] for row in rows}


async def expected_inputs(conn: asyncpg.Connection, before: dict[int, str]) -> dict[str, int]:
    """The distinct texts among rows whose final text is not the text embedded before the burst, and a
    check that every row's vector is of its final text (so each of those texts was sent at least once)."""
    from vector_sync.store import content_text, sha256_hex

    columns = ", ".join(CONTENT_COLUMNS)
    rows = await conn.fetch(f"select id, {columns} from projects")
    stored = await embedded_shas(conn)
    final = {row["id"]: sha256_hex(content_text([row[column] for column in CONTENT_COLUMNS])) for row in rows}
    changed = {row_id: sha for row_id, sha in final.items() if sha != before.get(row_id)}
    return {
        "rows": len(final),
        "rows_with_new_text": len(changed),
        "unique_texts": len(set(changed.values())),
        "rows_not_at_final_text": sum(stored.get(row_id) != sha for row_id, sha in final.items()),
    }


# --- pgai ------------------------------------------------------------------------------------------------


async def pgai_counts(admin_dsn: str, api_url: str, rows: int, edits: int, seed: int) -> dict[str, Any]:
    """pgai on the same workload, through pgai_peer.pgai_efficiency (same inserts, same burst, same API)."""
    try:
        import pgai_peer
    except ImportError as exc:
        return {"placeholder": f"bench/pgai_peer.py not importable: {exc}"}
    if not hasattr(pgai_peer, "pgai_efficiency"):
        return {"placeholder": "bench/pgai_peer.py has no pgai_efficiency(): pgai not measured"}
    # One statement per row, which pgai_efficiency reads row ids from: the same transactions, row changes
    # and texts as the daemon's run. Same batch as the daemon's, so the request counts compare like for like.
    workload = burst_rounds(rows, edits, seed, statement_per_row=True)
    result: dict[str, Any] = await pgai_peer.pgai_efficiency(
        admin_dsn, api_url, rows, edits, seed, batch_size=BATCH, workload=workload
    )
    result["tool"] = f"pgai {pgai_peer.PGAI_VERSION}"
    result["how"] = f"run: pgai vectorizer worker, processing batch_size {BATCH}, common.burst_rounds"
    return result


# --- the run ---------------------------------------------------------------------------------------------


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Per-phase differences of the counters (source labels unwrapped for the report)."""

    def metric(name: str) -> float:
        return after["daemon"].get(name, 0.0) - before["daemon"].get(name, 0.0)

    events = {source: int(metric(f'vector_sync_events_total{{source="{source}"}}')) for source in (*SOURCES, "drift")}
    offers = {
        result: int(metric(f'vector_sync_offers_total{{result="{result}"}}'))
        for result in ("accepted", "duplicate", "cancelled", "full")
    }
    answers = {
        key.split('"')[1]: int(metric(key))
        for key in after["daemon"]
        if key.startswith("vector_sync_webhook_responses")
    }
    return {
        "requests": after["api"]["requests"] - before["api"]["requests"],
        "inputs": after["api"]["inputs"] - before["api"]["inputs"],
        "daemon_requests": int(metric("vector_sync_embedding_requests_total")),
        "daemon_inputs": int(metric("vector_sync_embedding_inputs_total")),
        "vectors_stored": int(metric("vector_sync_vectors_stored_total")),
        "unchanged_skipped": int(metric("vector_sync_skipped_unchanged_total")),
        "events": events,
        "offers": offers,
        "webhook_answers": answers,
        "realtime_events_sent": after["realtime_events_sent"] - before["realtime_events_sent"],
        "webhooks_sent": after["webhooks_taken"] - before["webhooks_taken"],
    }


async def measure_daemon(
    admin_dsn: str, api_url: str, rows: int, workload: list[list[Statement]], settle_delay: str
) -> dict[str, Any]:
    # No vector index: it changes nothing in what is sent, and its build cost would only slow the writes.
    dsn = await fresh_database(admin_dsn, DATABASE, hnsw=False)
    port = free_port()
    daemon_url = f"http://127.0.0.1:{port}"
    conn = await asyncpg.connect(dsn)
    try:
        secret = await configure_webhooks(conn, f"{daemon_url}/webhook")
        async with realtime_server(dsn) as realtime_url, webhook_sender(dsn) as worker:
            settings = {
                "VECTOR_SYNC_SOURCES": ",".join(SOURCES),
                "SUPABASE_URL": realtime_url,
                "SUPABASE_SERVICE_ROLE_KEY": tests_import("realtime_server").DEFAULT_API_KEY,
                "VECTOR_SYNC_WEBHOOK_SECRET": secret,
                "VECTOR_SYNC_HTTP_PORT": str(port),
                "VECTOR_SYNC_INSERT_DELAY": settle_delay,
                "VECTOR_SYNC_UPDATE_DELAY": settle_delay,
                "VECTOR_SYNC_ENCODING_FORMAT": "base64",
            }
            async with daemon(dsn, api_url, BATCH, **settings):
                # Ready means the Realtime feed is live (the server's "Subscribed to PostgreSQL"), so no
                # change below can be missed by that stream.
                await wait_ready(daemon_url)
                start = await counters(daemon_url, api_url, realtime_url, worker)
                progress(f"api_efficiency: daemon ready with {', '.join(SOURCES)}; inserting {rows} rows")
                data = texts(rows, 0)
                await run_workload(
                    conn,
                    [[(INSERT_SQL, row) for row in data[i : i + INSERT_CHUNK]] for i in range(0, rows, INSERT_CHUNK)],
                )
                loaded = await settle(conn, rows, daemon_url, api_url, realtime_url, worker)
                before = await embedded_shas(conn)
                changes = rows + workload_summary(workload)["updates"]
                progress(f"api_efficiency: burst of {len(workload)} transactions, {changes - rows} updates")
                started = time.monotonic()
                commits = await run_workload(conn, workload)
                burst = await settle(conn, changes, daemon_url, api_url, realtime_url, worker)
                settled = time.monotonic()
                expected = await expected_inputs(conn, before)
    finally:
        await conn.close()
    return {
        "load": delta(loaded, start),
        "burst": delta(burst, loaded),
        "expected": expected,
        "changes": {"load": rows, "burst": changes - rows},
        "burst_write_seconds": round(commits[-1] - started, 3),
        "first_to_last_commit_seconds": round(commits[-1] - commits[0], 3),
        "burst_settle_seconds": round(settled - started, 1),
        "webhook_delivery": burst["webhook_delivery"],
    }


def workload_summary(workload: Sequence[Sequence[Statement]]) -> dict[str, int]:
    """Row changes of the workload (a set-based statement counts once per row it changes)."""
    statements = [(sql, rows_of(args)) for transaction in workload for sql, args in transaction]
    return {
        "transactions": len(workload),
        "statements": len(statements),
        "updates": sum(count for _, count in statements),
        "stars_only": sum(count for sql, count in statements if not names_embedded_column(sql)),
        "new_description": sum(count for sql, count in statements if names_embedded_column(sql)),
    }


async def run(
    admin_dsn: str | None = None,
    rows: int = 1000,
    edits: int = 10,
    *,
    seed: int = 0,
    pgai: bool = True,
    api_url: str | None = None,
    settle_delay: str = SETTLE_DELAY,
) -> dict[str, Any]:
    """The measure on a server with `wal_level = logical` (a new embedded one when `admin_dsn` is None).

    `settle_delay` is the daemon's VECTOR_SYNC_INSERT_DELAY and _UPDATE_DELAY; `api_url` a test API shared
    with other benchmarks (bench/run_all), none of which may use it meanwhile: its counters are the measure."""
    if admin_dsn is None:
        with embedded_postgres_with("vs-bench-efficiency-", wal_level="logical") as admin:
            return await run(admin, rows, edits, seed=seed, pgai=pgai, api_url=api_url, settle_delay=settle_delay)
    conn = await asyncpg.connect(admin_dsn)
    try:
        if await conn.fetchval("show wal_level") != "logical":
            raise RuntimeError("the Realtime test server needs wal_level = logical (common.embedded_postgres_with)")
    finally:
        await conn.close()
    workload = burst_rounds(rows, edits, seed)
    result: dict[str, Any] = {
        "rows": rows,
        "edits_per_row": edits,
        "seed": seed,
        "batch": BATCH,
        "settle_delay": settle_delay,
        "stars_only_share": STARS_ONLY_SHARE,
        "workload": workload_summary(workload),
    }
    async with api_or_new(api_url) as api:
        daemon_result = await measure_daemon(admin_dsn, api, rows, workload, settle_delay)
        burst, expected = daemon_result["burst"], daemon_result["expected"]
        result["vector_sync"] = daemon_result
        result["bar"] = {
            "inputs_equal_unique_texts": burst["inputs"] == expected["unique_texts"],
            "requests_equal_ceil": burst["requests"] == math.ceil(burst["inputs"] / BATCH),
            "ceil_requests": math.ceil(burst["inputs"] / BATCH),
            "every_row_at_final_text": expected["rows_not_at_final_text"] == 0,
            # Every changed row's final text was sent at least once (its vector is of it) and the texts
            # are pairwise different, so inputs == unique texts leaves no room for a text sent twice. With
            # more inputs than that, the extra ones may be texts sent twice or texts a row had part-way
            # through the burst: the test API's counts cannot tell which (None).
            "no_text_sent_twice": (
                expected["rows_not_at_final_text"] == 0 if burst["inputs"] == expected["unique_texts"] else None
            ),
            "each_change_by_every_source": all(
                burst["events"][source] >= daemon_result["changes"]["burst"] for source in SOURCES
            ),
        }
        result["supabase_guide"] = supabase_guide(rows, workload)
        if pgai:
            progress("api_efficiency: pgai on the same workload")
            result["pgai"] = await pgai_counts(admin_dsn, api, rows, edits, seed)
        else:
            result["pgai"] = {"placeholder": "not run (--no-pgai)"}
    return result


def per_changed_row(requests: int, inputs: int, changed: int) -> str:
    return f"{inputs / changed:.2f} inputs, {requests / changed:.3f} requests" if changed else "n/a"


def render(result: dict[str, Any]) -> str:
    daemon_result = result["vector_sync"]
    burst, expected, bar = daemon_result["burst"], daemon_result["expected"], result["bar"]
    changed = expected["rows_with_new_text"]
    guide, pgai = result["supabase_guide"], result["pgai"]
    rows: list[list[object]] = [
        [
            "vector-sync (run)",
            burst["requests"],
            burst["inputs"],
            per_changed_row(burst["requests"], burst["inputs"], changed),
        ]
    ]
    if "burst" in pgai:
        b = pgai["burst"]
        rows.append(
            [
                f"{pgai['tool']} (run, batch {BATCH})",
                b["requests"],
                b["inputs"],
                per_changed_row(b["requests"], b["inputs"], changed),
            ]
        )
    else:
        rows.append(["pgai", "-", "-", pgai["placeholder"]])
    g = guide["burst"]
    rows.append(
        [
            "Supabase guide (computed, not run)",
            g["requests"],
            g["inputs"],
            per_changed_row(g["requests"], g["inputs"], changed),
        ]
    )
    rows.append(["bar: unique texts, ceil(inputs / batch)", bar["ceil_requests"], expected["unique_texts"], ""])
    work = result["workload"]
    load = daemon_result["load"]
    lines = [
        f"API efficiency: {result['rows']} rows x {result['edits_per_row']} edits in {work['transactions']} "
        f"transactions of {work['statements'] // max(1, work['transactions'])} statements "
        f"({work['stars_only']} stars-only, {work['new_description']} new descriptions), "
        f"batch {result['batch']}, settle delay {result['settle_delay']}",
        f"burst written in {daemon_result['burst_write_seconds']:.2f} s (first to last commit "
        f"{daemon_result['first_to_last_commit_seconds']:.2f} s), settled on every path after "
        f"{daemon_result['burst_settle_seconds']:.1f} s",
        "",
        "burst:",
        markdown_table(["tool", "requests", "inputs", "per changed row"], rows),
        "",
        markdown_table(
            ["check", "value", "bar", ""],
            [
                [
                    "inputs = unique embedded texts",
                    burst["inputs"],
                    expected["unique_texts"],
                    verdict(bar["inputs_equal_unique_texts"]),
                ],
                [
                    "requests = ceil(inputs / batch)",
                    burst["requests"],
                    bar["ceil_requests"],
                    verdict(bar["requests_equal_ceil"]),
                ],
                [
                    "every row current at its final text",
                    expected["rows_not_at_final_text"],
                    0,
                    verdict(bar["every_row_at_final_text"]),
                ],
                [
                    "no text sent twice",
                    "proved by the two rows above" if bar["no_text_sent_twice"] else "",
                    "",
                    "unknown: the API gives counts only"
                    if bar["no_text_sent_twice"] is None
                    else verdict(bar["no_text_sent_twice"]),
                ],
                [
                    "burst events by source (realtime / webhook / listen)",
                    " / ".join(str(burst["events"][source]) for source in SOURCES),
                    f"≥ {daemon_result['changes']['burst']} each",
                    verdict(bar["each_change_by_every_source"]),
                ],
            ],
        ),
        "",
        f"daemon's own counters in the burst: {burst['daemon_requests']} requests, "
        f"{burst['daemon_inputs']} inputs; offers {burst['offers']}; vectors stored {burst['vectors_stored']}, "
        f"unchanged text {burst['unchanged_skipped']}",
        f"webhooks: {burst['webhooks_sent']} sent by the stand-in in the burst, daemon answers "
        f"{burst['webhook_answers']}, log {daemon_result['webhook_delivery']}; Realtime events sent "
        f"{burst['realtime_events_sent']}",
        f"load phase ({daemon_result['changes']['load']} inserts): vector-sync {load['requests']} requests / "
        f"{load['inputs']} inputs, events {load['events']}; Supabase guide {guide['load']['requests']} / "
        f"{guide['load']['inputs']}"
        + (f"; pgai {pgai['load']['requests']} / {pgai['load']['inputs']}" if "load" in pgai else ""),
    ]
    if pgai.get("pgai_errors"):
        lines.append(f"pgai recorded and recovered from: {pgai['pgai_errors']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--edits", type=int, default=10, help="edits per row in the burst (one transaction each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settle-delay", default=SETTLE_DELAY, help="the daemon's insert and update delay")
    parser.add_argument("--no-pgai", action="store_true", help="leave out the pgai run")
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    args = parser.parse_args()
    started = time.monotonic()
    result = asyncio.run(
        run(None, args.rows, args.edits, seed=args.seed, pgai=not args.no_pgai, settle_delay=args.settle_delay)
    )
    print_result(result, started, args.json, render)


if __name__ == "__main__":
    main()
