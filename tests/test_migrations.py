"""`migrate`, the rendered SQL and the database objects it creates, against embedded PostgreSQL.

Most tests start from an empty database (no pgvector, no `vector_sync`) so that what they check is
what `migrate` did, not what the shared template already had.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import vector_sync.migrations
from support import DIMENSIONS, PROJECTS_SQL, dsn_for, make_settings, wait_until
from vector_sync.config import ConfigError, Settings
from vector_sync.events import IdKind
from vector_sync.migrations import (
    MIGRATION_LOCK_KEY,
    Catalog,
    SchemaError,
    load_migrations,
    migrate,
    read_catalog,
)

CHANNEL = "vector_sync"
ADVISORY_LOCKS_HERE = (
    "select count(*) from pg_locks where locktype = 'advisory' "
    "and database = (select oid from pg_database where datname = current_database())"
)
_numbers = itertools.count()

FreshDatabase = Callable[..., Awaitable[str]]


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
async def fresh(pg_server: str) -> AsyncIterator[FreshDatabase]:
    """A factory of empty databases (plain `create database`), dropped again after the test."""
    created: list[str] = []

    async def make(setup_sql: str = "") -> str:
        name = f"vs_mig_{next(_numbers)}_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(pg_server)
        try:
            await admin.execute(f"create database {name}")
        finally:
            await admin.close()
        created.append(name)
        dsn = dsn_for(pg_server, name)
        if setup_sql:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(setup_sql)
            finally:
                await conn.close()
        return dsn

    yield make
    admin = await asyncpg.connect(pg_server)
    try:
        for name in created:
            await admin.execute(f"drop database if exists {name} with (force)")
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def connect(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


class Listener:
    """LISTEN on the trigger's channel; payloads are decoded into a queue."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def _received(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        assert channel == CHANNEL
        self.queue.put_nowait(json.loads(payload))

    async def next(self, timeout: float = 30.0) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no notification on {CHANNEL!r} within {timeout}s") from None


@contextlib.asynccontextmanager
async def listening(dsn: str) -> AsyncIterator[Listener]:
    async with connect(dsn) as conn:
        listener = Listener(conn)
        await conn.add_listener(CHANNEL, listener._received)
        try:
            yield listener
        finally:
            await conn.remove_listener(CHANNEL, listener._received)


def vector_literal(*hot: int, dimensions: int = DIMENSIONS) -> str:
    """A vector with 1.0 at the `hot` positions (and a small constant elsewhere, so none is zero)."""
    values = [1.0 if i in hot else 0.01 for i in range(dimensions)]
    return "[" + ",".join(str(value) for value in values) + "]"


async def epoch(conn: asyncpg.Connection) -> float:
    value: Decimal = await conn.fetchval("select extract(epoch from clock_timestamp())")
    return float(value)


async def column_type(conn: asyncpg.Connection, table: str, column: str) -> str:
    value: str = await conn.fetchval(
        "select format_type(atttypid, atttypmod) from pg_attribute "
        "where attrelid = $1::regclass and attname = $2 and not attisdropped",
        table,
        column,
    )
    return value


async def embedding_type(conn: asyncpg.Connection) -> str:
    return await column_type(conn, "vector_sync.project_embeddings", "embedding")


async def table_exists(conn: asyncpg.Connection, name: str) -> bool:
    return bool(await conn.fetchval("select to_regclass($1) is not null", name))


async def applied_rows(conn: asyncpg.Connection) -> list[tuple[int, str, str]]:
    rows = await conn.fetch("select number, name, checksum from vector_sync.schema_migrations order by number")
    return [(row["number"], row["name"], row["checksum"]) for row in rows]


