"""Idle cost: what the daemon spends while nothing changes, with every source it can run here on.

Target: 60 s idle after warm-up, all sources on: 0 queries from the daemon, < 0.5 % of a core,
RSS ≤ 120 MB.

The daemon runs as a real subprocess with LISTEN, the webhook listener and, where the server has
`wal_level = logical`, Realtime (the Realtime test server, `tests/realtime_server.py`, fed by
logical decoding of the same database). Warm-up: a few inserts, updates and a delete, announced by
every source (the webhooks are signed and posted by this script, as pg_net would), until every row
is current. Then the daemon is left alone for `--seconds` and measured:

- queries: `pg_stat_statements` (needs `shared_preload_libraries`; the standalone run starts a server
  with it), the delta of `calls` filtered by the daemon's own login role (`userid`) and database
  (`dbid`). The daemon connects as a role of its own, so the Realtime server's slot polls (10 a
  second) and this script's snapshots (both as `postgres`) are not counted. Cross-check without
  the extension: `pg_stat_activity` of that role — any backend that started a query or connected
  during the window. `pg_stat_database` transactions of the database are shown for context only:
  they include the Realtime server's polls and these snapshots.
- CPU: utime + stime of /proc/<pid>/stat over the window, as % of one core.
- memory: VmRSS at the end and VmHWM (peak since start) from /proc/<pid>/status, in MB (10^6 B).

Keepalives are allowed and are not queries: the Realtime heartbeat (every 25 s) and our websocket
ping (every 10 s), and the LISTEN and lease connections held open (TCP keepalive only on TCP).

    .venv/bin/python bench/idle_cost.py --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from common import (
    api_or_new,
    daemon_metrics,
    embedded_postgres_with,
    fresh_database,
    markdown_table,
    print_result,
    process_cpu_seconds,
    process_memory_mb,
    progress,
    realtime_server,
    tests_import,
    verdict,
    wait_all_current,
    wait_ready,
    webhook_daemon,
)

TARGET_QUERIES = 0
TARGET_CPU_PERCENT = 0.5
TARGET_RSS_MB = 120.0
DATABASE = "bench_idle"
DAEMON_ROLE = "vs_bench_idle_daemon"


def as_user(dsn: str, user: str) -> str:
    """The DSN with another login role (no password: the embedded server trusts local connections)."""
    parts = urllib.parse.urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{host}"))


async def server_capabilities(admin: str) -> dict[str, bool]:
    conn = await asyncpg.connect(admin)
    try:
        logical = await conn.fetchval("show wal_level") == "logical"
        preload = await conn.fetchval("show shared_preload_libraries")
        statements = "pg_stat_statements" in preload
        if statements:
            await conn.execute("create extension if not exists pg_stat_statements")
        await conn.execute(
            f"do $$ begin create role {DAEMON_ROLE} login superuser; exception when duplicate_object then null; end $$"
        )
    finally:
        await conn.close()
    return {"logical": logical, "statements": statements}


async def realtime_state(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_control/state") as response:
        body: dict[str, Any] = await response.json()
        state: dict[str, Any] = body["state"]
        return state


async def warm_up(conn: asyncpg.Connection, daemon_url: str, realtime_url: str | None) -> None:
    """Inserts, updates and a delete, each announced by every source, until all rows are current."""
    support = tests_import("support")
    inserted = await conn.fetch(
        "insert into projects (name, description) select 'warm ' || n, 'warm-up row ' || n "
        "from generate_series(1, 5) n returning id, version"
    )
    updated = await conn.fetch(
        "update projects set description = description || ' edited' where id = any($1::bigint[]) returning id, version",
        [row["id"] for row in inserted[:2]],
    )
    deleted = inserted[4]["id"]
    await conn.execute("delete from projects where id = $1", deleted)
    bodies = [support.webhook_body("INSERT", row["id"], 1) for row in inserted]
    bodies += [support.webhook_body("UPDATE", row["id"], row["version"]) for row in updated]
    bodies.append(support.webhook_body("DELETE", deleted, None))
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(f"{daemon_url}/webhook", data=body, headers=support.signed_headers(body)) as answer:
                if answer.status != 202:
                    raise RuntimeError(f"webhook answered {answer.status}: {await answer.text()}")
    await wait_all_current(conn, timeout=120)
    if realtime_url is not None:
        async with aiohttp.ClientSession() as session, session.get(f"{realtime_url}/_control/flush") as response:
            await response.read()


async def database_snapshot(admin: asyncpg.Connection, statements: bool) -> dict[str, Any]:
    """What the daemon's role did so far, read as `postgres` (which the filters leave out)."""
    snapshot: dict[str, Any] = {"at": await admin.fetchval("select clock_timestamp()")}
    if statements:
        rows = await admin.fetch(
            "select queryid, calls, left(regexp_replace(query, '\\s+', ' ', 'g'), 100) as query "
            "from pg_stat_statements s "
            "where s.userid = (select oid from pg_roles where rolname = $1) "
            "and s.dbid = (select oid from pg_database where datname = $2)",
            DAEMON_ROLE,
            DATABASE,
        )
        snapshot["statements"] = {row["queryid"]: (row["calls"], row["query"]) for row in rows}
    snapshot["backends"] = [
        dict(row)
        for row in await admin.fetch(
            "select pid, application_name, backend_start, query_start, state, "
            "left(regexp_replace(query, '\\s+', ' ', 'g'), 60) as query "
            "from pg_stat_activity where usename = $1 and datname = $2 order by pid",
            DAEMON_ROLE,
            DATABASE,
        )
    ]
    snapshot["transactions"] = await admin.fetchval(
        "select xact_commit + xact_rollback from pg_stat_database where datname = $1", DATABASE
    )
    return snapshot


