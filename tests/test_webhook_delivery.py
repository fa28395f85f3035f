"""Signed webhook delivery through pg_net, end to end: the change trigger, the reconciler, the
daemon's real listener and its drain of `pending_webhooks`.

pg_net is played by `pg_net_standin` (its SQL surface plus a worker that sends with aiohttp). The
reconciler, which pg_cron runs every 10 s in production, is called here every 100 ms while a test
waits, so back-off delays show up almost exactly: the gaps between attempts are printed as
`GAPS <case> <seconds> ...` (run with `-s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from pg_net_standin import (
    CONNECT_ERROR,
    STRANGER_BODY,
    TIMEOUT_ERROR,
    Fault,
    PgNetWorker,
    break_http_post,
    describe,
    install,
)
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from support import WEBHOOK_SECRET, RunningDaemon, all_current, make_settings, running, wait_until
from vector_sync.config import Settings, decode_webhook_secret
from vector_sync.sources.webhook import verify_signature

KEY = decode_webhook_secret(WEBHOOK_SECRET)
DEADLINE = 60.0  # generous: the machine is shared
RECONCILE_EVERY = 0.1
# An attempt goes out when the reconciler runs after its due time, and the stand-in takes it on its
# next poll: a gap may exceed the back-off by that much (never fall short of it).
GAP_TOLERANCE = 1.5
BACKOFF = [2.0, 4.0, 8.0]  # backoff_base_s 2: retry n waits 2 * 2^(n-1) s

measured_gaps: dict[str, list[float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _gap_table() -> Iterator[None]:
    yield
    if measured_gaps:
        print("\nGaps between webhook attempts (sent_at to sent_at):")
        for case, gaps in measured_gaps.items():
            print(f"  {case:<24} " + "  ".join(f"{gap:6.3f} s" for gap in gaps))


def report_gaps(case: str, gaps: list[float]) -> None:
    measured_gaps[case] = gaps
    print(f"\nGAPS {case} " + " ".join(f"{gap:.3f}" for gap in gaps))


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
async def pg_net(dsn: str, db: asyncpg.Connection) -> AsyncIterator[PgNetWorker]:
    """The pg_net stand-in installed into the (already migrated) test database, its worker running."""
    await install(db)
    async with PgNetWorker(dsn) as worker:
        yield worker


def daemon_settings(dsn: str, **overrides: Any) -> Settings:
    """A daemon whose only event source is its webhook listener."""
    return make_settings(dsn, VECTOR_SYNC_SOURCES="webhook", **overrides)


def metric(handle: RunningDaemon, name: str, **labels: str) -> float:
    value = handle.daemon.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def webhook_answers(handle: RunningDaemon) -> dict[str, float]:
    """The daemon's answers to POST /webhook, by status."""
    counts: dict[str, float] = {}
    for family in handle.daemon.metrics.registry.collect():
        if family.name == "vector_sync_webhook_responses":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["status"]] = sample.value
    return counts


async def started_up(handle: RunningDaemon) -> None:
    """The start-up drift pass is over, so what follows reaches the daemon only by webhook."""
    await wait_until(
        lambda: metric(handle, "vector_sync_drift_passes_total") >= 1, timeout=DEADLINE, what="start-up drift pass"
    )


def webhook_url(handle: RunningDaemon) -> str:
    return f"{handle.url}/webhook"


