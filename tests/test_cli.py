"""The `vector-sync` commands as a user runs them: real subprocesses, real database, real test API."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
from embedding_api import EmbeddingAPI, Fault
from realtime_server import RealtimeServer
from support import API_KEY, DIMENSIONS, REALTIME_API_KEY, WEBHOOK_SECRET, all_current, wait_until


def base_env(**values: str) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "PYTHONUNBUFFERED": "1"}
    env.update(values)
    return env


def daemon_env(dsn: str, api: EmbeddingAPI, **values: str) -> dict[str, str]:
    return base_env(
        DATABASE_URL=dsn,
        OPENAI_API_KEY=API_KEY,
        OPENAI_BASE_URL=api.url,
        VECTOR_SYNC_EMBEDDING_DIMENSIONS=str(DIMENSIONS),
        **values,
    )


def served_env(dsn: str, api: EmbeddingAPI, port: int, **values: str) -> dict[str, str]:
    """`daemon_env` for a `vector-sync run` serving on 127.0.0.1:`port`, webhooks on, no insert delay."""
    return daemon_env(
        dsn,
        api,
        VECTOR_SYNC_HTTP_HOST="127.0.0.1",
        VECTOR_SYNC_HTTP_PORT=str(port),
        VECTOR_SYNC_WEBHOOK_SECRET=WEBHOOK_SECRET,
        VECTOR_SYNC_INSERT_DELAY="0s",
        **values,
    )


async def vector_sync(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vector_sync",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def serving(*args: str, env: dict[str, str]) -> AsyncIterator[asyncio.subprocess.Process]:
    """`vector-sync ARGS` as a long-running subprocess (stderr captured); killed if a test leaves it running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vector_sync", *args, env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def ready(port: int) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/readyz") as response,
        ):
            return response.status == 200
    except aiohttp.ClientError:
        return False


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_migrate_is_idempotent_from_the_command_line(pg_server: str) -> None:
    from support import PROJECTS_SQL, create_database

    dsn = await create_database(pg_server, template="template0")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(PROJECTS_SQL)
        env = base_env(DATABASE_URL=dsn, VECTOR_SYNC_EMBEDDING_DIMENSIONS=str(DIMENSIONS))
        first, second = await asyncio.gather(vector_sync("migrate", env=env), vector_sync("migrate", env=env))
        assert first[0] == 0 and second[0] == 0, first[2] + second[2]
        applied = await conn.fetch("select number from vector_sync.schema_migrations order by number")
        assert [row["number"] for row in applied] == [1, 2, 3]  # each applied once, though both ran at once
        code, _, err = await vector_sync("migrate", env=env)
        assert code == 0 and "0 applied now" in err
    finally:
        await conn.close()


async def test_migrate_fails_cleanly_without_the_table(pg_server: str) -> None:
    from support import create_database

    dsn = await create_database(pg_server, template="template0")
    code, _, err = await vector_sync("migrate", env=base_env(DATABASE_URL=dsn))
    assert code == 1
    assert "public.projects does not exist" in err


