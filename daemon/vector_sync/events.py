"""The one event type every source produces, and the pure parsers that build it from raw input.

No I/O here: sources hand bytes or dicts in, get a `ChangeEvent` or a `MalformedEvent` out.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NewType

ProjectId = NewType("ProjectId", str)
"""The row id in its canonical text form (as Postgres prints it), the scheduler's key."""

MAX_VERSION = 2**63 - 1
MAX_TEXT_ID_BYTES = 2048


class Op(StrEnum):
    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"


class Source(StrEnum):
    REALTIME = "realtime"
    WEBHOOK = "webhook"
    LISTEN = "listen"
    DRIFT = "drift"


class IdKind(StrEnum):
    """How the source table's id column is typed, read from the catalog."""

    UUID = "uuid"
    BIGINT = "bigint"
    INTEGER = "integer"
    SMALLINT = "smallint"
    TEXT = "text"

    @property
    def sql_type(self) -> str:
        return self.value


_INT_RANGES = {
    IdKind.BIGINT: (-(2**63), 2**63 - 1),
    IdKind.INTEGER: (-(2**31), 2**31 - 1),
    IdKind.SMALLINT: (-(2**15), 2**15 - 1),
}


# ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses or reads differently.
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,19}")


class MalformedEvent(ValueError):
    """Input that cannot become a ChangeEvent. `status` is the HTTP status a webhook answers."""

    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def normalize_id(raw: object, kind: IdKind) -> ProjectId:
    """The canonical text of an id, or `MalformedEvent` when it cannot be an id of this kind."""
    if isinstance(raw, bool) or raw is None:
        raise MalformedEvent("id missing or not a valid id")
    if kind is IdKind.UUID:
        if not isinstance(raw, str):
            raise MalformedEvent("id is not a uuid")
        try:
            return ProjectId(str(uuid.UUID(raw)))
        except ValueError:
            raise MalformedEvent("id is not a uuid") from None
    if kind is IdKind.TEXT:
        text = str(raw) if isinstance(raw, int | str) else ""
        # Postgres text holds neither NUL nor lone surrogates; such an id cannot name a row.
        if text and "\x00" not in text and len(text.encode("utf-8", "surrogatepass")) <= MAX_TEXT_ID_BYTES:
            try:
                text.encode()
            except UnicodeEncodeError:
                raise MalformedEvent("id is not valid text") from None
            return ProjectId(text)
        raise MalformedEvent("id is not a non-empty string")
    low, high = _INT_RANGES[kind]
    if isinstance(raw, str) and _INTEGER_TEXT.fullmatch(raw):
        raw = int(raw)
    if isinstance(raw, int) and low <= raw <= high:
        return ProjectId(str(raw))
    raise MalformedEvent("id is not an integer in range")


def parse_version(raw: object, *, required: bool) -> int | None:
    if raw is None and not required:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_VERSION:
        raise MalformedEvent("version is not a positive integer")
    return raw


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """A hint that a row changed. The pipeline reads the row itself; the version only dedupes.

    `version` is None only for a DELETE whose old record did not carry one.
    `committed_at` is the commit (or statement) time in epoch seconds, when the source knows it.
    """

    project_id: ProjectId
    version: int | None
    op: Op
    source: Source
    received_at: float = field(default_factory=time.time)
    committed_at: float | None = None


def _op(raw: object) -> Op:
    if isinstance(raw, str) and raw.upper() in Op.__members__:
        return Op(raw.upper())
    raise MalformedEvent("type is not INSERT, UPDATE or DELETE")


def _epoch(raw: object) -> float | None:
    if isinstance(raw, int | float) and not isinstance(raw, bool) and 0 < raw < 1e11:
        return float(raw)
    return None


def parse_webhook(
    body: bytes, *, kind: IdKind, table: str, schema: str, id_column: str, received_at: float | None = None
) -> ChangeEvent:
    """A Supabase Database Webhook body → ChangeEvent. Status 400 for non-JSON, 422 for bad shape."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers bad JSON, bad UTF-8 and integers longer than Python will convert.
        raise MalformedEvent("body is not JSON", status=400) from None
    if not isinstance(payload, dict):
        raise MalformedEvent("body is not a JSON object", status=400)
    op = _op(payload.get("type"))
    if payload.get("table") != table:
        raise MalformedEvent("table does not match the configured table")
    if "schema" in payload and payload["schema"] != schema:
        raise MalformedEvent("schema does not match the configured table")
    record = payload.get("old_record") if op is Op.DELETE else payload.get("record")
    if not isinstance(record, dict):
        raise MalformedEvent("record is missing" if op is not Op.DELETE else "old_record is missing")
    project_id = normalize_id(record.get(id_column), kind)
    version = parse_version(record.get("version"), required=op is not Op.DELETE)
    return ChangeEvent(
        project_id=project_id,
        version=version,
        op=op,
        source=Source.WEBHOOK,
        received_at=received_at if received_at is not None else time.time(),
        committed_at=_epoch(payload.get("committed_at")),
    )


def parse_notify(payload: str, *, kind: IdKind) -> ChangeEvent:
    """The trigger's `pg_notify('vector_sync', …)` payload → ChangeEvent."""
    try:
        data: Any = json.loads(payload)
    except (ValueError, RecursionError):
        raise MalformedEvent("notification is not JSON") from None
    if not isinstance(data, dict):
        raise MalformedEvent("notification is not a JSON object")
    op = _op(data.get("type"))
    return ChangeEvent(
        project_id=normalize_id(data.get("id"), kind),
        version=parse_version(data.get("version"), required=op is not Op.DELETE),
        op=op,
        source=Source.LISTEN,
        committed_at=_epoch(data.get("committed_at")),
    )


@dataclass(frozen=True, slots=True)
class Truncated:
    """A Realtime event whose record was cut (413) before it yielded an id and a version.

    `project_id` is set when the id survived: only that row needs a look. Without it, any row may
    have changed.
    """

    project_id: ProjectId | None
    errors: tuple[str, ...]


def _commit_epoch(raw: object) -> float | None:
    if not isinstance(raw, str):
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return None
    # Realtime sends UTC with a "Z"; a time without an offset is read as UTC too, not local time.
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


def parse_realtime(data: object, *, kind: IdKind, table: str, schema: str, id_column: str) -> ChangeEvent | Truncated:
    """The `data` of a Realtime `postgres_changes` payload → ChangeEvent, or `Truncated` for a 413."""
    if not isinstance(data, dict):
        raise MalformedEvent("postgres_changes data is not an object")
    op = _op(data.get("type"))
    if data.get("table") != table or data.get("schema") != schema:
        raise MalformedEvent("postgres_changes for another table")
    raw_errors = data.get("errors")
    errors = tuple(str(error) for error in raw_errors) if isinstance(raw_errors, list) else ()
    record = data.get("old_record") if op is Op.DELETE else data.get("record")
    if not isinstance(record, dict):
        if errors:
            return Truncated(None, errors)
        raise MalformedEvent("record is missing" if op is not Op.DELETE else "old_record is missing")
    try:
        project_id = normalize_id(record.get(id_column), kind)
    except MalformedEvent:
        if errors:
            return Truncated(None, errors)
        raise
    try:
        version = parse_version(record.get("version"), required=op is not Op.DELETE)
    except MalformedEvent:
        if errors:
            return Truncated(project_id, errors)
        raise
    return ChangeEvent(
        project_id=project_id,
        version=version,
        op=op,
        source=Source.REALTIME,
        committed_at=_commit_epoch(data.get("commit_timestamp")),
    )