def free_port() -> int:
    """A port nothing listens on (connections are refused until a daemon is started on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def configure(db: asyncpg.Connection, url: str) -> None:
    """What `vector-sync webhook configure` stores where there is no Vault."""
    await db.execute(
        """
        insert into vector_sync.config (key, value)
        values ('secret:vector_sync_webhook_url', $1), ('secret:vector_sync_webhook_secret', $2)
        on conflict (key) do update set value = excluded.value, updated_at = now()
        """,
        url,
        WEBHOOK_SECRET,
    )


async def tune(db: asyncpg.Connection, **values: str) -> None:
    for key, value in values.items():
        await db.execute(
            "insert into vector_sync.config (key, value) values ($1, $2)"
            " on conflict (key) do update set value = excluded.value, updated_at = now()",
            key,
            value,
        )


async def insert_project(db: asyncpg.Connection, name: str) -> int:
    return int(
        await db.fetchval(
            "insert into public.projects (name, description) values ($1, $2) returning id", name, f"about {name}"
        )
    )


async def log_of(db: asyncpg.Connection, project_id: int) -> asyncpg.Record:
    row = await db.fetchrow(
        "select * from vector_sync.webhook_logs where project_id = $1 order by id desc limit 1", str(project_id)
    )
    assert row is not None, f"no webhook_logs row for project {project_id}"
    return row


async def status_of(db: asyncpg.Connection, log_id: int) -> str:
    return str(await db.fetchval("select status from vector_sync.webhook_logs where id = $1", log_id))


async def attempts_of(db: asyncpg.Connection, log_id: int) -> list[asyncpg.Record]:
    return await db.fetch(
        """
        select a.*, extract(epoch from a.sent_at)::float8 as sent_epoch,
               extract(epoch from a.completed_at - a.sent_at)::float8 as open_for
          from vector_sync.webhook_attempts a where a.log_id = $1 order by a.attempt_no
        """,
        log_id,
    )


def gaps_of(attempts: list[asyncpg.Record]) -> list[float]:
    return [later["sent_epoch"] - earlier["sent_epoch"] for earlier, later in itertools.pairwise(attempts)]


def assert_backoff(gaps: list[float], *, lead: float = 0.0) -> None:
    """Gap n is the back-off after failure n (plus `lead`, the time the failure took to show):
    never less, and at most GAP_TOLERANCE more."""
    for number, gap in enumerate(gaps):
        least = BACKOFF[number] + lead
        assert least <= gap <= least + GAP_TOLERANCE, f"gap {number + 1} is {gap:.3f}s, expected {least}s: {gaps}"


async def queued(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("select count(*) from net.http_request_queue"))


async def reconcile(db: asyncpg.Connection) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(await db.fetchval("select vector_sync.reconcile_webhooks()"))
    return result


class Reconciler:
    """Calls vector_sync.reconcile_webhooks() every `every` seconds, as pg_cron would (but faster)."""

    def __init__(self, dsn: str, every: float) -> None:
        self._dsn = dsn
        self._every = every
        self._stop = asyncio.Event()
        self.runs = 0
        self.totals: dict[str, int] = {}

    async def run(self) -> None:
        conn = await asyncpg.connect(self._dsn)
        try:
            while not self._stop.is_set():
                for key, value in (await reconcile(conn)).items():
                    if isinstance(value, int):
                        self.totals[key] = self.totals.get(key, 0) + value
                self.runs += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._every)
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def reconciling(dsn: str, every: float = RECONCILE_EVERY) -> AsyncIterator[Reconciler]:
    reconciler = Reconciler(dsn, every)
    task = asyncio.create_task(reconciler.run(), name="test-reconciler")
    try:
        yield reconciler
    finally:
        reconciler._stop.set()
        await task  # an error in reconcile_webhooks() surfaces here


async def delivered(db: asyncpg.Connection, log_id: int) -> bool:
    return await status_of(db, log_id) == "delivered"


# --- HMAC and signatures ------------------------------------------------------------------------

# RFC 4231 section 4: (key, data, HMAC-SHA-256). Case 5's output is truncated to 128 bits.
RFC_4231 = [
    (b"\x0b" * 20, b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
    (b"Jefe", b"what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
    (b"\xaa" * 20, b"\xdd" * 50, "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"),
    (
        bytes(range(1, 26)),
        b"\xcd" * 50,
        "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
    ),
    (b"\x0c" * 20, b"Test With Truncation", "a3b6167473100ee06e0c796c2955552b"),
    (
        b"\xaa" * 131,
        b"Test Using Larger Than Block-Size Key - Hash Key First",
        "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
    ),
    (
        b"\xaa" * 131,
        b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be "
        b"hashed before being used by the HMAC algorithm.",
        "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
    ),
]


async def test_hmac_sha256_passes_rfc_4231_test_cases(db: asyncpg.Connection) -> None:
    wrong = []
    for number, (key, data, expected) in enumerate(RFC_4231, start=1):
        # The table itself is checked against Python's hmac, so a typo here cannot hide a bug there.
        assert hmac.new(key, data, hashlib.sha256).hexdigest().startswith(expected), f"test case {number}"
        got = await db.fetchval("select encode(vector_sync.hmac_sha256($1, $2), 'hex')", key, data)
        if not got.startswith(expected):
            wrong.append((number, len(key), got, expected))
    assert wrong == [], f"RFC 4231 cases that differ (case, key length, got, expected): {wrong}"


async def test_hmac_sha256_matches_python_around_the_block_size(db: asyncpg.Connection) -> None:
    """Keys and messages at the edges of SHA-256's 64-byte block (empty, 55/56, 63/64/65 bytes)."""
    wrong = []
    for key_length in (0, 1, 32, 63, 64, 65, 200):
        for message_length in (0, 1, 55, 56, 63, 64, 65, 1000):
            key = bytes((7 * i + key_length) % 256 for i in range(key_length))
            message = bytes((13 * i + message_length) % 256 for i in range(message_length))
            got = await db.fetchval("select vector_sync.hmac_sha256($1, $2)", key, message)
            if got != hmac.new(key, message, hashlib.sha256).digest():
                wrong.append((key_length, message_length))
    assert wrong == [], f"(key length, message length) where SQL and Python differ: {wrong}"


