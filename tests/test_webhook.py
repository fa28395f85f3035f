"""`POST /webhook` against a running daemon, row by row of interface.md's status table, plus unit
tests of the signature check, the bearer check and the rate limiter.

Signatures are cross-checked with the `standardwebhooks` reference library, so the verifier is
tested against an independent signer and not only against our own `sign`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
from embedding_api import EmbeddingAPI, Fault
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from support import (
    WEBHOOK_SECRET,
    RunningDaemon,
    make_settings,
    running,
    signed_headers,
    stored,
    wait_until,
    webhook_body,
)
from vector_sync.config import decode_webhook_secret
from vector_sync.sources.webhook import RateLimiter, sign, verify_bearer, verify_signature

KEY = decode_webhook_secret(WEBHOOK_SECRET)
OTHER_SECRET = "whsec_" + base64.b64encode(b"another-secret-key-fedcba9876543").decode()
TOKEN = "static-bearer-token-0123456789"
MIB = 1024 * 1024
BIGINT_MAX = 2**63 - 1


# --- helpers ----------------------------------------------------------------------------------


class Answer:
    """One HTTP answer: status, headers and the body parsed as JSON (None when it is not JSON)."""

    def __init__(self, status: int, headers: dict[str, str], text: str) -> None:
        self.status = status
        self.headers = headers
        self.text = text
        try:
            self.json: Any = json.loads(text)
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.text[:200]!r})"


async def post(
    url: str,
    body: Any,
    headers: dict[str, str] | None = None,
    *,
    session: aiohttp.ClientSession | None = None,
    skip_content_type: bool = False,
) -> Answer:
    """POST `body` to /webhook exactly as given (no Content-Type is added when none is passed)."""
    skip = ["Content-Type"] if skip_content_type else []
    if isinstance(body, bytes) and len(body) > MIB // 2:
        body = io.BytesIO(body)  # still sent with a Content-Length; aiohttp warns about large raw bytes
    own = session is None
    client = session or aiohttp.ClientSession()
    try:
        async with client.post(f"{url}/webhook", data=body, headers=headers or {}, skip_auto_headers=skip) as resp:
            return Answer(resp.status, dict(resp.headers), await resp.text(errors="replace"))
    finally:
        if own:
            await client.close()


async def get(url: str, path: str) -> Answer:
    async with aiohttp.ClientSession() as session, session.get(f"{url}{path}") as resp:
        return Answer(resp.status, dict(resp.headers), await resp.text())


def assert_error(answer: Answer, status: int) -> None:
    """The status, and the error body shape every error shares: {"error": "<short reason>"}."""
    assert answer.status == status, answer
    assert isinstance(answer.json, dict), answer
    assert set(answer.json) == {"error"}, answer
    assert isinstance(answer.json["error"], str), answer
    assert answer.json["error"].strip(), answer


def assert_accepted(answer: Answer, webhook_id: str | None) -> None:
    assert answer.status == 202, answer
    assert answer.json == {"webhook_id": webhook_id}, answer


def reference_headers(
    body: bytes, *, secret: str = WEBHOOK_SECRET, msg_id: str | None = None, when: datetime | None = None
) -> dict[str, str]:
    """Standard Webhooks headers made by the reference library, not by the daemon's own `sign`."""
    msg_id = msg_id or f"msg_{secrets.token_hex(8)}"
    when = when or datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id, when, body.decode())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signature,
    }