async def test_reconcile_status_and_search(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    await db.executemany(
        "insert into projects (name, description) values ($1, $2)",
        [(f"project {i}", f"about topic {i}") for i in range(30)],
    )
    env = daemon_env(dsn, api)
    code, out, err = await vector_sync("status", env=env)
    assert code == 0, err
    assert "missing" in out and " 30" in out
    code, out, err = await vector_sync("reconcile", env=env)
    assert code == 0, err
    assert "30 rows were missing or behind; all current" in out
    assert "30/30" in err  # the progress bar
    assert await all_current(db)
    code, out, _ = await vector_sync("status", env=env)
    assert [line.split()[-1] for line in out.splitlines()[:5]] == ["30", "30", "30", "0", "0"]
    code, out, err = await vector_sync("search", "project 7\n\nabout topic 7", "--limit", "3", env=env)
    assert code == 0, err
    assert out.splitlines()[0].split()[0] == "1.000"  # the identical text is the nearest
    assert "project 7" in out.splitlines()[0]


async def test_check_reports_each_part(dsn: str, api: EmbeddingAPI) -> None:
    code, out, err = await vector_sync("check", env=daemon_env(dsn, api))
    assert code == 0, out + err
    assert out.splitlines()[0].startswith("ok")
    assert any(line.startswith("ok") and "embedding" in line for line in out.splitlines())
    api.script(*[Fault.server_error(500) for _ in range(10)])
    code, out, _ = await vector_sync("check", env=daemon_env(dsn, api, VECTOR_SYNC_MAX_RETRIES="0"))
    assert code == 1
    assert any(line.startswith("FAIL") and "embedding" in line for line in out.splitlines())
    code, out, _ = await vector_sync("check", env=daemon_env("postgresql://nobody@127.0.0.1:1/none", api))
    assert code == 1
    assert any(line.startswith("FAIL") and "database" in line for line in out.splitlines())


async def test_run_serves_and_stops_cleanly_on_sigterm(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    port = free_port()
    env = served_env(dsn, api, port, VECTOR_SYNC_LOG_FORMAT="json")
    async with serving("run", env=env) as process:
        await wait_until(lambda: ready(port), what="/readyz to answer 200")
        await db.execute("insert into projects (name, description) values ('Stargazer', 'planets tonight')")
        await wait_until(lambda: all_current(db), what="the insert to be embedded by the subprocess")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    assert process.stderr is not None
    log = (await process.stderr.read()).decode()
    assert '"message": "stopped in' in log
    assert API_KEY not in log and WEBHOOK_SECRET not in log


async def test_run_fails_fast_when_migrations_are_missing(pg_server: str) -> None:
    from support import PROJECTS_SQL, create_database

    dsn = await create_database(pg_server, template="template0")
    conn = await asyncpg.connect(dsn)
    await conn.execute("create extension vector")
    await conn.execute(PROJECTS_SQL)
    await conn.close()
    code, _, err = await vector_sync("run", env=base_env(DATABASE_URL=dsn, VECTOR_SYNC_EMBEDDER="hash"))
    assert code == 1
    assert "vector-sync migrate" in err


async def test_run_embedded_starts_its_own_postgres(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(VECTOR_SYNC_EMBEDDER="hash", VECTOR_SYNC_HTTP_HOST="127.0.0.1", VECTOR_SYNC_HTTP_PORT=str(port))
    async with serving("run", "--embedded", "--data-dir", str(tmp_path / "pgdata"), env=env) as process:
        await wait_until(lambda: ready(port), timeout=60, what="the embedded daemon to be ready")
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), timeout=60) == 0
    assert (tmp_path / "pgdata" / "PG_VERSION").exists()


async def test_demo_runs_end_to_end() -> None:
    code, out, err = await vector_sync("demo", env=base_env(), timeout=60)
    assert code == 0, out + err
    assert "all 30 embedded" in out
    assert "skipped as unchanged" in out
    assert "vector removed" in out
    assert "deduplicated" in out
    assert "Birdsong" in out.split('search "bird recordings":')[1].splitlines()[1]
    assert "temporary files removed" in out


async def test_reconcile_gives_up_when_embedding_is_paused(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    await db.execute("insert into projects (name, description) values ('a', 'b')")
    api.script(Fault.quota())
    code, out, _ = await vector_sync("reconcile", env=daemon_env(dsn, api), timeout=60)
    assert code == 1
    assert "some remain: embedding is paused" in out
    assert api.request_count == 1


# A stand-in with Supabase Vault's SQL surface: create_secret, update_secret, decrypted_secrets.
VAULT_STAND_IN = """
create schema vault;
create table vault.secrets (
  id uuid primary key default gen_random_uuid(), name text unique, secret text, description text);
create function vault.create_secret(new_secret text, new_name text default null, new_description text default '')
returns uuid language sql as $$
  insert into vault.secrets (name, secret, description) values (new_name, new_secret, new_description) returning id
$$;
create function vault.update_secret(secret_id uuid, new_secret text default null, new_name text default null,
                                    new_description text default null)
returns void language sql as $$
  update vault.secrets set secret = coalesce(new_secret, secret) where id = secret_id
$$;
create view vault.decrypted_secrets as select id, name, secret as decrypted_secret from vault.secrets;
"""


async def test_webhook_configure_stores_url_and_secret_where_the_trigger_reads_them(
    db: asyncpg.Connection, dsn: str
) -> None:
    env = base_env(DATABASE_URL=dsn)
    code, out, err = await vector_sync("webhook", "configure", "--url", "https://sync.example.com/webhook", env=env)
    assert code == 0, err
    printed = out.strip()
    assert printed.startswith("VECTOR_SYNC_WEBHOOK_SECRET=whsec_")
    secret = printed.split("=", 1)[1]
    assert "vector_sync.config" in err and "pg_net is not installed" in err
    assert (
        await db.fetchval("select vector_sync.secret('vector_sync_webhook_url')") == "https://sync.example.com/webhook"
    )
    assert await db.fetchval("select vector_sync.secret('vector_sync_webhook_secret')") == secret
    # Again with a given secret: replaced, not duplicated.
    code, out, err = await vector_sync(
        "webhook", "configure", "--url", "http://10.0.0.5:8080/webhook", "--secret", WEBHOOK_SECRET, env=env
    )
    assert code == 0, err
    assert out.strip() == f"VECTOR_SYNC_WEBHOOK_SECRET={WEBHOOK_SECRET}"
    assert await db.fetchval("select vector_sync.secret('vector_sync_webhook_secret')") == WEBHOOK_SECRET
    assert await db.fetchval("select count(*) from vector_sync.config where key like 'secret:%'") == 2
    # Bad input is a configuration error; nothing is stored.
    code, _, err = await vector_sync("webhook", "configure", "--url", "ftp://x/webhook", env=env)
    assert code == 2 and "http(s) URL" in err
    code, _, err = await vector_sync("webhook", "configure", "--url", "https://x/webhook", "--secret", "nope", env=env)
    assert code == 2 and "whsec_" in err
    assert await db.fetchval("select vector_sync.secret('vector_sync_webhook_url')") == "http://10.0.0.5:8080/webhook"


async def test_webhook_configure_uses_vault_when_it_is_installed(db: asyncpg.Connection, dsn: str) -> None:
    await db.execute(VAULT_STAND_IN)
    await db.execute("insert into vector_sync.config values ('secret:vector_sync_webhook_url', 'http://stale/webhook')")
    env = base_env(DATABASE_URL=dsn)
    for url in ("https://one.example.com/webhook", "https://two.example.com/webhook"):
        code, out, err = await vector_sync("webhook", "configure", "--url", url, env=env)
        assert code == 0, err
        assert "Supabase Vault" in err
    rows = {row[0]: row[1] for row in await db.fetch("select name, secret from vault.secrets")}
    assert rows["vector_sync_webhook_url"] == "https://two.example.com/webhook"
    assert rows["vector_sync_webhook_secret"] == out.strip().split("=", 1)[1]
    assert await db.fetchval("select count(*) from vector_sync.config where key like 'secret:%'") == 0
    assert (
        await db.fetchval("select vector_sync.secret('vector_sync_webhook_url')") == "https://two.example.com/webhook"
    )


async def test_status_counts_webhook_deliveries(db: asyncpg.Connection, dsn: str) -> None:
    await db.execute("insert into projects (name) select 'p' || n from generate_series(1, 6) n")
    await db.execute(
        """
        update vector_sync.webhook_logs set status = case
          when id <= 2 then 'delivered' when id = 3 then 'retry_wait' when id = 4 then 'in_flight'
          when id = 5 then 'exhausted' else status end
        """
    )
    await db.execute(
        "insert into vector_sync.pending_webhooks (log_id, project_id, event_type, source_version, attempts)"
        " select id, project_id, event_type, source_version, 4 from vector_sync.webhook_logs where id = 5"
    )
    code, out, err = await vector_sync("status", env=base_env(DATABASE_URL=dsn))
    assert code == 0, err
    counts = {line.rsplit(None, 1)[0]: line.rsplit(None, 1)[1] for line in out.splitlines()}
    assert counts["pending webhooks"] == "1"
    assert counts["webhooks delivered"] == "2"
    assert counts["webhooks retrying"] == "2"
    assert counts["webhooks exhausted"] == "1"
    assert counts["changes not sent"] == "1"


async def test_check_subscribes_to_realtime(live_dsn: str, live_server: RealtimeServer, api: EmbeddingAPI) -> None:
    env = daemon_env(
        live_dsn,
        api,
        VECTOR_SYNC_SOURCES="realtime",
        SUPABASE_URL=live_server.url,
        SUPABASE_SERVICE_ROLE_KEY=REALTIME_API_KEY,
    )
    code, out, err = await vector_sync("check", env=env)
    assert code == 0, out + err
    assert any(line.startswith("ok") and "realtime" in line and "subscribed" in line for line in out.splitlines())
    code, out, _ = await vector_sync("check", env={**env, "SUPABASE_SERVICE_ROLE_KEY": "wrong-key"})
    assert code == 1
    assert any(line.startswith("FAIL") and "realtime" in line for line in out.splitlines())


async def test_run_waits_for_an_unreachable_database_then_exits_1(tmp_path: Path) -> None:
    env = base_env(
        DATABASE_URL=f"postgresql://nobody@127.0.0.1:{free_port()}/none",
        VECTOR_SYNC_EMBEDDER="hash",
        VECTOR_SYNC_STARTUP_TIMEOUT="2s",
    )
    started = asyncio.get_running_loop().time()
    code, _, err = await vector_sync("run", env=env, timeout=60)
    took = asyncio.get_running_loop().time() - started
    assert code == 1
    assert took >= 2
    assert "cannot reach the database yet" in err  # it did retry
    assert sum("cannot start: cannot reach the database (for 2s)" in line for line in err.splitlines()) == 1


async def test_reconcile_all_replays_dead_letters_and_refuses_while_a_daemon_leads(
    db: asyncpg.Connection, dsn: str, api: EmbeddingAPI
) -> None:
    from support import make_settings, running

    await db.execute("insert into projects (name, description) values ('fine', 'text'), ('bad', 'POISON pill')")
    env = daemon_env(dsn, api)
    await vector_sync("reconcile", env=env, timeout=60)
    assert await db.fetchval("select count(*) from vector_sync.dead_letters") == 1
    # The API stops refusing that text (a fixed model server, a raised limit): --all tries it again.
    api.poison = None
    await vector_sync("reconcile", env=env, timeout=60)
    assert await db.fetchval("select count(*) from vector_sync.dead_letters") == 1  # plain reconcile skips it
    code, _, err = await vector_sync("reconcile", "--all", env=env, timeout=60)
    assert code == 0, err
    assert "1 dead letters cleared" in err
    assert await all_current(db)
    assert await db.fetchval("select count(*) from vector_sync.dead_letters") == 0
    # While a daemon holds the lease, reconcile leaves the work to it instead of paying twice.
    async with running(make_settings(dsn, api.url)):
        code, _, err = await vector_sync("reconcile", env=env, timeout=60)
    assert code == 1
    assert "holds the lease" in err


async def test_sigterm_while_waiting_for_the_database_is_a_clean_stop(tmp_path: Path) -> None:
    env = base_env(
        DATABASE_URL=f"postgresql://nobody@127.0.0.1:{free_port()}/none",
        VECTOR_SYNC_EMBEDDER="hash",
        VECTOR_SYNC_STARTUP_TIMEOUT="5m",
    )
    async with serving("run", env=env) as process:
        assert process.stderr is not None
        first = await asyncio.wait_for(process.stderr.readline(), timeout=30)
        assert b"cannot reach the database yet" in first
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0


async def test_run_refuses_a_vector_size_other_than_the_columns(dsn: str, api: EmbeddingAPI) -> None:
    env = {**daemon_env(dsn, api, VECTOR_SYNC_HTTP_PORT="0"), "VECTOR_SYNC_EMBEDDING_DIMENSIONS": str(DIMENSIONS * 2)}
    code, _, err = await vector_sync("run", env=env, timeout=60)
    assert code == 1
    assert f"holds {DIMENSIONS}-dimension vectors but VECTOR_SYNC_EMBEDDING_DIMENSIONS is {DIMENSIONS * 2}" in err