async def catalog_snapshot(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
    """Objects and definitions in vector_sync and on the source table: what a re-run must not change."""
    rows = await conn.fetch(
        """
        select 'class' as kind, c.oid::regclass::text as name, c.relkind::text as detail, c.xmin::text as version
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = 'vector_sync' or c.oid = 'public.projects'::regclass
        union all
        select 'proc', p.oid::regprocedure::text, md5(p.prosrc), p.xmin::text
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         where n.nspname = 'vector_sync' or p.proname = 'match_projects'
        union all
        select 'trigger', t.tgname, pg_get_triggerdef(t.oid), t.xmin::text
          from pg_trigger t where t.tgrelid = 'public.projects'::regclass and not t.tgisinternal
        union all
        select 'column', a.attname, format_type(a.atttypid, a.atttypmod), a.xmin::text
          from pg_attribute a where a.attrelid = 'public.projects'::regclass and a.attnum > 0
        union all
        select 'migration', number::text, checksum, applied_at::text from vector_sync.schema_migrations
        order by 1, 2
        """
    )
    return [tuple(row) for row in rows]


async def log_rows(conn: asyncpg.Connection) -> list[tuple[str, str, int | None, int]]:
    """The change log as sorted (project_id, event_type, source_version, txid) tuples."""
    rows = await conn.fetch("select project_id, event_type, source_version, txid from vector_sync.webhook_logs")
    return sorted((row[0], row[1], row[2], row[3]) for row in rows)


async def changed_in_transaction(conn: asyncpg.Connection, sql: str, *args: Any) -> tuple[Any, int]:
    """Run one statement in a transaction of its own; its result and that transaction's pg_current_xact_id()."""
    async with conn.transaction():
        result = await conn.fetchval(sql, *args)
        txid: int = await conn.fetchval("select pg_current_xact_id()")
    return result, txid


async def published_tables(conn: asyncpg.Connection) -> set[tuple[str, str]]:
    """(schema, table) of every table the supabase_realtime publication sends."""
    rows = await conn.fetch(
        "select schemaname, tablename from pg_publication_tables where pubname = 'supabase_realtime'"
    )
    return {(row[0], row[1]) for row in rows}


async def publication_state(conn: asyncpg.Connection) -> tuple[Any, ...]:
    """The supabase_realtime publication's catalog row and its explicit members, with their row versions."""
    publication = await conn.fetchrow(
        "select oid, xmin::text, puballtables, pubinsert, pubupdate, pubdelete, pubtruncate "
        "from pg_publication where pubname = 'supabase_realtime'"
    )
    assert publication is not None, "there is no supabase_realtime publication"
    members = await conn.fetch(
        "select prrelid::regclass::text, xmin::text from pg_publication_rel where prpubid = $1 order by 1",
        publication["oid"],
    )
    return (tuple(publication), [tuple(member) for member in members])


class RolledBack(Exception):
    """Raised inside `conn.transaction()` to roll it back."""


ID_TABLES = {
    "uuid": "create table public.projects (id uuid primary key default gen_random_uuid(), "
    "name text not null, description text)",
    "bigint": "create table public.projects (id bigint generated by default as identity primary key, "
    "name text not null, description text)",
    "text": "create table public.projects (id text primary key, name text not null, description text)",
}


# --- applying: once, idempotent, serialised ---------------------------------------------------


async def test_migrate_applies_every_migration_once_and_records_them(fresh: FreshDatabase) -> None:
    dsn = await fresh(PROJECTS_SQL)
    settings = make_settings(dsn)
    async with connect(dsn) as conn:
        done = await migrate(conn, settings)
        assert [(m.number, m.name) for m in done] == [(1, "core"), (2, "change_log"), (3, "webhook_delivery")]
        catalog = await read_catalog(conn, settings)
        expected = [(m.number, m.name, m.checksum) for m in load_migrations(settings, catalog)]
        assert await applied_rows(conn) == expected
        assert [row[:2] for row in expected] == [(1, "core"), (2, "change_log"), (3, "webhook_delivery")]
        assert [row[2] for row in expected] == [m.checksum for m in done]
        for name in (
            "vector_sync.project_embeddings",
            "vector_sync.dead_letters",
            "vector_sync.schema_migrations",
            "vector_sync.webhook_logs",
            "vector_sync.webhook_attempts",
            "vector_sync.pending_webhooks",
            "vector_sync.config",
        ):
            assert await table_exists(conn, name), name
        assert await column_type(conn, "public.projects", "version") == "bigint"
        assert await conn.fetchval(
            "select attnotnull from pg_attribute where attrelid = 'public.projects'::regclass and attname = 'version'"
        )
        triggers = {
            row["tgname"]
            for row in await conn.fetch(
                "select tgname from pg_trigger where tgrelid = 'public.projects'::regclass and not tgisinternal"
            )
        }
        assert {"projects_change_trigger", "zz_vector_sync_bump_version"} <= triggers
        assert await conn.fetchval("select to_regprocedure('vector_sync.notify_project_change_direct()') is not null")
        assert await conn.fetchval("select to_regprocedure('vector_sync.prune_webhook_logs(interval)') is not null")


async def test_a_second_migrate_applies_nothing_and_changes_nothing(fresh: FreshDatabase) -> None:
    dsn = await fresh(PROJECTS_SQL)
    settings = make_settings(dsn)
    async with connect(dsn) as conn:
        assert [m.number for m in await migrate(conn, settings)] == [1, 2, 3]
        before = await catalog_snapshot(conn)
        assert await migrate(conn, settings) == []
        assert await migrate(conn, settings) == []
        after = await catalog_snapshot(conn)
    assert after == before


async def test_two_connections_migrating_at_once_both_succeed_and_apply_once(fresh: FreshDatabase) -> None:
    dsn = await fresh(PROJECTS_SQL)
    settings = make_settings(dsn)
    async with connect(dsn) as first, connect(dsn) as second:
        results = await asyncio.wait_for(
            asyncio.gather(migrate(first, settings), migrate(second, settings)), timeout=90
        )
        assert sorted(len(done) for done in results) == [0, 3]
        assert [row[0] for row in await applied_rows(first)] == [1, 2, 3]
        # The lock was released by both: a third run neither waits nor applies.
        assert await asyncio.wait_for(migrate(first, settings), timeout=30) == []
        assert await first.fetchval(ADVISORY_LOCKS_HERE) == 0


async def test_migrate_waits_for_the_advisory_lock(fresh: FreshDatabase) -> None:
    """Both runs queue behind a held lock and, once it is released, exactly one applies 0001 and 0002."""
    dsn = await fresh(PROJECTS_SQL)
    settings = make_settings(dsn)
    async with connect(dsn) as holder, connect(dsn) as first, connect(dsn) as second:
        await holder.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        runs = asyncio.gather(migrate(first, settings), migrate(second, settings))

        async def both_waiting() -> bool:
            waiting = await holder.fetchval(
                "select count(*) from pg_locks where locktype = 'advisory' and not granted and database = "
                "(select oid from pg_database where datname = current_database())"
            )
            return bool(waiting == 2)

        try:
            await wait_until(both_waiting, timeout=60, what="both migrate calls to wait on the advisory lock")
            assert not await table_exists(holder, "vector_sync.project_embeddings")
        except BaseException:
            runs.cancel()
            with contextlib.suppress(BaseException):
                await runs
            raise
        finally:
            await holder.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        results = await asyncio.wait_for(runs, timeout=90)
        assert sorted(len(done) for done in results) == [0, 3]
        assert [row[0] for row in await applied_rows(holder)] == [1, 2, 3]


async def test_cli_migrate_exits_0_twice_and_1_for_a_missing_table(fresh: FreshDatabase, tmp_path: Path) -> None:
    dsn = await fresh(PROJECTS_SQL)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp_path)), "DATABASE_URL": dsn}
    env["VECTOR_SYNC_EMBEDDING_DIMENSIONS"] = str(DIMENSIONS)
    for _ in range(2):
        code, _out, err = await run_cli(["migrate"], env, tmp_path)
        assert code == 0, err
    async with connect(dsn) as conn:
        assert [row[0] for row in await applied_rows(conn)] == [1, 2, 3]
    code, _out, err = await run_cli(["migrate"], {**env, "VECTOR_SYNC_TABLE": "public.nothing_here"}, tmp_path)
    assert code == 1, err
    assert "does not exist" in err


# --- id types, end to end at the SQL level -----------------------------------------------------


@pytest.mark.parametrize("id_type", ["uuid", "bigint", "text"])
async def test_each_id_type_works_end_to_end(fresh: FreshDatabase, id_type: str) -> None:
    dsn = await fresh(ID_TABLES[id_type])
    settings = make_settings(dsn)
    async with connect(dsn) as conn:
        await migrate(conn, settings)
        assert (await read_catalog(conn, settings)).id_kind is IdKind(id_type)
        assert await column_type(conn, "vector_sync.project_embeddings", "project_id") == id_type
        assert await column_type(conn, "vector_sync.dead_letters", "project_id") == id_type

        def as_json(value: Any) -> Any:
            return value if id_type == "bigint" else str(value)

        async with listening(dsn) as listener:
            start = await epoch(conn)
            if id_type == "text":
                row = await conn.fetchrow(
                    "insert into projects (id, name) values ('proj-ü \"1\"', 'Alpha') returning id, version"
                )
            else:
                row = await conn.fetchrow("insert into projects (name) values ('Alpha') returning id, version")
            project, version = row["id"], row["version"]
            assert version == 1
            inserted = await listener.next()
            end = await epoch(conn)
            assert set(inserted) == {"type", "id", "version", "committed_at"}
            assert inserted["type"] == "INSERT"
            assert inserted["id"] == as_json(project)
            assert inserted["version"] == 1
            assert isinstance(inserted["committed_at"], int | float)
            assert start - 0.001 <= inserted["committed_at"] <= end + 0.001

            await conn.execute("update projects set name = 'Beta' where id = $1", project)
            updated = await listener.next()
            assert set(updated) == {"type", "id", "version", "committed_at"}
            assert (updated["type"], updated["id"], updated["version"]) == ("UPDATE", as_json(project), 2)
            assert updated["committed_at"] >= inserted["committed_at"]

            # A no-op update: no notification (the DELETE's is the very next one) and no version bump.
            await conn.execute("update projects set name = name, description = description where id = $1", project)
            assert await conn.fetchval("select version from projects where id = $1", project) == 2

            # The vector side uses the same type: a stored vector is found by match_projects.
            await conn.execute(
                "insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding) "
                "values ($1, 2, 'sha', 'model', $2)",
                project,
                vector_literal(0),
            )
            hits = await conn.fetch(
                f"select * from public.match_projects('{vector_literal(0)}'::vector({DIMENSIONS}), 5, 0)"
            )
            assert [hit["id"] for hit in hits] == [project]
            assert hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4)

            await conn.execute("delete from projects where id = $1", project)
            deleted = await listener.next()
            assert set(deleted) == {"type", "id", "version", "committed_at"}
            assert (deleted["type"], deleted["id"], deleted["version"]) == ("DELETE", as_json(project), 2)
            assert listener.queue.empty()
            assert await conn.fetchval("select count(*) from vector_sync.project_embeddings") == 0