def hmac_signature(key: bytes, msg_id: str, timestamp: str, body: bytes) -> str:
    """A v1 signature over the literal header text, as a Standard Webhooks sender computes it."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


async def insert_project(db: asyncpg.Connection, name: str, description: str = "") -> int:
    value: int = await db.fetchval(
        "insert into projects (name, description) values ($1, $2) returning id", name, description
    )
    return value


async def stored_version(db: asyncpg.Connection, project_id: int) -> int | None:
    row = (await stored(db)).get(project_id)
    return None if row is None else row[0]


async def webhook_only(handle: RunningDaemon) -> None:
    """With only the webhook source, wait for the start-up drift pass: from then on, only webhooks
    tell the daemon about changes, so whatever gets embedded was driven by a webhook."""
    drift = handle.daemon.drift
    assert drift is not None
    await wait_until(lambda: drift.passes >= 1, what="the start-up drift pass")


def webhook_counts(metrics_text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "vector_sync_webhook_responses_total":
                counts[sample.labels["status"]] = sample.value
    return counts


@pytest.fixture
async def live(dsn: str) -> AsyncIterator[RunningDaemon]:
    """A daemon with the default test settings: hash embedder, LISTEN + webhook, secret only."""
    async with running(make_settings(dsn)) as handle:
        yield handle


# --- unit: verify_signature -------------------------------------------------------------------

NOW = 1_700_000_000


def test_sign_matches_the_reference_library() -> None:
    body = b'{"type": "UPDATE", "table": "projects"}'
    reference = Webhook(WEBHOOK_SECRET).sign("msg_1", datetime.fromtimestamp(NOW, UTC), body.decode())
    assert f"v1,{sign(KEY, 'msg_1', NOW, body)}" == reference


def test_a_reference_signature_verifies() -> None:
    body = webhook_body("UPDATE", 7, 3)
    when = datetime.fromtimestamp(NOW, UTC)
    signature = Webhook(WEBHOOK_SECRET).sign("msg_ref", when, body.decode())
    assert verify_signature(KEY, "msg_ref", str(NOW), signature, body, now=NOW) is None


def test_the_test_helper_headers_pass_the_reference_verifier() -> None:
    body = webhook_body("INSERT", 1, 1)
    headers = signed_headers(body)
    assert Webhook(WEBHOOK_SECRET).verify(body, headers) == json.loads(body)
    with pytest.raises(WebhookVerificationError):
        Webhook(OTHER_SECRET).verify(body, headers)


@pytest.mark.parametrize(
    ("webhook_id", "timestamp", "signature_of"),
    [
        (None, str(NOW), "good"),
        ("msg_1", None, "good"),
        ("msg_1", str(NOW), None),
        ("", str(NOW), "good"),
        ("msg_1", "", "good"),
        ("msg_1", str(NOW), ""),
    ],
    ids=["no-id", "no-timestamp", "no-signature", "empty-id", "empty-timestamp", "empty-signature"],
)
def test_verify_signature_refuses_missing_headers(
    webhook_id: str | None, timestamp: str | None, signature_of: str | None
) -> None:
    body = b"{}"
    good = hmac_signature(KEY, "msg_1", str(NOW), body)
    signature = good if signature_of == "good" else signature_of
    assert verify_signature(KEY, webhook_id, timestamp, signature, body, now=NOW) is not None


def test_verify_signature_refuses_wrong_and_tampered_signatures() -> None:
    body = webhook_body("UPDATE", 7, 3)
    good = hmac_signature(KEY, "msg_1", str(NOW), body)
    assert verify_signature(KEY, "msg_1", str(NOW), good, body, now=NOW) is None
    other = Webhook(OTHER_SECRET).sign("msg_1", datetime.fromtimestamp(NOW, UTC), body.decode())
    cases = {
        "other secret": ("msg_1", str(NOW), other, body),
        "tampered body": ("msg_1", str(NOW), good, webhook_body("UPDATE", 7, 4)),
        "other id": ("msg_2", str(NOW), good, body),
        "other timestamp": ("msg_1", str(NOW + 1), good, body),
        "garbage": ("msg_1", str(NOW), "v1,bm90IGEgc2lnbmF0dXJl", body),
        "no version": ("msg_1", str(NOW), good.removeprefix("v1,"), body),
        "other version": ("msg_1", str(NOW), "v2," + good.removeprefix("v1,"), body),
        "v1a version": ("msg_1", str(NOW), "v1a," + good.removeprefix("v1,"), body),
        "truncated": ("msg_1", str(NOW), good[:-4], body),
    }
    accepted = [name for name, args in cases.items() if verify_signature(KEY, *args, now=NOW) is None]
    assert accepted == []


def test_verify_signature_accepts_one_valid_among_several() -> None:
    body = webhook_body("UPDATE", 7, 3)
    good = hmac_signature(KEY, "msg_1", str(NOW), body)
    other = hmac_signature(decode_webhook_secret(OTHER_SECRET), "msg_1", str(NOW), body)
    for signatures in (f"{other} {good}", f"{good} {other}", f"v1,Zm9v v2,YmFy {good}"):
        assert verify_signature(KEY, "msg_1", str(NOW), signatures, body, now=NOW) is None, signatures
    assert verify_signature(KEY, "msg_1", str(NOW), f"{other} v1,Zm9v", body, now=NOW) is not None


@pytest.mark.parametrize(
    ("offset", "ok"),
    [(0, True), (-299, True), (299, True), (-301, False), (301, False), (-86_400, False), (86_400, False)],
)
def test_verify_signature_timestamp_tolerance(offset: int, ok: bool) -> None:
    body = b"{}"
    sent = str(NOW + offset)
    signature = hmac_signature(KEY, "msg_1", sent, body)
    assert (verify_signature(KEY, "msg_1", sent, signature, body, now=NOW) is None) is ok


@pytest.mark.parametrize("timestamp", ["abc", f"{NOW}.0", f"{NOW}.5", "1.7e9", "0x6553f100", "-", "now"])
def test_verify_signature_refuses_non_integer_timestamps(timestamp: str) -> None:
    body = b"{}"
    signature = hmac_signature(KEY, "msg_1", timestamp, body)  # signed over the literal header text
    assert verify_signature(KEY, "msg_1", timestamp, signature, body, now=NOW) is not None


def test_verify_signature_reports_an_absurd_timestamp_instead_of_raising() -> None:
    # A 401-digit integer parses as an int but cannot be compared with a float clock.
    timestamp = "1" + "0" * 400
    signature = hmac_signature(KEY, "msg_1", timestamp, b"{}")
    # `now` is a float clock reading, as the receiver passes `time.time()`.
    assert verify_signature(KEY, "msg_1", timestamp, signature, b"{}", now=NOW + 0.25) is not None


def test_verify_signature_reports_undecodable_headers_instead_of_raising() -> None:
    # aiohttp hands header bytes that are not UTF-8 over as lone surrogates ("\udcff").
    good = hmac_signature(KEY, "msg_1", str(NOW), b"{}")
    assert verify_signature(KEY, "msg_\udcff", str(NOW), good, b"{}", now=NOW) is not None
    assert verify_signature(KEY, "msg_1", str(NOW), good + "\udcff", b"{}", now=NOW) is not None
    assert verify_signature(KEY, "msg_1", str(NOW), "v1,\udcff", b"{}", now=NOW) is not None


# --- unit: verify_bearer ----------------------------------------------------------------------


def test_verify_bearer() -> None:
    assert verify_bearer(TOKEN, f"Bearer {TOKEN}")
    assert verify_bearer(TOKEN, f"bearer {TOKEN}")  # auth schemes are case-insensitive (RFC 9110)
    refused = [
        None,
        "",
        "Bearer",
        "Bearer ",
        TOKEN,
        f"Basic {TOKEN}",
        f"Token {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN.upper()}",
        f"Bearer {TOKEN}\udcff",  # an undecodable header byte, as aiohttp passes it on
        f"Bearer \udcff{TOKEN}",
        "Bearer wrong-token",
    ]
    assert [value for value in refused if verify_bearer(TOKEN, value)] == []


# --- unit: RateLimiter ------------------------------------------------------------------------


def test_rate_limiter_allows_a_burst_then_refuses_with_a_wait() -> None:
    limiter = RateLimiter(5)
    assert [limiter.retry_after("a", now=100.0) for _ in range(5)] == [None] * 5
    wait = limiter.retry_after("a", now=100.0)
    assert wait is not None
    assert wait == pytest.approx(0.2)
    # Refusals take nothing: the wait shrinks with time and one token is back after 0.2 s.
    assert limiter.retry_after("a", now=100.1) == pytest.approx(0.1)
    assert limiter.retry_after("a", now=100.2) is None
    assert limiter.retry_after("a", now=100.2) is not None


def test_rate_limiter_is_per_address() -> None:
    limiter = RateLimiter(2)
    assert limiter.retry_after("10.0.0.1", now=0.0) is None
    assert limiter.retry_after("10.0.0.1", now=0.0) is None
    assert limiter.retry_after("10.0.0.1", now=0.0) is not None
    assert limiter.retry_after("10.0.0.2", now=0.0) is None
    assert limiter.retry_after("10.0.0.2", now=0.0) is None
    assert limiter.retry_after("10.0.0.2", now=0.0) is not None


def test_rate_limiter_refill_is_capped_at_the_burst() -> None:
    limiter = RateLimiter(3)
    assert limiter.retry_after("a", now=0.0) is None
    allowed = [limiter.retry_after("a", now=1000.0) is None for _ in range(10)]
    assert allowed == [True] * 3 + [False] * 7


def test_rate_limiter_sustains_its_rate() -> None:
    limiter = RateLimiter(10)
    now = 0.0
    passed = 0
    for _ in range(400):  # 40 requests a second for 10 s
        now += 0.025
        passed += limiter.retry_after("a", now=now) is None
    assert 100 <= passed <= 111  # 10 s at 10/s, plus the initial burst of 10


def test_rate_limiter_explicit_burst() -> None:
    limiter = RateLimiter(1, burst=3)
    assert [limiter.retry_after("a", now=0.0) is None for _ in range(4)] == [True, True, True, False]
    wait = limiter.retry_after("a", now=0.0)
    assert wait == pytest.approx(1.0)


# --- 202 --------------------------------------------------------------------------------------


async def test_accepted_at_once_despite_the_insert_delay_and_then_embedded(dsn: str, db: asyncpg.Connection) -> None:
    async with running(make_settings(dsn, VECTOR_SYNC_SOURCES="webhook", VECTOR_SYNC_INSERT_DELAY="60s")) as handle:
        await webhook_only(handle)
        inserted = await insert_project(db, "Lighthouse", "Maps coastal beacons")
        body = webhook_body("INSERT", inserted, 1)
        headers = signed_headers(body, webhook_id="msg_insert_1")
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            answer = await post(handle.url, body, headers, session=session)
            took = time.monotonic() - started
        assert_accepted(answer, "msg_insert_1")
        assert took < 1.0, f"202 took {took:.2f}s"

        updated = await insert_project(db, "Orchard", "Tracks apple trees")
        await db.execute("update projects set description = 'Tracks pear trees' where id = $1", updated)
        version = await db.fetchval("select version from projects where id = $1", updated)
        assert version == 2
        body = webhook_body("UPDATE", updated, version)
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            answer = await post(handle.url, body, signed_headers(body, webhook_id="msg_update_2"), session=session)
            took = time.monotonic() - started
        assert_accepted(answer, "msg_update_2")
        assert took < 1.0, f"202 took {took:.2f}s"

        async def embedded() -> bool:
            return await stored_version(db, updated) == 2

        await wait_until(embedded, what="the webhook's UPDATE to be embedded")


async def test_duplicates_are_accepted(live: RunningDaemon) -> None:
    body = webhook_body("UPDATE", 41, 3)
    headers = signed_headers(body, webhook_id="msg_dup")
    assert_accepted(await post(live.url, body, headers), "msg_dup")
    assert_accepted(await post(live.url, body, headers), "msg_dup")  # the same request again
    assert_accepted(await post(live.url, body, signed_headers(body, webhook_id="msg_dup_2")), "msg_dup_2")
    older = webhook_body("UPDATE", 41, 2)  # older than what was seen: still a 202
    assert_accepted(await post(live.url, older, signed_headers(older, webhook_id="msg_dup_3")), "msg_dup_3")


async def test_a_replay_is_accepted_but_not_embedded_twice(dsn: str, db: asyncpg.Connection, api: EmbeddingAPI) -> None:
    async with running(make_settings(dsn, api.url, VECTOR_SYNC_SOURCES="webhook")) as handle:
        await webhook_only(handle)
        first = await insert_project(db, "Alpha", "first")
        body = webhook_body("INSERT", first, 1)
        headers = signed_headers(body, webhook_id="msg_replayed")
        assert_accepted(await post(handle.url, body, headers), "msg_replayed")

        async def first_embedded() -> bool:
            return await stored_version(db, first) == 1

        await wait_until(first_embedded, what="the first delivery to be embedded")
        assert api.all_inputs == ["Alpha\n\nfirst"]
        requests_before = api.request_count

        # The row changes without telling the daemon: if a replay were taken for new news, the
        # daemon would read the row again and embed the new text.
        await db.execute("update projects set description = 'second' where id = $1", first)
        assert_accepted(await post(handle.url, body, headers), "msg_replayed")
        assert_accepted(await post(handle.url, body, headers), "msg_replayed")

        # A later, different change is the marker: once it is embedded (and the daemon is idle),
        # anything the replays set off has happened too.
        sentinel = await insert_project(db, "Omega", "sentinel")
        sentinel_body = webhook_body("INSERT", sentinel, 1)
        assert_accepted(await post(handle.url, sentinel_body, signed_headers(sentinel_body, webhook_id="m2")), "m2")

        async def sentinel_embedded() -> bool:
            return await stored_version(db, sentinel) == 1

        await wait_until(sentinel_embedded, what="the sentinel to be embedded")
        scheduler = handle.daemon.scheduler
        assert scheduler is not None
        await wait_until(scheduler.is_idle, what="the scheduler to be idle")
    assert "Alpha\n\nsecond" not in api.all_inputs
    assert api.all_inputs.count("Alpha\n\nfirst") == 1
    assert api.request_count == requests_before + 1
    assert await stored_version(db, first) == 1


async def test_bearer_token_without_a_secret(dsn: str) -> None:
    async with running(make_settings(dsn, VECTOR_SYNC_WEBHOOK_SECRET=None, VECTOR_SYNC_WEBHOOK_TOKEN=TOKEN)) as handle:
        body = webhook_body("UPDATE", 5, 2)
        json_type = {"content-type": "application/json"}
        assert_accepted(await post(handle.url, body, {**json_type, "Authorization": f"Bearer {TOKEN}"}), None)
        with_id = {**json_type, "Authorization": f"Bearer {TOKEN}", "webhook-id": "msg_tok"}
        assert_accepted(await post(handle.url, body, with_id), "msg_tok")
        assert_error(await post(handle.url, body, {**json_type, "Authorization": "Bearer wrong"}), 401)
        assert_error(await post(handle.url, body, json_type), 401)
        # No secret is configured, so a signature (however valid for some key) authenticates nothing.
        assert_error(await post(handle.url, body, signed_headers(body)), 401)


async def test_bearer_token_and_secret_both_configured(dsn: str) -> None:
    async with running(make_settings(dsn, VECTOR_SYNC_WEBHOOK_TOKEN=TOKEN)) as handle:
        body = webhook_body("UPDATE", 5, 2)
        json_type = {"content-type": "application/json"}
        assert_accepted(await post(handle.url, body, {**json_type, "Authorization": f"Bearer {TOKEN}"}), None)
        assert_accepted(await post(handle.url, body, signed_headers(body, webhook_id="msg_both")), "msg_both")
        assert_accepted(await post(handle.url, body, reference_headers(body, msg_id="msg_ref")), "msg_ref")
        assert_error(await post(handle.url, body, {**json_type, "Authorization": f"Bearer {TOKEN}x"}), 401)
        assert_error(await post(handle.url, body, json_type), 401)


async def test_a_reference_signed_request_is_accepted(live: RunningDaemon) -> None:
    body = webhook_body("DELETE", 9, None)
    assert_accepted(await post(live.url, body, reference_headers(body, msg_id="msg_reference")), "msg_reference")


# --- 401 --------------------------------------------------------------------------------------


async def test_401_for_bad_authentication(live: RunningDaemon) -> None:
    body = webhook_body("UPDATE", 5, 2)
    now = int(time.time())
    good = signed_headers(body, webhook_id="msg_auth")

    def without(*names: str) -> dict[str, str]:
        return {key: value for key, value in good.items() if key not in names}

    def with_timestamp(timestamp: str) -> dict[str, str]:
        return {
            **good,
            "webhook-timestamp": timestamp,
            "webhook-signature": hmac_signature(KEY, "msg_auth", timestamp, body),
        }

    stale = datetime.fromtimestamp(now - 400, UTC)
    future = datetime.fromtimestamp(now + 400, UTC)
    cases: dict[str, tuple[bytes, dict[str, str]]] = {
        "no auth headers": (body, {"content-type": "application/json"}),
        "no webhook-id": (body, without("webhook-id")),
        "no webhook-timestamp": (body, without("webhook-timestamp")),
        "no webhook-signature": (body, without("webhook-signature")),
        "wrong signature": (body, {**good, "webhook-signature": "v1,d3Jvbmcgc2lnbmF0dXJlIGhlcmUhISEhISEhISEhISE="}),
        "other secret (reference signer)": (body, reference_headers(body, secret=OTHER_SECRET)),
        "body tampered after signing": (webhook_body("UPDATE", 5, 3), good),
        "webhook-id changed after signing": (body, {**good, "webhook-id": "msg_other"}),
        "older than 5 minutes (reference signer)": (body, reference_headers(body, when=stale)),
        "newer than 5 minutes (reference signer)": (body, reference_headers(body, when=future)),
        "timestamp not an integer": (body, with_timestamp("yesterday")),
        "timestamp a float": (body, with_timestamp(f"{now}.0")),
        "timestamp absurdly large": (body, with_timestamp("1" + "0" * 400)),
        "signature without version": (body, {**good, "webhook-signature": good["webhook-signature"][3:]}),
        "signature of version v2": (body, {**good, "webhook-signature": "v2," + good["webhook-signature"][3:]}),
        "bearer token but none configured": (body, {"content-type": "application/json", "Authorization": "Bearer x"}),
    }
    answers = {name: await post(live.url, case_body, headers) for name, (case_body, headers) in cases.items()}
    wrong = {name: answer for name, answer in answers.items() if answer.status != 401}
    assert wrong == {}
    for answer in answers.values():
        assert_error(answer, 401)


async def raw_post(url: str, headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, bytes]:
    """POST over a bare socket, so header values can carry bytes an HTTP client would refuse."""
    port = int(url.rsplit(":", 1)[1])
    lines = [b"POST /webhook HTTP/1.1", f"Host: 127.0.0.1:{port}".encode(), b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    lines.append(f"Content-Length: {len(body)}".encode())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


async def test_401_for_header_bytes_that_are_not_utf8(dsn: str) -> None:
    """Auth headers carrying a byte that is not UTF-8 are a bad signature or token, not a crash."""
    async with running(make_settings(dsn, VECTOR_SYNC_WEBHOOK_TOKEN=TOKEN)) as handle:
        body = webhook_body("UPDATE", 5, 2)
        good = {name.encode(): value.encode() for name, value in signed_headers(body, webhook_id="msg_raw").items()}
        status, _ = await raw_post(handle.url, list(good.items()), body)
        assert status == 202  # the raw request itself is well formed
        variants = {
            "webhook-id": {**good, b"webhook-id": b"msg_\xff"},
            "webhook-timestamp": {**good, b"webhook-timestamp": good[b"webhook-timestamp"] + b"\xff"},
            "webhook-signature": {**good, b"webhook-signature": good[b"webhook-signature"] + b"\xff"},
            "webhook-signature alone": {**good, b"webhook-signature": b"v1,\xff"},
            "authorization": {
                b"content-type": b"application/json",
                b"authorization": f"Bearer {TOKEN}".encode() + b"\xff",
            },
            "authorization scheme": {
                b"content-type": b"application/json",
                b"authorization": b"Bear\xe9r " + TOKEN.encode(),
            },
        }
        answers = {name: await raw_post(handle.url, list(headers.items()), body) for name, headers in variants.items()}
        assert {name: answer for name, answer in answers.items() if answer[0] != 401} == {}
        for _, payload in answers.values():
            assert json.loads(payload).keys() == {"error"}


async def test_400_for_a_body_whose_content_encoding_is_broken(live: RunningDaemon) -> None:
    """A gzip body that does not decompress is refused before anything else reads it, signed or not."""
    garbage = b"\x1f\x8b\x08\x00 not really gzip at all"
    for headers in (
        [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")],
        [*((k.encode(), v.encode()) for k, v in signed_headers(garbage).items()), (b"content-encoding", b"gzip")],
    ):
        status, payload = await raw_post(live.url, headers, garbage)
        assert status == 400
        assert json.loads(payload).keys() == {"error"}


async def test_408_when_a_body_does_not_arrive(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender that announces a body and never sends it cannot hold a reading slot for long."""
    from vector_sync.sources import webhook

    monkeypatch.setattr(webhook, "BODY_READ_TIMEOUT_SECONDS", 0.5)
    async with running(make_settings(dsn)) as handle:
        port = int(handle.url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readline(), timeout=30)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    assert head.split(b" ")[1] == b"408"


