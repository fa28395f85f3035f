"""Everything the daemon reads from and writes to Postgres, in batches, through one asyncpg pool.

Identifiers are quoted once here (`migrations.quote_*`) when the query texts are built; ids travel as
text and are cast to the id column's type in SQL, so one code path serves uuid, bigint and text.
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg
from pgvector import HalfVector, Vector
from pgvector.asyncpg import register_vector

from vector_sync.config import Settings
from vector_sync.embedder import Embedding
from vector_sync.events import ProjectId
from vector_sync.migrations import Catalog, quote_ident, quote_table, uses_halfvec

# Errors that mean "the database is unreachable right now", as opposed to a bug in a query.
DATABASE_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    # A pooled connection whose backend was terminated mid-operation can refuse the next query with
    # "cannot switch to state ...; another operation is in progress" (seen under pg_terminate_backend).
    asyncpg.exceptions.InternalClientError,
)
# Any failure to reach or query the database, for callers that report it rather than retry a batch.
DATABASE_ERRORS = (*DATABASE_UNAVAILABLE, asyncpg.PostgresError)


def content_text(values: Sequence[str | None]) -> str:
    """The text that is embedded: the content columns in order, empty ones left out."""
    return "\n\n".join(value for value in values if value)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def vector_binary(value: bytes | Embedding | Vector) -> bytes:
    """pgvector's binary input: dimensions and a reserved zero (uint16 each), then big-endian float32.

    Bytes are taken as already encoded: asyncpg would read an array of floats inside a `vector[]`
    parameter as one more array dimension, so `Store` encodes before handing vectors over.
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, Vector):
        return value.to_binary()
    components = array.array("f", value)
    if sys.byteorder == "little":
        components.byteswap()
    return struct.pack(">HH", len(components), 0) + components.tobytes()


async def vector_dimensions(db: asyncpg.Connection | asyncpg.Pool) -> int | None:
    """The size of the stored vectors: the embedding column's type modifier (None if it has none);
    vector(n) and halfvec(n) keep n there."""
    value: int | None = await db.fetchval(
        "select nullif(atttypmod, -1) from pg_attribute"
        " where attrelid = to_regclass('vector_sync.project_embeddings') and attname = 'embedding'"
    )
    return value


@dataclass(frozen=True, slots=True)
class RowState:
    """One source row as read for embedding, with what is stored for it."""

    project_id: ProjectId
    version: int
    text: str
    sha256: str
    stored_version: int | None
    stored_sha256: str | None
    stored_model: str | None
    dead_sha256: str | None
    dead_model: str | None


@dataclass(frozen=True, slots=True)
class VectorWrite:
    """A vector to store, or (embedding None) a version move for unchanged text."""

    project_id: ProjectId
    version: int
    sha256: str
    embedding: Embedding | None
    committed_at: float | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    project_id: ProjectId
    version: int
    sha256: str
    error: str


@dataclass(frozen=True, slots=True)
class Status:
    rows: int
    embedded: int
    current: int
    stale: int
    missing: int
    dead_letters: int
    pending_webhooks: int
    oldest_stale_seconds: float | None
    deliveries: dict[str, int]  # webhook_logs by status: delivered, retrying, exhausted, ...

    def webhook_summary(self) -> dict[str, int]:
        """The change log's delivery states as `vector-sync status` reports them."""
        in_delivery = ("pending", "in_flight", "retry_wait")
        return {
            "delivered": self.deliveries.get("delivered", 0),
            "retrying": sum(self.deliveries.get(state, 0) for state in in_delivery),
            "exhausted": self.deliveries.get("exhausted", 0),
            "not_sent": self.deliveries.get("unsent", 0),
        }


EmbeddingStatus = Literal["current", "stale", "missing"]


@dataclass(frozen=True, slots=True)
class ProjectRow:
    """A source row's content columns, and what is stored for it (the vector fields are None when
    no vector is stored)."""

    project_id: str
    content: tuple[str | None, ...]  # the content columns, in the configured order
    version: int
    vector_version: int | None
    vector_model: str | None
    embedded_at: datetime | None
    vector_age_seconds: float | None

    def embedding_status(self, model: str) -> EmbeddingStatus:
        """`current` when the vector is of the row's version and `model`; else `stale` (behind, or
        another model's: the drift pass re-embeds both), or `missing`. As `status()` counts them."""
        if self.vector_version is None:
            return "missing"
        return "current" if self.vector_version == self.version and self.vector_model == model else "stale"