async def test_a_noop_update_sends_no_notification(db: asyncpg.Connection, dsn: str) -> None:
    project = await db.fetchval("insert into projects (name, description) values ('A', 'a') returning id")
    async with listening(dsn) as listener:
        await db.execute("update projects set name = 'A', description = 'a', stars = stars where id = $1", project)
        await db.execute("update projects set stars = 7 where id = $1", project)  # the sentinel
        first = await listener.next()
        assert (first["type"], first["version"]) == ("UPDATE", 2), "the no-op update sent a notification"
    assert await db.fetchval("select version from projects where id = $1", project) == 2


# --- the version trigger -----------------------------------------------------------------------


async def version_of(db: asyncpg.Connection, project: int) -> int:
    value: int = await db.fetchval("select version from projects where id = $1", project)
    return value


async def test_a_real_change_bumps_the_version_by_exactly_one(db: asyncpg.Connection) -> None:
    project = await db.fetchval("insert into projects (name) values ('A') returning id")
    assert await version_of(db, project) == 1
    for expected, stars in enumerate([5, 6, 7, 100], start=2):
        await db.execute("update projects set stars = $2 where id = $1", project, stars)
        assert await version_of(db, project) == expected
    # Several changes in one statement still count once.
    await db.execute("update projects set name = 'B', description = 'd', stars = 1 where id = $1", project)
    assert await version_of(db, project) == 6
    # Several updates in one transaction count once each.
    async with db.transaction():
        await db.execute("update projects set name = 'C' where id = $1", project)
        await db.execute("update projects set name = 'D' where id = $1", project)
    assert await version_of(db, project) == 8


async def test_a_noop_update_keeps_the_version(db: asyncpg.Connection) -> None:
    project = await db.fetchval("insert into projects (name, description) values ('A', null) returning id")
    await db.execute("update projects set name = 'A' where id = $1", project)
    await db.execute("update projects set description = null where id = $1", project)
    await db.execute("update projects set name = name, stars = stars where id = $1", project)
    assert await version_of(db, project) == 1


@pytest.mark.parametrize("value", [100, 0, 1, -5])
async def test_setting_the_version_by_hand_is_ignored(db: asyncpg.Connection, value: int) -> None:
    project = await db.fetchval("insert into projects (name) values ('A') returning id")
    await db.execute("update projects set stars = 1 where id = $1", project)
    assert await version_of(db, project) == 2
    await db.execute("update projects set version = $2 where id = $1", project, value)
    assert await version_of(db, project) == 2
    await db.execute("update projects set version = $2, name = 'B' where id = $1", project, value)
    assert await version_of(db, project) == 3


@pytest.mark.parametrize("trigger_name", ["set_updated_at", "Touch", "zz_touch", "zz_vector_sync_a"])
async def test_a_users_before_update_trigger_runs_first(db: asyncpg.Connection, trigger_name: str) -> None:
    await db.execute(
        f"""
        alter table projects add column updated_at timestamptz;
        create function public.touch() returns trigger language plpgsql as $$
        begin
          new.updated_at := clock_timestamp();
          return new;
        end $$;
        create trigger "{trigger_name}" before update on projects for each row execute function public.touch();
        """
    )
    project = await db.fetchval("insert into projects (name) values ('A') returning id")
    # The statement itself changes nothing; only the user's trigger does.
    await db.execute("update projects set name = name where id = $1", project)
    row = await db.fetchrow("select version, updated_at from projects where id = $1", project)
    assert row["updated_at"] is not None
    assert row["version"] == 2
    names = [
        r["tgname"]
        for r in await db.fetch(
            "select tgname from pg_trigger where tgrelid = 'projects'::regclass and not tgisinternal "
            'and tgtype & 2 = 2 order by tgname collate "C"'  # BEFORE row triggers, in firing order
        )
    ]
    assert names[-1] == "zz_vector_sync_bump_version"


# --- cascades ------------------------------------------------------------------------------------


async def count_for(db: asyncpg.Connection, table: str, project: int) -> int:
    value: int = await db.fetchval(f"select count(*) from vector_sync.{table} where project_id = $1", project)
    return value


async def test_deleting_a_row_deletes_its_vector_and_dead_letter_in_the_same_transaction(
    db: asyncpg.Connection,
) -> None:
    doomed = await db.fetchval("insert into projects (name) values ('doomed') returning id")
    kept = await db.fetchval("insert into projects (name) values ('kept') returning id")
    for project in (doomed, kept):
        await db.execute(
            "insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding) "
            "values ($1, 1, 'sha', 'model', $2)",
            project,
            vector_literal(1),
        )
        await db.execute(
            "insert into vector_sync.dead_letters (project_id, version, content_sha256, model, error) "
            "values ($1, 1, 'sha', 'model', 'refused')",
            project,
        )
    async with db.transaction():
        await db.execute("delete from projects where id = $1", doomed)
        # Still inside the deleting transaction.
        assert await count_for(db, "project_embeddings", doomed) == 0
        assert await count_for(db, "dead_letters", doomed) == 0
    assert await count_for(db, "project_embeddings", doomed) == 0
    assert await count_for(db, "dead_letters", doomed) == 0
    assert await count_for(db, "project_embeddings", kept) == 1
    assert await count_for(db, "dead_letters", kept) == 1