async def test_several_signatures_one_valid_is_accepted(live: RunningDaemon) -> None:
    body = webhook_body("UPDATE", 5, 2)
    reference = reference_headers(body, msg_id="msg_multi")
    other = Webhook(OTHER_SECRET).sign("msg_multi", datetime.now(UTC), body.decode())
    for signatures in (f"{other} {reference['webhook-signature']}", f"{reference['webhook-signature']} {other}"):
        headers = {**reference, "webhook-signature": signatures}
        assert_accepted(await post(live.url, body, headers), "msg_multi")
    assert_error(await post(live.url, body, {**reference, "webhook-signature": f"{other} {other}"}), 401)


async def test_a_replay_within_tolerance_is_accepted(live: RunningDaemon) -> None:
    body = webhook_body("UPDATE", 5, 2)
    # Signed four minutes ago: within the five-minute tolerance.
    headers = reference_headers(body, msg_id="msg_old", when=datetime.fromtimestamp(time.time() - 240, UTC))
    assert_accepted(await post(live.url, body, headers), "msg_old")
    assert_accepted(await post(live.url, body, headers), "msg_old")


# --- 400 --------------------------------------------------------------------------------------


async def test_400_for_bodies_that_are_not_a_json_object(live: RunningDaemon) -> None:
    bodies = {
        "not JSON": b"type=UPDATE&table=projects",
        "empty": b"",
        "truncated JSON": webhook_body("UPDATE", 5, 2)[:-3],
        "JSON array": b'[{"type": "UPDATE", "table": "projects", "record": {"id": 5, "version": 2}}]',
        "JSON string": b'"UPDATE"',
        "JSON number": b"42",
        "JSON null": b"null",
        "invalid UTF-8": b'{"type": "UPDATE", "table": "projects\xff", "record": {"id": 5, "version": 2}}',
        "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    }
    answers = {name: await post(live.url, body, signed_headers(body)) for name, body in bodies.items()}
    assert {name: answer.status for name, answer in answers.items() if answer.status != 400} == {}
    for answer in answers.values():
        assert_error(answer, 400)


# --- 422 --------------------------------------------------------------------------------------


def payload(**changes: Any) -> bytes:
    base: dict[str, Any] = {
        "type": "UPDATE",
        "table": "projects",
        "schema": "public",
        "record": {"id": 5, "version": 2, "name": "x"},
        "old_record": {"id": 5, "version": 1, "name": "x"},
    }
    for key, value in changes.items():
        if value is ...:
            base.pop(key, None)
        else:
            base[key] = value
    return json.dumps(base).encode()


UNPROCESSABLE = {
    "unknown type": payload(type="TRUNCATE"),
    "type missing": payload(type=...),
    "type not a string": payload(type=1),
    "wrong table": payload(table="users"),
    "table missing": payload(table=...),
    "wrong schema": payload(schema="private"),
    "no id": payload(record={"version": 2}),
    "id null": payload(record={"id": None, "version": 2}),
    "id a string for a bigint column": payload(record={"id": "abc", "version": 2}),
    "id beyond bigint": payload(record={"id": 2**70, "version": 2}),
    "id just beyond bigint": payload(record={"id": 2**63, "version": 2}),
    "id a float": payload(record={"id": 5.5, "version": 2}),
    "id a boolean": payload(record={"id": True, "version": 2}),
    "id an object": payload(record={"id": {"n": 5}, "version": 2}),
    "record null for UPDATE": payload(record=None),
    "record missing for INSERT": payload(type="INSERT", record=...),
    "record a list": payload(record=[5, 2]),
    "old_record null for DELETE": payload(type="DELETE", old_record=None),
    "version 0": payload(record={"id": 5, "version": 0}),
    "version negative": payload(record={"id": 5, "version": -3}),
    "version a string": payload(record={"id": 5, "version": "3"}),
    "version a float": payload(record={"id": 5, "version": 3.5}),
    "version a boolean": payload(record={"id": 5, "version": True}),
    "version null on UPDATE": payload(record={"id": 5, "version": None}),
    "version missing on UPDATE": payload(record={"id": 5}),
    "version missing on INSERT": payload(type="INSERT", record={"id": 5}),
    "DELETE with a bad version": payload(type="DELETE", old_record={"id": 5, "version": "one"}),
}


async def test_422_for_json_of_the_wrong_shape(live: RunningDaemon) -> None:
    answers = {name: await post(live.url, body, signed_headers(body)) for name, body in UNPROCESSABLE.items()}
    assert {name: answer for name, answer in answers.items() if answer.status != 422} == {}
    for answer in answers.values():
        assert_error(answer, 422)


@pytest.mark.parametrize(
    "bad_id", ["--5", "²", "5-", "1" * 5000], ids=["double-minus", "superscript-two", "trailing-minus", "5000-digits"]
)
async def test_422_for_id_strings_that_only_look_numeric(live: RunningDaemon, bad_id: str) -> None:
    body = payload(record={"id": bad_id, "version": 2})
    assert_error(await post(live.url, body, signed_headers(body)), 422)


async def test_a_number_too_long_for_python_is_refused_not_a_server_error(live: RunningDaemon) -> None:
    # 5000 digits: valid JSON that Python's int parser refuses (sys.get_int_max_str_digits).
    body = b'{"type": "UPDATE", "table": "projects", "record": {"id": 5, "version": ' + b"7" * 5000 + b"}}"
    answer = await post(live.url, body, signed_headers(body))
    assert answer.status in {400, 422}, answer
    assert_error(answer, answer.status)


async def test_202_for_well_formed_shapes(live: RunningDaemon) -> None:
    bodies = {
        "DELETE without a version": payload(type="DELETE", record=None, old_record={"id": 5}),
        "DELETE with a version": payload(type="DELETE", record=None, old_record={"id": 5, "version": 4}),
        "INSERT": payload(type="INSERT", old_record=None),
        "extra keys": payload(extra={"anything": [1, 2, 3]}, commit_timestamp="2024-01-01T00:00:00Z"),
        "bigint id at the top of the range": payload(record={"id": BIGINT_MAX, "version": 2}),
        "largest version": payload(record={"id": 5, "version": BIGINT_MAX}),
        "negative id": payload(record={"id": -5, "version": 2}),
    }
    answers = {name: await post(live.url, body, signed_headers(body, webhook_id="m")) for name, body in bodies.items()}
    assert {name: answer for name, answer in answers.items() if answer.status != 202} == {}
    for answer in answers.values():
        assert_accepted(answer, "m")


# --- 413 --------------------------------------------------------------------------------------


def padded_body(size: int) -> bytes:
    """A well-formed webhook body of exactly `size` bytes."""
    empty = webhook_body("UPDATE", 5, 2, padding="")
    body = webhook_body("UPDATE", 5, 2, padding="x" * (size - len(empty)))
    assert len(body) == size
    return body


async def test_413_for_a_body_over_1_mib_with_content_length(live: RunningDaemon) -> None:
    body = padded_body(MIB + 1)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{live.url}/webhook", data=io.BytesIO(body), headers=signed_headers(body)) as resp,
    ):
        assert resp.request_info.headers.get("Content-Length") == str(MIB + 1)
        answer = Answer(resp.status, dict(resp.headers), await resp.text())
    assert_error(answer, 413)
    bigger = padded_body(3 * MIB)
    assert_error(await post(live.url, bigger, signed_headers(bigger)), 413)