@dataclass(frozen=True, slots=True)
class SearchHit:
    project_id: str
    similarity: float
    text: str
    row: ProjectRow


class Store:
    """Queries over the source table and `vector_sync.*`, rendered once for this deployment."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, catalog: Catalog) -> None:
        self.pool = pool
        self.model = settings.vector_model
        self._halfvec = uses_halfvec(settings.embedding_dimensions)
        table = quote_table(settings.table)
        ident = quote_ident(settings.id_column)
        id_type = catalog.id_kind.sql_type
        columns = ", ".join(f"t.{quote_ident(column)}::text" for column in settings.content_columns)
        self._content_count = len(settings.content_columns)
        self._read_rows = f"""
            select k.key, t.version, e.version, e.content_sha256, e.model,
                   d.content_sha256, d.model, {columns}
              from unnest($1::text[]) as k(key)
              join {table} t on t.{ident} = k.key::{id_type}
              left join vector_sync.project_embeddings e on e.project_id = t.{ident}
              left join vector_sync.dead_letters d on d.project_id = t.{ident}
        """
        array_type = "halfvec[]" if self._halfvec else "vector[]"
        vector_schema = quote_ident(catalog.vector_schema)
        # Versions restart at 1 when a row is deleted and inserted again, so a batch holding the old
        # life's text can meet the new life at the same version: at equal versions the row's text
        # must still be the one embedded (same text and hash as `read_rows` computes), or the write
        # is refused. A vector at an older version than its row is allowed: it reads as stale.
        texts = ", ".join(f"nullif(t.{quote_ident(column)}::text, '')" for column in settings.content_columns)
        same_life = (
            "(t.version > u.version"
            f" or encode(sha256(convert_to(concat_ws(E'\\n\\n', {texts}), 'UTF8')), 'hex') = u.sha)"
        )
        # The join with the source row makes a write for a deleted row a no-op, and `for key share`
        # makes a concurrent delete wait for this transaction (its cascade then removes the vector)
        # or, committed first, leaves the row out: never a foreign key error.
        self._upsert = f"""
            insert into vector_sync.project_embeddings as e
                   (project_id, version, content_sha256, model, embedding, embedded_at, committed_at)
            select t.{ident}, u.version, u.sha, $5, u.embedding, clock_timestamp(),
                   to_timestamp(u.committed_at)
              from unnest($1::text[], $2::bigint[], $3::text[], $4::{vector_schema}.{array_type},
                          $6::float8[]) as u(key, version, sha, embedding, committed_at)
              join {table} t on t.{ident} = u.key::{id_type} and t.version >= u.version and {same_life}
               for key share of t
            on conflict (project_id) do update
               set version = excluded.version, content_sha256 = excluded.content_sha256,
                   model = excluded.model, embedding = excluded.embedding,
                   embedded_at = excluded.embedded_at, committed_at = excluded.committed_at
             where excluded.version > e.version
                or (excluded.version = e.version
                    and (excluded.model <> e.model or excluded.content_sha256 <> e.content_sha256))
            returning e.project_id::text, e.version
        """
        self._move_versions = f"""
            update vector_sync.project_embeddings as e
               set version = u.version, embedded_at = clock_timestamp(),
                   committed_at = to_timestamp(u.committed_at)
              from unnest($1::text[], $2::bigint[], $3::text[], $5::float8[])
                   as u(key, version, sha, committed_at)
              join {table} t on t.{ident} = u.key::{id_type} and t.version >= u.version and {same_life}
             where e.project_id = t.{ident} and e.version < u.version
               and e.content_sha256 = u.sha and e.model = $4
            returning e.project_id::text, e.version
        """
        self._clear_dead = f"""
            delete from vector_sync.dead_letters d using unnest($1::text[]) as k(key)
             where d.project_id = k.key::{id_type}
        """
        # The vector of the row's previous text goes too: search must not find the row for words
        # it no longer has.
        self._dead_letter = f"""
            with stale as (
              delete from vector_sync.project_embeddings where project_id = $1::text::{id_type}
            )
            insert into vector_sync.dead_letters as d
                   (project_id, version, content_sha256, model, error)
            select t.{ident}, $2, $3, $4, $5 from {table} t where t.{ident} = $1::text::{id_type}
            on conflict (project_id) do update
               set version = excluded.version, content_sha256 = excluded.content_sha256,
                   model = excluded.model, error = excluded.error,
                   attempts = d.attempts + 1, last_failed_at = now()
        """
        self._dead_letter_seen = f"""
            update vector_sync.dead_letters set version = $2
             where project_id = $1::text::{id_type} and version < $2
        """
        # Keyset pages over the primary key; both sides are walked in id order by their indexes.
        stale = f"""
            (e.project_id is null or e.version < t.version or e.model <> $1)
            and not exists (select 1 from vector_sync.dead_letters d
                             where d.project_id = t.{ident} and d.version >= t.version and d.model = $1)
        """
        self._drift_first = f"""
            select t.{ident}::text, t.version from {table} t
              left join vector_sync.project_embeddings e on e.project_id = t.{ident}
             where {stale}
             order by t.{ident} limit $2
        """
        self._drift_next = f"""
            select t.{ident}::text, t.version from {table} t
              -- The bound on e too: without it the merge join reads every vector before the page again.
              left join vector_sync.project_embeddings e
                     on e.project_id = t.{ident} and e.project_id > $3::text::{id_type}
             where t.{ident} > $3::text::{id_type} and {stale}
             order by t.{ident} limit $2
        """
        self._stale_among = f"""
            select t.{ident}::text, t.version from unnest($2::text[]) as k(key)
              join {table} t on t.{ident} = k.key::{id_type}
              left join vector_sync.project_embeddings e on e.project_id = t.{ident}
             where {stale}
        """
        # A claimed change is settled when its row is gone, its vector is at the change's version or
        # the row's current one, or the row is dead-lettered at its current text.
        self._resolve_pending = f"""
            update vector_sync.pending_webhooks p set resolved_at = now()
             where p.log_id = any($2::bigint[]) and p.resolved_at is null
               and (not exists (select 1 from {table} t where t.{ident} = p.project_id::{id_type})
                    or exists (select 1 from {table} t
                                 join vector_sync.project_embeddings e on e.project_id = t.{ident}
                                where t.{ident} = p.project_id::{id_type} and e.model = $1
                                  and (e.version >= t.version or e.version >= p.source_version))
                    or exists (select 1 from {table} t
                                 join vector_sync.dead_letters d on d.project_id = t.{ident}
                                where t.{ident} = p.project_id::{id_type} and d.model = $1
                                  and d.version >= t.version))
            returning p.log_id
        """
        self._status = f"""
            select count(*) as rows,
                   count(e.project_id) as embedded,
                   count(*) filter (where e.version = t.version and e.model = $1) as current,
                   count(*) filter (where e.project_id is null) as missing,
                   extract(epoch from now() - min(e.embedded_at)
                           filter (where e.version < t.version or e.model <> $1))::float8 as oldest
              from {table} t left join vector_sync.project_embeddings e on e.project_id = t.{ident}
        """
        # `ProjectRow` columns first (see `_project_row`), then anything else.
        stored = "e.version, e.model, e.embedded_at, extract(epoch from now() - e.embedded_at)::float8"
        self._search = f"""
            select m.id::text, t.version, {stored}, {columns}, m.similarity
              from public.match_projects($1::{vector_schema}.{array_type.removesuffix("[]")}, $2, $3) m
              join {table} t on t.{ident} = m.id
              join vector_sync.project_embeddings e on e.project_id = m.id
             order by m.similarity desc
        """
        self._project = f"""
            select t.{ident}::text, t.version, {stored}, {columns}
              from {table} t left join vector_sync.project_embeddings e on e.project_id = t.{ident}
             where t.{ident} = $1::text::{id_type}
        """

    @staticmethod
    async def connect(
        settings: Settings,
        catalog: Catalog,
        *,
        min_size: int = 1,
        read_only: bool = False,
        application_name: str = "vector-sync",
    ) -> Store:
        """A store on a new pool. `read_only` starts every session with `default_transaction_read_only`,
        so the server refuses any write through this store, whatever a caller attempts."""

        async def init(conn: asyncpg.Connection) -> None:
            await register_vector(conn, schema=catalog.vector_schema)
            # Ours for `vector`: float32 arrays go to the wire as they are, not through a Python list.
            await conn.set_type_codec(
                "vector",
                schema=catalog.vector_schema,
                encoder=vector_binary,
                decoder=Vector.from_binary,
                format="binary",
            )

        server_settings = {"application_name": application_name}
        if read_only:
            server_settings["default_transaction_read_only"] = "on"
        assert settings.database_url is not None
        pool = await asyncpg.create_pool(
            settings.database_url.get_secret_value(),
            min_size=min_size,
            max_size=settings.pool_size,
            init=init,
            # Idle connections are closed so an idle daemon holds (and pings) as little as possible.
            max_inactive_connection_lifetime=300,
            server_settings=server_settings,
        )
        return Store(pool, settings, catalog)

    async def close(self) -> None:
        await self.pool.close()

    async def read_rows(self, keys: Sequence[ProjectId]) -> dict[ProjectId, RowState]:
        """The current rows for `keys`; a key missing from the result is a deleted row."""
        records = await self.pool.fetch(self._read_rows, list(keys))
        found: dict[ProjectId, RowState] = {}
        for record in records:
            text = content_text([record[7 + index] for index in range(self._content_count)])
            key = ProjectId(record[0])
            found[key] = RowState(
                project_id=key,
                version=record[1],
                text=text,
                sha256=sha256_hex(text),
                stored_version=record[2],
                stored_sha256=record[3],
                stored_model=record[4],
                dead_sha256=record[5],
                dead_model=record[6],
            )
        return found

    async def write(self, writes: Sequence[VectorWrite]) -> dict[ProjectId, int]:
        """Store vectors and move versions in one transaction; return the versions now stored.

        A write the guard refuses (an older version than the stored one, a deleted row, or a row
        deleted and inserted again that has other text at the same version) is left out of the result.
        """
        vectors = [(write, write.embedding) for write in writes if write.embedding is not None]
        moves = [write for write in writes if write.embedding is None]
        applied: dict[ProjectId, int] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            if vectors:
                rows = await conn.fetch(
                    self._upsert,
                    [write.project_id for write, _ in vectors],
                    [write.version for write, _ in vectors],
                    [write.sha256 for write, _ in vectors],
                    [self._vector(embedding) for _, embedding in vectors],
                    self.model,
                    [write.committed_at for write, _ in vectors],
                )
                applied.update((ProjectId(row[0]), row[1]) for row in rows)
                await conn.execute(self._clear_dead, [write.project_id for write, _ in vectors])
            if moves:
                rows = await conn.fetch(
                    self._move_versions,
                    [write.project_id for write in moves],
                    [write.version for write in moves],
                    [write.sha256 for write in moves],
                    self.model,
                    [write.committed_at for write in moves],
                )
                applied.update((ProjectId(row[0]), row[1]) for row in rows)
        return applied

    def _vector(self, embedding: Embedding) -> Any:
        return HalfVector(embedding.tolist()) if self._halfvec else vector_binary(embedding)

    async def dead_letter(self, letter: DeadLetter) -> None:
        await self.pool.execute(
            self._dead_letter,
            letter.project_id,
            letter.version,
            letter.sha256,
            self.model,
            letter.error[:2000],
        )

    async def note_dead_letter_version(self, project_id: ProjectId, version: int) -> None:
        """The text of a dead-lettered row is unchanged at a newer version: keep it out of drift."""
        await self.pool.execute(self._dead_letter_seen, project_id, version)

    async def drift_page(self, after: str | None, limit: int) -> list[tuple[ProjectId, int]]:
        """Up to `limit` rows whose vector is missing or behind, with ids after `after`."""
        if after is None:
            rows = await self.pool.fetch(self._drift_first, self.model, limit)
        else:
            rows = await self.pool.fetch(self._drift_next, self.model, limit, after)
        return [(ProjectId(row[0]), row[1]) for row in rows]

    async def stale_among(self, ids: Sequence[str]) -> list[tuple[ProjectId, int]]:
        """Those of `ids` whose vector is missing or behind (ids of deleted rows simply drop out)."""
        rows = await self.pool.fetch(self._stale_among, self.model, list(ids))
        return [(ProjectId(row[0]), row[1]) for row in rows]

    async def snapshot_xmin(self) -> int:
        """Every transaction below this id has finished: its changes are visible from now on."""
        return int(await self.pool.fetchval("select pg_snapshot_xmin(pg_current_snapshot())::text::bigint"))

    async def changed_since(self, xmin: int, limit: int) -> list[str]:
        """Ids of rows changed by transactions at or above `xmin` (at most `limit`), from the change log."""
        rows = await self.pool.fetch(
            """
            select distinct project_id from vector_sync.webhook_logs
             where txid >= $1
             limit $2
            """,
            xmin,
            limit,
        )
        return [row[0] for row in rows]

    async def prune_change_log(self) -> int:
        return int(await self.pool.fetchval("select vector_sync.prune_webhook_logs()"))

    async def claim_pending(self, limit: int) -> list[tuple[int, ProjectId]]:
        """Claim open pending changes nobody claimed in the last five minutes (another daemon's
        claim, or one that crashed): (log id, row id) of each."""
        rows = await self.pool.fetch(
            """
            with claimable as (
              select log_id from vector_sync.pending_webhooks
               where resolved_at is null and (claimed_at is null or claimed_at < now() - interval '5 minutes')
               order by created_at
               limit $1
               for update skip locked)
            update vector_sync.pending_webhooks p set claimed_at = now()
              from claimable c where p.log_id = c.log_id
            returning p.log_id, p.project_id
            """,
            limit,
        )
        return [(row[0], ProjectId(row[1])) for row in rows]

    async def foreign_claim_expiry(self, ours: Sequence[int]) -> float | None:
        """Seconds until the earliest open claim not in `ours` expires (a daemon that died holding it)."""
        value = await self.pool.fetchval(
            """
            select extract(epoch from min(claimed_at) + interval '5 minutes' - now())::float8
              from vector_sync.pending_webhooks
             where resolved_at is null and claimed_at is not null and log_id <> all($1::bigint[])
            """,
            list(ours),
        )
        return None if value is None else max(0.0, float(value))

    async def resolve_pending(self, log_ids: Sequence[int]) -> list[int]:
        """Mark settled those of `log_ids` whose change is embedded (or moot); returns them."""
        rows = await self.pool.fetch(self._resolve_pending, self.model, list(log_ids))
        return [row[0] for row in rows]

    async def clear_dead_letters(self) -> int:
        """Forget every dead letter, so the next pass tries those rows again; returns how many."""
        return int(
            await self.pool.fetchval(
                "with gone as (delete from vector_sync.dead_letters returning 1) select count(*) from gone"
            )
        )

    async def status(self) -> Status:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(self._status, self.model)
            dead = await conn.fetchval("select count(*) from vector_sync.dead_letters")
            pending = await conn.fetchval("select count(*) from vector_sync.pending_webhooks where resolved_at is null")
            deliveries = {
                status: count
                for status, count in await conn.fetch(
                    "select status, count(*) from vector_sync.webhook_logs group by status"
                )
            }
        assert row is not None
        return Status(
            rows=row["rows"],
            embedded=row["embedded"],
            current=row["current"],
            stale=row["embedded"] - row["current"],
            missing=row["missing"],
            dead_letters=dead,
            pending_webhooks=pending,
            oldest_stale_seconds=row["oldest"],
            deliveries=deliveries,
        )

    async def search(self, embedding: Embedding, limit: int, min_similarity: float = 0.0) -> list[SearchHit]:
        """The nearest rows through `public.match_projects` (the caller's row level security holds)."""
        rows = await self.pool.fetch(self._search, self._vector(embedding), limit, min_similarity)
        hits = []
        for row in rows:
            project = self._project_row(row)
            hits.append(SearchHit(project.project_id, row[-1], content_text(project.content), project))
        return hits

    async def read_project(self, key: ProjectId) -> ProjectRow | None:
        """One source row with its stored vector's version and age; None when no such row is visible."""
        row = await self.pool.fetchrow(self._project, key)
        return None if row is None else self._project_row(row)

    async def vector_dimensions(self) -> int | None:
        return await vector_dimensions(self.pool)

    def _project_row(self, row: asyncpg.Record) -> ProjectRow:
        return ProjectRow(
            project_id=row[0],
            version=row[1],
            vector_version=row[2],
            vector_model=row[3],
            embedded_at=row[4],
            vector_age_seconds=row[5],
            content=tuple(row[6 + index] for index in range(self._content_count)),
        )
