"""Hostile input (issue #6): what an attacker, a broken proxy or a confused operator can throw at the daemon.

- **Webhook fuzzing.** Hypothesis builds requests to the real aiohttp listener of an in-process daemon:
  bodies of every kind (arbitrary bytes, JSON of the wrong shape, valid shapes with wrong types, huge
  numbers, deep nesting, lone surrogates and other encodings, bodies just under and over 1 MiB, gzip
  bombs, chunked transfer) under headers of every kind (missing, garbled, duplicated webhook-id /
  timestamp / signature, other schemes and versions, stale and future timestamps, a valid signature
  over another body, id or timestamp, another secret, a wrong or empty bearer token). Each answer is
  checked against the status order of docs/operations.md (415, 413, 401, then 400 / 422, else 202):
  never a 5xx, never a 2xx without the real secret or token, and every 202 is offered to the
  scheduler exactly once. Rows of the table are named by some of the accepted requests: those must end
  up embedded, and rows only named by refused requests must not; at the end a drift pass embeds the
  rest and `reliability.verify` checks every row's vector. Every request claims another client address
  (X-Forwarded-For, X-Real-IP, Forwarded): the rate limiter must keep one bucket, the peer's. A replay
  of an accepted request is a 202 and a duplicate (docs: "accepted or duplicate: 202"); the same request
  once the clock has moved past the five-minute tolerance is a 401. Process memory (VmRSS) is measured
  after a warm-up and at the end. 1,000 cases here, 10,000 in the soak (bench/soak.py imports
  `SCENARIOS`).
- **Realtime junk.** The Realtime test server sends frames of every wrong shape on the daemon's live
  socket (MALFORMED_KINDS and more: wrong types in every field, other tables, huge and deeply nested
  frames, binary frames, lone surrogates, presence and broadcast frames), then random ones. After each,
  a marker change must still arrive on the same session (state live, generation unchanged) as the only
  event taken, the frames meant for us are counted as malformed (once each) and logged, and a real
  change is embedded at the end (`reliability.verify`).
- **Configuration as an attack surface.** Table and column names with quotes, spaces, semicolons, SQL
  comments, placeholders and SQL fragments either work end to end on a real table of that name or are
  refused with a clear error, and a canary table shows no fragment ran. A source scan checks that
  every identifier the package pastes into SQL text went through `quote_ident` / `quote_table`.
- **Secrets.** The whole-suite scan lives in conftest.py (`SecretScan`); its scanner is tested here.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import ctypes
import gc
import gzip
import hashlib
import hmac
import io
import itertools
import json
import os
import random
import re
import secrets
import string
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any
from unittest import mock

import aiohttp
import asyncpg
import httpx
import httpx2
import pytest
from aiohttp import web
from embedding_api import EmbeddingAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from loguru import logger
from multidict import CIMultiDict
from realtime_server import MALFORMED_KINDS, RealtimeServer, commit_timestamp
from reliability import Check, Scenario, cluster, verify
from support import (
    API_KEY,
    AUDIT_SQL,
    DIMENSIONS,
    REALTIME_API_KEY,
    WEBHOOK_SECRET,
    RunningDaemon,
    all_current,
    create_database,
    make_settings,
    metric,
    realtime_settings,
    running,
    twice_written,
    wait_until,
)
from vector_sync.config import ConfigError, Settings, TableName, decode_webhook_secret
from vector_sync.events import ChangeEvent, IdKind, Source
from vector_sync.migrations import Catalog, SchemaError, load_migrations, migrate, quote_table
from vector_sync.sources import webhook as webhook_module
from vector_sync.sources.realtime import State

# realtime-py 2.34.1 reads ConnectionClosed.code (deprecated in websockets 15) on its error path; with
# filterwarnings=error that warning would be raised inside its receive task (see test_realtime_events).
pytestmark = pytest.mark.filterwarnings(r"ignore:ConnectionClosed\.(code|reason) is deprecated:DeprecationWarning")

# The secrets of this file's daemons; the session's secret scan (conftest.py) looks for them by name.
WEBHOOK_TOKEN = "hostile-bearer-token-5c1e0b9d2a77"
OTHER_WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"an-attacker-key-not-the-daemons!").decode()
# The test servers trust local connections, so a DSN may carry any password: the daemon still has to
# keep it out of its logs and answers.
DB_PASSWORD = "db-password-hostile-3e9f1c"

KEY = decode_webhook_secret(WEBHOOK_SECRET)
OTHER_KEY = decode_webhook_secret(OTHER_WEBHOOK_SECRET)
# What this file's daemons must never show, by the test's own values: the daemon's list of its
# secrets (settings.secrets()) would let a secret it forgot to list pass.
OUR_SECRETS = {
    "WEBHOOK_SECRET": WEBHOOK_SECRET,
    "the base64 part of WEBHOOK_SECRET": WEBHOOK_SECRET.removeprefix("whsec_"),
    "the webhook key": KEY.decode(),
    "WEBHOOK_TOKEN": WEBHOOK_TOKEN,
    "DB_PASSWORD": DB_PASSWORD,
    "API_KEY": API_KEY,
    "REALTIME_API_KEY": REALTIME_API_KEY,
}
MIB = 1024 * 1024
BIGINT_MAX = 2**63 - 1
TOLERANCE = 300  # seconds, docs/operations.md: "timestamp within ±5 minutes"
SEED = 20_240_606  # CI runs are reproducible; the soak passes its own
FUZZ_CASES = int(os.environ.get("HOSTILE_FUZZ_CASES", "1000"))
SOAK_FUZZ_CASES = 10_000
MEMORY_WARMUP_CASES = 150
MAX_RSS_GROWTH_BYTES = 20 * MIB
# Rows the fuzzer may name: far from the small ids hypothesis likes, so random ids do not hit them.
REAL_BASE = 7_000_000_000_000
REAL_ROWS = 40
MARKER_BASE = 9_000_000_000_000


def with_password(dsn: str) -> str:
    """The test DSN (`postgresql://postgres:@/db?host=...`) with DB_PASSWORD in it."""
    assert "postgres:@" in dsn, dsn
    return dsn.replace("postgres:@", f"postgres:{DB_PASSWORD}@", 1)


def rss_bytes() -> int:
    """This process's resident set (VmRSS; the daemon runs in it), after a garbage collection and after
    giving freed heap memory back (malloc_trim), so what is counted is what is still in use, not the
    allocator's high-water mark after a 16 MiB body."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@contextlib.contextmanager
def daemon_log(level: str = "DEBUG") -> Iterator[list[tuple[str, str]]]:
    """(level, text) of every loguru line while the block runs, exceptions included."""
    lines: list[tuple[str, str]] = []
    sink = logger.add(
        lambda message: lines.append((message.record["level"].name, str(message))),
        level=level,
        format="{message}",
        backtrace=False,
        diagnose=False,
    )
    try:
        yield lines
    finally:
        logger.remove(sink)


def leaked(texts: list[str]) -> list[str]:
    """Which of OUR_SECRETS each text contains, with an excerpt that names it instead of showing it."""
    found = []
    for text in texts:
        for name, value in OUR_SECRETS.items():
            if value in text:
                at = text.index(value)
                found.append(f"{name}: ...{text[max(0, at - 80) : at]}<{name}>{text[at + len(value) :][:80]}...")
    return found


# ==================================================================================== webhook fuzzing

OPS = ("INSERT", "UPDATE", "DELETE")
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=16)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
# Any code point at all: lone surrogates, controls, noncharacters, private use.
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=24)
# What may sit in an HTTP header value (aiohttp refuses CR, LF and NUL; surrogates cannot be encoded).
HEADER_TEXT = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=60)
WRONG_VALUES = (
    JSON_VALUES
    | ANY_TEXT
    | st.sampled_from(
        ["", "0", "-1", "1e3", " 5", "5 ", "\u0665", "²", "0x10", "5.0", "+5", "--5", "9" * 30, "projects ", "PROJECTS"]
    )
    | st.sampled_from([0, -1, 1.0, 2.5, 2**63, -(2**63) - 1, 2**64, True, False, [], {}, [1], {"id": 1}])
)
SAFE_ID_CHARS = string.ascii_letters + string.digits + "_-:.~"
CONTENT_TYPES = ["application/json"] * 24 + [
    "application/json; charset=utf-8",
    "Application/JSON",  # media types are case-insensitive
    "text/plain",
    "application/x-www-form-urlencoded",
    "application/jsonx",
    "text/json",
    None,  # no Content-Type header at all
    "garbled",
]
JSON_CONTENT_TYPES = {"application/json", "application/json; charset=utf-8", "Application/JSON"}

AUTHENTIC, REFUSED, EITHER = "authentic", "refused", "either"


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed body; half of them name one of the real rows (at its version, 1)."""
    op = draw(st.sampled_from(OPS))
    real = draw(st.booleans())
    project = REAL_BASE + draw(st.integers(0, REAL_ROWS - 1)) if real else draw(st.integers(-(2**63), BIGINT_MAX))
    record: dict[str, Any] = {"id": project, "name": draw(st.text(max_size=12))}
    if op != "DELETE" or draw(st.booleans()):
        record["version"] = 1 if real else draw(st.integers(1, BIGINT_MAX))
    document: dict[str, Any] = {"type": op, "table": "projects"}
    if draw(st.booleans()):
        document["schema"] = "public"
    if op == "DELETE":
        document["record"], document["old_record"] = None, record
    else:
        document["record"], document["old_record"] = record, draw(st.none() | st.just(dict(record)))
    if draw(st.integers(0, 3)) == 0:
        document["committed_at"] = draw(JSON_SCALARS)
    return document


@st.composite
def broken_events(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed body with one field of a wrong type or value, or missing."""
    document = draw(events())
    record_key = "old_record" if document["type"] == "DELETE" else "record"
    where = draw(st.sampled_from(["type", "table", "schema", "record", "old_record", "id", "version"]))
    target = document[record_key] if where in ("id", "version") else document
    key = where
    if draw(st.integers(0, 4)) == 0:
        target.pop(key, None)
    else:
        target[key] = draw(WRONG_VALUES)
    return document


def dumps(document: Any, *, ascii_only: bool = True) -> bytes:
    # surrogatepass: lone surrogates become the (invalid) UTF-8 bytes json.loads reads back.
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def unicode_bodies(draw: st.DrawFn) -> bytes:
    document = draw(events())
    record = document["old_record" if document["type"] == "DELETE" else "record"]
    target, key = draw(
        st.sampled_from(
            [(document, "type"), (document, "table"), (document, "schema"), (record, "id"), (record, "name")]
        )
    )
    target[key] = draw(
        ANY_TEXT
        | st.sampled_from(
            [
                "\uff50\uff52\uff4f\uff4a\uff45\uff43\uff54\uff53",
                "projects\u200b",
                "\u0131nsert",
                "\u0130NSERT",
                "\u0664\u0662",
            ]
        )
    )
    text = json.dumps(document, ensure_ascii=draw(st.booleans()))
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1"]))
    return text.encode(encoding, "surrogatepass" if encoding != "latin-1" else "replace")


