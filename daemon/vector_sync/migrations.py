"""Render the `sql/` migrations for this deployment and apply them, once each, under a lock.

Rendering only ever substitutes quoted identifiers, a type chosen from a fixed list and validated
integers, so nothing from the environment is pasted into SQL.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg
from loguru import logger

from vector_sync.config import Settings, TableName
from vector_sync.events import IdKind

# Two hosts running `migrate` at once queue on this lock instead of racing on DDL.
MIGRATION_LOCK_KEY = 0x76656374_6D696772  # "vectmigr"
HNSW_VECTOR_MAX_DIMENSIONS = 2000
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def quote_ident(name: str) -> str:
    """Postgres' quote_ident, always quoting: safe for any name, including ones with quotes."""
    if "\x00" in name:
        raise ValueError("identifiers cannot contain NUL")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A string constant, safe whatever standard_conforming_strings says (E'' escapes backslashes)."""
    if "\x00" in text:
        raise ValueError("string constants cannot contain NUL")
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_table(table: TableName) -> str:
    return f"{quote_ident(table.schema)}.{quote_ident(table.name)}"


class SchemaError(Exception):
    """The database is not in a state the daemon can work with (missing table, wrong id type...)."""


@dataclass(frozen=True, slots=True)
class Catalog:
    """Facts read from the database that the rendered SQL depends on."""

    id_kind: IdKind
    vector_schema: str
    vector_version: tuple[int, ...] = (0, 8, 0)

    @property
    def has_iterative_scan(self) -> bool:
        return self.vector_version >= (0, 8, 0)


@dataclass(frozen=True, slots=True)
class Migration:
    number: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


_ID_TYPES = {
    "uuid": IdKind.UUID,
    "bigint": IdKind.BIGINT,
    "integer": IdKind.INTEGER,
    "smallint": IdKind.SMALLINT,
    "text": IdKind.TEXT,
    "character varying": IdKind.TEXT,
}


async def read_source_table(conn: asyncpg.Connection, settings: Settings) -> IdKind:
    """The id column's kind, once the table, its id column and every content column are found.

    A missing content column is refused here: otherwise every batch's read would fail for as long as
    the daemon runs.
    """
    table = settings.table
    rows = await conn.fetch(
        """
        select a.attname::text as name, format_type(a.atttypid, null) as type
          from pg_attribute a
          join pg_class c on c.oid = a.attrelid
          join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = $1 and c.relname = $2 and a.attname = any($3::text[])
           and a.attnum > 0 and not a.attisdropped
        """,
        table.schema,
        table.name,
        [settings.id_column, *settings.content_columns],
    )
    types: dict[str, str] = {row["name"]: row["type"] for row in rows}
    if settings.id_column not in types:
        exists = await conn.fetchval(
            "select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = $1 and c.relname = $2",
            table.schema,
            table.name,
        )
        if not exists:
            raise SchemaError(f"table {table} does not exist (VECTOR_SYNC_TABLE)")
        raise SchemaError(f"table {table} has no column {settings.id_column!r} (VECTOR_SYNC_ID_COLUMN)")
    missing = [column for column in settings.content_columns if column not in types]
    if missing:
        raise SchemaError(
            f"table {table} has no column {missing[0]!r} (VECTOR_SYNC_CONTENT_COLUMNS); "
            'a name with a comma or spaces at its ends goes in "double quotes"'
        )
    kind = _ID_TYPES.get(types[settings.id_column])
    if kind is None:
        raise SchemaError(
            f"id column {settings.id_column!r} of {table} is {types[settings.id_column]}; "
            "expected uuid, bigint, integer or text"
        )
    return kind


async def read_vector_schema(conn: asyncpg.Connection) -> str | None:
    schema: str | None = await conn.fetchval(
        "select n.nspname from pg_extension e join pg_namespace n on n.oid = e.extnamespace where e.extname = 'vector'"
    )
    return schema


async def read_vector_version(conn: asyncpg.Connection) -> tuple[int, ...]:
    text = await conn.fetchval("select extversion from pg_extension where extname = 'vector'") or "0"
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


async def read_catalog(conn: asyncpg.Connection, settings: Settings) -> Catalog:
    id_kind = await read_source_table(conn, settings)
    vector_schema = await read_vector_schema(conn)
    if vector_schema is None:
        raise SchemaError("the pgvector extension is not installed; run `vector-sync migrate`")
    return Catalog(id_kind, vector_schema, await read_vector_version(conn))


def uses_halfvec(dimensions: int) -> bool:
    """HNSW indexes vector up to 2000 dimensions; above that the column is halfvec."""
    return dimensions > HNSW_VECTOR_MAX_DIMENSIONS


def vector_type(dimensions: int, vector_schema: str) -> tuple[str, str]:
    """The column type and its HNSW cosine opclass, schema-qualified."""
    base = "halfvec" if uses_halfvec(dimensions) else "vector"
    schema = quote_ident(vector_schema)
    return f"{schema}.{base}({int(dimensions)})", f"{schema}.{base}_cosine_ops"


def render(template: str, settings: Settings, catalog: Catalog) -> str:
    for line in template.splitlines():
        comment = line.find("--")
        if comment != -1 and "{{" in line[comment:]:
            # A quoted name may hold a line break, which would end the comment and run the rest.
            raise ValueError(f"a placeholder inside an SQL comment: {line.strip()!r}")
    column_type, opclass = vector_type(settings.embedding_dimensions, catalog.vector_schema)
    values = {
        "table": quote_table(settings.table),
        "table_literal": quote_literal(quote_table(settings.table)),
        "table_name_literal": quote_literal(settings.table.name),
        "table_schema_literal": quote_literal(settings.table.schema),
        "id_column": quote_ident(settings.id_column),
        "id_type": catalog.id_kind.sql_type,
        "dimensions": str(int(settings.embedding_dimensions)),
        "vector_type": column_type,
        "vector_opclass": opclass,
        "vector_schema": quote_ident(catalog.vector_schema),
        "search_settings": "set hnsw.iterative_scan = strict_order" if catalog.has_iterative_scan else "",
    }

    def substitute(match: re.Match[str]) -> str:
        try:
            return values[match.group(1)]
        except KeyError:
            raise KeyError(f"unknown placeholder {match.group(0)} in a migration") from None

    return _PLACEHOLDER.sub(substitute, template)


def load_migrations(settings: Settings, catalog: Catalog) -> list[Migration]:
    folder = resources.files("vector_sync.sql").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            sql = render(entry.read_text(encoding="utf-8"), settings, catalog)
            found.append(Migration(int(match.group(1)), match.group(2), sql))
    found.sort(key=lambda migration: migration.number)
    return found


async def ensure_pgvector(conn: asyncpg.Connection) -> str:
    """Create pgvector where Supabase keeps extensions (schema `extensions`) or in public."""
    schema = await read_vector_schema(conn)
    if schema is not None:
        return schema
    has_extensions_schema = await conn.fetchval(
        "select exists (select 1 from pg_namespace where nspname = 'extensions')"
    )
    target = "extensions" if has_extensions_schema else "public"
    await conn.execute(f"create extension if not exists vector with schema {quote_ident(target)}")
    logger.info("created extension vector in schema {schema}", schema=target)
    return target


async def migrate(conn: asyncpg.Connection, settings: Settings) -> list[Migration]:
    """Apply every missing migration; return those applied. Safe to run from two hosts at once."""
    await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        vector_schema = await ensure_pgvector(conn)
        catalog = Catalog(await read_source_table(conn, settings), vector_schema, await read_vector_version(conn))
        await conn.execute(
            """
            create schema if not exists vector_sync;
            create table if not exists vector_sync.schema_migrations (
              number     integer primary key,
              name       text not null,
              checksum   text not null,
              applied_at timestamptz not null default now()
            );
            """
        )
        applied = {
            row["number"]: row["checksum"]
            for row in await conn.fetch("select number, checksum from vector_sync.schema_migrations")
        }
        if 1 not in applied:
            await _check_version_column(conn, settings)
        done = []
        for migration in load_migrations(settings, catalog):
            if migration.number in applied:
                if applied[migration.number] != migration.checksum:
                    logger.warning(
                        "migration {number} was applied with other settings or an older text; not re-applied",
                        number=migration.number,
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "insert into vector_sync.schema_migrations (number, name, checksum) values ($1, $2, $3)",
                    migration.number,
                    migration.name,
                    migration.checksum,
                )
            logger.info("applied migration {number} {name}", number=migration.number, name=migration.name)
            done.append(migration)
        return done
    finally:
        await conn.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _check_version_column(conn: asyncpg.Connection, settings: Settings) -> None:
    """A `version` column the table already has is adopted only if it can be ours: bigint."""
    existing = await conn.fetchval(
        """
        select format_type(a.atttypid, null) from pg_attribute a
          join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = $1 and c.relname = $2 and a.attname = 'version' and a.attnum > 0 and not a.attisdropped
        """,
        settings.table.schema,
        settings.table.name,
    )
    if existing is not None and existing != "bigint":
        raise SchemaError(
            f"table {settings.table} already has a column named version ({existing}); vector-sync needs a bigint "
            "version column of its own"
        )
    if existing is not None:
        logger.warning(
            "table {table} already has a bigint version column; vector-sync adopts it", table=str(settings.table)
        )


async def pending_migrations(conn: asyncpg.Connection, settings: Settings, catalog: Catalog) -> list[int]:
    """Numbers of migrations not yet applied (all of them when the bookkeeping table is missing)."""
    known = [migration.number for migration in load_migrations(settings, catalog)]
    exists = await conn.fetchval("select to_regclass('vector_sync.schema_migrations') is not null")
    if not exists:
        return known
    applied = {row["number"] for row in await conn.fetch("select number from vector_sync.schema_migrations")}
    return [number for number in known if number not in applied]