async def test_sql_signature_verifies_with_the_daemons_verifier(db: asyncpg.Connection) -> None:
    """Signed in SQL over `payload::text`, checked on the exact bytes pg_net queues to send."""
    await install(db)
    payload = {
        "type": "UPDATE",
        "table": "projects",
        "schema": "public",
        "record": {"id": 7, "version": 3, "name": 'Zürich — 東京 🚀 «naïve» \\ "quoted" \u2028'},
        "old_record": None,
    }
    webhook_id = "msg_0123456789abcdef0123456789abcdef"
    signed_at = int(time.time())
    request_id = await db.fetchval(
        """
        select net.http_post(
          url := 'http://127.0.0.1:9/webhook',
          body := $1::jsonb,
          headers := jsonb_build_object(
            'Content-Type', 'application/json', 'webhook-id', $2::text, 'webhook-timestamp', $3::bigint::text,
            'webhook-signature', vector_sync.webhook_signature($2, $3, $1::jsonb::text, $4)))
        """,
        json.dumps(payload),
        webhook_id,
        signed_at,
        WEBHOOK_SECRET,
    )
    row = await db.fetchrow("select headers, body from net.http_request_queue where id = $1", request_id)
    headers = json.loads(row["headers"])
    body = bytes(row["body"])
    assert "Zürich — 東京 🚀".encode() in body  # sent as UTF-8, not escaped
    assert json.loads(body) == payload
    assert headers["webhook-signature"].startswith("v1,") and len(headers["webhook-signature"]) == 3 + 44

    def check(candidate: bytes) -> str | None:
        return verify_signature(
            KEY,
            headers["webhook-id"],
            headers["webhook-timestamp"],
            headers["webhook-signature"],
            candidate,
            time.time(),
        )

    assert check(body) is None
    Webhook(WEBHOOK_SECRET).verify(body, headers)  # and the Standard Webhooks reference library agrees

    tampered = body.replace("Zürich".encode(), b"Zurich")
    assert tampered != body
    assert check(tampered) == "bad signature"
    with pytest.raises(WebhookVerificationError):
        Webhook(WEBHOOK_SECRET).verify(tampered, headers)


async def test_standin_http_post_insists_on_json_content_type(db: asyncpg.Connection) -> None:
    """As pg_net does: anything but exactly application/json raises; a missing one is added."""
    await install(db)
    with pytest.raises(asyncpg.RaiseError, match="Content-Type header must be"):
        await db.fetchval(
            "select net.http_post('http://127.0.0.1:9/', '{}'::jsonb, '{}'::jsonb,"
            ' \'{"Content-Type": "application/json; charset=utf-8"}\'::jsonb)'
        )
    request_id = await db.fetchval(
        'select net.http_post(\'http://127.0.0.1:9/x\', \'{"a": 1}\', \'{"q": "a b/ü"}\', \'{"X-Other": "1"}\')'
    )
    row = await db.fetchrow("select * from net.http_request_queue where id = $1", request_id)
    assert json.loads(row["headers"]) == {"X-Other": "1", "Content-Type": "application/json"}
    assert row["url"] == "http://127.0.0.1:9/x?q=a%20b%2F%C3%BC"
    assert bytes(row["body"]) == b'{"a": 1}'
    assert row["timeout_milliseconds"] == 5000
    persistence = await db.fetch(
        "select relname, relpersistence::text from pg_class"
        " where relnamespace = 'net'::regnamespace and relkind in ('r', 'S')"
    )
    assert {r["relname"]: r["relpersistence"] for r in persistence} == {
        "http_request_queue": "u",
        "http_request_queue_id_seq": "u",  # PostgreSQL >= 15: the sequence follows its table
        "_http_response": "u",
    }


# --- delivery -----------------------------------------------------------------------------------