async def test_a_vector_for_a_missing_row_is_refused(db: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await db.execute(
            "insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding) "
            "values (424242, 1, 'sha', 'model', $1)",
            vector_literal(1),
        )


# --- the change log (0002) ------------------------------------------------------------------------


async def test_each_change_writes_one_log_row_in_the_writers_transaction(db: asyncpg.Connection) -> None:
    assert await log_rows(db) == []
    expected: list[tuple[str, str, int | None, int]] = []

    project, txid = await changed_in_transaction(db, "insert into projects (name) values ('A') returning id")
    expected.append((str(project), "INSERT", 1, txid))
    assert await log_rows(db) == sorted(expected)

    version, txid = await changed_in_transaction(
        db, "update projects set stars = 5 where id = $1 returning version", project
    )
    assert version == 2
    expected.append((str(project), "UPDATE", 2, txid))
    assert await log_rows(db) == sorted(expected)

    other, txid = await changed_in_transaction(db, "insert into projects (name) values ('B') returning id")
    expected.append((str(other), "INSERT", 1, txid))

    # Two rows in one statement, then one of them again in the same transaction: a log row per row
    # change, each with the version after it, all with the transaction's id; there before the commit.
    async with db.transaction():
        await db.execute("update projects set name = name || '!'")
        await db.execute("update projects set stars = 6 where id = $1", project)
        txid = await db.fetchval("select pg_current_xact_id()")
        assert sorted(row[:3] for row in await log_rows(db) if row[3] == txid) == sorted(
            [(str(project), "UPDATE", 3), (str(other), "UPDATE", 2), (str(project), "UPDATE", 4)]
        )
    expected += [(str(project), "UPDATE", 3, txid), (str(other), "UPDATE", 2, txid), (str(project), "UPDATE", 4, txid)]
    assert await log_rows(db) == sorted(expected)

    # A DELETE is logged with the version the row had.
    version, txid = await changed_in_transaction(db, "delete from projects where id = $1 returning version", project)
    assert version == 4
    expected.append((str(project), "DELETE", 4, txid))
    assert await log_rows(db) == sorted(expected)
    assert await db.fetchval("select count(distinct id) from vector_sync.webhook_logs") == len(expected)


async def test_a_noop_update_or_a_rolled_back_change_writes_no_log_row(db: asyncpg.Connection) -> None:
    project, _ = await changed_in_transaction(
        db, "insert into projects (name, description) values ('A', 'a') returning id"
    )
    before = await log_rows(db)
    assert len(before) == 1

    await db.execute("update projects set name = 'A', description = 'a', stars = stars where id = $1", project)
    await db.execute("update projects set version = 99 where id = $1", project)  # ignored: a no-op too
    assert await version_of(db, project) == 1
    assert await log_rows(db) == before

    with pytest.raises(RolledBack):
        async with db.transaction():
            await db.execute("insert into projects (name) values ('B')")
            await db.execute("update projects set stars = 1 where id = $1", project)
            await db.execute("delete from projects where id = $1", project)
            assert len(await log_rows(db)) == len(before) + 3
            raise RolledBack
    assert await log_rows(db) == before

    # A rolled-back savepoint takes its log row with it; a change kept inside a savepoint is logged
    # with the top-level transaction's id (what snapshots' xmin is compared with), not the subtransaction's.
    async with db.transaction():
        txid = await db.fetchval("select pg_current_xact_id()")
        with pytest.raises(RolledBack):
            async with db.transaction():
                await db.execute("update projects set stars = 1 where id = $1", project)
                raise RolledBack
        async with db.transaction():
            await db.execute("update projects set stars = 2 where id = $1", project)
    assert await log_rows(db) == sorted([*before, (str(project), "UPDATE", 2, txid)])


@pytest.mark.parametrize("id_type", ["uuid", "bigint", "text"])
async def test_the_change_log_records_each_id_type_in_its_text_form(fresh: FreshDatabase, id_type: str) -> None:
    dsn = await fresh(ID_TABLES[id_type])
    settings = make_settings(dsn)
    async with connect(dsn) as conn:
        await migrate(conn, settings)
        assert await column_type(conn, "vector_sync.webhook_logs", "project_id") == "text"
        if id_type == "text":
            insert = "insert into projects (id, name) values ('proj-ü \"1\"', 'Alpha') returning id"
        elif id_type == "bigint":  # beyond 2^53: the id must not pass through a double on its way
            insert = f"insert into projects (id, name) values ({2**53 + 1}, 'Alpha') returning id"
        else:
            insert = "insert into projects (name) values ('Alpha') returning id"
        project, inserted = await changed_in_transaction(conn, insert)
        version, updated = await changed_in_transaction(
            conn, "update projects set name = 'Beta' where id = $1 returning version", project
        )
        assert version == 2
        await conn.execute("update projects set name = name, description = description where id = $1", project)
        version, deleted = await changed_in_transaction(
            conn, "delete from projects where id = $1 returning version", project
        )
        assert version == 2
        text = str(project)
        assert text == await conn.fetchval(f"select $1::{id_type}::text", project)
        assert await log_rows(conn) == sorted(
            [(text, "INSERT", 1, inserted), (text, "UPDATE", 2, updated), (text, "DELETE", 2, deleted)]
        )
        # The text form casts back to the id.
        assert (
            await conn.fetchval(
                f"select count(*) from vector_sync.webhook_logs where project_id::{id_type} = $1", project
            )
            == 3
        )


async def test_prune_webhook_logs_deletes_only_rows_older_than_keep_and_counts_them(db: asyncpg.Connection) -> None:
    # More old rows than one batch of the function's delete loop.
    await db.execute("insert into projects (name) select 'old ' || n from generate_series(1, 10005) n")
    await db.execute("update vector_sync.webhook_logs set created_at = now() - interval '15 days'")
    await db.execute("insert into projects (name) select 'week ' || n from generate_series(1, 3) n")
    await db.execute(
        "update vector_sync.webhook_logs set created_at = now() - interval '2 days' "
        "where created_at > now() - interval '1 day'"
    )
    await db.execute("insert into projects (name) select 'new ' || n from generate_series(1, 2) n")
    ages = {
        row[0]: row[1]
        for row in await db.fetch(
            "select date_trunc('day', now() - created_at)::text, count(*) from vector_sync.webhook_logs group by 1"
        )
    }
    assert ages == {"15 days": 10005, "2 days": 3, "00:00:00": 2}
    young = await db.fetch("select id from vector_sync.webhook_logs where created_at > now() - interval '3 days'")

    assert await db.fetchval("select vector_sync.prune_webhook_logs()") == 10005
    assert {row[0] for row in await db.fetch("select id from vector_sync.webhook_logs")} == {row[0] for row in young}
    assert await db.fetchval("select vector_sync.prune_webhook_logs()") == 0
    assert await db.fetchval("select vector_sync.prune_webhook_logs(interval '1 day')") == 3
    assert await db.fetchval("select count(*) from vector_sync.webhook_logs") == 2
    assert await db.fetchval("select vector_sync.prune_webhook_logs(interval '1 day')") == 0

    # "Older than": a row exactly `keep` old stays (now() is fixed within a transaction).
    async with db.transaction():
        await db.execute(
            "update vector_sync.webhook_logs set created_at = now() - interval '1 hour' "
            "where id = (select id from vector_sync.webhook_logs limit 1)"
        )
        assert await db.fetchval("select vector_sync.prune_webhook_logs(interval '1 hour')") == 0
        assert await db.fetchval("select vector_sync.prune_webhook_logs(interval '59 minutes')") == 1
    assert await db.fetchval("select count(*) from vector_sync.webhook_logs") == 1


async def test_upgrading_a_0001_database_applies_the_later_ones_and_logs_from_then_on(
    fresh: FreshDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = await fresh(PROJECTS_SQL)
    settings = make_settings(dsn)
    every_migration = vector_sync.migrations.load_migrations
    async with connect(dsn) as conn:
        with monkeypatch.context() as patch:
            patch.setattr(
                vector_sync.migrations,
                "load_migrations",
                lambda settings, catalog: [m for m in every_migration(settings, catalog) if m.number == 1],
            )
            assert [m.number for m in await migrate(conn, settings)] == [1]
        assert not await table_exists(conn, "vector_sync.webhook_logs")
        project = await conn.fetchval("insert into projects (name) values ('before') returning id")
        await conn.execute("update projects set stars = 1 where id = $1", project)

        assert [(m.number, m.name) for m in await migrate(conn, settings)] == [
            (2, "change_log"),
            (3, "webhook_delivery"),
        ]
        catalog = await read_catalog(conn, settings)
        assert await applied_rows(conn) == [(m.number, m.name, m.checksum) for m in load_migrations(settings, catalog)]
        assert await log_rows(conn) == []  # changes from before the log are not invented
        assert await published_tables(conn) == {("public", "projects")}
        version, txid = await changed_in_transaction(
            conn, "update projects set stars = 2 where id = $1 returning version", project
        )
        assert version == 3
        assert await log_rows(conn) == [(str(project), "UPDATE", 3, txid)]
        assert await migrate(conn, settings) == []


async def test_a_table_with_a_unique_id_but_no_primary_key_still_takes_updates_and_deletes(
    fresh: FreshDatabase,
) -> None:
    dsn = await fresh(
        "create table public.projects (id bigint generated by default as identity unique not null, "
        "name text not null, description text)"
    )
    async with connect(dsn) as conn:
        assert [m.number for m in await migrate(conn, make_settings(dsn))] == [1, 2, 3]
        project = await conn.fetchval("insert into projects (name) values ('A') returning id")
        await conn.execute("update projects set name = 'B' where id = $1", project)
        await conn.execute("delete from projects where id = $1", project)
        assert [row[1] for row in await log_rows(conn)] == ["DELETE", "INSERT", "UPDATE"]


# Migration 0002 only registers the job with pg_cron; the embedded server has no pg_cron, so a stand-in
# `cron.schedule` records the call and the extension is entered in pg_extension by hand.
FAKE_PG_CRON = """
create schema cron;
create table cron.job (jobname text primary key, schedule text, command text);
-- Like pg_cron: scheduling an existing name replaces that job.
create function cron.schedule(job_name text, schedule text, command text) returns bigint
language sql as $$
  insert into cron.job values (job_name, schedule, command)
  on conflict (jobname) do update set schedule = excluded.schedule, command = excluded.command
  returning 1::bigint
$$;
insert into pg_catalog.pg_extension (oid, extname, extowner, extnamespace, extrelocatable, extversion)
values ((select max(oid::bigint) + 1 from pg_catalog.pg_extension)::oid, 'pg_cron',
        (select oid from pg_catalog.pg_roles where rolname = current_user), 'cron'::regnamespace, false, '1.6');
"""


async def test_with_pg_cron_migrate_schedules_the_pruning(fresh: FreshDatabase) -> None:
    dsn = await fresh(FAKE_PG_CRON + PROJECTS_SQL)
    async with connect(dsn) as conn:
        await migrate(conn, make_settings(dsn))
        jobs = {row[0]: (row[1], row[2]) for row in await conn.fetch("select jobname, schedule, command from cron.job")}
        assert set(jobs) == {
            "vector-sync-prune-webhook-logs",
            "vector-sync-reconcile-webhooks",
            "vector-sync-prune-cron-history",
        }
        assert jobs["vector-sync-prune-webhook-logs"] == ("17 * * * *", "select vector_sync.prune_webhook_logs()")
        # pg_cron 1.5 and later run the reconciler every 10 seconds.
        assert jobs["vector-sync-reconcile-webhooks"] == ("10 seconds", "select vector_sync.reconcile_webhooks()")
        # The scheduled commands run: the pruning prunes, the reconciler says pg_net is missing.
        await conn.execute("insert into projects (name) values ('A')")
        await conn.execute("update vector_sync.webhook_logs set created_at = now() - interval '15 days'")
        await conn.execute(jobs["vector-sync-prune-webhook-logs"][1])
        assert await conn.fetchval("select count(*) from vector_sync.webhook_logs") == 0
        assert "pg_net" in await conn.fetchval(jobs["vector-sync-reconcile-webhooks"][1])


async def test_an_old_pg_cron_runs_the_reconciler_every_minute(fresh: FreshDatabase) -> None:
    dsn = await fresh(FAKE_PG_CRON.replace("'1.6'", "'1.4'") + PROJECTS_SQL)
    async with connect(dsn) as conn:
        await migrate(conn, make_settings(dsn))
        schedule = await conn.fetchval("select schedule from cron.job where jobname = 'vector-sync-reconcile-webhooks'")
        assert schedule == "* * * * *"


async def test_without_pg_cron_migrate_says_the_pruning_is_not_scheduled(fresh: FreshDatabase) -> None:
    dsn = await fresh(PROJECTS_SQL)
    notices: list[asyncpg.PostgresLogMessage] = []
    async with connect(dsn) as conn:
        assert not await conn.fetchval("select exists (select 1 from pg_extension where extname = 'pg_cron')")
        conn.add_log_listener(lambda _conn, message: notices.append(message))
        await migrate(conn, make_settings(dsn))
        await wait_until(
            lambda: any("prune_webhook_logs() is not scheduled" in notice.message for notice in notices),
            what="the notice that pg_cron is missing",
        )
        assert not await conn.fetchval("select exists (select 1 from pg_namespace where nspname = 'cron')")


# --- the Realtime publication ------------------------------------------------------------------------


async def test_migrate_creates_the_publication_with_the_table(fresh: FreshDatabase) -> None:
    dsn = await fresh(PROJECTS_SQL)
    async with connect(dsn) as conn:
        assert await conn.fetchval("select count(*) from pg_publication") == 0
        await migrate(conn, make_settings(dsn))
        assert await published_tables(conn) == {("public", "projects")}
        (_oid, _xmin, all_tables, *publishes), _members = await publication_state(conn)
        assert not all_tables
        assert publishes == [True, True, True, True]  # insert, update, delete, truncate


async def test_migrate_adds_the_table_to_an_existing_publication_and_keeps_its_tables(fresh: FreshDatabase) -> None:
    dsn = await fresh(
        PROJECTS_SQL + "; create table public.other (id int primary key); "
        "create publication supabase_realtime for table public.other"
    )
    async with connect(dsn) as conn:
        (before, _members) = await publication_state(conn)
        await migrate(conn, make_settings(dsn))
        assert await published_tables(conn) == {("public", "other"), ("public", "projects")}
        (after, _members) = await publication_state(conn)
        assert after == before  # the same publication, not dropped and created again


async def test_migrate_leaves_a_for_all_tables_publication_alone(fresh: FreshDatabase) -> None:
    dsn = await fresh(PROJECTS_SQL + "; create publication supabase_realtime for all tables")
    async with connect(dsn) as conn:
        before = await publication_state(conn)
        assert before[1] == []
        assert [m.number for m in await migrate(conn, make_settings(dsn))] == [1, 2, 3]
        assert await publication_state(conn) == before
        assert ("public", "projects") in await published_tables(conn)


async def test_migrate_accepts_a_table_already_in_the_publication(fresh: FreshDatabase) -> None:
    dsn = await fresh(PROJECTS_SQL + "; create publication supabase_realtime for table public.projects")
    async with connect(dsn) as conn:
        before = await publication_state(conn)
        assert before[1] == [("projects", before[1][0][1])]
        assert [m.number for m in await migrate(conn, make_settings(dsn))] == [1, 2, 3]
        assert await publication_state(conn) == before
        assert await published_tables(conn) == {("public", "projects")}


# --- the vector column and its index ---------------------------------------------------------------


INDEX_SQL = """
select am.amname, opc.opcname, format_type(a.atttypid, a.atttypmod) as type, a.attname
  from pg_index i
  join pg_class c on c.oid = i.indexrelid
  join pg_am am on am.oid = c.relam
  join pg_opclass opc on opc.oid = i.indclass[0]
  join pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]
 where i.indrelid = 'vector_sync.project_embeddings'::regclass and am.amname = 'hnsw'
"""


@pytest.mark.parametrize(
    ("dimensions", "base"),
    [(64, "vector"), (1536, "vector"), (2000, "vector"), (2001, "halfvec"), (3072, "halfvec")],
)
async def test_hnsw_cosine_index_and_column_type(fresh: FreshDatabase, dimensions: int, base: str) -> None:
    dsn = await fresh(PROJECTS_SQL)
    settings = make_settings(dsn, VECTOR_SYNC_EMBEDDING_DIMENSIONS=dimensions)
    async with connect(dsn) as conn:
        await migrate(conn, settings)
        indexes = await conn.fetch(INDEX_SQL)
        assert len(indexes) == 1
        index = indexes[0]
        assert index["attname"] == "embedding"
        assert index["opcname"] == f"{base}_cosine_ops"
        assert index["type"] == f"{base}({dimensions})"
        # A vector of that size can be stored and searched.
        project = await conn.fetchval("insert into projects (name) values ('A') returning id")
        literal = vector_literal(0, dimensions=dimensions)
        await conn.execute(
            "insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding) "
            "values ($1, 1, 'sha', 'model', $2)",
            project,
            literal,
        )
        hits = await conn.fetch(f"select * from public.match_projects('{literal}'::{base}({dimensions}), 3, 0.5)")
        assert [hit["id"] for hit in hits] == [project]
        with pytest.raises(asyncpg.DataError):
            await conn.execute(
                "insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding) "
                "values ($1, 1, 'sha', 'model', $2)",
                await conn.fetchval("insert into projects (name) values ('B') returning id"),
                vector_literal(0, dimensions=dimensions + 1),
            )


# --- Supabase layout: pgvector in schema `extensions` ------------------------------------------------


SUPABASE_SETUP = "create schema extensions; create extension vector with schema extensions;\n" + PROJECTS_SQL


async def test_pgvector_in_the_extensions_schema(fresh: FreshDatabase) -> None:
    dsn = await fresh(SUPABASE_SETUP)
    settings = make_settings(dsn)
    async with connect(dsn) as conn:
        assert [m.number for m in await migrate(conn, settings)] == [1, 2, 3]
        assert (
            await conn.fetchval(
                "select n.nspname from pg_extension e join pg_namespace n on n.oid = e.extnamespace "
                "where e.extname = 'vector'"
            )
            == "extensions"
        )
        assert await embedding_type(conn) == f"extensions.vector({DIMENSIONS})"
        index = (await conn.fetch(INDEX_SQL))[0]
        assert index["opcname"] == "vector_cosine_ops"
        ids = []
        for position, name in enumerate(["near", "middle", "far"]):
            project = await conn.fetchval("insert into projects (name) values ($1) returning id", name)
            ids.append(project)
            hot = {"near": (0,), "middle": (0, 1), "far": (2,)}[name]
            await conn.execute(
                "insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding) "
                "values ($1, 1, $2, 'model', $3::extensions.vector)",
                project,
                f"sha{position}",
                vector_literal(*hot),
            )
        hits = await conn.fetch(
            f"select * from public.match_projects('{vector_literal(0)}'::extensions.vector({DIMENSIONS}), 5, 0)"
        )
        assert [hit["id"] for hit in hits] == ids
        assert hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
        assert hits[0]["similarity"] > hits[1]["similarity"] > hits[2]["similarity"]
        limited = await conn.fetch(
            f"select * from public.match_projects('{vector_literal(0)}'::extensions.vector({DIMENSIONS}), 1, 0)"
        )
        assert [hit["id"] for hit in limited] == ids[:1]
        threshold = await conn.fetch(
            f"select * from public.match_projects('{vector_literal(0)}'::extensions.vector({DIMENSIONS}), 5, 0.6)"
        )
        assert [hit["id"] for hit in threshold] == ids[:2]


async def test_migrate_creates_pgvector_in_extensions_when_that_schema_exists(fresh: FreshDatabase) -> None:
    dsn = await fresh("create schema extensions;\n" + PROJECTS_SQL)
    async with connect(dsn) as conn:
        await migrate(conn, make_settings(dsn))
        assert (
            await conn.fetchval(
                "select n.nspname from pg_extension e join pg_namespace n on n.oid = e.extnamespace "
                "where e.extname = 'vector'"
            )
            == "extensions"
        )


# --- hostile names ------------------------------------------------------------------------------------


HOSTILE_SCHEMA = "my schema"
HOSTILE_TABLE = 'Weird "Table"; drop table x; --'
HOSTILE_ID = 'Quoted"Id'
HOSTILE_CONTENT = ("project name", "long description")


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def outside_double_quotes(sql: str) -> str:
    """The SQL without quoted identifiers and without the E'' string constants names are rendered as."""
    without_names = re.sub(r'"(?:[^"]|"")*"', " ", sql)
    return re.sub(r"E'(?:[^'\\]|''|\\.)*'", " ", without_names)


def hostile_settings(dsn: str) -> Settings:
    return make_settings(
        dsn,
        VECTOR_SYNC_TABLE=f"{ident(HOSTILE_SCHEMA)}.{ident(HOSTILE_TABLE)}",
        VECTOR_SYNC_ID_COLUMN=HOSTILE_ID,
        VECTOR_SYNC_CONTENT_COLUMNS=",".join(HOSTILE_CONTENT),
    )


async def test_hostile_names_are_quoted(fresh: FreshDatabase) -> None:
    table = f"{ident(HOSTILE_SCHEMA)}.{ident(HOSTILE_TABLE)}"
    dsn = await fresh(
        f"""
        create table public.x (a int);
        create schema {ident(HOSTILE_SCHEMA)};
        create table {ident(HOSTILE_SCHEMA)}.x (a int);
        create table {table} (
          {ident(HOSTILE_ID)} bigint generated by default as identity primary key,
          {ident(HOSTILE_CONTENT[0])} text,
          {ident(HOSTILE_CONTENT[1])} text
        );
        """
    )
    settings = hostile_settings(dsn)
    assert settings.table.schema == HOSTILE_SCHEMA
    assert settings.table.name == HOSTILE_TABLE
    assert settings.id_column == HOSTILE_ID
    assert settings.content_columns == HOSTILE_CONTENT

    rendered = "\n".join(m.sql for m in load_migrations(settings, Catalog(IdKind.BIGINT, "extensions")))
    assert table in rendered
    bare = outside_double_quotes(rendered)
    for fragment in ("drop table x", "Weird", "Table", HOSTILE_SCHEMA, HOSTILE_ID, "Quoted", "Id"):
        assert fragment not in bare, f"{fragment!r} appears outside quotes in the rendered SQL"

    async with connect(dsn) as conn:
        assert [m.number for m in await migrate(conn, settings)] == [1, 2, 3]
        assert await published_tables(conn) == {(HOSTILE_SCHEMA, HOSTILE_TABLE)}
        assert await table_exists(conn, "public.x")
        assert await table_exists(conn, f"{ident(HOSTILE_SCHEMA)}.x")
        assert await column_type(conn, table, "version") == "bigint"
        assert await column_type(conn, "vector_sync.project_embeddings", "project_id") == "bigint"
        async with listening(dsn) as listener:
            project = await conn.fetchval(
                f"insert into {table} ({ident(HOSTILE_CONTENT[0])}) values ('A') returning {ident(HOSTILE_ID)}"
            )
            change = await listener.next()
            assert (change["type"], change["id"], change["version"]) == ("INSERT", project, 1)
            await conn.execute(f"update {table} set {ident(HOSTILE_CONTENT[1])} = 'B'")
            change = await listener.next()
            assert (change["type"], change["id"], change["version"]) == ("UPDATE", project, 2)
        assert [row[:3] for row in await log_rows(conn)] == [(str(project), "INSERT", 1), (str(project), "UPDATE", 2)]
        await conn.execute(
            "insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding) "
            "values ($1, 2, 'sha', 'model', $2)",
            project,
            vector_literal(0),
        )
        hits = await conn.fetch(f"select * from public.match_projects('{vector_literal(0)}'::vector, 5, 0)")
        assert [hit["id"] for hit in hits] == [project]
        await conn.execute(f"delete from {table}")
        assert await conn.fetchval("select count(*) from vector_sync.project_embeddings") == 0
        assert await migrate(conn, settings) == []


@pytest.mark.parametrize("where", ["table", "id_column"])
async def test_a_newline_in_a_name_cannot_end_a_sql_comment(fresh: FreshDatabase, where: str) -> None:
    """The migration text has `--` comments that mention the table and id column; a name with a line break
    must not turn the rest of itself into SQL."""
    evil = "line\ndrop table if exists public.canary; --"
    table_name, id_name = (evil, "id") if where == "table" else ("projects", evil)
    dsn = await fresh(
        f"""
        create table public.canary (a int);
        create table public.{ident(table_name)} ({ident(id_name)} bigint primary key, name text, description text);
        """
    )
    try:
        settings = make_settings(dsn, VECTOR_SYNC_TABLE=f"public.{ident(table_name)}", VECTOR_SYNC_ID_COLUMN=id_name)
    except ConfigError as exc:  # refusing such a name is fine too
        variable = "VECTOR_SYNC_TABLE" if where == "table" else "VECTOR_SYNC_ID_COLUMN"
        assert any(problem.startswith(variable) for problem in exc.problems), exc.problems
        return
    async with connect(dsn) as conn:
        with contextlib.suppress(asyncpg.PostgresError, SchemaError):
            await migrate(conn, settings)
        assert await table_exists(conn, "public.canary"), "a name with a line break ran `drop table` from a comment"


@pytest.mark.parametrize("value", ["a.b.c", '"unterminated', 'public."', "", "a..b", "schema.", ".table"])
def test_an_unparseable_table_name_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        make_settings("postgresql://localhost/x", VECTOR_SYNC_TABLE=value)
    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith("VECTOR_SYNC_TABLE")


async def test_a_missing_table_is_a_schema_error(fresh: FreshDatabase) -> None:
    dsn = await fresh()
    async with connect(dsn) as conn:
        with pytest.raises(SchemaError, match="does not exist"):
            await migrate(conn, make_settings(dsn))
        assert not await table_exists(conn, "vector_sync.schema_migrations")
        assert await conn.fetchval(ADVISORY_LOCKS_HERE) == 0


@pytest.mark.parametrize("id_sql", ["numeric primary key", "jsonb", "double precision primary key", "bytea"])
async def test_an_unsupported_id_type_is_a_schema_error(fresh: FreshDatabase, id_sql: str) -> None:
    dsn = await fresh(f"create table public.projects (id {id_sql}, name text, description text)")
    async with connect(dsn) as conn:
        with pytest.raises(SchemaError, match="id column"):
            await migrate(conn, make_settings(dsn))
        # Nothing half-applied: the source table is untouched and nothing is recorded.
        assert (
            await conn.fetchval(
                "select count(*) from pg_attribute where attrelid = 'public.projects'::regclass and attname = 'version'"
            )
            == 0
        )
        assert not await table_exists(conn, "vector_sync.schema_migrations")


async def test_a_missing_id_column_is_a_schema_error(fresh: FreshDatabase) -> None:
    dsn = await fresh(PROJECTS_SQL)
    async with connect(dsn) as conn:
        with pytest.raises(SchemaError, match="VECTOR_SYNC_ID_COLUMN"):
            await migrate(conn, make_settings(dsn, VECTOR_SYNC_ID_COLUMN="project_id"))


# --- privileges: row level security, and the private schema --------------------------------------


async def test_match_projects_honours_row_level_security(db: asyncpg.Connection) -> None:
    role = f"reader_{uuid.uuid4().hex[:10]}"
    visible, hidden = [], []
    for number in range(6):
        stars = 10 if number % 2 == 0 else 0
        project = await db.fetchval(
            "insert into projects (name, stars) values ($1, $2) returning id", f"p{number}", stars
        )
        (visible if stars else hidden).append(project)
        await db.execute(
            "insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding) "
            "values ($1, 1, 'sha', 'model', $2)",
            project,
            vector_literal(0, number + 1),
        )
    query = f"select id from public.match_projects('{vector_literal(0)}'::vector({DIMENSIONS}), 100, -1)"
    await db.execute(
        f"""
        create role {role} nologin;
        grant select on public.projects to {role};
        grant usage on schema vector_sync to {role};
        grant select on vector_sync.project_embeddings to {role};
        grant execute on function public.match_projects to {role};
        alter table public.projects enable row level security;
        create policy only_starred on public.projects for select to {role} using (stars >= 10);
        """
    )
    try:
        assert {row["id"] for row in await db.fetch(query)} == set(visible + hidden)  # the owner sees all
        await db.execute(f"set role {role}")
        assert {row["id"] for row in await db.fetch("select id from public.projects")} == set(visible)
        assert {row["id"] for row in await db.fetch(query)} == set(visible)
        # Granted select on the vectors themselves, the role still sees only its rows' vectors.
        direct = await db.fetch("select project_id from vector_sync.project_embeddings")
        assert {row["project_id"] for row in direct} == set(visible)
    finally:
        await db.execute(f"reset role; drop owned by {role}; drop role {role}")


async def test_match_projects_returns_more_than_the_index_candidate_list(db: asyncpg.Connection) -> None:
    """hnsw.ef_search is 40; the iterative scan keeps going so match_count rows come back."""
    await db.executemany("insert into projects (name) values ($1)", [(f"p{number}",) for number in range(120)])
    await db.execute(
        "insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding) "
        "select id, 1, 'sha', 'model', "
        "(select array_agg(random()::real) from generate_series(1, $1) where id is not null)::vector from projects",
        DIMENSIONS,
    )
    query = f"select count(*) from public.match_projects('{vector_literal(0)}'::vector({DIMENSIONS}), 100, -1)"
    await db.execute("set enable_seqscan = off")
    assert await db.fetchval(query) == 100


async def test_match_projects_is_not_executable_by_public(db: asyncpg.Connection) -> None:
    role = f"stranger_{uuid.uuid4().hex[:10]}"
    await db.execute(f"create role {role} nologin")
    try:
        assert not await db.fetchval(
            "select has_function_privilege($1, 'public.match_projects(vector, integer, double precision)', 'execute')",
            role,
        )
    finally:
        await db.execute(f"drop role {role}")


async def test_the_change_log_is_closed_to_public_and_to_a_role_with_usage_on_vector_sync(
    db: asyncpg.Connection,
) -> None:
    role = f"peer_{uuid.uuid4().hex[:10]}"
    await db.execute(f"create role {role} nologin; grant usage on schema vector_sync to {role}")
    try:
        for grantee in ("public", role):
            for privilege in ("select", "insert", "update", "delete", "truncate", "references", "trigger"):
                assert not await db.fetchval(
                    "select has_table_privilege($1, 'vector_sync.webhook_logs', $2)", grantee, privilege
                ), f"{grantee} has {privilege} on vector_sync.webhook_logs"
            assert not await db.fetchval(
                "select has_function_privilege($1, 'vector_sync.prune_webhook_logs(interval)', 'execute')", grantee
            ), f"{grantee} may execute vector_sync.prune_webhook_logs"
        await db.execute(f"set role {role}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.fetch("select * from vector_sync.webhook_logs")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.fetchval("select vector_sync.prune_webhook_logs()")
    finally:
        await db.execute(f"reset role; drop owned by {role}; drop role {role}")


async def test_a_writer_with_no_rights_in_vector_sync_still_gets_its_changes_logged(db: asyncpg.Connection) -> None:
    role = f"writer_{uuid.uuid4().hex[:10]}"
    await db.execute(f"create role {role} nologin; grant select, insert, update, delete on public.projects to {role}")
    try:
        await db.execute(f"set role {role}")
        project, inserted = await changed_in_transaction(db, "insert into projects (name) values ('A') returning id")
        _, updated = await changed_in_transaction(db, "update projects set stars = 3 where id = $1", project)
        _, deleted = await changed_in_transaction(db, "delete from projects where id = $1", project)
        await db.execute("reset role")
        text = str(project)
        assert await log_rows(db) == sorted(
            [(text, "INSERT", 1, inserted), (text, "UPDATE", 2, updated), (text, "DELETE", 2, deleted)]
        )
    finally:
        await db.execute(f"reset role; drop owned by {role}; drop role {role}")


async def ensure_role(conn: asyncpg.Connection, role: str) -> None:
    await conn.execute(
        f"""
        do $$ begin
          if not exists (select 1 from pg_roles where rolname = '{role}') then
            create role {role} nologin;
          end if;
        exception when duplicate_object or unique_violation then null;
        end $$;
        """
    )


async def test_anon_and_authenticated_get_nothing_in_vector_sync(fresh: FreshDatabase, pg_server: str) -> None:
    async with connect(pg_server) as admin:
        for role in ("anon", "authenticated"):
            await ensure_role(admin, role)
    dsn = await fresh(SUPABASE_SETUP)
    async with connect(dsn) as conn:
        await migrate(conn, make_settings(dsn))
        tables = [
            row["name"]
            for row in await conn.fetch(
                "select format('%I.%I', schemaname, tablename) as name from pg_tables where schemaname = 'vector_sync'"
            )
        ]
        assert {
            "vector_sync.project_embeddings",
            "vector_sync.dead_letters",
            "vector_sync.schema_migrations",
            "vector_sync.webhook_logs",
        } <= set(tables)
        for role in ("anon", "authenticated"):
            assert not await conn.fetchval("select has_schema_privilege($1, 'vector_sync', 'usage')", role)
            assert not await conn.fetchval(
                "select has_function_privilege($1, 'vector_sync.prune_webhook_logs(interval)', 'execute')", role
            )
            for table in tables:
                for privilege in ("select", "insert", "update", "delete", "truncate", "references", "trigger"):
                    assert not await conn.fetchval("select has_table_privilege($1, $2, $3)", role, table, privilege), (
                        f"{role} has {privilege} on {table}"
                    )


# --- `vector-sync sql` ------------------------------------------------------------------------------


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", str(tmp_path)), **extra}


async def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vector_sync",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"vector-sync {' '.join(args)} did not finish within {timeout}s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_sql_command_output_builds_a_working_schema_that_migrate_accepts(
    fresh: FreshDatabase, tmp_path: Path
) -> None:
    env = clean_env(tmp_path, VECTOR_SYNC_EMBEDDING_DIMENSIONS=str(DIMENSIONS))
    code, sql, err = await run_cli(
        ["sql", "--offline", "--id-type", "bigint", "--vector-schema", "extensions"], env, tmp_path
    )
    assert code == 0, err
    assert "zz_vector_sync_bump_version" in sql

    dsn = await fresh(SUPABASE_SETUP)
    settings = make_settings(dsn)
    async with connect(dsn) as conn:
        await conn.execute(sql)
        assert await embedding_type(conn) == f"extensions.vector({DIMENSIONS})"
        async with listening(dsn) as listener:
            project = await conn.fetchval("insert into projects (name) values ('From SQL') returning id")
            change = await listener.next()
            assert (change["type"], change["id"], change["version"]) == ("INSERT", project, 1)
            await conn.execute("update projects set name = 'Changed' where id = $1", project)
            change = await listener.next()
            assert (change["type"], change["version"]) == ("UPDATE", 2)

        recorded = await applied_rows(conn)
        catalog = await read_catalog(conn, settings)
        assert recorded == [(m.number, m.name, m.checksum) for m in load_migrations(settings, catalog)]
        assert await migrate(conn, settings) == []
        assert await applied_rows(conn) == recorded

        # Applying the printed SQL a second time is harmless too.
        await conn.execute(sql)
        assert await applied_rows(conn) == recorded


async def test_sql_command_reads_the_table_settings(tmp_path: Path) -> None:
    env = clean_env(
        tmp_path,
        VECTOR_SYNC_TABLE='app."Project List"',
        VECTOR_SYNC_ID_COLUMN="Key",
        VECTOR_SYNC_EMBEDDING_DIMENSIONS="3072",
    )
    code, sql, err = await run_cli(["sql", "--offline", "--id-type", "text"], env, tmp_path)
    assert code == 0, err
    assert '"app"."Project List"' in sql
    assert 'references "app"."Project List" ("Key")' in sql
    assert "halfvec(3072)" in sql
    assert "halfvec_cosine_ops" in sql
    assert re.search(r"project_id\s+text primary key", sql)


async def test_a_version_column_of_another_type_is_refused(fresh: FreshDatabase) -> None:
    dsn = await fresh("create table public.projects (id bigint primary key, name text, description text, version text)")
    async with connect(dsn) as conn:
        with pytest.raises(SchemaError, match="already has a column named version"):
            await migrate(conn, make_settings(dsn))
        assert await conn.fetchval("select to_regclass('vector_sync.project_embeddings')") is None