async def test_a_body_of_exactly_1_mib_is_accepted(live: RunningDaemon) -> None:
    body = padded_body(MIB)
    assert_accepted(await post(live.url, body, signed_headers(body, webhook_id="msg_mib")), "msg_mib")


async def test_413_for_a_chunked_body_over_1_mib(live: RunningDaemon) -> None:
    body = padded_body(MIB + 64 * 1024)
    headers = signed_headers(body)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 32 * 1024):
            yield body[start : start + 32 * 1024]

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{live.url}/webhook", data=chunks(), headers=headers) as resp,
    ):
        assert resp.request_info.headers.get("Content-Length") is None
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        answer = Answer(resp.status, dict(resp.headers), await resp.text())
    assert_error(answer, 413)


async def test_a_small_chunked_body_is_accepted(live: RunningDaemon) -> None:
    body = webhook_body("UPDATE", 5, 2)

    async def chunks() -> AsyncIterator[bytes]:
        yield body[:10]
        yield body[10:]

    answer = await post(live.url, chunks(), signed_headers(body, webhook_id="msg_chunked"))
    assert_accepted(answer, "msg_chunked")


# --- 415 --------------------------------------------------------------------------------------


async def test_415_for_content_types_other_than_json(live: RunningDaemon) -> None:
    body = webhook_body("UPDATE", 5, 2)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/jsonx", "text/json"):
        headers = {**signed_headers(body), "content-type": content_type}
        assert_error(await post(live.url, body, headers), 415)
    missing = {key: value for key, value in signed_headers(body).items() if key != "content-type"}
    assert_error(await post(live.url, body, missing, skip_content_type=True), 415)