@st.composite
def huge_number_bodies(draw: st.DrawFn) -> bytes:
    document = draw(events())
    record = document["old_record" if document["type"] == "DELETE" else "record"]
    target, key = draw(st.sampled_from([(record, "id"), (record, "version"), (document, "committed_at")]))
    target[key] = "__NUMBER__"
    digits = draw(st.integers(19, 12_000))
    number = draw(
        st.sampled_from(
            [
                "9" * digits,
                "-" + "9" * digits,
                "1" + "0" * digits,
                "0." + "0" * digits + "1",
                "1e400",
                "-1e400",
                "1e-400",
                "-0",
                "1E+2",
                "9223372036854775808",
                "18446744073709551616",
                "1.0",
            ]
        )
    )
    return dumps(document).replace(b'"__NUMBER__"', number.encode())


@st.composite
def deep_bodies(draw: st.DrawFn) -> bytes:
    # Either shallow or far past any parser's limit: the depth where Python's json gives up depends
    # on the stack in use, so the band around it is left out.
    depth = draw(st.sampled_from([1, 2, 10, 100]) | st.integers(5_000, 200_000))
    shape = draw(st.sampled_from(["array", "object", "inside"]))
    if shape == "array":
        return b"[" * depth + b"]" * depth
    if shape == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return dumps(draw(events()))[:-1] + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"


@st.composite
def truncated_bodies(draw: st.DrawFn) -> bytes:
    body = dumps(draw(events()))
    return body[: draw(st.integers(0, len(body) - 1))]


BODIES: dict[str, st.SearchStrategy[bytes]] = {
    "event": events().map(dumps),
    "broken": broken_events().map(dumps),
    "json": JSON_VALUES.map(dumps),
    "bytes": st.binary(max_size=512),
    "truncated": truncated_bodies(),
    "unicode": unicode_bodies(),
    "huge-number": huge_number_bodies(),
    "deep": deep_bodies(),
}
# Bodies too big to draw byte by byte: drawn as a recipe, built when sent (`materialize`).
SIZED_KINDS = ("large", "gzip")
BODY_KINDS = (
    ["event"] * 10
    + ["broken"] * 6
    + ["json", "bytes", "truncated", "unicode", "unicode", "huge-number", "deep"] * 2
    + ["large", "gzip"]
)
AUTH_KINDS = (
    ["signed"] * 8
    + ["bearer"] * 3
    + ["signed-among-junk", "bearer-and-junk-signature"]
    + ["stale", "future", "other-secret", "other-body", "other-id", "other-timestamp"] * 2
    + ["wrong-version", "mangled-signature", "missing", "duplicated", "garbled", "garbled", "bearer-wrong"] * 2
    + ["none", "weird-id", "timestamp-text"]
)


@dataclass(frozen=True)
class Hostile:
    """One request, as drawn: the body (or its recipe), how it is authenticated and sent."""

    body_kind: str
    body: bytes  # empty for SIZED_KINDS
    size: int  # the decoded size for SIZED_KINDS
    auth: str
    auth_params: dict[str, Any]
    content_type: str | None
    chunked: bool

    def __repr__(self) -> str:
        shown = self.body if len(self.body) <= 300 else self.body[:300] + b"..."
        return (
            f"Hostile(body_kind={self.body_kind!r}, body={shown!r} ({len(self.body)} bytes), size={self.size}, "
            f"auth={self.auth!r}, auth_params={self.auth_params!r}, content_type={self.content_type!r}, "
            f"chunked={self.chunked})"
        )