async def test_a_change_reaches_the_daemon_once_signed_and_is_embedded(
    dsn: str, db: asyncpg.Connection, pg_net: PgNetWorker
) -> None:
    async with running(daemon_settings(dsn)) as handle:
        await started_up(handle)
        await configure(db, webhook_url(handle))
        project_id = await insert_project(db, "delivered once")
        log = await log_of(db, project_id)
        assert (log["status"], log["attempt_count"], log["event_type"]) == ("in_flight", 1, "INSERT")

        await pg_net.drained()
        sent = pg_net.to(log["webhook_id"])
        assert [(s.status_code, s.error_msg) for s in sent] == [(202, None)], describe(pg_net.sent)
        assert json.loads(sent[0].content or "") == {"webhook_id": log["webhook_id"]}
        request = sent[0].request
        assert request.url == webhook_url(handle)
        assert request.headers["Content-Type"] == "application/json"
        body = json.loads(request.body)
        assert body["type"] == "INSERT" and body["record"] == {"id": project_id, "version": 1}

        await wait_until(lambda: all_current(db), timeout=DEADLINE, what="the change embedded")
        assert webhook_answers(handle) == {"202": 1.0}  # once, and never a 401
        assert metric(handle, "vector_sync_events_total", source="webhook") == 1

        assert await reconcile(db) == {"delivered": 1, "failed": 0, "lost": 0, "sent": 0}
        log = await log_of(db, project_id)
        assert (log["status"], log["attempt_count"], log["last_status_code"]) == ("delivered", 1, 202)
        assert log["delivered_at"] is not None
        attempts = await attempts_of(db, log["id"])
        assert [(a["attempt_no"], a["outcome"], a["status_code"]) for a in attempts] == [(1, "success", 202)]
        assert attempts[0]["request_id"] == request.id
        assert str(attempts[0]["signature_ts"]) == request.headers["webhook-timestamp"]

        # Nothing more happens: a delivered change is never sent again.
        assert await reconcile(db) == {"delivered": 0, "failed": 0, "lost": 0, "sent": 0}
        await pg_net.drained()
        assert len(pg_net.sent) == 1


async def test_listener_down_for_5s_then_up_is_delivered_by_a_retry(
    dsn: str, db: asyncpg.Connection, pg_net: PgNetWorker
) -> None:
    port = free_port()
    await configure(db, f"http://127.0.0.1:{port}/webhook")
    async with reconciling(dsn):
        project_id = await insert_project(db, "down, then up")
        log_id = (await log_of(db, project_id))["id"]
        first_sent = (await attempts_of(db, log_id))[0]["sent_epoch"]

        async def second_attempt_failed() -> bool:
            attempts = await attempts_of(db, log_id)
            return len(attempts) >= 2 and attempts[1]["completed_at"] is not None

        await wait_until(second_attempt_failed, timeout=DEADLINE, what="the first retry to fail")
        await wait_until(lambda: time.time() >= first_sent + 5.0, timeout=DEADLINE, what="5 s of downtime")
        async with running(daemon_settings(dsn, VECTOR_SYNC_HTTP_PORT=port)) as handle:
            up_at = time.time()
            await wait_until(lambda: delivered(db, log_id), timeout=DEADLINE, what="delivery by a retry")
            await wait_until(lambda: all_current(db), timeout=DEADLINE, what="the change embedded")
            assert webhook_answers(handle) == {"202": 1.0}

    attempts = await attempts_of(db, log_id)
    outcomes = [(a["outcome"], a["error"]) for a in attempts]
    assert len(attempts) >= 3, outcomes
    assert outcomes[:-1] == [("transport_error", CONNECT_ERROR)] * (len(attempts) - 1)
    assert all(a["sent_epoch"] < up_at for a in attempts[:-1])
    assert (attempts[-1]["outcome"], attempts[-1]["status_code"]) == ("success", 202)
    log = await log_of(db, project_id)
    assert (log["status"], log["attempt_count"]) == ("delivered", len(attempts))
    gaps = gaps_of(attempts)
    report_gaps("down-5s-then-up", gaps)
    assert_backoff(gaps)