async def test_json_with_a_charset_is_accepted(live: RunningDaemon) -> None:
    body = webhook_body("UPDATE", 5, 2)
    for content_type in ("application/json; charset=utf-8", "application/json;charset=UTF-8"):
        headers = {**signed_headers(body, webhook_id="msg_cs"), "content-type": content_type}
        assert_accepted(await post(live.url, body, headers), "msg_cs")


# --- 429 --------------------------------------------------------------------------------------


async def test_429_with_retry_after_when_one_address_sends_too_many(dsn: str) -> None:
    async with running(make_settings(dsn, VECTOR_SYNC_WEBHOOK_RATE_LIMIT=5)) as handle:
        body = webhook_body("UPDATE", 5, 2)
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            answers = await asyncio.gather(
                *(
                    post(handle.url, body, signed_headers(body, webhook_id="msg_burst"), session=session)
                    for _ in range(60)
                )
            )
        statuses = sorted({answer.status for answer in answers})
        assert statuses == [202, 429], statuses
        limited = [answer for answer in answers if answer.status == 429]
        for answer in limited:
            assert_error(answer, 429)
            retry_after = answer.headers.get("Retry-After")
            assert retry_after is not None and retry_after.isdigit(), answer.headers
            assert int(retry_after) >= 1
        elapsed = time.monotonic() - started
        # A burst of 5, then 5 a second: however slow the machine, no more than that got through.
        assert sum(answer.status == 202 for answer in answers) <= 5 + 5 * elapsed + 1

        # Another address has its own allowance (all of 127.0.0.0/8 is loopback on Linux).
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=connector) as other:
            answer = await post(handle.url, body, signed_headers(body, webhook_id="msg_other"), session=other)
        assert_accepted(answer, "msg_other")

        # And the limited address gets through again once the bucket refills.
        async def allowed_again() -> bool:
            return (await post(handle.url, body, signed_headers(body))).status == 202

        await wait_until(allowed_again, what="the address to be allowed again")


