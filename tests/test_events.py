"""The pure parsers of `vector_sync.events`: ids, webhook bodies and NOTIFY payloads."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vector_sync.events import (
    ChangeEvent,
    IdKind,
    MalformedEvent,
    Op,
    Source,
    normalize_id,
    parse_notify,
    parse_webhook,
)

UUID_TEXT = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
BIGINT = (-(2**63), 2**63 - 1)
INTEGER = (-(2**31), 2**31 - 1)
SMALLINT = (-(2**15), 2**15 - 1)


def malformed(raw: object, kind: IdKind) -> MalformedEvent:
    with pytest.raises(MalformedEvent) as caught:
        normalize_id(raw, kind)
    return caught.value


# --- normalize_id: uuid -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        UUID_TEXT,
        UUID_TEXT.upper(),
        "A0EEBC99-9c0b-4EF8-bb6d-6BB9BD380A11",
        "{" + UUID_TEXT + "}",
        UUID_TEXT.replace("-", ""),
    ],
    ids=["canonical", "upper", "mixed", "braces", "no-hyphens"],
)
def test_uuid_ids_are_canonicalised(raw: str) -> None:
    assert normalize_id(raw, IdKind.UUID) == UUID_TEXT


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not-a-uuid",
        UUID_TEXT[:-1],
        UUID_TEXT + "0",
        UUID_TEXT.replace("a", "g", 1),
        42,
        uuid.UUID(UUID_TEXT).int,
        1.5,
        [UUID_TEXT],
        {"id": UUID_TEXT},
        True,
        None,
    ],
    ids=["empty", "words", "short", "long", "non-hex", "int", "uuid-as-int", "float", "list", "dict", "bool", "none"],
)
def test_uuid_ids_refused(raw: object) -> None:
    malformed(raw, IdKind.UUID)


@given(st.uuids())
def test_any_uuid_round_trips_in_its_canonical_text(value: uuid.UUID) -> None:
    assert normalize_id(str(value).upper(), IdKind.UUID) == str(value)
    assert normalize_id(value.hex, IdKind.UUID) == str(value)


# --- normalize_id: integers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "bounds"), [(IdKind.BIGINT, BIGINT), (IdKind.INTEGER, INTEGER), (IdKind.SMALLINT, SMALLINT)]
)
def test_integer_id_range_edges(kind: IdKind, bounds: tuple[int, int]) -> None:
    low, high = bounds
    for value in (low, low + 1, -1, 0, 1, high - 1, high):
        assert normalize_id(value, kind) == str(value)
        assert normalize_id(str(value), kind) == str(value)
    for value in (low - 1, high + 1, low - 2**70, high + 2**70):
        malformed(value, kind)
        malformed(str(value), kind)


@pytest.mark.parametrize("kind", [IdKind.BIGINT, IdKind.INTEGER, IdKind.SMALLINT])
def test_numeric_strings_become_canonical_integers(kind: IdKind) -> None:
    assert normalize_id("42", kind) == "42"
    assert normalize_id("-42", kind) == "-42"
    assert normalize_id("0042", kind) == "42"
    assert normalize_id("-0", kind) == "0"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "-",
        "abc",
        "4.2",
        "4.0",
        "1e3",
        "5-",
        "--5",
        "-" * 5 + "5",
        "²",
        "1" * 5000,
        4.0,
        4.2,
        float("inf"),
        float("nan"),
        True,
        False,
        None,
        [42],
        {"id": 42},
        b"42",
    ],
)
def test_integer_ids_refused(raw: object) -> None:
    malformed(raw, IdKind.BIGINT)


def test_bools_and_none_are_refused_for_every_kind() -> None:
    for kind in IdKind:
        for raw in (True, False, None):
            assert malformed(raw, kind).status == 422


@given(st.integers(*BIGINT))
def test_every_bigint_round_trips(value: int) -> None:
    assert normalize_id(value, IdKind.BIGINT) == str(value)
    assert normalize_id(str(value), IdKind.BIGINT) == str(value)


@given(st.integers(*BIGINT))
def test_integer_kinds_agree_with_their_ranges(value: int) -> None:
    for kind, (low, high) in ((IdKind.INTEGER, INTEGER), (IdKind.SMALLINT, SMALLINT)):
        if low <= value <= high:
            assert normalize_id(value, kind) == str(value)
        else:
            malformed(value, kind)


@given(st.text(max_size=30))
def test_arbitrary_strings_give_an_id_or_malformed_never_another_error(raw: str) -> None:
    for kind in IdKind:
        try:
            result = normalize_id(raw, kind)
        except MalformedEvent:
            continue
        if kind in (IdKind.BIGINT, IdKind.INTEGER, IdKind.SMALLINT):
            assert str(int(result)) == result  # canonical integer text
            assert result.lstrip("-").isascii()


# --- normalize_id: text -----------------------------------------------------------------------


def test_text_ids() -> None:
    assert normalize_id("abc", IdKind.TEXT) == "abc"
    assert normalize_id("  spaced  ", IdKind.TEXT) == "  spaced  "
    assert normalize_id("x" * 2048, IdKind.TEXT) == "x" * 2048
    assert normalize_id("é" * 1024, IdKind.TEXT) == "é" * 1024  # 2048 bytes
    assert normalize_id(42, IdKind.TEXT) == "42"


@pytest.mark.parametrize(
    "raw",
    ["", "x" * 2049, "é" * 1025, "😀" * 513, 1.5, [], {}, ["abc"], True, False, None],
    ids=[
        "empty",
        "2049-bytes",
        "2050-bytes-2-byte-chars",
        "2052-bytes-emoji",
        "float",
        "list",
        "dict",
        "list-str",
        "true",
        "false",
        "none",
    ],
)
def test_text_ids_refused(raw: object) -> None:
    malformed(raw, IdKind.TEXT)


# --- parse_webhook ----------------------------------------------------------------------------


def webhook(document: Any, kind: IdKind = IdKind.BIGINT, **options: Any) -> ChangeEvent:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return parse_webhook(body, kind=kind, table="projects", schema="public", id_column="id", **options)


def webhook_status(document: Any, kind: IdKind = IdKind.BIGINT) -> int:
    with pytest.raises(MalformedEvent) as caught:
        webhook(document, kind)
    return caught.value.status


def event(op: Any = "UPDATE", record: Any = None, old_record: Any = None, **extra: Any) -> dict[str, Any]:
    document = {"type": op, "table": "projects", "schema": "public", "record": record, "old_record": old_record}
    document.update(extra)
    return document


def test_webhook_update() -> None:
    before = time.time()
    result = webhook(event("UPDATE", {"id": 7, "version": 3, "name": "x"}, {"id": 7, "version": 2}))
    assert result.project_id == "7"
    assert result.version == 3  # from record, not old_record
    assert result.op is Op.UPDATE
    assert result.source is Source.WEBHOOK
    assert result.committed_at is None
    assert before <= result.received_at <= time.time()


def test_webhook_insert_and_delete() -> None:
    inserted = webhook(event("INSERT", {"id": 8, "version": 1}))
    assert (inserted.project_id, inserted.version, inserted.op) == ("8", 1, Op.INSERT)
    deleted = webhook(event("DELETE", None, {"id": 9, "version": 4}))
    assert (deleted.project_id, deleted.version, deleted.op) == ("9", 4, Op.DELETE)
    unversioned = webhook(event("DELETE", None, {"id": 9}))
    assert (unversioned.project_id, unversioned.version) == ("9", None)
    # A DELETE reads old_record: a record present for some reason does not override it.
    odd = webhook(event("DELETE", {"id": 1, "version": 1}, {"id": 9, "version": 4}))
    assert (odd.project_id, odd.version) == ("9", 4)


def test_webhook_tolerates_extra_keys() -> None:
    document = event("UPDATE", {"id": 7, "version": 3, "extra": [1, 2]}, None, anything={"x": 1})
    assert webhook(document).project_id == "7"


def test_webhook_ids_are_normalised_for_the_column_kind() -> None:
    assert webhook(event("UPDATE", {"id": UUID_TEXT.upper(), "version": 1}), IdKind.UUID).project_id == UUID_TEXT
    assert webhook(event("UPDATE", {"id": "slug-1", "version": 1}), IdKind.TEXT).project_id == "slug-1"
    assert webhook(event("UPDATE", {"id": "0042", "version": 1}), IdKind.INTEGER).project_id == "42"


def test_webhook_uses_the_configured_id_column() -> None:
    body = json.dumps(event("UPDATE", {"id": 1, "key": 99, "version": 2})).encode()
    result = parse_webhook(body, kind=IdKind.BIGINT, table="projects", schema="public", id_column="key")
    assert result.project_id == "99"


def test_webhook_table_and_schema_come_from_the_arguments() -> None:
    document = event("UPDATE", {"id": 1, "version": 2}, None, table="items", schema="catalog")
    body = json.dumps(document).encode()
    assert parse_webhook(body, kind=IdKind.BIGINT, table="items", schema="catalog", id_column="id").project_id == "1"
    assert webhook_status(document) == 422


def test_webhook_received_at_can_be_given() -> None:
    assert webhook(event("INSERT", {"id": 8, "version": 1}), received_at=12.5).received_at == 12.5


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1_700_000_000, 1_700_000_000.0),
        (1_700_000_000.123456, 1_700_000_000.123456),
        ("1700000000", None),
        ("2024-01-01T00:00:00Z", None),
        (True, None),
        (0, None),
        (-5, None),
        (1_700_000_000_000, None),  # milliseconds, not seconds
        (None, None),
        ([1_700_000_000], None),
    ],
)
def test_webhook_committed_at(raw: object, expected: float | None) -> None:
    result = webhook(event("INSERT", {"id": 8, "version": 1}, None, committed_at=raw))
    assert result.committed_at == expected


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{",
        b'{"type": "UPDATE",}',
        b"[]",
        b'[{"type": "UPDATE"}]',
        b'"UPDATE"',
        b"42",
        b"null",
        b"true",
        b'{"type": "UPDATE", "table": "projects\xff"}',
        b"\xff\xfe\x00",
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=[
        "empty",
        "words",
        "open-brace",
        "trailing-comma",
        "empty-array",
        "array",
        "string",
        "number",
        "null",
        "true",
        "invalid-utf8",
        "garbage-bytes",
        "deep-nesting",
    ],
)
def test_webhook_not_a_json_object_is_400(body: bytes) -> None:
    assert webhook_status(body) == 400


@pytest.mark.parametrize(
    "document",
    [
        event("TRUNCATE", {"id": 1, "version": 1}),
        event("", {"id": 1, "version": 1}),
        event(None, {"id": 1, "version": 1}),
        event(1, {"id": 1, "version": 1}),
        {"table": "projects", "record": {"id": 1, "version": 1}},
        event("UPDATE", {"id": 1, "version": 1}, table="users"),
        event("UPDATE", {"id": 1, "version": 1}, table=None),
        {"type": "UPDATE", "record": {"id": 1, "version": 1}},
        event("UPDATE", {"id": 1, "version": 1}, schema="private"),
        event("UPDATE", {"id": 1, "version": 1}, schema=None),
        event("UPDATE", None, {"id": 1, "version": 1}),
        event("INSERT", None),
        event("UPDATE", [1, 1]),
        event("UPDATE", "1"),
        event("DELETE", {"id": 1, "version": 1}, None),
        event("UPDATE", {"version": 1}),
        event("UPDATE", {"id": None, "version": 1}),
        event("UPDATE", {"id": "abc", "version": 1}),
        event("UPDATE", {"id": 2**70, "version": 1}),
        event("UPDATE", {"id": 2**63, "version": 1}),
        event("UPDATE", {"id": 1.5, "version": 1}),
        event("UPDATE", {"id": True, "version": 1}),
        event("UPDATE", {"id": 1}),
        event("INSERT", {"id": 1}),
        event("UPDATE", {"id": 1, "version": None}),
        event("UPDATE", {"id": 1, "version": 0}),
        event("UPDATE", {"id": 1, "version": -1}),
        event("UPDATE", {"id": 1, "version": "3"}),
        event("UPDATE", {"id": 1, "version": 3.5}),
        event("UPDATE", {"id": 1, "version": True}),
        event("UPDATE", {"id": 1, "version": 2**63}),
        event("DELETE", None, {"id": 1, "version": "3"}),
        event("DELETE", None, {"id": 1, "version": 0}),
    ],
    ids=lambda document: json.dumps(document)[:60],
)
def test_webhook_wrong_shape_is_422(document: dict[str, Any]) -> None:
    assert webhook_status(document) == 422


def test_webhook_version_edges() -> None:
    assert webhook(event("UPDATE", {"id": 1, "version": 1})).version == 1
    assert webhook(event("UPDATE", {"id": 1, "version": 2**63 - 1})).version == 2**63 - 1


@pytest.mark.parametrize(
    "body",
    [
        b'{"type": "UPDATE", "table": "projects", "record": {"id": 5, "version": ' + b"7" * 5000 + b"}}",
        b'{"type": "UPDATE", "table": "projects", "record": {"id": ' + b"7" * 5000 + b', "version": 1}}',
    ],
    ids=["5000-digit-version", "5000-digit-id"],
)
def test_webhook_numbers_too_long_for_python_are_malformed(body: bytes) -> None:
    """Valid JSON whose integer Python refuses to parse must still be a MalformedEvent (400 or 422),
    not a bare ValueError that becomes a 500."""
    with pytest.raises(MalformedEvent) as caught:
        webhook(body)
    assert caught.value.status in {400, 422}


@given(st.binary(max_size=200))
def test_webhook_any_bytes_give_an_event_or_malformed(body: bytes) -> None:
    try:
        result = webhook(body)
    except MalformedEvent as exc:
        assert exc.status in {400, 422}
        return
    assert result.source is Source.WEBHOOK


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**100), 2**100) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


@given(
    st.fixed_dictionaries(
        {}, optional={"type": JSON, "table": JSON, "schema": JSON, "record": JSON, "old_record": JSON}
    )
)
def test_webhook_any_object_gives_an_event_or_a_422(document: dict[str, Any]) -> None:
    try:
        webhook(document)
    except MalformedEvent as exc:
        assert exc.status == 422


# --- parse_notify -----------------------------------------------------------------------------


def notify(payload: Any, kind: IdKind = IdKind.BIGINT) -> ChangeEvent:
    return parse_notify(payload if isinstance(payload, str) else json.dumps(payload), kind=kind)


def test_notify_payloads_from_the_trigger() -> None:
    before = time.time()
    result = notify({"type": "UPDATE", "id": 12, "version": 4, "committed_at": 1_700_000_000.123456})
    assert result.project_id == "12"
    assert result.version == 4
    assert result.op is Op.UPDATE
    assert result.source is Source.LISTEN
    assert result.committed_at == pytest.approx(1_700_000_000.123456)
    assert before <= result.received_at <= time.time()
    inserted = notify({"type": "INSERT", "id": 13, "version": 1, "committed_at": 1_700_000_001})
    assert (inserted.op, inserted.version, inserted.committed_at) == (Op.INSERT, 1, 1_700_000_001.0)
    deleted = notify({"type": "DELETE", "id": 14, "version": 9})
    assert (deleted.op, deleted.version, deleted.committed_at) == (Op.DELETE, 9, None)


def test_notify_delete_may_lack_a_version() -> None:
    assert notify({"type": "DELETE", "id": 14}).version is None
    assert notify({"type": "DELETE", "id": 14, "version": None}).version is None


def test_notify_ids_follow_the_column_kind() -> None:
    assert notify({"type": "UPDATE", "id": UUID_TEXT.upper(), "version": 1}, IdKind.UUID).project_id == UUID_TEXT
    assert notify({"type": "UPDATE", "id": "slug", "version": 1}, IdKind.TEXT).project_id == "slug"
    assert notify({"type": "UPDATE", "id": 2**15 - 1, "version": 1}, IdKind.SMALLINT).project_id == "32767"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1_700_000_000.5, 1_700_000_000.5),
        (1_700_000_000, 1_700_000_000.0),
        ("1700000000.5", None),
        (0, None),
        (-1, None),
        (1.7e12, None),  # milliseconds, not seconds
        (False, None),
        (None, None),
    ],
)
def test_notify_committed_at(raw: object, expected: float | None) -> None:
    result = notify({"type": "UPDATE", "id": 1, "version": 2, "committed_at": raw})
    assert result.committed_at == expected


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "{",
        "[]",
        '"UPDATE"',
        "12",
        "null",
        "[" * 100_000 + "]" * 100_000,
        {"id": 1, "version": 1},
        {"type": "TRUNCATE", "id": 1, "version": 1},
        {"type": None, "id": 1, "version": 1},
        {"type": "UPDATE", "version": 1},
        {"type": "UPDATE", "id": None, "version": 1},
        {"type": "UPDATE", "id": "abc", "version": 1},
        {"type": "UPDATE", "id": 2**63, "version": 1},
        {"type": "UPDATE", "id": True, "version": 1},
        {"type": "UPDATE", "id": 1},
        {"type": "INSERT", "id": 1, "version": None},
        {"type": "UPDATE", "id": 1, "version": 0},
        {"type": "UPDATE", "id": 1, "version": -2},
        {"type": "UPDATE", "id": 1, "version": "2"},
        {"type": "UPDATE", "id": 1, "version": 2.5},
        {"type": "UPDATE", "id": 1, "version": True},
        {"type": "DELETE", "id": 1, "version": "2"},
        '{"type": "UPDATE", "id": 1, "version": ' + "9" * 5000 + "}",
    ],
    ids=lambda payload: (payload if isinstance(payload, str) else json.dumps(payload))[:50],
)
def test_notify_malformed(payload: Any) -> None:
    with pytest.raises(MalformedEvent):
        notify(payload)


@given(st.text(max_size=200))
def test_notify_any_text_gives_an_event_or_malformed(payload: str) -> None:
    try:
        result = notify(payload)
    except MalformedEvent:
        return
    assert result.source is Source.LISTEN


@pytest.mark.parametrize("raw", ["\ud800", "a\x00b", "ok\udfff"])
def test_text_ids_postgres_cannot_hold_are_malformed(raw: str) -> None:
    with pytest.raises(MalformedEvent):
        normalize_id(raw, IdKind.TEXT)