async def test_listener_down_for_good_hands_the_change_to_the_daemon(
    dsn: str, db: asyncpg.Connection, pg_net: PgNetWorker
) -> None:
    port = free_port()
    await configure(db, f"http://127.0.0.1:{port}/webhook")
    notifications: list[str] = []
    listener = await asyncpg.connect(dsn)
    try:
        await listener.add_listener("vector_sync_pending", lambda *args: notifications.append(args[3]))
        async with reconciling(dsn):
            project_id = await insert_project(db, "never answered")
            log_id = (await log_of(db, project_id))["id"]
            await wait_until(
                lambda: _is(status_of(db, log_id), "exhausted"), timeout=DEADLINE, what="the change exhausted"
            )
            await wait_until(lambda: str(log_id) in notifications, timeout=DEADLINE, what="NOTIFY vector_sync_pending")
    finally:
        await listener.close()

    attempts = await attempts_of(db, log_id)
    assert [(a["attempt_no"], a["outcome"], a["error"]) for a in attempts] == [
        (n, "transport_error", CONNECT_ERROR) for n in (1, 2, 3, 4)
    ]
    gaps = gaps_of(attempts)
    report_gaps("down-for-good", gaps)
    assert_backoff(gaps)
    assert notifications == [str(log_id)]
    pending = await db.fetchrow("select * from vector_sync.pending_webhooks where log_id = $1", log_id)
    assert pending is not None
    assert (pending["project_id"], pending["event_type"], pending["source_version"], pending["attempts"]) == (
        str(project_id),
        "INSERT",
        1,
        4,
    )
    assert pending["last_error"] == CONNECT_ERROR
    assert pending["claimed_at"] is None and pending["resolved_at"] is None
    # Exhausted is final for the reconciler: no fifth attempt.
    await reconcile(db)
    await pg_net.drained()
    assert len(await attempts_of(db, log_id)) == 4 and await queued(db) == 0
    assert await db.fetchval("select count(*) from vector_sync.project_embeddings") == 0

    async with running(daemon_settings(dsn)):

        async def resolved() -> bool:
            return bool(
                await db.fetchval(
                    "select resolved_at is not null from vector_sync.pending_webhooks where log_id = $1", log_id
                )
            )

        await wait_until(resolved, timeout=DEADLINE, what="the pending row resolved")
        assert await all_current(db)
    pending = await db.fetchrow("select * from vector_sync.pending_webhooks where log_id = $1", log_id)
    assert pending["claimed_at"] is not None and pending["resolved_at"] >= pending["claimed_at"]
    assert (
        await db.fetchval("select version from vector_sync.project_embeddings where project_id = $1", project_id) == 1
    )


async def test_an_exhausted_delete_is_resolved_because_the_row_is_gone(
    dsn: str, db: asyncpg.Connection, pg_net: PgNetWorker
) -> None:
    """The drain's other way to settle a row: the change was a DELETE and the row is gone (its vector
    went with it: project_embeddings references the row on delete cascade)."""
    project_id = await insert_project(db, "deleted while the listener is down")  # unsent: no URL yet
    async with running(daemon_settings(dsn)):
        await wait_until(lambda: all_current(db), timeout=DEADLINE, what="start-up embedding")
    await tune(db, max_attempts="1")  # exhausted at the first failure
    await configure(db, f"http://127.0.0.1:{free_port()}/webhook")
    async with reconciling(dsn):
        await db.execute("delete from public.projects where id = $1", project_id)
        log_id = (await log_of(db, project_id))["id"]
        await wait_until(lambda: _is(status_of(db, log_id), "exhausted"), timeout=DEADLINE, what="the delete exhausted")
    pending = await db.fetchrow("select * from vector_sync.pending_webhooks where log_id = $1", log_id)
    assert (pending["event_type"], pending["attempts"], pending["resolved_at"]) == ("DELETE", 1, None)
    assert await db.fetchval("select count(*) from vector_sync.project_embeddings") == 0

    async with running(daemon_settings(dsn)):

        async def resolved() -> bool:
            return bool(
                await db.fetchval(
                    "select resolved_at is not null from vector_sync.pending_webhooks where log_id = $1", log_id
                )
            )

        await wait_until(resolved, timeout=DEADLINE, what="the pending delete resolved")
    assert await db.fetchval("select claimed_at from vector_sync.pending_webhooks where log_id = $1", log_id)


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


@pytest.mark.parametrize("fault", [Fault.STRANGER, Fault.TIMEOUT, Fault.DROP])
async def test_an_unacknowledged_attempt_is_retried(
    dsn: str, db: asyncpg.Connection, pg_net: PgNetWorker, fault: Fault
) -> None:
    """A stranger's 2xx without the echo, a timeout, or no response at all: not delivered, so retried."""
    await tune(db, http_timeout_ms="1000", lost_grace_s="1")
    async with running(daemon_settings(dsn)) as handle:
        await started_up(handle)
        await configure(db, webhook_url(handle))
        pg_net.fail_next(fault)
        async with reconciling(dsn):
            project_id = await insert_project(db, f"first attempt: {fault}")
            log_id = (await log_of(db, project_id))["id"]
            await wait_until(lambda: delivered(db, log_id), timeout=DEADLINE, what="delivery by the retry")
        await wait_until(lambda: all_current(db), timeout=DEADLINE, what="the change embedded")
        assert webhook_answers(handle) == {"202": 1.0}  # only the retry reached the daemon

    attempts = await attempts_of(db, log_id)
    first, second = attempts  # exactly two
    expected = {
        Fault.STRANGER: ("lost", None, "no response of ours from pg_net"),
        Fault.DROP: ("lost", None, "no response of ours from pg_net"),
        Fault.TIMEOUT: ("transport_error", None, TIMEOUT_ERROR),
    }[fault]
    assert (first["outcome"], first["status_code"], first["error"]) == expected
    assert (second["outcome"], second["status_code"]) == ("success", 202)
    if fault is Fault.TIMEOUT:
        assert first["open_for"] >= 1.0  # the request's own timeout
    else:
        assert first["open_for"] >= 2.0  # http_timeout_ms + lost_grace_s, then found lost
    if fault is Fault.STRANGER:
        stranger = await db.fetchrow(
            "select status_code, content from net._http_response where id = $1", first["request_id"]
        )
        assert (stranger["status_code"], stranger["content"]) == (200, STRANGER_BODY)  # a 2xx, yet not delivered
    sent = pg_net.to((await log_of(db, project_id))["webhook_id"])
    assert [s.fault for s in sent] == [fault, None], describe(sent)