# --- 503 --------------------------------------------------------------------------------------


async def test_503_while_stopping(live: RunningDaemon) -> None:
    body = webhook_body("UPDATE", 5, 2)
    assert live.daemon.webhook is not None
    live.daemon.webhook.stopping = True
    assert_error(await post(live.url, body, signed_headers(body)), 503)
    # Whatever else is wrong with the request, a stopping daemon says 503.
    assert_error(await post(live.url, b"junk", {"content-type": "text/plain"}), 503)


async def test_503_during_a_real_shutdown(dsn: str, db: asyncpg.Connection, api: EmbeddingAPI) -> None:
    """Stop the daemon while a batch hangs in the embedding API: until it has closed its listener,
    webhooks are answered 503."""
    api.script(Fault.hang(60))
    # The hung request outlives the grace period, so the listener stays up (answering 503) for it.
    settings_ = make_settings(dsn, api.url, VECTOR_SYNC_SHUTDOWN_GRACE="8s", VECTOR_SYNC_REQUEST_TIMEOUT="30s")
    async with running(settings_) as handle:
        await insert_project(db, "Hanging", "held in the API")
        await wait_until(lambda: api.in_flight == 1, what="a request to hang in the API")
        handle.stop.set()
        body = webhook_body("UPDATE", 5, 2)
        answers: list[Answer] = []

        async def refused() -> bool:
            answers.append(await post(handle.url, body, signed_headers(body)))
            return answers[-1].status == 503

        await wait_until(refused, timeout=6, what="a 503 while shutting down")
        assert_error(answers[-1], 503)
        assert {answer.status for answer in answers} <= {202, 503}
        assert await asyncio.wait_for(handle.task, timeout=60) == 0


