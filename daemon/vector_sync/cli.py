"""`vector-sync` commands. Exit codes: 0 ok, 1 failure, 2 bad configuration."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncpg
from loguru import logger

from vector_sync import __version__, logs
from vector_sync.app import Daemon, FatalError, load_catalog
from vector_sync.config import ENV_NAMES, ConfigError, Settings, SourceName, load_settings, mask_dsn
from vector_sync.drift import DriftPass
from vector_sync.embedder import build_embedder
from vector_sync.events import IdKind
from vector_sync.lease import Lease
from vector_sync.metrics import Metrics
from vector_sync.migrations import (
    Catalog,
    SchemaError,
    load_migrations,
    migrate,
    quote_ident,
    read_catalog,
    read_source_table,
)
from vector_sync.pipeline import Pipeline
from vector_sync.scheduler import Scheduler
from vector_sync.sources.realtime import SessionEnded
from vector_sync.sources.realtime import probe as realtime_probe
from vector_sync.store import DATABASE_ERRORS, Store
from vector_sync.webhook_config import check_target, new_secret, store_webhook_target

CONNECTION_VARS = ["DATABASE_URL"]
# `reconcile` stops waiting for rows that failed this many times (a stuck database or API).
RECONCILE_ATTEMPTS = 3
EMBEDDING_VARS = [
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "embedder",
    "embedding_model",
    "embedding_dimensions",
    "encoding_format",
    "batch_size",
    "max_requests_per_second",
    "max_concurrent_requests",
    "request_timeout",
    "max_retries",
]
TABLE_VARS = ["table", "id_column", "content_columns"]
ALL_VARS = sorted(set(ENV_NAMES.values()))


def _env_help(names: list[str]) -> str:
    shown = [ENV_NAMES.get(name, name) for name in names]
    return (
        "environment variables read:\n  "
        + "\n  ".join(shown)
        + "\n  (a .env file in the working directory is read too)"
    )


def _configure_logging(settings: Settings | None) -> None:
    if settings is None:
        logs.setup(level=os.environ.get("VECTOR_SYNC_LOG_LEVEL", "INFO").upper())
    else:
        logs.setup(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())


def _settings(require_database: bool = True, require_embedder: bool = True, **overrides: Any) -> Settings:
    settings = load_settings(require_database=require_database, require_embedder=require_embedder, **overrides)
    _configure_logging(settings)
    return settings


# --- run -------------------------------------------------------------------------------------


async def _serve(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        # Only set the event: shutdown itself runs in the daemon's own order. A second Ctrl-C means
        # the operator will not wait for the grace period.
        if signum == signal.SIGINT and stop.is_set():
            logger.warning("second interrupt: exiting now")
            os._exit(130)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await Daemon(settings).run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def cmd_run(args: argparse.Namespace) -> int:
    if not args.embedded:
        return asyncio.run(_serve(_settings()))
    from vector_sync.embedded import EmbeddedPostgres, ensure_sample_table

    settings = _settings(require_database=False)
    server = EmbeddedPostgres(Path(args.data_dir).expanduser().resolve())
    try:
        dsn = server.start()
        settings = _settings(require_database=False, DATABASE_URL=dsn)

        async def prepare_and_serve() -> int:
            if await ensure_sample_table(dsn):
                logger.info("created the sample table public.projects in the embedded database")
            await _migrate(settings)
            return await _serve(settings)

        return asyncio.run(prepare_and_serve())
    finally:
        server.stop()


# --- migrate / sql ---------------------------------------------------------------------------


async def _migrate(settings: Settings) -> list[int]:
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    try:
        return [migration.number for migration in await migrate(conn, settings)]
    finally:
        await conn.close()


def _database_failure(action: str, exc: BaseException) -> int:
    logger.error("{action} failed: {error}: {detail}", action=action, error=type(exc).__name__, detail=str(exc))
    return 1


def cmd_migrate(_args: argparse.Namespace) -> int:
    settings = _settings(require_embedder=False)
    try:
        applied = asyncio.run(_migrate(settings))
    except (*DATABASE_ERRORS, SchemaError) as exc:
        return _database_failure("migrate", exc)
    logger.info("migrations up to date ({count} applied now)", count=len(applied))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    settings = _settings(require_database=False, require_embedder=False)
    version = tuple(int(part) for part in args.pgvector_version.split(".")[:3])
    catalog = Catalog(IdKind(args.id_type), args.vector_schema, version)
    if settings.database_url is not None and not args.offline:
        try:
            catalog = asyncio.run(_read_catalog_for_sql(settings, args.vector_schema))
        except (*DATABASE_ERRORS, SchemaError) as exc:
            return _database_failure("reading the catalog", exc)
    out = [
        "-- vector-sync migrations, rendered by `vector-sync sql`",
        f"create extension if not exists vector with schema {quote_ident(catalog.vector_schema)};",
        "create schema if not exists vector_sync;",
        "create table if not exists vector_sync.schema_migrations (number integer primary key, name text not null, "
        "checksum text not null, applied_at timestamptz not null default now());",
    ]
    for migration in load_migrations(settings, catalog):
        out.append(f"\n-- migration {migration.number:04d}_{migration.name}")
        out.append(migration.sql.rstrip())
        out.append(
            "insert into vector_sync.schema_migrations (number, name, checksum) values "
            f"({migration.number}, '{migration.name}', '{migration.checksum}') on conflict do nothing;"
        )
    print("\n".join(out))
    return 0


async def _read_catalog_for_sql(settings: Settings, vector_schema: str) -> Catalog:
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    try:
        try:
            return await read_catalog(conn, settings)
        except SchemaError:
            # No pgvector yet: render for the schema given, as the migration will create it.
            return Catalog(await read_source_table(conn, settings), vector_schema)
    finally:
        await conn.close()


# --- check -----------------------------------------------------------------------------------


async def _check(settings: Settings) -> int:
    failures = 0

    def line(ok: bool, name: str, detail: str) -> None:
        nonlocal failures
        failures += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'}  {name:<12} {detail}")

    line(True, "config", f"sources {','.join(sorted(s.value for s in settings.active_sources))}")
    assert settings.database_url is not None
    catalog = None
    try:
        catalog = await load_catalog(settings)
        line(True, "database", f"{mask_dsn(settings.database_url.get_secret_value())} (id {catalog.id_kind.value})")
    except FatalError as exc:
        line(False, "database", str(exc))
    embedder = build_embedder(settings)
    try:
        vectors = await embedder.embed(["vector-sync check"])
        ok = len(vectors[0]) == settings.embedding_dimensions
        line(
            ok,
            "embedding",
            f"{embedder.model}: {len(vectors[0])} dimensions (expected {settings.embedding_dimensions})",
        )
    except Exception as exc:
        line(False, "embedding", f"{type(exc).__name__}: {exc}")
    finally:
        await embedder.close()
    if SourceName.REALTIME in settings.active_sources:
        assert settings.supabase_url is not None and settings.supabase_key is not None
        try:
            took = await realtime_probe(
                settings.supabase_url,
                settings.supabase_key.get_secret_value(),
                schema=settings.table.schema,
                table=settings.table.name,
                timeout=settings.realtime_ready_timeout,
            )
            line(True, "realtime", f"subscribed to {settings.table} (server ready in {took * 1000:.0f}ms)")
        except SessionEnded as exc:
            line(False, "realtime", str(exc))
    else:
        print("skip  realtime     not a configured source")
    return 1 if failures else 0


def cmd_check(_args: argparse.Namespace) -> int:
    return asyncio.run(_check(_settings()))


# --- reconcile / status / search -------------------------------------------------------------


async def _with_store(
    settings: Settings, work: Callable[[Store, Catalog], Coroutine[Any, Any, int]], *, embeds: bool = True
) -> int:
    try:
        catalog = await load_catalog(settings, embeds=embeds)
        store = await Store.connect(settings, catalog)
    except FatalError as exc:
        logger.error("{error}", error=str(exc))
        return 1
    try:
        return await work(store, catalog)
    finally:
        await store.close()


async def _reconcile(settings: Settings, store: Store, _catalog: Catalog, *, replay: bool) -> int:
    assert settings.database_url is not None
    lease = Lease(settings.database_url.get_secret_value(), settings.table)
    if not await lease.try_acquire():
        # A leading daemon does this work itself (its drift pass); both at once would pay twice.
        print(
            "vector-sync: a running daemon holds the lease for this table and embeds what is stale itself; "
            "stop it first, or restart it to have its drift pass run now",
            file=sys.stderr,
        )
        return 1
    try:
        if replay:
            replayed = await store.clear_dead_letters()
            print(f"{replayed} dead letters cleared: their rows are tried again", file=sys.stderr)
        return await _reconcile_holding_lease(settings, store)
    finally:
        await lease.release()


async def _reconcile_holding_lease(settings: Settings, store: Store) -> int:
    embedder = build_embedder(settings)
    scheduler = Scheduler(insert_delay=0, update_delay=0, max_pending=settings.max_pending)
    pipeline = Pipeline(
        scheduler=scheduler,
        store=store,
        embedder=embedder,
        metrics=Metrics(),
        batch_size=settings.batch_size,
        max_concurrent_batches=settings.max_concurrent_requests,
    )
    stop = asyncio.Event()
    runner = asyncio.create_task(pipeline.run(stop))
    found = 0

    def progress(count: int) -> None:
        nonlocal found
        found = count

    drift = asyncio.create_task(DriftPass(store, scheduler, scheduler.offer).run_once("reconcile", progress, stop))
    gave_up = ""
    try:
        while not drift.done() or not scheduler.is_idle() or pipeline.busy:
            _progress_bar(found - scheduler.pending_count - scheduler.in_flight_count, found)
            if pipeline.paused:
                gave_up = "embedding is paused (see the log)"
            elif scheduler.stalled(RECONCILE_ATTEMPTS):
                gave_up = f"rows still failing after {RECONCILE_ATTEMPTS} attempts (see the log)"
            if gave_up:
                break
            await asyncio.sleep(0.2)
        else:
            _progress_bar(found, found)
        print(file=sys.stderr)
    finally:
        stop.set()
        await asyncio.gather(runner, drift, return_exceptions=True)
        await pipeline.drain(settings.shutdown_grace)
        await embedder.close()
    still = await store.drift_page(None, 1)
    outcome = "all current" if not still else f"some remain: {gave_up or 'see the log'}"
    print(f"reconcile: {found} rows were missing or behind; {outcome}")
    return 1 if still else 0


def _progress_bar(done: int, total: int, width: int = 40) -> None:
    share = 1.0 if total == 0 else done / total
    filled = int(width * share)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} rows")
    sys.stderr.flush()


def cmd_reconcile(args: argparse.Namespace) -> int:
    settings = _settings()
    return asyncio.run(
        _with_store(settings, lambda store, catalog: _reconcile(settings, store, catalog, replay=args.replay))
    )


async def _status(store: Store, _catalog: Catalog) -> int:
    status = await store.status()
    rows = [
        ("rows", status.rows),
        ("embedded", status.embedded),
        ("current", status.current),
        ("stale", status.stale),
        ("missing", status.missing),
        ("pending webhooks", status.pending_webhooks),
        ("dead letters", status.dead_letters),
        (
            "oldest stale",
            "-" if status.oldest_stale_seconds is None else f"{status.oldest_stale_seconds:.0f}s",
        ),
    ]
    webhooks = status.webhook_summary()
    rows += [
        ("webhooks delivered", webhooks["delivered"]),
        ("webhooks retrying", webhooks["retrying"]),
        ("webhooks exhausted", webhooks["exhausted"]),
        ("changes not sent", webhooks["not_sent"]),
    ]
    for name, value in rows:
        print(f"{name:<20}{value:>12}")
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    settings = _settings(require_embedder=False)
    return asyncio.run(_with_store(settings, _status, embeds=False))


async def _search(settings: Settings, store: Store, text: str, limit: int) -> int:
    embedder = build_embedder(settings)
    try:
        vector = (await embedder.embed([text]))[0]
    finally:
        await embedder.close()
    hits = await store.search(vector, limit)
    for hit in hits:
        first_line = hit.text.splitlines()[0] if hit.text else ""
        print(f"{hit.similarity:6.3f}  {hit.project_id:<12} {first_line[:80]}")
    if not hits:
        print("no results")
    return 0


async def _configure_webhook(settings: Settings, url: str, secret: str) -> int:
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
    try:
        if await conn.fetchval("select to_regclass('vector_sync.config') is null"):
            print("vector-sync: run `vector-sync migrate` first", file=sys.stderr)
            return 1
        where = await store_webhook_target(conn, url, secret)
        sender = await conn.fetchval("select vector_sync.pg_net_installed()")
    finally:
        await conn.close()
    place = "Supabase Vault" if where == "vault" else "vector_sync.config (no Vault here)"
    print(f"stored the webhook URL and signing secret in {place}", file=sys.stderr)
    if not sender:
        print("pg_net is not installed: changes are logged but not sent until it is", file=sys.stderr)
    print("put this in the daemon's environment:", file=sys.stderr)
    print(f"VECTOR_SYNC_WEBHOOK_SECRET={secret}")
    return 0


def cmd_webhook_configure(args: argparse.Namespace) -> int:
    settings = _settings(require_embedder=False)
    secret = args.secret or new_secret()
    try:
        check_target(args.url, secret)
    except ValueError as exc:
        raise ConfigError([f"--url/--secret: {exc}"]) from None
    return asyncio.run(_configure_webhook(settings, args.url, secret))


def cmd_search(args: argparse.Namespace) -> int:
    settings = _settings()
    return asyncio.run(_with_store(settings, lambda store, _c: _search(settings, store, args.text, args.limit)))


def cmd_mcp(args: argparse.Namespace) -> int:
    # Imported here: only this command needs the MCP SDK (and uvicorn).
    from vector_sync.mcp_server import serve

    return serve(_settings(), http=args.http, host=args.host, port=args.port)


def cmd_demo(args: argparse.Namespace) -> int:
    from vector_sync.demo import run_demo

    logs.setup(level=os.environ.get("VECTOR_SYNC_LOG_LEVEL", "WARNING").upper())
    code: int = run_demo(keep=args.keep)
    return code


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vector-sync",
        description="Keeps pgvector embeddings of a table in step with its rows, driven by events.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vector-sync {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, handler: Callable[[argparse.Namespace], int], env: list[str]):  # type: ignore[no-untyped-def]
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_env_help(env),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    run = add("run", "run the daemon until SIGTERM or SIGINT", cmd_run, ALL_VARS)
    run.add_argument("--embedded", action="store_true", help="start a local embedded Postgres with pgvector and use it")
    run.add_argument(
        "--data-dir", default="./.vector-sync/pgdata", help="data directory for --embedded (default: %(default)s)"
    )
    add(
        "migrate",
        "apply the sql/ migrations to DATABASE_URL",
        cmd_migrate,
        CONNECTION_VARS + TABLE_VARS + ["embedding_dimensions"],
    )
    sql = add(
        "sql", "print the rendered migration SQL", cmd_sql, CONNECTION_VARS + TABLE_VARS + ["embedding_dimensions"]
    )
    sql.add_argument(
        "--id-type",
        choices=[kind.value for kind in IdKind],
        default="uuid",
        help="id type when not read from DATABASE_URL",
    )
    sql.add_argument("--vector-schema", default="extensions", help="schema of pgvector when not read from the database")
    sql.add_argument("--offline", action="store_true", help="do not read the catalog even when DATABASE_URL is set")
    sql.add_argument(
        "--pgvector-version",
        default="0.8.0",
        help="pgvector version when not read from the database; below 0.8 match_projects scans without "
        "hnsw.iterative_scan (default: %(default)s)",
    )
    add("check", "validate configuration and reach the database, the embedding API and Realtime", cmd_check, ALL_VARS)
    add(
        "reconcile",
        "embed every row whose vector is missing or behind, then exit",
        cmd_reconcile,
        CONNECTION_VARS + TABLE_VARS + EMBEDDING_VARS,
    ).add_argument(
        "--all",
        action="store_true",
        dest="replay",
        help="also retry rows in vector_sync.dead_letters (rows from another model are always re-embedded)",
    )
    add(
        "status",
        "print counts: rows, embedded, stale, pending webhooks, dead letters",
        cmd_status,
        CONNECTION_VARS + TABLE_VARS,
    )
    webhook = commands.add_parser("webhook", help="the database's webhook sender (pg_net)")
    webhook_commands = webhook.add_subparsers(dest="webhook_command", required=True, metavar="COMMAND")
    configure = webhook_commands.add_parser(
        "configure",
        help="store the URL and signing secret the SQL trigger sends with, and print the secret",
        description="Store the daemon's /webhook URL and the signing secret where the database's sender reads "
        "them (Supabase Vault, else vector_sync.config), and print the secret for the daemon's environment.",
        epilog=_env_help(CONNECTION_VARS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure.add_argument(
        "--url", required=True, help="the daemon's webhook route, e.g. https://sync.example.com/webhook"
    )
    configure.add_argument("--secret", help="a Standard Webhooks secret (whsec_<base64>); a new one when omitted")
    configure.set_defaults(handler=cmd_webhook_configure)
    search = add(
        "search", "print the projects nearest to TEXT", cmd_search, CONNECTION_VARS + TABLE_VARS + EMBEDDING_VARS
    )
    search.add_argument("text", metavar="TEXT")
    search.add_argument("--limit", type=int, default=10, help="how many results (default: %(default)s)")
    mcp = add(
        "mcp",
        "serve semantic search over the projects to MCP clients (read-only): stdio, or HTTP with --http",
        cmd_mcp,
        CONNECTION_VARS
        + TABLE_VARS
        + EMBEDDING_VARS
        + ["pool_size", "VECTOR_SYNC_MCP_TOKEN", "log_level", "log_format"],
    )
    mcp.add_argument(
        "--http",
        action="store_true",
        help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio; every request needs "
        "Authorization: Bearer $VECTOR_SYNC_MCP_TOKEN, and it refuses to start without that variable",
    )
    mcp.add_argument("--host", default="127.0.0.1", help="address to listen on with --http (default: %(default)s)")
    mcp.add_argument("--port", type=int, default=8766, help="port to listen on with --http (default: %(default)s)")
    demo = add(
        "demo",
        "embedded Postgres + sample projects + the daemon, end to end; no account needed",
        cmd_demo,
        ["OPENAI_API_KEY", "OPENAI_BASE_URL"],
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo's data directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"vector-sync: configuration error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