def queries_between(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    ran = []
    for queryid, (calls, query) in after.get("statements", {}).items():
        delta = calls - before["statements"].get(queryid, (0, ""))[0]
        if delta:
            ran.append({"calls": delta, "query": query})
    return sorted(ran, key=lambda item: -item["calls"])


def backends_active(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """Daemon backends that connected or started a query during the window, or went away."""
    start = before["at"]
    active = [
        {"pid": b["pid"], "application_name": b["application_name"], "query": b["query"]}
        for b in after["backends"]
        if b["backend_start"] >= start or (b["query_start"] is not None and b["query_start"] >= start)
    ]
    remaining = {b["pid"] for b in after["backends"]}
    active += [
        {"pid": b["pid"], "application_name": b["application_name"], "query": "(disconnected)"}
        for b in before["backends"]
        if b["pid"] not in remaining
    ]
    return active


def thread_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def keepalives(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None

    def total(state: dict[str, Any], key: str) -> int:
        return sum(conn[key] for conn in state["connections"])

    return {
        "heartbeats": total(after, "heartbeats") - total(before, "heartbeats"),
        "frames_in": total(after, "frames_in") - total(before, "frames_in"),
        "handshakes": after["handshakes"] - before["handshakes"],
        "events_sent": after["events_sent"] - before["events_sent"],
    }


async def measure(
    admin: asyncpg.Connection, pid: int, seconds: float, statements: bool, realtime_url: str | None
) -> dict[str, Any]:
    realtime_before = await realtime_state(realtime_url) if realtime_url else None
    before = await database_snapshot(admin, statements)
    cpu_before, wall_before = process_cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu_after, wall_after = process_cpu_seconds(pid), time.monotonic()
    after = await database_snapshot(admin, statements)
    realtime_after = await realtime_state(realtime_url) if realtime_url else None
    memory = process_memory_mb(pid)
    cpu = cpu_after - cpu_before
    queries = queries_between(before, after) if statements else None
    return {
        "daemon_queries": sum(item["calls"] for item in queries) if queries is not None else None,
        "queries": queries,
        # The positive control: the same filter over start-up and warm-up.
        "daemon_queries_before_window": (
            sum(calls for calls, _ in before["statements"].values()) if statements else None
        ),
        "backends_active_in_window": backends_active(before, after),
        "backends_held": [f"{b['application_name']} ({b['state']})" for b in after["backends"]],
        "database_transactions_all_roles": after["transactions"] - before["transactions"],
        "cpu_seconds": round(cpu, 3),
        "cpu_percent_of_core": round(100 * cpu / (wall_after - wall_before), 3),
        "rss_mb": round(memory["VmRSS"], 1),
        "peak_rss_mb": round(memory["VmHWM"], 1),
        "threads": thread_count(pid),
        "realtime_keepalive": keepalives(realtime_before, realtime_after),
    }


async def run(
    admin_dsn: str,
    *,
    seconds: float = 60.0,
    settle: float = 3.0,
    realtime: bool = True,
    api_url: str | None = None,
) -> dict[str, Any]:
    """Warm up, then measure `seconds` of idleness. The server needs `wal_level = logical` for the
    Realtime source and `shared_preload_libraries = pg_stat_statements` for an exact query count
    (`common.embedded_postgres_with` starts one); without them it says what it left out."""
    capabilities = await server_capabilities(admin_dsn)
    dsn = await fresh_database(admin_dsn, DATABASE)
    notes = []
    use_realtime = realtime and capabilities["logical"]
    if realtime and not use_realtime:
        notes.append("realtime off: the server's wal_level is not logical")
    if not capabilities["statements"]:
        notes.append("pg_stat_statements not preloaded: no query count, pg_stat_activity check only")
    sources = ["listen", "webhook", *(["realtime"] if use_realtime else [])]
    settings = {"VECTOR_SYNC_SOURCES": ",".join(sources)}
    writer = await asyncpg.connect(dsn)
    observer = await asyncpg.connect(admin_dsn)  # the postgres database, where pg_stat_statements is
    try:
        async with api_or_new(api_url) as api, _realtime(dsn if use_realtime else None) as realtime_url:
            if realtime_url is not None:
                settings["SUPABASE_URL"] = realtime_url
                settings["SUPABASE_SERVICE_ROLE_KEY"] = tests_import("realtime_server").DEFAULT_API_KEY
            async with webhook_daemon(as_user(dsn, DAEMON_ROLE), api, 100, **settings) as (daemon_url, _, process):
                progress(f"idle_cost: daemon ready with {', '.join(sources)}; warming up")
                await warm_up(writer, daemon_url, realtime_url)
                warm = await daemon_metrics(daemon_url)
                await asyncio.sleep(settle)
                progress(f"idle_cost: idle for {seconds:.0f}s")
                result = await measure(observer, process.pid, seconds, capabilities["statements"], realtime_url)
                after = await daemon_metrics(daemon_url)
                ready = await wait_ready(daemon_url, timeout=10)
    finally:
        await writer.close()
        await observer.close()
    result.update(
        seconds=seconds,
        sources=sources,
        notes=notes,
        warm_up_events={s: warm.get(f'vector_sync_events_total{{source="{s}"}}', 0) for s in sources},
        events_in_window=sum(
            after.get(key, 0) - value for key, value in warm.items() if key.startswith("vector_sync_events_total")
        ),
        ready_after=ready.get("ready"),
        query_count_method=(
            f"pg_stat_statements calls, userid = {DAEMON_ROLE}, dbid = {DATABASE}"
            if capabilities["statements"]
            else "none (pg_stat_activity check only)"
        ),
    )
    queries_ok = not result["backends_active_in_window"] and result["daemon_queries"] in (0, None)
    result["targets"] = {
        "queries": queries_ok,
        "cpu": result["cpu_percent_of_core"] < TARGET_CPU_PERCENT,
        "rss": result["rss_mb"] <= TARGET_RSS_MB,
    }
    return result


@asynccontextmanager
async def _realtime(dsn: str | None) -> AsyncIterator[str | None]:
    if dsn is None:
        yield None
        return
    async with realtime_server(dsn) as url:
        yield url


def render(result: dict[str, Any]) -> str:
    targets = result["targets"]
    queries = "n/a" if result["daemon_queries"] is None else result["daemon_queries"]
    rows: list[list[object]] = [
        ["daemon queries (pg_stat_statements, its role and database)", queries, "0", verdict(targets["queries"])],
        [
            "daemon backends that queried or connected (pg_stat_activity)",
            len(result["backends_active_in_window"]),
            "0",
            verdict(targets["queries"]),
        ],
        [
            "daemon CPU (utime+stime)",
            f"{result['cpu_percent_of_core']:.3f} % of a core ({result['cpu_seconds']:.2f} s)",
            "< 0.5 %",
            verdict(targets["cpu"]),
        ],
        ["daemon RSS at the end (VmRSS)", f"{result['rss_mb']:.1f} MB", "≤ 120 MB", verdict(targets["rss"])],
        ["daemon peak RSS since start (VmHWM)", f"{result['peak_rss_mb']:.1f} MB", "(info)", ""],
    ]
    lines = [
        f"Idle cost: {result['seconds']:.0f} s idle after warm-up, sources {', '.join(result['sources'])}",
        "",
        markdown_table(["measure", "value", "target", ""], rows),
        "",
        f"daemon queries before the window (start-up and warm-up, same filter): "
        f"{result['daemon_queries_before_window']}",
        f"warm-up events by source: {result['warm_up_events']}; events during the window: "
        f"{result['events_in_window']:.0f}; ready after: {result['ready_after']}",
        f"connections held: {', '.join(result['backends_held'])}; threads: {result['threads']}",
        f"database-wide transactions in the window, all roles (Realtime server polls, these snapshots): "
        f"{result['database_transactions_all_roles']}",
    ]
    if result["realtime_keepalive"] is not None:
        lines.append(f"Realtime traffic in the window (keepalives, not queries): {result['realtime_keepalive']}")
    if result["queries"]:
        lines.append(f"queries the daemon ran: {result['queries']}")
    if result["backends_active_in_window"]:
        lines.append(f"backends active in the window: {result['backends_active_in_window']}")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the idle window")
    parser.add_argument("--settle", type=float, default=3.0, help="pause between warm-up and the window")
    parser.add_argument("--no-realtime", action="store_true", help="leave the Realtime source off")
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    args = parser.parse_args()
    started = time.monotonic()
    with embedded_postgres_with(
        "vs-bench-idle-", wal_level="logical", shared_preload_libraries="pg_stat_statements"
    ) as admin:
        result = asyncio.run(run(admin, seconds=args.seconds, settle=args.settle, realtime=not args.no_realtime))
    print_result(result, started, args.json, render)


if __name__ == "__main__":
    main()