# --- other routes and metrics -----------------------------------------------------------------


async def test_health_ready_and_unknown_routes(live: RunningDaemon) -> None:
    health = await get(live.url, "/healthz")
    assert health.status == 200

    async def ready() -> bool:
        return (await get(live.url, "/readyz")).status == 200

    await wait_until(ready, what="/readyz to answer 200")
    readiness = await get(live.url, "/readyz")
    assert isinstance(readiness.json, dict), readiness
    missing = await get(live.url, "/no-such-route")
    assert_error(missing, 404)
    assert missing.headers["Content-Type"].startswith("application/json")
    wrong_method = await get(live.url, "/webhook")
    assert_error(wrong_method, 405)


async def test_metrics_count_webhook_answers_by_status(live: RunningDaemon) -> None:
    good = webhook_body("UPDATE", 5, 2)
    await post(live.url, good, signed_headers(good))
    await post(live.url, good, signed_headers(good))
    await post(live.url, good, {"content-type": "application/json"})
    await post(live.url, b"[]", signed_headers(b"[]"))
    await post(live.url, good, {**signed_headers(good), "content-type": "text/plain"})
    bad_shape = payload(type="TRUNCATE")
    await post(live.url, bad_shape, signed_headers(bad_shape))
    await get(live.url, "/healthz")
    metrics = await get(live.url, "/metrics")
    assert metrics.status == 200
    assert webhook_counts(metrics.text) == {"202": 2, "401": 1, "400": 1, "415": 1, "422": 1}