async def test_a_pg_net_crash_loses_nothing(dsn: str, db: asyncpg.Connection, pg_net: PgNetWorker) -> None:
    """Answered-but-unreconciled and still-queued requests vanish with pg_net's unlogged tables, and
    the request ids start again at 1: the reconciler finds both attempts lost and sends them again,
    and a new request reusing an old id does not pass for the old one (its echo is not theirs)."""
    await tune(db, http_timeout_ms="1000", lost_grace_s="1")
    async with running(daemon_settings(dsn)) as handle:
        await started_up(handle)
        await configure(db, webhook_url(handle))
        answered = await log_of(db, await insert_project(db, "answered, then the crash"))
        await pg_net.drained()
        assert await db.fetchval("select count(*) from net._http_response where status_code = 202") == 1

        pg_net.pause()
        queued_log = await log_of(db, await insert_project(db, "queued, then the crash"))
        assert await queued(db) == 1
        await pg_net.crash()
        assert await queued(db) == 0
        assert await db.fetchval("select count(*) from net._http_response") == 0
        pg_net.resume()

        after = await log_of(db, await insert_project(db, "after the crash"))
        await pg_net.drained()
        old_request = (await attempts_of(db, answered["id"]))[0]["request_id"]
        new_request = (await attempts_of(db, after["id"]))[0]["request_id"]
        assert new_request == old_request == 1  # the id is reused; its response is the new request's

        async with reconciling(dsn) as reconciler:
            for log in (answered, queued_log, after):
                await wait_until(lambda log=log: delivered(db, log["id"]), timeout=DEADLINE, what="all delivered")
        await wait_until(lambda: all_current(db), timeout=DEADLINE, what="all embedded")
        print(f"\nCRASH reconciler runs {reconciler.runs}, totals {reconciler.totals}")

    summary = {}
    for name, log in (("answered", answered), ("queued", queued_log), ("after", after)):
        summary[name] = [(a["outcome"], a["status_code"]) for a in await attempts_of(db, log["id"])]
    assert summary == {
        "answered": [("lost", None), ("success", 202)],
        "queued": [("lost", None), ("success", 202)],
        "after": [("success", 202)],
    }
    # At least once: the answered change reached the daemon twice; the queued one only after the crash.
    assert [s.status_code for s in pg_net.to(answered["webhook_id"])] == [202, 202]
    assert [s.status_code for s in pg_net.to(queued_log["webhook_id"])] == [202]


async def test_a_rolled_back_write_sends_nothing(dsn: str, db: asyncpg.Connection, pg_net: PgNetWorker) -> None:
    await configure(db, f"http://127.0.0.1:{free_port()}/webhook")
    transaction = db.transaction()
    await transaction.start()
    try:
        project_id = await insert_project(db, "rolled back")
        assert await queued(db) == 1  # queued inside the transaction...
        await pg_net.drained()
        assert pg_net.sent == []  # ...but invisible to the sender until commit
    finally:
        await transaction.rollback()
    await pg_net.drained()
    assert pg_net.sent == []
    assert await queued(db) == 0
    assert (
        await db.fetchval("select count(*) from vector_sync.webhook_logs where project_id = $1", str(project_id)) == 0
    )
    assert await db.fetchval("select count(*) from vector_sync.webhook_attempts") == 0
    assert await reconcile(db) == {"delivered": 0, "failed": 0, "lost": 0, "sent": 0}

    # The same write committed is sent.
    committed = await log_of(db, await insert_project(db, "committed"))
    await pg_net.drained()
    assert [s.request.webhook_id for s in pg_net.sent] == [committed["webhook_id"]]