@st.composite
def auth_params(draw: st.DrawFn) -> dict[str, Any]:
    """Every knob any auth kind may use; each kind reads the ones it needs."""
    return {
        "webhook_id": "msg_" + draw(st.text(st.sampled_from(SAFE_ID_CHARS), min_size=1, max_size=40)),
        "offset": draw(st.integers(-(TOLERANCE - 50), TOLERANCE - 50)),
        "far": draw(st.integers(TOLERANCE + 10, 10**9) | st.sampled_from([TOLERANCE + 10, 86_400])),
        "junk": draw(st.lists(HEADER_TEXT, min_size=1, max_size=3)),
        "which": draw(st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature"])),
        "present": draw(st.lists(st.booleans(), min_size=3, max_size=3)),
        "junk_first": draw(st.booleans()),
        "position": draw(st.integers(0, 3)),
        "scheme": draw(st.sampled_from(["Bearer", "bearer", "BEARER", "BeArEr"])),
        "spaces": draw(st.sampled_from([" ", "  ", " \t"])),
        "variant": draw(st.integers(0, 11)),
        "cut": draw(st.integers(1, 43)),
        "weird_id": draw(
            st.sampled_from(["msg_é", "msg_東京", "msg_\u2028", "x" * 257, "msg_" + "x" * 300])
            | HEADER_TEXT.filter(lambda text: not text.isascii())
        ),
        "timestamp_text": draw(
            st.sampled_from(["0{t}", "+{t}", "{t}.0", "{t}.5", "1.7e9", "0x{t}", "{t}s", "{t} {t}"])
        ),
    }


@st.composite
def hostile_requests(draw: st.DrawFn) -> Hostile:
    kind = draw(st.sampled_from(BODY_KINDS))
    body, size = b"", 0
    if kind == "large":
        size = draw(st.sampled_from([MIB - 1, MIB, MIB + 1, 2 * MIB, 3 * MIB]) | st.integers(MIB - 300, MIB + 300))
    elif kind == "gzip":
        size = draw(st.sampled_from([100, MIB, MIB + 1, 8 * MIB, 16 * MIB]) | st.integers(MIB - 300, MIB + 300))
    else:
        body = draw(BODIES[kind])
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type == "garbled":
        content_type = draw(HEADER_TEXT)
    return Hostile(
        body_kind=kind,
        body=body,
        size=size,
        auth=draw(st.sampled_from(AUTH_KINDS)),
        auth_params=draw(auth_params()),
        content_type=content_type,
        chunked=draw(st.integers(0, 9)) == 0,
    )


def padded_event(size: int, filler: bytes = b"x") -> bytes:
    """A well-formed body (an UPDATE of a row that does not exist) of exactly `size` bytes."""
    head = b'{"type": "UPDATE", "table": "projects", "record": {"id": 5, "version": 2}, "padding": "'
    return head + filler * (size - len(head) - 2) + b'"}'


def materialize(case: Hostile) -> tuple[bytes, bytes, str | None]:
    """(what is sent, what the listener reads after decoding, the Content-Encoding)."""
    if case.body_kind == "large":
        body = padded_event(case.size)
        return body, body, None
    if case.body_kind == "gzip":
        plain = padded_event(case.size, b"0") if case.size > 200 else b'{"type": "UPDATE"}'
        return gzip.compress(plain, compresslevel=1), plain, "gzip"
    return case.body, case.body, None


def v1(key: bytes, webhook_id: str, timestamp: str, body: bytes) -> str:
    """A Standard Webhooks v1 signature over the literal header texts."""
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


Headers = list[tuple[str, str]]
AuthBuilder = Callable[[dict[str, Any], bytes, int], tuple[Headers, str]]


def _standard(webhook_id: str, timestamp: int | str, signature: str) -> Headers:
    return [("webhook-id", webhook_id), ("webhook-timestamp", str(timestamp)), ("webhook-signature", signature)]


def _signed(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    at = now + p["offset"]
    return _standard(p["webhook_id"], at, v1(KEY, p["webhook_id"], str(at), body)), AUTHENTIC


def _signed_among_junk(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    at = now + p["offset"]
    junk = ["v1,bm90IGEgc2lnbmF0dXJl", "v2,Zm9v", v1(OTHER_KEY, p["webhook_id"], str(at), body)]
    signatures = [*junk[: p["position"]], v1(KEY, p["webhook_id"], str(at), body), *junk[p["position"] :]]
    return _standard(p["webhook_id"], at, " ".join(signatures)), AUTHENTIC


def _bearer(p: dict[str, Any], _body: bytes, _now: int) -> tuple[Headers, str]:
    return [("Authorization", f"{p['scheme']}{p['spaces']}{WEBHOOK_TOKEN}")], AUTHENTIC


def _bearer_and_junk_signature(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    headers = _standard(p["webhook_id"], now, "v1," + p["junk"][0])
    return [("Authorization", f"Bearer {WEBHOOK_TOKEN}"), *headers], AUTHENTIC


def _out_of_tolerance(sign: int) -> AuthBuilder:
    def build(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
        at = now + sign * p["far"]
        return _standard(p["webhook_id"], at, v1(KEY, p["webhook_id"], str(at), body)), REFUSED

    return build


def _other_secret(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    return _standard(p["webhook_id"], now, v1(OTHER_KEY, p["webhook_id"], str(now), body)), REFUSED


def _other_body(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    other = body + b" " if p["position"] % 2 else b" " + body
    return _standard(p["webhook_id"], now, v1(KEY, p["webhook_id"], str(now), other)), REFUSED


def _other_id(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    signature = v1(KEY, p["webhook_id"] + "x", str(now), body)
    return _standard(p["webhook_id"], now, signature), REFUSED


def _other_timestamp(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    at = now + p["offset"]
    return _standard(p["webhook_id"], at + 1, v1(KEY, p["webhook_id"], str(at), body)), REFUSED


def _wrong_version(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    value = v1(KEY, p["webhook_id"], str(now), body).removeprefix("v1,")
    prefixes = ["v2,", "v1a,", "", "v1 ", "v1;", ",", "v1,,", "v0,", "1,", "v11,", "V1,", "v1=,"]
    prefix = prefixes[p["variant"]]
    # "V1,": whether a version is case-sensitive is the verifier's choice; either answer is safe.
    return _standard(p["webhook_id"], now, prefix + value), EITHER if prefix == "V1," else REFUSED


def _mangled_signature(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    good = v1(KEY, p["webhook_id"], str(now), body)
    value = good.removeprefix("v1,")
    flipped = value[: p["cut"]] + ("A" if value[p["cut"]] != "A" else "B") + value[p["cut"] + 1 :]
    raw = base64.b64decode(value)
    variants = [
        good[: -p["cut"]],
        good + "x",
        "v1," + flipped,
        "v1," + value.rstrip("="),
        "v1," + base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).decode(),
        "v1," + raw.hex(),
        "v1," + base64.b64encode(raw[:-1]).decode(),
        "v1," + base64.b64encode(raw + b"\0").decode(),
        "v1," + value.lower(),
        "v1,",
        "v1," + " " * 44,
        "v1," + value[::-1],
    ]
    signature = variants[p["variant"]]
    # A few mangles can leave the signature intact by chance (nothing to strip, already lower case).
    return _standard(p["webhook_id"], now, signature), EITHER if signature == good else REFUSED


def _missing(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    headers = _standard(p["webhook_id"], now, v1(KEY, p["webhook_id"], str(now), body))
    return [(name, value) for name, value in headers if name != p["which"]], REFUSED


def _duplicated(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    """A second value for one header: which one counts is the listener's choice, so either answer
    is safe, as long as the valid signature is the only way in."""
    headers = _standard(p["webhook_id"], now, v1(KEY, p["webhook_id"], str(now), body))
    index = [name for name, _ in headers].index(p["which"])
    extra = (p["which"], p["junk"][0])
    headers.insert(index if p["junk_first"] else index + 1, extra)
    return headers, EITHER


def _garbled(p: dict[str, Any], _body: bytes, _now: int) -> tuple[Headers, str]:
    names = ["webhook-id", "webhook-timestamp", "webhook-signature"]
    junk = p["junk"] * 3
    return [(name, junk[i]) for i, name in enumerate(names) if p["present"][i]], REFUSED


def _bearer_wrong(p: dict[str, Any], _body: bytes, _now: int) -> tuple[Headers, str]:
    values = [
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {WEBHOOK_TOKEN[:-1]}",
        f"Bearer {WEBHOOK_TOKEN}x",
        f"Bearer {WEBHOOK_TOKEN.upper()}",
        f"Basic {WEBHOOK_TOKEN}",
        WEBHOOK_TOKEN,
        f"Bearer {WEBHOOK_TOKEN} {WEBHOOK_TOKEN}",
        f"Bearer {p['junk'][0]}",
        f"Token {WEBHOOK_TOKEN}",
        f"Bearer{WEBHOOK_TOKEN}",
    ]
    return [("Authorization", values[p["variant"]])], REFUSED


def _none(_p: dict[str, Any], _body: bytes, _now: int) -> tuple[Headers, str]:
    return [], REFUSED


def _weird_id(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    # A valid HMAC over an id that is not ASCII or is very long: refusing it is the listener's choice.
    return _standard(p["weird_id"], now, v1(KEY, p["weird_id"], str(now), body)), EITHER


def _timestamp_text(p: dict[str, Any], body: bytes, now: int) -> tuple[Headers, str]:
    text = p["timestamp_text"].replace("{t}", str(now))
    # Signed over the literal text, which is not a plain integer: refused or (leniently) read.
    return _standard(p["webhook_id"], text, v1(KEY, p["webhook_id"], text, body)), EITHER


AUTH_BUILDERS: dict[str, AuthBuilder] = {
    "signed": _signed,
    "signed-among-junk": _signed_among_junk,
    "bearer": _bearer,
    "bearer-and-junk-signature": _bearer_and_junk_signature,
    "stale": _out_of_tolerance(-1),
    "future": _out_of_tolerance(+1),
    "other-secret": _other_secret,
    "other-body": _other_body,
    "other-id": _other_id,
    "other-timestamp": _other_timestamp,
    "wrong-version": _wrong_version,
    "mangled-signature": _mangled_signature,
    "missing": _missing,
    "duplicated": _duplicated,
    "garbled": _garbled,
    "bearer-wrong": _bearer_wrong,
    "none": _none,
    "weird-id": _weird_id,
    "timestamp-text": _timestamp_text,
}
assert set(AUTH_BUILDERS) == set(AUTH_KINDS)


# --- the oracle: docs/operations.md, "POST /webhook" -------------------------------------------------


def _int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _id_statuses(raw: object) -> set[int]:
    if _int_in(raw, -(2**63), BIGINT_MAX):
        return {202}
    if isinstance(raw, str) and re.fullmatch(r"-?[0-9]{1,19}", raw) and -(2**63) <= int(raw) <= BIGINT_MAX:
        return {202, 422}  # the id's text form: reading it is lenient, refusing it is strict
    return {422}


def shape_statuses(document: object) -> set[int]:
    """The statuses the interface allows for a parsed body (the table's own wording)."""
    if not isinstance(document, dict):
        return {400}
    op = document.get("type")
    allowed = {202}
    if op not in OPS:
        if not (isinstance(op, str) and op.upper() in OPS):
            return {422}
        allowed = {202, 422}  # case-folded type names: tolerated, never required
        op = op.upper()
    if document.get("table") != "projects" or ("schema" in document and document["schema"] != "public"):
        return {422}
    record = document.get("old_record" if op == "DELETE" else "record")
    if not isinstance(record, dict):
        return {422}
    allowed &= _id_statuses(record.get("id"))
    version = record.get("version")
    if not (_int_in(version, 1, BIGINT_MAX) or (op == "DELETE" and version is None)):
        return {422}
    return allowed or {422}


def body_statuses(plain: bytes) -> set[int]:
    """400 for what is not a JSON object, 422 for the wrong shape, else 202. Python's json reads the
    body as the listener does (UTF-8/16/32 detected, lone surrogates passed through)."""
    try:
        document = json.loads(plain)
    except (ValueError, RecursionError):
        return {400}
    return shape_statuses(document)


@dataclass
class Expected:
    statuses: set[int]
    verdict: str
    echo: str | None  # the webhook-id a 202 must echo


def expected(case: Hostile, plain: bytes, headers: Headers, verdict: str) -> Expected:
    """Checks run cheapest first (operations.md): 415, 413, 401, 400, 422, else 202."""
    ids = [value for name, value in headers if name == "webhook-id"]
    echo = ids[0].strip(" \t") if ids else None
    statuses: set[int] = set()
    if case.content_type not in JSON_CONTENT_TYPES:
        statuses.add(415)
        if case.content_type is None or case.content_type.lower().split(";")[0].strip() != "application/json":
            return Expected(statuses, verdict, echo)
    if len(plain) > MIB:
        return Expected(statuses | {413}, verdict, echo)
    if verdict != AUTHENTIC:
        statuses.add(401)
    if verdict != REFUSED:
        statuses |= body_statuses(plain)
    if case.body_kind == "gzip":
        statuses.add(400)  # a decoding the listener cannot finish is a 400, whoever signed it
    return Expected(statuses, verdict, echo)


# --- the driver ------------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    by_verdict: Counter[tuple[str, int]] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    accepted_events: list[tuple[str, int | None, int | None]] = field(default_factory=list)
    bytes_sent: int = 0
    rss_warm: int | None = None
    rss_end: int | None = None
    blocks_warm: int = 0
    blocks_end: int = 0
    slowest: float = 0.0


@dataclass
class Target:
    handle: RunningDaemon
    session: aiohttp.ClientSession
    report: FuzzReport
    recorded: list[Hostile] = field(default_factory=list)

    def counters(self) -> tuple[float, float]:
        return (
            metric(self.handle, "vector_sync_events_total", source="webhook"),
            metric(self.handle, "vector_sync_malformed_events_total", source="webhook"),
        )


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 64 * 1024):
        yield body[start : start + 64 * 1024]


async def send(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: CIMultiDict[str], *, chunked: bool = False
) -> tuple[int | None, str]:
    """POST /webhook; (status, body text), or (None, the transport error) when the connection failed."""
    skip = [] if "Content-Type" in headers else ["Content-Type"]
    data: Any = _chunks(body) if chunked else io.BytesIO(body) if len(body) > MIB // 2 else body
    try:
        async with session.post(f"{url}/webhook", data=data, headers=headers, skip_auto_headers=skip) as response:
            return response.status, await response.text(errors="replace")
    except aiohttp.ClientError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _accepted_event(plain: bytes) -> tuple[str, int | None, int | None]:
    """(op, id, version) of a body the listener accepted; ids as ints where they are."""
    document = json.loads(plain)
    op = str(document["type"]).upper()
    record = document["old_record" if op == "DELETE" else "record"]
    project, version = record.get("id"), record.get("version")
    return op, int(project) if isinstance(project, int | str) else None, version if isinstance(version, int) else None


async def exchange(target: Target, case: Hostile) -> None:
    """Send one case and check its answer and what the daemon counted; AssertionError describes a failure."""
    report = target.report
    sent, plain, encoding = materialize(case)
    auth, verdict = AUTH_BUILDERS[case.auth](case.auth_params, plain, int(time.time()))
    headers: CIMultiDict[str] = CIMultiDict(auth)
    if case.content_type is not None:
        headers.add("Content-Type", case.content_type)
    if encoding is not None:
        headers.add("Content-Encoding", encoding)
    # The rate limit is per client address, the peer's: each request claims another address in the
    # headers proxies set, which must not earn it a bucket of its own (checked at the end).
    claimed = f"203.0.113.{report.cases % 250 + 1}" if report.cases % 2 else f"2001:db8::{report.cases:x}"
    headers.add("X-Forwarded-For", claimed)
    headers.add("X-Real-IP", claimed)
    headers.add("Forwarded", f'for="{claimed}"')
    want = expected(case, plain, auth, verdict)
    events_before, malformed_before = target.counters()
    started = time.monotonic()
    status, text = await send(target.session, target.handle.url, sent, headers, chunked=case.chunked)
    report.slowest = max(report.slowest, time.monotonic() - started)
    report.cases += 1
    report.bytes_sent += len(sent)
    events_after, malformed_after = target.counters()
    where = f"{case!r}\nheaders={list(headers.items())!r}\nanswer={status} {text[:300]!r}"
    if status is None:
        # The listener may answer 413 and close before a body over the limit has been sent.
        assert len(sent) > MIB or (case.chunked and len(plain) > MIB), f"transport error\n{where}"
        report.transport_errors[text.split(":")[0]] += 1
        return
    report.statuses[status] += 1
    report.by_verdict[want.verdict, status] += 1
    assert leaked([text]) == [], f"a secret in the answer\n{where}"
    assert status < 500, f"a server error\n{where}"
    assert status in want.statuses, f"expected one of {sorted(want.statuses)}\n{where}"
    answer = json.loads(text)
    if status == 202:
        assert want.verdict != REFUSED, f"accepted without the secret or token\n{where}"
        assert answer == {"webhook_id": want.echo}, where
        assert (events_after - events_before, malformed_after - malformed_before) == (1, 0), where
        report.accepted_events.append(_accepted_event(plain))
    else:
        assert isinstance(answer, dict) and set(answer) == {"error"} and answer["error"], where
        assert events_after == events_before, f"an event offered for a refused request\n{where}"
        # 400 and 422 from the parser are counted as malformed; a 400 for an undecodable body is not.
        allowed = {1.0} if status == 422 else {0.0, 1.0} if status == 400 else {0.0}
        assert malformed_after - malformed_before in allowed, where


async def fuzz(target: Target, cases: int, fuzz_seed: int) -> None:
    """Run `cases` hypothesis examples against the listener, all in this event loop.

    Hypothesis drives a plain function in a worker thread; each example is sent by a coroutine handed
    to this loop, where the daemon and the one client session live."""
    loop = asyncio.get_running_loop()

    @hypothesis_seed(fuzz_seed)
    @settings(
        max_examples=cases,
        deadline=None,  # one request may wait for a 1 MiB body or a 16 MiB gzip bomb
        database=None,  # reproducible from the seed alone
        phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
        # Drawing a body recipe and about forty knobs per example is slower than hypothesis expects.
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=hostile_requests())
    def one(case: Hostile) -> None:
        asyncio.run_coroutine_threadsafe(exchange(target, case), loop).result(timeout=120)
        target.recorded.append(case)

    await asyncio.to_thread(one)


async def replay_for_memory(target: Target) -> None:
    """The recorded cases again, without hypothesis (which keeps every example's choices while it runs,
    a few MiB per thousand): the daemon's resident memory after a warm-up and at the end."""
    report = target.report
    for number, case in enumerate(target.recorded, start=1):
        await exchange(target, case)
        if number == MEMORY_WARMUP_CASES:
            report.rss_warm = rss_bytes()
            report.blocks_warm = sys.getallocatedblocks()
    report.rss_end = rss_bytes()
    report.blocks_end = sys.getallocatedblocks()


async def insert_real_rows(conn: asyncpg.Connection) -> list[int]:
    ids = [REAL_BASE + number for number in range(REAL_ROWS)]
    await conn.executemany(
        "insert into projects (id, name, description) values ($1, $2, $3)",
        [(project, f"hostile {project}", "only webhooks tell the daemon about me") for project in ids],
    )
    return ids


async def embedded_ids(conn: asyncpg.Connection, ids: list[int]) -> set[int]:
    rows = await conn.fetch(
        "select project_id from vector_sync.project_embeddings where project_id = any($1::bigint[])", ids
    )
    return {row[0] for row in rows}


async def settle_rows(handle: RunningDaemon, conn: asyncpg.Connection, report: FuzzReport) -> dict[str, Any]:
    """Rows named by an accepted INSERT/UPDATE at their version are embedded; rows no accepted
    request named are not (a refused request moved nothing)."""
    real = [REAL_BASE + number for number in range(REAL_ROWS)]
    named = {project for _, project, _ in report.accepted_events if project in real}
    must = {project for op, project, version in report.accepted_events if op != "DELETE" and version == 1} & named
    untouched = set(real) - named

    async def all_embedded() -> bool:
        return must <= await embedded_ids(conn, sorted(must))

    try:
        await wait_until(all_embedded, timeout=60, what="the rows named by accepted webhooks to be embedded")
    except AssertionError as exc:
        missing = sorted(must - await embedded_ids(conn, sorted(must)))
        raise AssertionError(f"{exc}: accepted webhooks whose rows were never embedded: {missing}") from None
    scheduler = handle.daemon.scheduler
    assert scheduler is not None
    await wait_until(scheduler.is_idle, timeout=60, what="the scheduler to be idle")
    embedded = await embedded_ids(conn, real)
    return {"must_embed": len(must), "untouched": len(untouched), "wrongly_embedded": sorted(untouched & embedded)}


async def verify_every_row(handle: RunningDaemon, conn: asyncpg.Connection) -> Check:
    """`verify` of the whole table. Rows no accepted webhook named have no vector by design (settle_rows
    checked that), so first a drift pass, the daemon's own catch-up, embeds them; the vectors the
    webhooks made are left as they are (current) and checked with the rest."""
    drift, scheduler = handle.daemon.drift, handle.daemon.scheduler
    assert drift is not None and scheduler is not None
    passes = drift.passes
    drift.request("the hostile test's final check")
    await wait_until(
        lambda: drift.passes > passes and scheduler.is_idle(), timeout=60, what="the final drift pass settled"
    )
    return await verify(conn)


class _ShiftedClock:
    """`time` as the listener sees it, `seconds` in the future (monotonic time unchanged)."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def time(self) -> float:
        return time.time() + self._seconds

    def monotonic(self) -> float:
        return time.monotonic()


async def replays(target: Target, conn: asyncpg.Connection, api: EmbeddingAPI) -> dict[str, Any]:
    """An accepted request sent again within the tolerance: 202 (docs: "accepted or duplicate"), and the
    row is neither embedded nor written again; the same bytes once the listener's clock is past the
    tolerance: 401, and nothing offered."""
    handle, session = target.handle, target.session
    project = REAL_BASE + REAL_ROWS  # a row of its own, so the replay is not mixed up with the fuzz
    await conn.execute("insert into projects (id, name, description) values ($1, 'replayed', 'once')", project)
    body = json.dumps({"type": "INSERT", "table": "projects", "record": {"id": project, "version": 1}}).encode()
    headers: CIMultiDict[str] = CIMultiDict(
        [*_standard("msg_replayed", int(time.time()), v1(KEY, "msg_replayed", str(int(time.time())), body))]
    )
    headers["Content-Type"] = "application/json"
    first = await send(session, handle.url, body, headers)
    assert first[0] == 202 and json.loads(first[1]) == {"webhook_id": "msg_replayed"}, first
    await wait_until(lambda: embedded_ids(conn, [project]), what="the replayed row to be embedded once")
    scheduler = handle.daemon.scheduler
    assert scheduler is not None
    await wait_until(scheduler.is_idle, what="the scheduler to be idle")
    requests = api.request_count
    events = metric(handle, "vector_sync_events_total", source="webhook")
    again = await send(session, handle.url, body, headers)
    assert again[0] == 202 and json.loads(again[1]) == {"webhook_id": "msg_replayed"}, again
    # Offered again (a duplicate, or a re-check of a row found current); never paid for or written twice.
    assert metric(handle, "vector_sync_events_total", source="webhook") == events + 1
    await wait_until(scheduler.is_idle, what="the scheduler to be idle")
    assert api.request_count == requests, "a replayed webhook was embedded again"
    events += 1
    answers = []
    for shift in (TOLERANCE + 2, TOLERANCE + 60, 86_400):
        with mock.patch.object(webhook_module, "time", _ShiftedClock(shift)):
            answers.append(await send(session, handle.url, body, headers))
    assert [status for status, _ in answers] == [401, 401, 401], answers
    assert metric(handle, "vector_sync_events_total", source="webhook") == events
    await wait_until(scheduler.is_idle, what="the scheduler to be idle")
    writes = await conn.fetchval("select count(*) from test_audit.writes where project_id = $1", project)
    assert writes == 1, f"the replayed row was written {writes} times"
    return {"replayed": 1 + len(answers), "replays_refused": len(answers)}


async def webhook_fuzz(
    *,
    soak: bool = False,
    admin_dsn: str | None = None,
    seed: int | None = None,
    cases: int | None = None,
) -> dict[str, Any]:
    """Hypothesis fuzzes POST /webhook of an in-process daemon (secret and token configured) with hostile
    bodies and headers: never a 5xx, never a 202 without the secret or token, each 202 offered once, the
    rows named by accepted requests embedded and no other; replays deduplicated, and refused once past
    the tolerance; resident memory flat over a replay of every case; every row's vector, at the end,
    the test API's embedding of its current text (`reliability.verify`).

    `cases` hypothesis examples (1,000; soak 10,000), each sent again for the memory measurement."""
    cases = cases or (SOAK_FUZZ_CASES if soak else FUZZ_CASES)
    fuzz_seed = SEED if seed is None else seed
    report = FuzzReport()
    async with cluster(admin_dsn) as pg, EmbeddingAPI(dimensions=DIMENSIONS) as api:
        dsn = await create_database(pg.admin_dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(AUDIT_SQL)
            settings_ = make_settings(
                with_password(dsn),
                api.url,
                VECTOR_SYNC_SOURCES="webhook",
                VECTOR_SYNC_WEBHOOK_TOKEN=WEBHOOK_TOKEN,
                VECTOR_SYNC_WEBHOOK_RATE_LIMIT=1_000_000,  # the fuzzer is one address; 429s would hide the rest
            )
            with daemon_log() as log:
                async with running(settings_) as handle, aiohttp.ClientSession() as session:
                    drift = handle.daemon.drift
                    assert drift is not None
                    await wait_until(lambda: drift.passes >= 1, what="the start-up drift pass")
                    await insert_real_rows(conn)  # after the pass: only webhooks can tell the daemon
                    target = Target(handle, session, report)
                    started = time.monotonic()
                    await fuzz(target, cases, fuzz_seed)
                    took = time.monotonic() - started
                    await replay_for_memory(target)
                    counted = {
                        status: metric(handle, "vector_sync_webhook_responses_total", status=str(status))
                        for status in report.statuses
                    }
                    rows = await settle_rows(handle, conn, report)
                    replayed = await replays(target, conn, api)
                    webhook = handle.daemon.webhook
                    assert webhook is not None
                    limiter_addresses = list(webhook._limiter._buckets)
                    check = await verify_every_row(handle, conn)
        finally:
            await conn.close()
    assert report.cases == 2 * cases, report.cases
    assert counted == {status: float(n) for status, n in report.statuses.items()}, counted
    assert rows["wrongly_embedded"] == [], f"rows embedded though no accepted webhook named them: {rows}"
    assert check.ok, check.summary()
    assert leaked([text for _, text in log]) == [], "a secret in the daemon's log"
    assert [text for level, text in log if level in ("ERROR", "CRITICAL")] == []
    assert report.rss_warm is not None and report.rss_end is not None
    growth = report.rss_end - report.rss_warm
    assert growth < MAX_RSS_GROWTH_BYTES, f"memory grew by {growth / MIB:.1f} MiB over {cases} cases"
    # One bucket per client address, the peer's (request.remote; "unknown" once a transport is gone):
    # every request came from 127.0.0.1, and none of the addresses they claimed in their headers may
    # have a bucket of its own.
    assert "127.0.0.1" in limiter_addresses, limiter_addresses[:10]
    assert set(limiter_addresses) <= {"127.0.0.1", "unknown"}, limiter_addresses[:10]
    result = {
        "repetitions": cases,
        "requests": report.cases,
        "faults": sum(n for (verdict, _), n in report.by_verdict.items() if verdict != AUTHENTIC),
        "rows_checked": check.rows_checked,
        "lost": check.lost,
        "seconds": round(took, 1),
        "statuses": dict(sorted(report.statuses.items())),
        "by_verdict": {f"{verdict} {status}": n for (verdict, status), n in sorted(report.by_verdict.items())},
        "transport_errors": dict(report.transport_errors),
        "accepted": report.statuses.get(202, 0),
        "rows_named_and_embedded": rows["must_embed"],
        "rows_untouched": rows["untouched"],
        "mib_sent": round(report.bytes_sent / MIB, 1),
        "slowest_request_s": round(report.slowest, 2),
        "rss_growth_mib": round(growth / MIB, 2),
        "python_blocks_growth": report.blocks_end - report.blocks_warm,
        **replayed,
    }
    print(f"RESULT webhook-fuzz {result}")
    return result


@pytest.mark.timeout(240)
async def test_webhook_fuzz(pg_server: str) -> None:
    result = await webhook_fuzz(admin_dsn=pg_server)
    statuses = result["statuses"]
    # The fuzzer did reach every answer of the table, accepted ones included.
    assert {202, 400, 401, 413, 415, 422} <= set(statuses), statuses
    assert statuses[202] >= 100 and result["rows_named_and_embedded"] >= 5, result


async def test_a_signed_request_outside_the_tolerance_is_refused(dsn: str) -> None:
    """The boundary, from the listener's side: a request signed 299 s ago passes, 301 s ago does not."""
    async with running(make_settings(dsn)) as handle, aiohttp.ClientSession() as session:
        body = json.dumps({"type": "UPDATE", "table": "projects", "record": {"id": 5, "version": 2}}).encode()
        answers = {}
        for offset in (-299, 299, -301, 301, -3600, 3600, -(10**9)):
            at = int(time.time()) + offset
            headers = CIMultiDict([*_standard(f"msg_{offset}", at, v1(KEY, f"msg_{offset}", str(at), body))])
            headers["Content-Type"] = "application/json"
            answers[offset] = (await send(session, handle.url, body, headers))[0]
    assert answers == {-299: 202, 299: 202, -301: 401, 301: 401, -3600: 401, 3600: 401, -(10**9): 401}


# ====================================================================================== realtime junk

# Kinds of realtime_server.MALFORMED_KINDS that realtime-py parses and drops by itself, as not ours (a
# reply to a ref nobody waits for, a topic never joined): nothing reaches the daemon to count.
LIBRARY_IGNORES = frozenset({"reply_unknown_ref", "changes_unknown_topic"})
# Over websockets' 1 MiB limit the client closes 1009 and a new session starts (test_realtime_events).
ENDS_THE_SESSION = frozenset({"oversize"})
NOT_AN_ID = "not-an-id"
RANDOM_FRAMES = 150
SOAK_RANDOM_FRAMES = 3_000
FRAMES_PER_MARKER = 10

Frame = str | bytes
Sender = Callable[[Any], None]  # given the server's Connection


def phoenix(event: Any, payload: Any, topic: Any, ref: Any = None) -> str:
    return json.dumps({"ref": ref, "event": event, "payload": payload, "topic": topic})


def change_data(**changes: Any) -> dict[str, Any]:
    """A `postgres_changes` data object the library accepts, whose record is no row of ours (its id is
    not a bigint): whatever else is wrong with it, it can never become an event."""
    data: dict[str, Any] = {
        "columns": [{"name": "id", "type": "int8"}, {"name": "version", "type": "int8"}],
        "commit_timestamp": commit_timestamp(datetime.now(UTC)),
        "errors": None,
        "record": {"id": NOT_AN_ID, "version": 1},
        "old_record": {},
        "schema": "public",
        "table": "projects",
        "type": "UPDATE",
    }
    data.update(changes)
    return data


def junk_catalogue(topic: str, ids: list[int]) -> list[tuple[str, Frame, bool]]:
    """(name, frame, must be counted): frames of every wrong shape, on the daemon's own topic unless
    the name says otherwise. Those not counted are not for us (the library drops them unseen) or are
    tolerated as they are (a broadcast nobody listens to)."""

    def changes(ref: Any = None, **data: Any) -> str:
        return phoenix("postgres_changes", {"ids": ids, "data": change_data(**data)}, topic, ref)

    def record(**fields: Any) -> str:
        return changes(record={"id": 5, "version": 1, **fields})

    deep = 100_000
    frames: list[tuple[str, Frame, bool]] = [
        ("empty text", "", True),
        ("whitespace", " \n\t ", True),
        ("a number", "42", True),
        ("true", "true", True),
        ("NaN payload", phoenix("postgres_changes", "__NAN__", topic).replace('"__NAN__"', "NaN"), True),
        ("duplicate keys", '{"topic": "realtime:elsewhere", ' + phoenix("surprise", {}, topic)[1:], True),
        ("trailing garbage", changes() + "}}}", True),
        ("control characters in the event", phoenix("\u0000\u001f\u007f", {}, topic), True),
        ("a lone surrogate in the event", phoenix("postgres_\ud800changes", {}, topic), True),
        ("a lone surrogate in the table", changes(table="\udfffprojects"), True),
        ("topic a number", phoenix("postgres_changes", {"ids": ids, "data": change_data()}, 123), True),
        ("ref an object", changes(ref={"a": 1}), True),
        ("payload a list", phoenix("postgres_changes", [1, 2], topic), True),
        ("payload a string", phoenix("postgres_changes", "payload", topic), True),
        ("data a list", phoenix("postgres_changes", {"ids": ids, "data": []}, topic), True),
        ("ids strings", phoenix("postgres_changes", {"ids": ["x"], "data": change_data()}, topic), True),
        ("ids null", phoenix("postgres_changes", {"ids": None, "data": change_data()}, topic), True),
        ("access_token from the server", phoenix("access_token", {"access_token": "x"}, topic), True),
        ("phx_join from the server", phoenix("phx_join", {}, topic, "x1"), True),
        ("heartbeat on our topic", phoenix("heartbeat", {}, topic, "x2"), True),
        ("type a number", changes(type=7), True),
        ("type TRUNCATE", changes(type="TRUNCATE"), True),
        ("type in lower case", changes(type="update"), True),
        ("table a list", changes(table=["projects"]), True),
        ("schema null", changes(schema=None), True),
        ("commit_timestamp a number", changes(commit_timestamp=12345), True),
        ("columns a string", changes(columns="id"), True),
        ("record a string", changes(record="row"), True),
        ("record a list", changes(record=[5, 1]), True),
        ("old_record a string on DELETE", changes(type="DELETE", record=None, old_record="x"), True),
        ("id text", record(id=NOT_AN_ID), True),
        ("id empty", record(id=""), True),
        ("id beyond bigint", record(id=2**70), True),
        ("id a float", record(id=1.5), True),
        ("id a boolean", record(id=True), True),
        ("id null", record(id=None), True),
        ("id an object", record(id={"n": 5}), True),
        ("version 0", record(version=0), True),
        ("version negative", record(version=-1), True),
        ("version a string", record(version="1"), True),
        ("version a float", record(version=1.5), True),
        ("version beyond bigint", record(version=2**64), True),
        ("version a boolean", record(version=True), True),
        ("version null on UPDATE", record(version=None), True),
        ("another table", changes(table="users", record={"id": 5, "version": 1}), True),
        ("another schema", changes(schema="auth", record={"id": 5, "version": 1}), True),
        ("DELETE without old_record", changes(type="DELETE", record=None, old_record=None), True),
        ("INSERT without record", changes(type="INSERT", record=None), True),
        ("a date that is not one", changes(commit_timestamp="the day after tomorrow"), True),
        ("a huge event name", phoenix("x" * 900_000, {}, topic), True),
        ("a huge record", record(id=NOT_AN_ID, blob="y" * 900_000), True),
        (
            "deep nesting",
            phoenix("postgres_changes", "__DEEP__", topic).replace('"__DEEP__"', "[" * deep + "]" * deep),
            True,
        ),
        (
            "a deeply nested record",
            changes(record="__DEEP__").replace('"__DEEP__"', '{"a":' * 5_000 + "1" + "}" * 5_000),
            True,
        ),
        ("binary: a change", changes().encode(), True),
        ("binary: UTF-16", changes().encode("utf-16"), True),
        ("binary: zeros", b"\0" * 1000, True),
        ("binary: invalid UTF-8", b'{"topic": "\xff\xfe"}', True),
        ("presence_state metas not a list", phoenix("presence_state", {"user": {"metas": 5}}, topic), True),
        ("broadcast nobody listens to", phoenix("broadcast", {"event": "x", "payload": {}}, topic), False),
        (
            "system ok from another extension",
            phoenix("system", {"channel": topic, "extension": "presence", "message": "hi", "status": "ok"}, topic),
            False,
        ),
        ("reply on another topic", phoenix("phx_reply", {"status": "ok", "response": {}}, "realtime:x", "77"), False),
        (
            "changes for bindings not ours",
            phoenix("postgres_changes", {"ids": [424242], "data": change_data()}, topic),
            False,
        ),
        ("a reply to an unknown ref", phoenix("phx_reply", {"status": "ok", "response": {}}, "phoenix", "x3"), False),
    ]
    return frames


def presence_without_phx_ref(topic: str) -> list[tuple[str, Frame]]:
    """Presence frames whose meta lacks `phx_ref` (optional in realtime-py's own PresenceMeta type):
    realtime-py 2.34.1 pops it unconditionally (`_transform_state`), and the KeyError escapes its
    receive loop, which ends the task."""
    return [
        ("presence_state without phx_ref", phoenix("presence_state", {"user": {"metas": [{}]}}, topic)),
        (
            "presence_diff leaving without phx_ref",
            phoenix("presence_diff", {"joins": {}, "leaves": {"user": {"metas": [{}]}}}, topic),
        ),
    ]


def random_text(rng: random.Random) -> str:
    alphabet = string.printable + "éß東京🚀\u2028\u0000\ud800\udfff\ufeff\uffff"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 2**70, rng.randrange(-(10**6), 10**6)])
    if kind == 2:
        return rng.choice([0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan"), rng.random()])
    if kind in (3, 4):
        return random_text(rng)
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["ids", "data", "record", "id", "version", "type", "table", "schema", "status", "metas", "event"]
    return {rng.choice([*keys, random_text(rng)]): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


JUNK_EVENTS = (
    "postgres_changes",
    "system",
    "phx_reply",
    "broadcast",
    "presence_state",
    "presence_diff",
    "surprise",
    "heartbeat",
    "access_token",
)


def random_frame(rng: random.Random, topic: str, ids: list[int]) -> Frame:
    """Random junk that is never a change of ours nor a legitimate control message (no phx_close, no
    phx_error, no system status ok/error, no reply to a ref the client waits for)."""
    shape = rng.randrange(6)
    if shape == 0:
        return json.dumps(random_json(rng))
    if shape == 1:
        event = rng.choice([*JUNK_EVENTS, random_text(rng)])
        payload = random_json(rng)
        if event == "system" and isinstance(payload, dict):
            payload["status"] = "maybe"
        ref = rng.choice([None, f"x{rng.randrange(1000)}", [], {}, 1.5])
        return phoenix(event, payload, rng.choice([topic, topic, "realtime:x", "phoenix", random_text(rng), 5]), ref)
    if shape == 2:
        data = change_data(type=rng.choice(["INSERT", "UPDATE", "DELETE"]))
        for _ in range(rng.randrange(1, 4)):
            data[rng.choice(sorted(data))] = random_json(rng)
        for key in ("record", "old_record"):
            if isinstance(data.get(key), dict):
                data[key]["id"] = NOT_AN_ID
        return phoenix("postgres_changes", {"ids": rng.choice([ids, ids[:1], [], [0]]), "data": data}, topic)
    if shape == 3:
        return rng.randbytes(rng.randrange(0, 300))
    if shape == 4:
        text = phoenix("postgres_changes", {"ids": ids, "data": change_data()}, topic)
        cut = rng.randrange(len(text))
        # A text frame is UTF-8: lone surrogates cannot be sent raw (binary frames carry any bytes).
        inserted = random_text(rng).encode("utf-8", "replace").decode()
        return text[:cut] + inserted + text[cut + rng.randrange(0, 5) :]
    payload = {"channel": topic, "extension": "postgres_changes", "message": random_text(rng), "status": "maybe"}
    payload[rng.choice(sorted(payload))] = random_json(rng)
    if payload.get("status") in ("ok", "error"):
        payload["status"] = "maybe"
    return phoenix("system", payload, topic)


@dataclass
class Outcome:
    name: str
    frames: int
    malformed: float  # how much the malformed counter moved
    ended: str | None  # why the session ended, if it did


class Feed:
    """The daemon's Realtime session as seen from the test server: send junk, then a marker change, and
    see whether the marker still arrives on the same session."""

    def __init__(self, handle: RunningDaemon, server: RealtimeServer) -> None:
        self.handle = handle
        self.server = server
        self.status = handle.daemon.realtime_status
        self.markers = itertools.count(MARKER_BASE)

    def events(self) -> float:
        return metric(self.handle, "vector_sync_events_total", source="realtime")

    def malformed(self) -> float:
        return metric(self.handle, "vector_sync_malformed_events_total", source="realtime")

    def channel(self) -> tuple[Any, str, list[int]]:
        """The one connection, its joined topic and its binding ids."""
        connections = self.server.connections
        assert len(connections) == 1, connections
        connection = connections[0]
        (topic, channel), *_ = connection.channels.items()
        return connection, topic, [int(binding["id"]) for binding in channel.bindings]

    async def after(self, name: str, senders: list[Sender]) -> Outcome:
        status = self.status
        generation, events, malformed = status.generation, self.events(), self.malformed()
        connection, _, _ = self.channel()
        marker = next(self.markers)
        intake = self.handle.daemon.intake
        assert intake is not None
        offered: list[ChangeEvent] = []
        offer = intake.offer

        def watched(event: ChangeEvent) -> None:
            offered.append(event)
            offer(event)

        def arrived() -> bool:
            marked = any(event.project_id == str(marker) for event in offered)  # ids are kept as text
            return marked or status.generation != generation or status.state != State.LIVE

        # Which events the daemon took, not only how many: a junk frame taken for a change moves the
        # counter as the marker does, so the wait is for the marker itself.
        with mock.patch.object(intake, "offer", watched):
            for send_ in senders:
                send_(connection)
            self.server.emit_change("UPDATE", "projects", {"id": marker, "version": 1})
            await wait_until(arrived, timeout=30, what=f"the marker after {name}")
        if (status.state, status.generation) != (State.LIVE, generation):
            ended = status.last_error or status.state
            await wait_until(lambda: status.state == State.LIVE, timeout=60, what="the next session live")
            return Outcome(name, len(senders), self.malformed() - malformed, ended)
        taken = [(event.project_id, event.version) for event in offered]
        assert self.events() == events + 1, f"{name}: junk was taken for a change: {taken}"
        return Outcome(name, len(senders), self.malformed() - malformed, None)


async def realtime_live(handle: RunningDaemon) -> None:
    """Realtime live, the start-up pass done and the scheduler idle."""
    daemon = handle.daemon
    await wait_until(
        lambda: daemon.intake is not None and daemon.intake.live.get(Source.REALTIME) is True,
        timeout=60,
        what="Realtime live",
    )
    drift, scheduler = daemon.drift, daemon.scheduler
    assert drift is not None and scheduler is not None
    await wait_until(lambda: drift.passes >= 1 and scheduler.is_idle(), timeout=60, what="the start-up pass")


async def embedded_at(conn: asyncpg.Connection, project: int, version: int) -> bool:
    stored = await conn.fetchval("select version from vector_sync.project_embeddings where project_id = $1", project)
    return stored == version


async def junk_rounds(feed: Feed, rng: random.Random, random_frames: int) -> list[Outcome]:
    outcomes = []
    for kind in sorted(set(MALFORMED_KINDS) - ENDS_THE_SESSION):
        outcomes.append(await feed.after(kind, [lambda c, k=kind: feed.server.send_malformed(k, connection=c)]))
    names = [name for name, _, _ in junk_catalogue("t", [1])]
    catalogues: dict[tuple[str, tuple[int, ...]], dict[str, Frame]] = {}
    for name in names:
        # Built for the session now live (a replaced session has another topic).
        _, topic, ids = feed.channel()
        key = (topic, tuple(ids))
        if key not in catalogues:
            catalogues = {key: {name: frame for name, frame, _ in junk_catalogue(topic, ids)}}
        frame = catalogues[key][name]
        outcomes.append(await feed.after(name, [lambda c, f=frame: c.send_raw(f)]))
    for start in range(0, random_frames, FRAMES_PER_MARKER):
        _, topic, ids = feed.channel()  # a session may have been replaced: frames go to the current one
        frames = [random_frame(rng, topic, ids) for _ in range(min(FRAMES_PER_MARKER, random_frames - start))]
        name = f"random frames {start}..{start + len(frames) - 1}: {[frame[:80] for frame in frames]!r}"
        outcomes.append(await feed.after(name, [lambda c, f=frame: c.send_raw(f) for frame in frames]))
    return outcomes


async def realtime_junk(
    *, soak: bool = False, admin_dsn: str | None = None, seed: int | None = None, random_frames: int | None = None
) -> dict[str, Any]:
    """The Realtime test server sends frames of every wrong shape (about 90 kinds), then random junk
    (150; soak 3,000), on the daemon's live socket: each is dropped (counted and logged when it is meant
    for the daemon), the session stays the same, and a real change is embedded afterwards (`verify`)."""
    rng = random.Random(SEED if seed is None else seed)
    random_frames = random_frames or (SOAK_RANDOM_FRAMES if soak else RANDOM_FRAMES)
    async with cluster(admin_dsn) as pg, EmbeddingAPI(dimensions=DIMENSIONS) as api:
        dsn = await create_database(pg.admin_dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(AUDIT_SQL)
            async with RealtimeServer(dsn, publish_tables=["public.projects"]) as server:
                settings_ = realtime_settings(
                    with_password(dsn), server, api_url=api.url, VECTOR_SYNC_SOURCES="realtime"
                )
                with daemon_log() as log:
                    async with running(settings_) as handle:
                        await realtime_live(handle)
                        project = await conn.fetchval(
                            "insert into projects (name, description) values ('junk', 'before') returning id"
                        )
                        await wait_until(lambda: embedded_at(conn, project, 1), what="the first change embedded")
                        outcomes = await junk_rounds(Feed(handle, server), rng, random_frames)
                        version = await conn.fetchval(
                            "update projects set description = 'after' where id = $1 returning version", project
                        )
                        await wait_until(lambda: embedded_at(conn, project, version), what="the change after the junk")
                        await wait_until(lambda: all_current(conn), timeout=60, what="every row current")
                        status = handle.daemon.realtime_status
                        generation, failed = status.generation, status.sessions_failed
            check = await verify(conn)
            twice = await twice_written(conn)
        finally:
            await conn.close()
    ended = [(outcome.name[:200], outcome.ended) for outcome in outcomes if outcome.ended]
    uncounted = [outcome.name for outcome in outcomes if not outcome.ended and outcome.malformed < 1]
    logged = [text for level, text in log if "dropped malformed input from realtime" in text]
    meant = meant_for_us()
    result = {
        "repetitions": len(outcomes),
        "faults": sum(outcome.frames for outcome in outcomes),
        "rows_checked": check.rows_checked,
        "lost": check.lost,
        "written_twice": len(twice),
        "frames_random": random_frames,
        "sessions": generation,
        "sessions_failed": failed,
        "ended_the_session": ended,
        "uncounted": uncounted,
        "malformed_counted": sum(outcome.malformed for outcome in outcomes),
        # {times the malformed counter moved: rounds} over the one-frame rounds meant for the daemon.
        "counted_per_frame_meant_for_it": dict(Counter(o.malformed for o in outcomes if o.name in meant)),
        "warnings_logged": len(logged),
        "errors_logged": [text[:300] for level, text in log if level in ("ERROR", "CRITICAL")],
        "leaked": leaked([text for _, text in log]),
    }
    print(f"RESULT realtime-junk {result}")
    assert result["ended_the_session"] == [], result["ended_the_session"]
    assert (result["sessions"], result["sessions_failed"]) == (1, 0)
    assert check.ok, check.summary()
    assert twice == [], f"(id, version) written twice: {twice}"
    assert result["leaked"] == [] and result["errors_logged"] == [], result
    assert result["warnings_logged"] >= 1
    # Every frame meant for our channel was counted as malformed (the not-ours ones may not be).
    assert meant.isdisjoint(uncounted), sorted(meant & set(uncounted))
    return result


def meant_for_us() -> set[str]:
    """The one-frame rounds (by name) whose frame is meant for the daemon's channel: it must count it."""
    names = {name for name, _, counted in junk_catalogue("t", [1]) if counted}
    return names | (set(MALFORMED_KINDS) - ENDS_THE_SESSION - LIBRARY_IGNORES)


@pytest.mark.timeout(240)
async def test_realtime_junk_is_dropped_and_the_feed_stays_up(logical_pg: str) -> None:
    result = await realtime_junk(admin_dsn=logical_pg)
    # Each frame meant for the daemon was counted once: none missed, none counted twice.
    assert result["counted_per_frame_meant_for_it"] == {1.0: len(meant_for_us())}, result


async def test_presence_frames_without_phx_ref_do_not_end_the_session(
    live_dsn: str, live_db: asyncpg.Connection, live_server: RealtimeServer
) -> None:
    """A presence frame whose meta has no `phx_ref` raises KeyError inside realtime-py's receive task;
    before the fix that ended the task, so the supervisor replaced the session (a reconnect and a full
    drift pass) instead of dropping the frame. Now the channel's handler is guarded: dropped, counted."""
    async with running(realtime_settings(live_dsn, live_server, VECTOR_SYNC_SOURCES="realtime")) as handle:
        await realtime_live(handle)
        feed = Feed(handle, live_server)
        outcomes = []
        for index in range(len(presence_without_phx_ref("t"))):
            _, topic, _ = feed.channel()  # the session live now: the previous frame may have ended one
            name, frame = presence_without_phx_ref(topic)[index]
            outcomes.append(await feed.after(name, [lambda c, f=frame: c.send_raw(f)]))
        project = await live_db.fetchval("insert into projects (name) values ('after presence') returning id")
        await wait_until(lambda: embedded_at(live_db, project, 1), what="a change after the presence frames")
    ended = {outcome.name: outcome.ended for outcome in outcomes if outcome.ended}
    assert ended == {}, f"frames that ended the Realtime session: {ended}"


# ====================================================================== configuration as an attack surface

# Names with quotes, spaces, semicolons, comments, placeholders and SQL fragments; the fragments would
# drop the canary table or create public.pwned if they ever ran.
HOSTILE_NAMES = [
    'pro"jects',
    "my table",
    "x; drop table public.canary; --",
    "a--b",
    "$1",
    '"; select pg_sleep(1); --',
    "'); drop table public.canary; --",
    '"; create table public.pwned (a int); --',
    "*/ drop table public.canary; /*",
    "tab\there",
    "back\\slash",
    "%s %(x)s {0} ?",
    "select",
    "null",
    "\u30d7\u30ed\u30b8\u30a7\u30af\u30c8",  # katakana "project"
    "\u00dcn\u00efc\u00f8d\u00e9 \U0001f4e6",
    "E'\\x00'",
    "a,b",
    " edge spaces ",
]


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def outside_quotes(sql: str) -> str:
    """The SQL without its quoted identifiers and E'' string constants."""
    return re.sub(r"E'(?:[^'\\]|''|\\.)*'", " ", re.sub(r'"(?:[^"]|"")*"', " ", sql))


async def fresh_database(admin_dsn: str, setup_sql: str) -> str:
    """An empty database (no projects table, nothing migrated) with `setup_sql` run in it."""
    dsn = await create_database(admin_dsn, template="template1")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(setup_sql)
    finally:
        await conn.close()
    return dsn


async def user_tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace "
        "where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema', 'vector_sync')"
    )
    return {f"{row[0]}.{row[1]}" for row in rows}


@dataclass
class Trial:
    """What became of one configuration: refused at `stage` with `error`, working, or neither."""

    stage: str  # "config", "migrate", "start" (refused), "works", or "runtime" (started, then every batch failed)
    error: str = ""


async def try_configuration(dsn: str, content_column: str = "name", **variables: str) -> Trial:
    """Configure, migrate, start, change a row, see it embedded. Refusals are caught with their message."""
    try:
        settings_ = make_settings(dsn, VECTOR_SYNC_SOURCES="listen", **variables)
    except ConfigError as exc:
        return Trial("config", "\n".join(exc.problems))
    conn = await asyncpg.connect(dsn)
    try:
        try:
            await migrate(conn, settings_)
        except (SchemaError, asyncpg.PostgresError, ValueError) as exc:
            return Trial("migrate", f"{type(exc).__name__}: {exc}")
        table, id_column = quote_table(settings_.table), ident(settings_.id_column)
        with daemon_log("WARNING") as log:
            try:
                async with running(settings_):
                    content = ident(content_column)
                    project = await conn.fetchval(
                        f"insert into {table} ({content}) values ('hostile but harmless') returning {id_column}"
                    )

                    async def embedded_or_failing() -> bool:
                        return any(level == "ERROR" for level, _ in log) or bool(
                            await conn.fetchval(
                                "select count(*) = 1 from vector_sync.project_embeddings where project_id = $1",
                                project,
                            )
                        )

                    await wait_until(embedded_or_failing, timeout=20, what="the row embedded")
            except AssertionError as exc:
                errors = [text for level, text in log if level in ("ERROR", "CRITICAL")]
                return Trial("start", "\n".join(errors) or str(exc))
        errors = [text.splitlines()[0] for level, text in log if level in ("ERROR", "CRITICAL")]
        # Started, but failing at its work: neither working nor refused.
        return Trial("runtime", "\n".join(errors)) if errors else Trial("works")
    finally:
        await conn.close()


def create_table_sql(table: str, id_column: str, content_column: str) -> str:
    return f"""
        create table public.canary (a int);
        create table {table} (
          {ident(id_column)} bigint generated by default as identity primary key,
          {ident(content_column)} text
        );
    """


async def assert_no_fragment_ran(dsn: str, expected: set[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        assert await user_tables(conn) == expected | {"public.canary"}
    finally:
        await conn.close()


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[f"name{number}" for number in range(len(HOSTILE_NAMES))])
async def test_a_hostile_name_as_table_id_and_content_column(pg_server: str, name: str) -> None:
    """The name as the table (quoted, as the configuration syntax asks), as the id column and, with a
    suffix, as the content column: it works end to end, or it is refused with an error naming the
    variable; no fragment of it ever runs."""
    content = name + " text"
    dsn = await fresh_database(pg_server, create_table_sql(f"public.{ident(name)}", name, content))
    trial = await try_configuration(
        dsn,
        content,
        VECTOR_SYNC_TABLE=f'"public".{ident(name)}',
        VECTOR_SYNC_ID_COLUMN=name,
        VECTOR_SYNC_CONTENT_COLUMNS=content,
    )
    await assert_no_fragment_ran(dsn, {f"public.{name}"})
    if trial.stage == "works":
        return
    # Only a name the bare comma list cannot carry (a comma, spaces at its ends, a leading double quote,
    # which starts a quoted name) may be refused, and then clearly: split or stripped, it names columns
    # the table lacks, refused before any migration runs (before the fix the daemon started anyway and
    # every batch failed). Quoted, it works: see the next test.
    assert "," in name or name != name.strip() or name.startswith('"'), (name, trial)
    assert trial.stage in ("config", "migrate"), (name, trial)
    assert "VECTOR_SYNC_CONTENT_COLUMNS" in trial.error, (name, trial)


async def test_a_content_column_the_table_lacks_is_refused_at_migrate_and_at_start(dsn: str) -> None:
    """Before the fix only the id column was checked against the catalog at start: with a content
    column the table did not have, the daemon started, said it was ready, and every batch failed
    ("batch of N rows failed unexpectedly; retrying later", UndefinedColumnError) for as long as it ran."""
    trial = await try_configuration(dsn, VECTOR_SYNC_CONTENT_COLUMNS="name,no_such_column")
    assert trial.stage == "migrate", trial
    assert "VECTOR_SYNC_CONTENT_COLUMNS" in trial.error and "no_such_column" in trial.error, trial
    # Migrated for columns the table has, then started with one it lacks: the start refuses.
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn, make_settings(dsn, VECTOR_SYNC_SOURCES="listen"))
    finally:
        await conn.close()
    settings_ = make_settings(dsn, VECTOR_SYNC_SOURCES="listen", VECTOR_SYNC_CONTENT_COLUMNS="name,no_such_column")
    with daemon_log("ERROR") as log, pytest.raises(AssertionError, match="daemon exited during start"):
        async with running(settings_):
            pass
    assert any("VECTOR_SYNC_CONTENT_COLUMNS" in text and "no_such_column" in text for _, text in log), log


@pytest.mark.parametrize("name", ["a,b", " edge spaces ", 'say "hi", twice', '"; select pg_sleep(1); --'])
async def test_a_content_column_with_a_comma_or_edge_spaces_works_in_double_quotes(pg_server: str, name: str) -> None:
    dsn = await fresh_database(pg_server, create_table_sql("public.projects", "id", name))
    trial = await try_configuration(dsn, name, VECTOR_SYNC_CONTENT_COLUMNS=ident(name))
    await assert_no_fragment_ran(dsn, {"public.projects"})
    assert trial.stage == "works", (name, trial)


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[f"name{number}" for number in range(len(HOSTILE_NAMES))])
def test_a_hostile_table_name_typed_without_quotes(name: str) -> None:
    """VECTOR_SYNC_TABLE as an operator might type it, unquoted: refused as a configuration error, or
    read as one literal name that every migration quotes (nothing of it outside quotes)."""
    try:
        settings_ = make_settings("postgresql://postgres:@/db", VECTOR_SYNC_TABLE=name)
    except ConfigError as exc:
        assert [problem.split(":")[0] for problem in exc.problems] == ["VECTOR_SYNC_TABLE"]
        assert "double quotes" in exc.problems[0]
        return
    neutral = make_settings("postgresql://postgres:@/db", VECTOR_SYNC_TABLE="zz_neutral")

    def rendered(settings__: Settings) -> str:
        return "\n".join(m.sql for m in load_migrations(settings__, Catalog(IdKind.BIGINT, "public")))

    assert quote_table(settings_.table) in rendered(settings_)
    # Outside quoted names and string constants the SQL is the same as for a plain name.
    assert outside_quotes(rendered(settings_)) == outside_quotes(rendered(neutral)), name


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("VECTOR_SYNC_TABLE", '""'),
        ("VECTOR_SYNC_TABLE", '"public".""'),
        ("VECTOR_SYNC_TABLE", ""),
        ("VECTOR_SYNC_ID_COLUMN", ""),
        ("VECTOR_SYNC_CONTENT_COLUMNS", ""),
        ("VECTOR_SYNC_CONTENT_COLUMNS", " , , "),
        ("VECTOR_SYNC_ID_COLUMN", "x" * 64),
        ("VECTOR_SYNC_ID_COLUMN", "\u00e9" * 32),  # 64 bytes
        ("VECTOR_SYNC_CONTENT_COLUMNS", "name," + "y" * 64),
        ("VECTOR_SYNC_ID_COLUMN", "nul\x00byte"),
    ],
)
def test_empty_too_long_and_nul_column_names_are_configuration_errors(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        make_settings("postgresql://postgres:@/db", **{variable: value})
    assert [problem.split(":")[0] for problem in raised.value.problems] == [variable]


@pytest.mark.parametrize(
    "name", ["t" * 64, "t" * 100, "\u00e9" * 32, "nul\x00byte"], ids=["64-bytes", "100-bytes", "64-bytes-utf8", "nul"]
)
async def test_a_table_name_postgres_cannot_hold_is_refused(pg_server: str, name: str) -> None:
    """Postgres cuts identifiers to 63 bytes (and holds no NUL). A table configured with such a name
    must be refused, at configuration or at start with a clear error, never confused with the table
    Postgres made of the cut name."""
    stored = name.encode()[:63].decode(errors="ignore").replace("\x00", "")
    dsn = await fresh_database(pg_server, create_table_sql(f"public.{ident(stored)}", "id", "name"))
    trial = await try_configuration(dsn, VECTOR_SYNC_TABLE=f'"public".{ident(name)}')
    await assert_no_fragment_ran(dsn, {f"public.{stored}"})
    assert trial.stage in ("config", "migrate", "start"), f"VECTOR_SYNC_TABLE={name!r}: {trial}"
    # Refused by the configuration, or (today) by Postgres itself when `migrate` first uses the name.
    assert re.search(r"VECTOR_SYNC_TABLE|identifier too long|0x00", trial.error), trial


@pytest.mark.parametrize("raw", ["Projects", "MixedCase_2", "\u00dcn\u00efc\u00f8d\u00e9", "\u00c0\u00c9\u00ce"])
async def test_unquoted_table_names_fold_as_postgres_folds_them(pg_server: str, raw: str) -> None:
    """Unquoted parts are folded as Postgres folds them: only ASCII A-Z (in a UTF-8 database). Before
    the fix Python's str.lower folded non-ASCII capitals too, and the daemon looked for a table that
    was not there and refused to start."""
    dsn = await fresh_database(pg_server, f"create table {raw} (id bigint primary key, name text, description text)")
    conn = await asyncpg.connect(dsn)
    try:
        postgres_name = await conn.fetchval(
            "select relname from pg_class where relnamespace = 'public'::regnamespace and relkind = 'r'"
        )
    finally:
        await conn.close()
    assert make_settings(dsn, VECTOR_SYNC_TABLE=raw).table == TableName("public", postgres_name)


# --- no SQL built by pasting -------------------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parents[1] / "daemon" / "vector_sync"
_SQL_TEXT = re.compile(
    r"\b(select\b.*\bfrom|insert\s+into|update\s+\S+\s+set|delete\s+from|create\s+(table|index|extension|schema|"
    r"trigger|function|view)|alter\s+table|drop\s+(table|index)|join\s+\S+|unnest|on\s+conflict|"
    r"where\s+\S+\s*(=|>|<|is|in))",
    re.IGNORECASE | re.DOTALL,
)
# Values pasted into SQL on purpose, with why it is safe: `vector-sync sql` prints the bookkeeping insert
# of each migration, whose number, name and checksum come from the package's own files.
REVIEWED_PASTES = {
    "cli.py: migration.number": "an int parsed from a packaged file name (\\d{4})",
    "cli.py: migration.name": "\\w+ from a packaged file name",
    "cli.py: migration.checksum": "a sha256 hex digest",
}
# Calls whose result is safe to paste: the quoting helpers, and int() of a number.
_SAFE_CALLS = {"quote_ident", "quote_table", "quote_literal", "int", "vector_type"}
# Attributes that are chosen from fixed lists: IdKind.sql_type is one of uuid/bigint/integer/smallint/text.
_SAFE_ATTRIBUTES = {"sql_type"}


class _Pasting(ast.NodeVisitor):
    """Every expression pasted into SQL text (an f-string, `%` or `.format` on a string that reads as
    SQL, or `+` with one) whose value is not known to be quoted, a fixed choice or a number."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []
        self.sql_strings = 0
        self._scopes: list[dict[str, list[ast.expr]]] = [{}]

    # -- scopes: what each local name was assigned
    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        assigned: dict[str, list[ast.expr]] = {}
        for child in ast.walk(node):
            if isinstance(child, ast.Assign):
                for target in child.targets:
                    for name in _names(target):
                        assigned.setdefault(name, []).append(child.value)
            elif isinstance(child, ast.AnnAssign | ast.AugAssign) and child.value is not None:
                for name in _names(child.target):
                    assigned.setdefault(name, []).append(child.value)
        self._scopes.append(assigned)
        self.generic_visit(node)
        self._scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def safe(self, node: ast.expr, seen: frozenset[str] = frozenset()) -> bool:
        if isinstance(node, ast.Constant):
            return True
        if isinstance(node, ast.JoinedStr):
            return all(self.safe(value.value, seen) for value in node.values if isinstance(value, ast.FormattedValue))
        if isinstance(node, ast.IfExp):
            return self.safe(node.body, seen) and self.safe(node.orelse, seen)
        if isinstance(node, ast.Attribute):
            return node.attr in _SAFE_ATTRIBUTES
        if isinstance(node, ast.Call):
            return self._safe_call(node, seen)
        if isinstance(node, ast.Name):
            values = self._scopes[-1].get(node.id)
            if not values or node.id in seen:
                return False
            return all(self.safe(value, seen | {node.id}) for value in values)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.safe(node.left, seen) and self.safe(node.right, seen)
        return False

    def _safe_call(self, node: ast.Call, seen: frozenset[str]) -> bool:
        function = node.func
        if isinstance(function, ast.Name):
            return function.id in _SAFE_CALLS
        if not isinstance(function, ast.Attribute):
            return False
        if function.attr == "join":  # ", ".join(<safe item> for ...)
            items = node.args[0] if node.args else None
            element = items.elt if isinstance(items, ast.GeneratorExp | ast.ListComp) else items
            return self.safe(function.value, seen) and element is not None and self.safe(element, seen)
        # A method of a safe string with constant arguments ("vector[]".removesuffix("[]")).
        return self.safe(function.value, seen) and all(isinstance(arg, ast.Constant) for arg in node.args)

    def _report(self, node: ast.AST, pasted: ast.expr) -> None:
        self.problems.append(f"{self.path.name}:{node.lineno}: {ast.unparse(pasted)}")

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        text = "".join(value.value for value in node.values if isinstance(value, ast.Constant))
        if _SQL_TEXT.search(text):
            self.sql_strings += 1
            for value in node.values:
                if isinstance(value, ast.FormattedValue) and not self.safe(value.value):
                    self._report(node, value.value)
        self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        sides = (node.left, node.right)
        sql = [side for side in sides if isinstance(side, ast.Constant) and isinstance(side.value, str)]
        if isinstance(node.op, ast.Mod | ast.Add) and any(_SQL_TEXT.search(side.value) for side in sql):
            for side in sides:
                if not self.safe(side):
                    self._report(node, side)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        function = node.func
        if (
            isinstance(function, ast.Attribute)
            and function.attr == "format"
            and isinstance(function.value, ast.Constant)
            and isinstance(function.value.value, str)
            and _SQL_TEXT.search(function.value.value)
        ):
            for arg in [*node.args, *(keyword.value for keyword in node.keywords)]:
                if not self.safe(arg):
                    self._report(node, arg)
        self.generic_visit(node)


def _names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple | ast.List):
        return [name for element in target.elts for name in _names(element)]
    return []


def pasted_into_sql(path: Path) -> tuple[list[str], int]:
    """(the unsafe pastes, how many SQL f-strings were looked at)."""
    visitor = _Pasting(path)
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.problems, visitor.sql_strings


def test_the_scan_for_pasted_sql_finds_pasting(tmp_path: Path) -> None:
    """The scan itself: it flags a pasted name, and lets quoted names, fixed choices and numbers pass."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def bad(conn, settings, table, name):\n"
        "    conn.execute(f'select * from {settings.table} where id = 1')\n"
        "    conn.execute('delete from ' + table)\n"
        "    conn.execute('select * from %s' % name)\n"
        "    conn.execute('insert into {} values (1)'.format(name))\n"
        "    column = name\n"
        "    conn.execute(f'select {column} from t')\n"
        "def good(conn, settings, catalog, n):\n"
        "    table = quote_table(settings.table)\n"
        "    columns = ', '.join(f't.{quote_ident(c)}::text' for c in settings.content_columns)\n"
        "    kind = catalog.id_kind.sql_type\n"
        "    array = 'halfvec[]' if n > 2000 else 'vector[]'\n"
        "    conn.execute(f'select {columns} from {table} t where t.id = $1::{kind} and {int(n)} > 0')\n"
        "    conn.execute(f'select $1::{array.removesuffix(\"[]\")} from x')\n"
    )
    problems, sql_strings = pasted_into_sql(sample)
    assert [problem.split(": ", 1)[1] for problem in problems] == ["settings.table", "table", "name", "name", "column"]
    assert sql_strings == 4


def test_no_identifier_is_pasted_into_sql_unquoted() -> None:
    """Every value pasted into SQL text in the package is quoted (quote_ident / quote_table /
    quote_literal), a fixed choice (IdKind.sql_type, a literal) or a number. The migration files
    themselves are rendered by migrations.render from the same helpers (test_migrations checks them)."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    scanned = {path.name: pasted_into_sql(path) for path in files}
    problems = [problem for found, _ in scanned.values() for problem in found]
    unreviewed = [problem for problem in problems if re.sub(r":\d+:", ":", problem) not in REVIEWED_PASTES]
    assert unreviewed == []
    # Not vacuous: the query texts of the store, the migrations and the CLI were all looked at.
    assert scanned["store.py"][1] >= 12 and scanned["migrations.py"][1] >= 1 and scanned["cli.py"][1] >= 1, scanned


# ====================================================================================== the secrets scan


def conftest_module(secret_scan: Any) -> Any:
    return sys.modules[type(secret_scan).__module__]


def test_the_secret_scan_catches_a_secret_in_loguru_output(secret_scan: Any) -> None:
    """The scanner on a buffer of its own, with a secret made up here (so the session's scan, which
    also sees this log line, does not know it)."""
    value = "fake-secret-" + secrets.token_hex(8)
    scan = type(secret_scan)({"FAKE_SECRET": value})
    sink = logger.add(scan.sink, level=0, format="{message}")
    try:
        logger.info("connected to the database")
        assert scan.findings == []
        logger.warning("connecting with {key}", key=value)
        try:
            raise RuntimeError(f"refused: {value}")
        except RuntimeError:
            logger.exception("a traceback")
    finally:
        logger.remove(sink)
    assert len(scan.findings) == 2, scan.findings
    assert all(finding.startswith("FAKE_SECRET in loguru output") for finding in scan.findings)
    assert all(value not in finding for finding in scan.findings), "a finding must not repeat the secret"


def test_the_secret_scan_reads_test_reports_and_watched_files(secret_scan: Any, tmp_path: Path) -> None:
    conftest = conftest_module(secret_scan)
    value = "fake-password-" + secrets.token_hex(8)
    scan = type(secret_scan)({"FAKE_PASSWORD": value})

    report = SimpleNamespace(
        when="call",
        sections=[("Captured stdout call", "all fine"), ("Captured stderr call", f"dsn=postgres://u:{value}@h/d")],
    )
    with mock.patch.object(conftest, "_secret_scan", scan):
        conftest.pytest_runtest_logreport(report)
    assert [finding.split(" (")[0] for finding in scan.findings] == ["FAKE_PASSWORD in Captured stderr call"]
    log = tmp_path / "daemon.log"
    log.write_text(f"2024-01-01 | INFO | key={value}\n")
    scan.watch(log, "subprocess log")
    scan.scan_watched()
    assert len(scan.findings) == 2 and scan.findings[1].startswith("FAKE_PASSWORD in subprocess log")


async def test_the_secret_scan_reads_every_http_answer(secret_scan: Any) -> None:
    """The session-wide hook on HTTP clients: an aiohttp answer read, one only looked at for its status,
    an httpx answer and an httpx2 one (the openai SDK's) all reach the scan (a scan of its own here,
    with a secret made up here)."""
    conftest = conftest_module(secret_scan)
    value = "fake-token-" + secrets.token_hex(8)
    scan = type(secret_scan)({"FAKE_TOKEN": value})

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "token": value})

    app = web.Application()
    app.router.add_get("/{name}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        with mock.patch.object(conftest, "_secret_scan", scan):
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/read") as response:
                    await response.json()
                async with session.get(f"{url}/status-only") as response:
                    assert response.status == 200
            async with httpx.AsyncClient() as client:
                await client.get(f"{url}/httpx")
            async with httpx2.AsyncClient() as client2:
                await client2.get(f"{url}/httpx2")
    finally:
        await runner.cleanup()
    found = sorted(finding.split(" (")[0] for finding in scan.findings)
    paths = ("httpx", "httpx2", "read", "status-only")
    assert found == [f"FAKE_TOKEN in HTTP answer to GET {url}/{path}" for path in paths], scan.findings


def test_the_secret_scan_says_when_captured_output_was_not_scanned(secret_scan: Any) -> None:
    """Under `pytest -s` the test reports carry no output: the summary must say so, not pass in silence."""
    scan = type(secret_scan)({"FAKE_SECRET": "fake-secret-value"})
    scan.check("loguru output", "a line", "loguru lines")
    assert not any("NOT scanned" in line for line in scan.summary())
    scan.captured = False
    assert scan.summary()[0] == "secrets scan: 1 secrets, 1 outputs scanned (0 subprocess log files), none found"
    assert "NOT scanned" in scan.summary()[-1] and "capture is off" in scan.summary()[-1], scan.summary()


def test_a_secret_made_at_run_time_is_registered_with_add(secret_scan: Any) -> None:
    value = "run-time-password-" + secrets.token_hex(8)
    scan = type(secret_scan)()
    scan.check("before", f"dsn=postgresql://u:{value}@h/d")
    scan.add("RUN_TIME_PASSWORD", value)
    scan.check("after", f"dsn=postgresql://u:{value}@h/d")
    assert [finding.split(" (")[0] for finding in scan.findings] == ["RUN_TIME_PASSWORD in after"]
    with pytest.raises(ValueError, match="match by chance"):
        scan.add("SHORT", "abc")


def test_the_session_scan_knows_the_suites_secrets(secret_scan: Any) -> None:
    """What the session looks for: found by name in the test modules, with the key inside a whsec_
    secret and the password of a DSN; nothing so short it would match by chance."""
    conftest = conftest_module(secret_scan)
    values = set(secret_scan.secrets.values())
    assert {WEBHOOK_SECRET, KEY.decode(), API_KEY, REALTIME_API_KEY, WEBHOOK_TOKEN, DB_PASSWORD} <= values
    assert all(len(value) >= 8 for value in values)
    module = ModuleType("sample")
    module.SAMPLE_DATABASE_URL = "postgresql://user:pa55-w0rd-xyz@db.example.com/app"  # type: ignore[attr-defined]
    module.SHORT_TOKEN = "abc"  # type: ignore[attr-defined]
    module.GREETING = "just-some-text-here"  # type: ignore[attr-defined]
    assert conftest.known_secrets([module]) == {"sample.SAMPLE_DATABASE_URL (password)": "pa55-w0rd-xyz"}


# ==================================================================================== soak registry

SCENARIOS: list[tuple[str, Scenario]] = [
    ("webhook-fuzz", webhook_fuzz),
    ("realtime-junk", realtime_junk),
]