# --- property: anything thrown at /webhook ----------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
IDS = st.integers(-(2**64), 2**64) | st.sampled_from([None, True, False, "abc", "", 1.5, [], {}])
VERSIONS = st.integers(-3, 2**64) | st.sampled_from([None, True, False, "3", "", 3.5, [], 0, BIGINT_MAX, 2**63])
RECORDS = (
    st.fixed_dictionaries({}, optional={"id": IDS, "version": VERSIONS, "name": st.text(max_size=10)})
    | st.none()
    | JSON_SCALARS
)
PAYLOADS = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["INSERT", "UPDATE", "DELETE", "TRUNCATE", "", None, 1]),
        "table": st.sampled_from(["projects", "users", None]),
        "record": RECORDS,
        "old_record": RECORDS,
    },
    optional={"schema": st.sampled_from(["public", "auth", None, 5]), "extra": JSON_VALUES},
)
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
# Repeated entries weight the draw towards requests that get past the header checks.
CONTENT_TYPES = ["application/json"] * 4 + ["application/json; charset=utf-8", "text/plain", "application/xml", None]
AUTH_KINDS = (
    ["signed"] * 4
    + ["reference"] * 2
    + [
        "none",
        "random",
        "tampered",
        "stale",
        "future",
        "other-secret",
        "bearer",
    ]
)
OPS = ["INSERT", "UPDATE", "DELETE"]


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed webhook body, then (often) one field broken or one extra key added."""
    op = draw(st.sampled_from(OPS))
    record: dict[str, Any] = {"id": draw(st.integers(-(2**63), BIGINT_MAX)), "name": draw(st.text(max_size=10))}
    if op != "DELETE" or draw(st.booleans()):
        record["version"] = draw(st.integers(1, BIGINT_MAX))
    document: dict[str, Any] = {"type": op, "table": "projects", "schema": "public"}
    document["record"], document["old_record"] = (None, record) if op == "DELETE" else (record, None)
    change = draw(st.sampled_from(["none", "none", "field", "record", "top", "drop"]))
    if change == "field":
        record[draw(st.sampled_from(["id", "version"]))] = draw(IDS | VERSIONS)
    elif change == "record":
        document[draw(st.sampled_from(["record", "old_record"]))] = draw(RECORDS)
    elif change == "top":
        key = draw(st.sampled_from(["type", "table", "schema", "extra", "committed_at"]))
        document[key] = draw(JSON_SCALARS | st.sampled_from(["INSERT", "DELETE", "projects", "public"]))
    elif change == "drop":
        document.pop(draw(st.sampled_from(sorted(document))))
    return document


def _valid_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def shape_statuses(document: Any) -> set[int]:
    """What the interface allows for a parsed body, from its own wording (an independent model)."""
    if not isinstance(document, dict):
        return {400}
    op = document.get("type")
    if op not in ("INSERT", "UPDATE", "DELETE"):
        return {422}
    if document.get("table") != "projects":
        return {422}
    if "schema" in document and document["schema"] != "public":
        return {422}
    record = document.get("old_record" if op == "DELETE" else "record")
    if not isinstance(record, dict) or not _valid_int(record.get("id"), -(2**63), BIGINT_MAX):
        return {422}
    version = record.get("version")
    if op == "DELETE" and version is None:
        return {202}
    if _valid_int(version, 1, BIGINT_MAX):
        return {202}
    if _valid_int(version, BIGINT_MAX + 1, 2**80):
        return {202, 422}  # a positive integer no bigint column can hold: either answer is defensible
    return {422}


def body_statuses(body: bytes) -> set[int]:
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        allowed = {400}
        # Python also reads UTF-16/32 and a BOM: tolerated, never required.
        with contextlib.suppress(UnicodeDecodeError, ValueError, RecursionError):
            allowed |= shape_statuses(json.loads(body))
        return allowed
    return shape_statuses(document)


@st.composite
def fuzz_cases(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["event", "event", "event", "payload", "json", "bytes", "truncated"]))
    if kind == "event":
        body = json.dumps(draw(events())).encode()
    elif kind == "payload":
        body = json.dumps(draw(PAYLOADS)).encode()
    elif kind == "json":
        body = json.dumps(draw(JSON_VALUES)).encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=300))
    else:
        full = json.dumps(draw(PAYLOADS)).encode()
        body = full[: draw(st.integers(0, max(0, len(full) - 1)))]
    auth = draw(st.sampled_from(AUTH_KINDS))
    return {
        "body": body,
        "auth": auth,
        "content_type": draw(st.sampled_from(CONTENT_TYPES)),
        "random_headers": {
            name: draw(HEADER_TEXT)
            for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
            if draw(st.booleans())
        },
        "offset": draw(st.integers(301, 10**7)),
        "token": draw(HEADER_TEXT),
    }


def build_request(case: dict[str, Any]) -> tuple[dict[str, str], bool]:
    """Headers for the case, and whether they authenticate its body."""
    body: bytes = case["body"]
    auth = case["auth"]
    headers: dict[str, str]
    if auth == "signed":
        headers, valid = signed_headers(body, webhook_id="msg_fuzz"), True
    elif auth == "reference" and _is_utf8(body):
        headers, valid = reference_headers(body, msg_id="msg_fuzz"), True
    elif auth == "random":
        headers, valid = dict(case["random_headers"]), False
    elif auth == "tampered":
        headers, valid = signed_headers(body + b" ", webhook_id="msg_fuzz"), False
    elif auth in ("stale", "future"):
        offset = -case["offset"] if auth == "stale" else case["offset"]
        headers, valid = signed_headers(body, webhook_id="msg_fuzz", timestamp=int(time.time()) + offset), False
    elif auth == "other-secret" and _is_utf8(body):
        headers, valid = reference_headers(body, secret=OTHER_SECRET), False
    elif auth == "bearer":
        headers, valid = {"Authorization": f"Bearer {case['token']}"}, False
    else:
        headers, valid = {}, False
    headers = {key: value for key, value in headers.items() if key != "content-type"}
    if case["content_type"] is not None:
        headers["Content-Type"] = case["content_type"]
    return headers, valid


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=fuzz_cases())
async def test_property_answers_stay_in_the_table(live: RunningDaemon, case: dict[str, Any]) -> None:
    """Every answer is one the table allows for what was wrong with the request; nothing is accepted
    without a valid signature; no 5xx at all (the daemon is not stopping)."""
    headers, authenticated = build_request(case)
    answer = await post(live.url, case["body"], headers, skip_content_type=case["content_type"] is None)
    faults: set[int] = set()
    json_type = case["content_type"] is not None and case["content_type"].startswith("application/json")
    if not json_type:
        faults.add(415)
    if not authenticated:
        faults.add(401)
    shape = body_statuses(case["body"])
    # With a fault in the headers, any one of the faults present may be named (the interface does
    # not order them), but never 202; without one, the body alone decides.
    allowed = faults | (shape - {202}) if faults else shape
    assert answer.status in allowed, (answer, sorted(allowed), headers)
    if answer.status == 202:
        assert authenticated
        assert answer.json == {"webhook_id": headers.get("webhook-id")}, answer
    else:
        assert_error(answer, answer.status)