async def test_a_bulk_update_does_not_wait_for_delivery(dsn: str, db: asyncpg.Connection, pg_net: PgNetWorker) -> None:
    rows = 1000
    await db.execute(
        "insert into public.projects (name, description) select 'project ' || g, 'bulk ' || g"
        " from generate_series(1, $1) g",
        rows,
    )
    async with running(daemon_settings(dsn)) as handle:
        await wait_until(lambda: all_current(db), timeout=DEADLINE, what="start-up embedding")
        await configure(db, webhook_url(handle))
        pg_net.pause()  # nothing can be delivered while the update runs
        started = time.monotonic()
        await db.execute("update public.projects set stars = stars + 1")
        took = time.monotonic() - started
        print(f"\nBULK update of {rows} rows took {took:.3f}s")
        assert took < 3.0, f"the update of {rows} rows took {took:.1f}s"
        assert await queued(db) == rows
        statuses = await db.fetch(
            "select status, count(*) from vector_sync.webhook_logs where event_type = 'UPDATE' group by 1"
        )
        assert {r["status"]: r["count"] for r in statuses} == {"in_flight": rows}

        pg_net.resume()
        started = time.monotonic()
        async with reconciling(dsn) as reconciler:

            async def all_delivered() -> bool:
                return bool(
                    await db.fetchval(
                        "select count(*) = $1 from vector_sync.webhook_logs"
                        " where event_type = 'UPDATE' and status = 'delivered'",
                        rows,
                    )
                )

            await wait_until(all_delivered, timeout=90, what=f"{rows} webhooks delivered")
        await wait_until(lambda: all_current(db), timeout=DEADLINE, what=f"{rows} rows embedded at version 2")
        attempts = await db.fetch(
            "select attempt_count, count(*) from vector_sync.webhook_logs where event_type = 'UPDATE' group by 1"
        )
        print(
            f"BULK delivered in {time.monotonic() - started:.2f}s; logs by attempts "
            f"{ {r['attempt_count']: r['count'] for r in attempts} }; answers {webhook_answers(handle)}; "
            f"reconciler {reconciler.totals}"
        )
        assert await db.fetchval("select count(*) from vector_sync.project_embeddings where version = 2") == rows


# --- not configured, no pg_net, a failing pg_net --------------------------------------------------


async def test_without_a_url_changes_are_logged_unsent(db: asyncpg.Connection, pg_net: PgNetWorker) -> None:
    await db.execute(
        "insert into vector_sync.config (key, value) values ('secret:vector_sync_webhook_secret', $1)", WEBHOOK_SECRET
    )  # a secret but no URL
    project_id = await insert_project(db, "no url")
    await db.execute("update public.projects set stars = 5 where id = $1", project_id)
    logs = await db.fetch(
        "select event_type, status, attempt_count, webhook_id from vector_sync.webhook_logs order by id"
    )
    assert [tuple(r) for r in logs] == [("INSERT", "unsent", 0, None), ("UPDATE", "unsent", 0, None)]
    assert await queued(db) == 0
    assert await reconcile(db) == {"delivered": 0, "failed": 0, "lost": 0, "sent": 0}
    await pg_net.drained()
    assert pg_net.sent == []
    assert await db.fetchval("select count(*) from vector_sync.webhook_attempts") == 0


async def test_without_pg_net_changes_are_logged_unsent(db: asyncpg.Connection) -> None:
    await configure(db, f"http://127.0.0.1:{free_port()}/webhook")
    assert await db.fetchval("select to_regnamespace('net')") is None
    project_id = await insert_project(db, "no pg_net")
    log = await log_of(db, project_id)
    assert (log["status"], log["attempt_count"]) == ("unsent", 0)
    assert await reconcile(db) == {"skipped": "pg_net is not installed"}

    # Installed after the migrations: the next change is queued.
    await install(db)
    log = await log_of(db, await insert_project(db, "pg_net installed"))
    assert (log["status"], log["attempt_count"]) == ("in_flight", 1)
    assert await queued(db) == 1


async def test_a_failing_http_post_never_fails_the_write(dsn: str, db: asyncpg.Connection, pg_net: PgNetWorker) -> None:
    messages: list[str] = []
    db.add_log_listener(lambda _conn, message: messages.append(str(message)))
    async with running(daemon_settings(dsn)) as handle:
        await started_up(handle)
        await configure(db, webhook_url(handle))
        await break_http_post(db)

        project_id = await insert_project(db, "written while pg_net fails")  # must not raise
        log = await log_of(db, project_id)
        assert (log["status"], log["attempt_count"], log["webhook_id"]) == ("pending", 0, None)
        assert await queued(db) == 0
        await wait_until(
            lambda: any("webhooks not queued now" in m for m in messages), timeout=DEADLINE, what="the warning"
        )
        assert any("broken on purpose" in m for m in messages), messages

        # The reconciler cannot queue it either: that counts as an attempt (so a sender that can
        # never queue ends in pending_webhooks), and it is retried after the back-off.
        assert (await reconcile(db))["sent"] == 0
        log = await log_of(db, project_id)
        assert (log["status"], log["attempt_count"]) == ("retry_wait", 1)
        assert log["last_error"].startswith("could not queue:")

        await install(db)  # pg_net works again
        async with reconciling(dsn):
            await wait_until(lambda: delivered(db, log["id"]), timeout=DEADLINE, what="delivery after the repair")
        await wait_until(lambda: all_current(db), timeout=DEADLINE, what="the change embedded")
        assert webhook_answers(handle) == {"202": 1.0}
    attempts = await attempts_of(db, log["id"])
    # Attempt 1 never reached pg_net (no request, no row here); attempt 2 was delivered.
    assert [(a["attempt_no"], a["outcome"], a["status_code"]) for a in attempts] == [(2, "success", 202)]


async def test_a_claim_left_by_a_dead_daemon_is_taken_when_it_expires(dsn: str, db: asyncpg.Connection) -> None:
    project_id = await insert_project(db, "claimed by a daemon that died")
    log = await log_of(db, project_id)
    await db.execute(
        "update vector_sync.webhook_logs set status = 'exhausted', attempt_count = 4 where id = $1", log["id"]
    )
    # Claimed 4 min 57 s ago: not claimable at start-up, claimable 3 s later.
    await db.execute(
        "insert into vector_sync.pending_webhooks"
        " (log_id, project_id, event_type, source_version, attempts, claimed_at)"
        " values ($1, $2, 'INSERT', 1, 4, now() - interval '4 minutes 57 seconds')",
        log["id"],
        str(project_id),
    )
    async with running(daemon_settings(dsn)) as handle:
        await started_up(handle)
        assert await db.fetchval("select resolved_at from vector_sync.pending_webhooks") is None
        await wait_until(
            lambda: db.fetchval("select resolved_at is not null from vector_sync.pending_webhooks"),
            timeout=DEADLINE,
            what="the expired claim taken and resolved",
        )
    assert await db.fetchval("select claimed_at > now() - interval '1 minute' from vector_sync.pending_webhooks")


async def test_a_sender_that_can_never_queue_ends_in_pending_webhooks(
    db: asyncpg.Connection, pg_net: PgNetWorker
) -> None:
    await configure(db, "http://127.0.0.1:9/webhook")
    await tune(db, backoff_base_s="0.05")
    await break_http_post(db)
    project_id = await insert_project(db, "never queued")
    log = await log_of(db, project_id)
    for _ in range(4):
        await wait_until(
            lambda: db.fetchval(
                "select status in ('pending', 'exhausted') or next_attempt_at <= clock_timestamp()"
                " from vector_sync.webhook_logs where id = $1",
                log["id"],
            ),
            what="the next attempt to be due",
        )
        await reconcile(db)
    assert await status_of(db, log["id"]) == "exhausted"
    assert await db.fetchval("select attempts from vector_sync.pending_webhooks where log_id = $1", log["id"]) == 4


async def test_a_vault_that_cannot_decrypt_never_fails_the_write(db: asyncpg.Connection, pg_net: PgNetWorker) -> None:
    # A Vault whose secrets cannot be decrypted (a restore, a key change): reading it raises.
    await db.execute(
        """
        create schema vault;
        create view vault.decrypted_secrets as select 'x'::text as name, (1 / 0)::text as decrypted_secret;
        """
    )
    project_id = await insert_project(db, "written while Vault is broken")  # must not raise
    log = await log_of(db, project_id)
    assert log["status"] == "unsent"
    assert await queued(db) == 0


async def test_a_late_delete_from_pending_webhooks_does_not_lose_the_row_inserted_again(
    dsn: str, db: asyncpg.Connection
) -> None:
    # The old row's DELETE failed every attempt; the id was then inserted again.
    await db.execute("insert into projects (id, name, description) values (42, 'old life', 'x')")
    await db.execute("delete from projects where id = 42")
    log = await log_of(db, 42)
    await db.execute(
        "update vector_sync.webhook_logs set status = 'exhausted', attempt_count = 4 where id = $1", log["id"]
    )
    await db.execute(
        "insert into vector_sync.pending_webhooks (log_id, project_id, event_type, source_version, attempts)"
        " values ($1, '42', 'DELETE', 1, 4)",
        log["id"],
    )
    await db.execute("insert into projects (id, name, description) values (42, 'new life', 'y')")
    async with running(daemon_settings(dsn, VECTOR_SYNC_INSERT_DELAY="2s")) as handle:
        await started_up(handle)
        await wait_until(lambda: all_current(db), timeout=DEADLINE, what="the row inserted again to be embedded")
        await wait_until(
            lambda: db.fetchval("select resolved_at is not null from vector_sync.pending_webhooks"),
            timeout=DEADLINE,
            what="the old DELETE resolved",
        )
