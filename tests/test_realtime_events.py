"""Realtime events end to end: duplicates with webhooks, drops, error events, 413s, malformed frames, readiness.

Each integration test runs the in-process daemon against the Realtime test server (tests/realtime_server.py)
and embedded Postgres (wal_level = logical) and ends with every row embedded at its latest version and no
(id, version) written twice (`test_audit.writes`, see support.AUDIT_SQL). Unit tests of
`events.parse_realtime` and of the source's callbacks (with a fake sink) come last.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
from embedding_api import EmbeddingAPI
from loguru import logger
from realtime_server import MALFORMED_KINDS, RealtimeServer
from support import (
    RunningDaemon,
    all_current,
    metric,
    post_webhook,
    realtime_settings,
    running,
    signed_headers,
    twice_written,
    wait_until,
    webhook_body,
)
from vector_sync.app import Daemon
from vector_sync.drift import DriftPass
from vector_sync.events import (
    ChangeEvent,
    IdKind,
    MalformedEvent,
    Op,
    ProjectId,
    Source,
    Truncated,
    parse_realtime,
)
from vector_sync.scheduler import Scheduler
from vector_sync.sources import realtime as realtime_module
from vector_sync.sources.realtime import RealtimeSource, State

# realtime-py 2.34.1 reads ConnectionClosed.code (deprecated in websockets 15) on its error path; with
# filterwarnings=error that warning would be raised inside its receive task. Production only prints it.
pytestmark = pytest.mark.filterwarnings(r"ignore:ConnectionClosed\.(code|reason) is deprecated:DeprecationWarning")

REALTIME_ONLY = {"VECTOR_SYNC_SOURCES": "realtime"}
# How long a state must hold before the daemon counts as settled (no drift pass still running).
QUIET_SECONDS = 0.5
# Negative checks ("still missing") watch the idle daemon for this long: a bounded observation window,
# not a wait for a condition.
IDLE_WINDOW_SECONDS = 2.5
ERROR_413 = "Error 413: Payload Too Large"
ERROR_400 = "Error 400: Bad Request, no primary key"
ERROR_401 = "Error 401: Unauthorized"

# Frames the pinned realtime-py parses and then ignores by itself: well formed, only not for us (a reply
# to a ref nobody waits for, a topic we never joined). Nothing reaches the daemon, nothing is counted.
IGNORED_BY_THE_LIBRARY = frozenset({"reply_unknown_ref", "changes_unknown_topic"})
# Frames the library rejects before it can know their topic: not JSON, not an object, or without a topic.
WITHOUT_A_TOPIC = frozenset(
    {"not_json", "json_null", "json_string", "json_array", "binary", "empty_object", "missing_topic"}
)
# The one kind that legitimately ends the session: over websockets' 1 MiB limit the client closes 1009.
ENDS_THE_SESSION = frozenset({"oversize"})
# The rest carry our topic and are rejected by the library's validation: counted as malformed.
ROUTED_TO_THE_SOURCE = frozenset(MALFORMED_KINDS) - IGNORED_BY_THE_LIBRARY - WITHOUT_A_TOPIC - ENDS_THE_SESSION


# ------------------------------------------------------------------------------------------ helpers


async def insert(db: asyncpg.Connection, name: str, description: str = "d") -> tuple[int, int]:
    row = await db.fetchrow(
        "insert into projects (name, description) values ($1, $2) returning id, version", name, description
    )
    return int(row["id"]), int(row["version"])


async def update(db: asyncpg.Connection, project_id: int, description: str) -> int:
    return int(
        await db.fetchval(
            "update projects set description = $2 where id = $1 returning version", project_id, description
        )
    )


async def writes_of(db: asyncpg.Connection, project_id: int) -> list[int]:
    rows = await db.fetch("select version from test_audit.writes where project_id = $1 order by at", project_id)
    return [row[0] for row in rows]


async def embedded_at(db: asyncpg.Connection, project_id: int, version: int) -> bool:
    stored = await db.fetchval("select version from vector_sync.project_embeddings where project_id = $1", project_id)
    return stored == version


def realtime_events(handle: RunningDaemon) -> float:
    return metric(handle, "vector_sync_events_total", source="realtime")


def parts(daemon: Daemon) -> tuple[DriftPass, Scheduler]:
    assert daemon.drift is not None and daemon.scheduler is not None
    return daemon.drift, daemon.scheduler


async def settled(handle: RunningDaemon) -> None:
    """Realtime is live and the start-up and readiness passes are over: a full pass ran, nothing is queued,
    and both stay so for QUIET_SECONDS (a pass still running would bump `passes` meanwhile)."""
    daemon = handle.daemon
    await wait_until(
        lambda: daemon.intake is not None and daemon.intake.live.get(Source.REALTIME) is True,
        timeout=60,
        what="Realtime live",
    )
    drift, scheduler = parts(daemon)
    seen: list[tuple[int, float]] = []

    def quiet() -> bool:
        state = drift.passes if drift.passes >= 1 and scheduler.is_idle() else -1
        if not seen or seen[-1][0] != state:
            seen.append((state, time.monotonic()))
        return state >= 0 and time.monotonic() - seen[-1][1] >= QUIET_SECONDS

    await wait_until(quiet, timeout=60, what="the start-up and readiness drift passes to finish")


async def http_get(handle: RunningDaemon, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"{handle.url}{path}") as response:
        return response.status, await response.text()


async def post_change(handle: RunningDaemon, op: str, project_id: int, version: int) -> None:
    """The webhook the pg_net sender would post for this change."""
    body = webhook_body(op, project_id, version)
    status, answer = await post_webhook(handle.url, body, signed_headers(body))
    assert status == 202, answer


async def finish(db: asyncpg.Connection) -> None:
    await wait_until(lambda: all_current(db), timeout=60, what="every row embedded at its latest version")
    assert await twice_written(db) == []


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    """The daemon's warning (and worse) log lines while the test runs."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), level="WARNING")
    yield lines
    logger.remove(sink)


# ------------------------------------------------------------------------------------------ 1. duplicates


@pytest.mark.parametrize("first", ["webhook", "realtime"])
async def test_a_change_by_realtime_and_by_webhook_is_embedded_once(
    first: str, live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer, api: EmbeddingAPI
) -> None:
    settings = realtime_settings(live_dsn, live_server, api_url=api.url)
    project = 0
    async with running(settings) as handle:
        await settled(handle)
        duplicates = metric(handle, "vector_sync_offers_total", result="duplicate")
        for number, op in enumerate(("INSERT", "UPDATE"), start=1):
            if first == "webhook":
                # Realtime delivers the change 3 s after the server reads it; the webhook goes at once.
                live_server.event_delay = 3.0
            if op == "INSERT":
                project, version = await insert(live_db, "twice told", "first text")
            else:
                version = await update(live_db, project, "second text")
            committed = time.monotonic()
            if first == "webhook":
                await post_change(handle, op, project, version)
                await wait_until(lambda p=project, v=version: embedded_at(live_db, p, v), what=f"{op} by webhook")
                assert realtime_events(handle) == number - 1, "Realtime was not late"
                await wait_until(lambda n=number: realtime_events(handle) == n, what=f"the late Realtime {op}")
            else:
                await wait_until(lambda n=number: realtime_events(handle) == n, what=f"the Realtime {op}")
                await wait_until(lambda p=project, v=version: embedded_at(live_db, p, v), what=f"{op} by Realtime")
                # The scenario, not a wait for a condition: the webhook comes a couple of seconds later.
                await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - committed)))
                await post_change(handle, op, project, version)
            await wait_until(
                lambda n=number: metric(handle, "vector_sync_offers_total", result="duplicate") == duplicates + n,
                what=f"the second {op} to be dropped as a duplicate",
            )
        await finish(live_db)
        assert metric(handle, "vector_sync_events_total", source="webhook") == 2
        assert realtime_events(handle) == 2
    # Insert and update: one API call and one write each, though every change arrived twice.
    assert api.request_count == 2 and api.input_count == 2
    assert "first text" in api.all_inputs[0] and "second text" in api.all_inputs[1]
    assert await writes_of(live_db, project) == [1, 2]


# ------------------------------------------------------------------------------------------ 2. drops


async def test_webhooks_cover_the_events_realtime_drops(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    async with running(realtime_settings(live_dsn, live_server)) as handle:
        await settled(handle)
        drift, _ = parts(handle.daemon)
        passes, recent, generation = drift.passes, drift.recent_passes, handle.daemon.realtime_status.generation
        before, _ = await insert(live_db, "before the drop")
        await wait_until(lambda: realtime_events(handle) == 1, what="the first event")

        live_server.drop_events(seconds=120)  # Realtime's rate limit: consumed from the slot, never sent
        changes: list[tuple[str, int, int]] = []
        for n in range(5):
            project, version = await insert(live_db, f"dropped {n}")
            changes.append(("INSERT", project, version))
        for project in (before, changes[0][1]):
            changes.append(("UPDATE", project, await update(live_db, project, "changed while dropping")))
        await live_server.flush()
        assert live_server.events_dropped == 7
        assert not await all_current(live_db)
        live_server.stop_dropping()

        for op, project, version in changes:  # one webhook per change, in commit order, as pg_net sends them
            await post_change(handle, op, project, version)
        await finish(live_db)
        assert metric(handle, "vector_sync_events_total", source="webhook") == 7
        assert realtime_events(handle) == 1
        # The webhooks did it: no drift pass, no reconnect.
        assert (drift.passes, drift.recent_passes) == (passes, recent)
        assert handle.daemon.realtime_status.generation == generation

        # Realtime itself still works afterwards.
        last, _ = await insert(live_db, "after the drop")
        await wait_until(lambda: realtime_events(handle) == 2, what="an event after the drop")
        await finish(live_db)
    assert last > before


# ------------------------------------------------------------------------------------------ 3. safety interval


async def drop_some_changes(db: asyncpg.Connection, server: RealtimeServer) -> list[int]:
    """Changes Realtime consumes and never sends: three inserts and an update of the first."""
    server.drop_events(seconds=120)
    ids = [(await insert(db, f"lost {n}"))[0] for n in range(3)]
    await update(db, ids[0], "lost again")
    await server.flush()
    assert server.events_dropped == 4
    server.stop_dropping()
    return ids


async def test_the_safety_interval_finds_what_realtime_dropped(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    settings = realtime_settings(live_dsn, live_server, **REALTIME_ONLY, VECTOR_SYNC_SAFETY_INTERVAL="1s")
    async with running(settings) as handle:
        await settled(handle)
        drift, _ = parts(handle.daemon)
        passes, recent, generation = drift.passes, drift.recent_passes, handle.daemon.realtime_status.generation
        await drop_some_changes(live_db, live_server)
        await finish(live_db)
        assert drift.recent_passes > recent
        # Found by the cheap recent pass over the change log, not by a full pass or a reconnect.
        assert drift.passes == passes
        assert handle.daemon.realtime_status.generation == generation
        assert realtime_events(handle) == 0


async def test_without_the_safety_interval_dropped_changes_wait_for_something_else(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    """The control for the test above: Realtime only, no safety interval, so nothing looks for the drops."""
    async with running(realtime_settings(live_dsn, live_server, **REALTIME_ONLY)) as handle:
        await settled(handle)
        drift, scheduler = parts(handle.daemon)
        passes = drift.passes
        await drop_some_changes(live_db, live_server)
        # A bounded observation window for a negative check: the idle daemon does not find them.
        deadline = time.monotonic() + IDLE_WINDOW_SECONDS
        while time.monotonic() < deadline:
            assert not await all_current(live_db)
            assert scheduler.is_idle()
            await asyncio.sleep(0.1)
        assert (drift.passes, drift.recent_passes) == (passes, 0)
        # Something else asks: the server re-creates its subscriptions, and the readiness asks for a pass.
        assert live_server.resubscribe() == 1
        await finish(live_db)
        assert drift.passes > passes
        assert handle.daemon.realtime_status.readiness == 2


# ------------------------------------------------------------------------------------------ 4. error events


async def drop_one_and_error_one(
    db: asyncpg.Connection, server: RealtimeServer, code: int, ids: list[int], text: str
) -> None:
    """The next change is dropped, the one after goes out as a 400/401 error event (no row, no timestamp)."""
    server.drop_events(count=1)
    server.inject_error_events(code)  # type: ignore[arg-type]
    await update(db, ids[0], text)
    await update(db, ids[1], text)
    await server.flush()


async def test_400_and_401_error_events_bring_a_drift_pass(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    async with running(realtime_settings(live_dsn, live_server, **REALTIME_ONLY)) as handle:
        await settled(handle)
        status = handle.daemon.realtime_status
        generation, readiness = status.generation, status.readiness
        ids = [(await insert(live_db, f"p{n}"))[0] for n in range(4)]
        await wait_until(lambda: realtime_events(handle) == 4, what="the inserts by Realtime")
        await finish(live_db)

        await drop_one_and_error_one(live_db, live_server, 400, ids[:2], "behind a 400")
        await wait_until(lambda: status.error_events.get("400") == 1, what="the 400 event counted")
        await finish(live_db)

        await drop_one_and_error_one(live_db, live_server, 401, ids[2:], "behind a 401")
        await wait_until(lambda: status.error_events.get("401") == 1, what="the 401 event counted")
        await finish(live_db)

        assert status.error_events == {"400": 1, "401": 1}
        _, text = await http_get(handle, "/metrics")
        assert 'vector_sync_realtime_error_events_total{code="400"} 1.0' in text
        assert 'vector_sync_realtime_error_events_total{code="401"} 1.0' in text
        assert 'vector_sync_realtime_error_events_total{code="413"} 0.0' in text
        # No reconnect was needed, and the error events were not mistaken for malformed frames.
        assert (status.generation, status.readiness, status.sessions_failed) == (generation, readiness, 0)
        assert metric(handle, "vector_sync_malformed_events_total", source="realtime") == 0
        assert realtime_events(handle) == 4


async def test_an_error_event_asks_for_a_recent_pass_not_a_full_one(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    """An error event names no row: the change log since the last pass says which rows to look at, an index
    range scan; a full pass compares the whole table (drift.py, ports.EventSink.request_recent)."""
    async with running(realtime_settings(live_dsn, live_server, **REALTIME_ONLY)) as handle:
        await settled(handle)
        drift, _ = parts(handle.daemon)
        ids = [(await insert(live_db, f"p{n}"))[0] for n in range(2)]
        await finish(live_db)
        passes, recent = drift.passes, drift.recent_passes
        await drop_one_and_error_one(live_db, live_server, 401, ids, "behind a 401")
        await wait_until(lambda: handle.daemon.realtime_status.error_events.get("401") == 1, what="the 401 event")
        await finish(live_db)
        assert drift.recent_passes == recent + 1, "the error event did not bring a recent pass"
        assert drift.passes == passes, "the error event brought a full drift pass"


# ------------------------------------------------------------------------------------------ 5. 413


async def test_413_events_with_id_and_version_are_events(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer, api: EmbeddingAPI
) -> None:
    async with running(realtime_settings(live_dsn, live_server, **REALTIME_ONLY, api_url=api.url)) as handle:
        await settled(handle)
        drift, _ = parts(handle.daemon)
        status = handle.daemon.realtime_status
        passes, recent = drift.passes, drift.recent_passes
        huge = "huge " * 2000
        live_server.max_record_bytes = 4096  # a record over the limit is a 413 by itself
        project, _ = await insert(live_db, "big", huge)
        await wait_until(lambda: status.error_events.get("413") == 1, what="the natural 413")
        await wait_until(lambda: embedded_at(live_db, project, 1), what="the big row")
        live_server.max_record_bytes = 1_048_576

        live_server.inject_error_events(413)  # the server's truncation on a record of any size
        version = await update(live_db, project, "bigger " * 3000)
        await wait_until(lambda: status.error_events.get("413") == 2, what="the injected 413")
        await finish(live_db)
        assert await embedded_at(live_db, project, version)

        sent = [m["payload"]["data"] for m in live_server.sent("postgres_changes")]
        assert [data["errors"] for data in sent] == [[ERROR_413], [ERROR_413]]
        assert all("description" not in data["record"] and "version" in data["record"] for data in sent)
        # The daemon reads the row itself: the whole description was embedded, not the truncated record.
        assert len(api.all_inputs) == 2
        assert huge.strip() in api.all_inputs[0] and ("bigger " * 3000).strip() in api.all_inputs[1]
        assert realtime_events(handle) == 2
        assert (drift.passes, drift.recent_passes) == (passes, recent)
        assert metric(handle, "vector_sync_malformed_events_total", source="realtime") == 0


async def test_a_413_event_with_only_the_id_rechecks_that_row(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    """bigint ids and versions always survive the 64-byte cut, so the server cannot cut the version of a
    real change: the change itself is dropped and a crafted 413 event without a version names the row."""
    async with running(realtime_settings(live_dsn, live_server, **REALTIME_ONLY)) as handle:
        await settled(handle)
        drift, _ = parts(handle.daemon)
        status = handle.daemon.realtime_status
        project, _ = await insert(live_db, "row")
        other, _ = await insert(live_db, "other")
        await finish(live_db)
        passes, recent = drift.passes, drift.recent_passes

        live_server.drop_events(count=1)
        version = await update(live_db, project, "x" * 200)
        await live_server.flush()
        assert live_server.events_dropped == 1
        live_server.inject_error_events(413)
        live_server.emit_change("UPDATE", "projects", {"id": project, "name": "row", "description": "x" * 200})
        await wait_until(lambda: status.error_events.get("413") == 1, what="the 413 event")
        await finish(live_db)
        assert await embedded_at(live_db, project, version)
        assert await writes_of(live_db, other) == [1]
        # A per-row re-check, not a pass over the change log or the table.
        assert (drift.passes, drift.recent_passes) == (passes, recent)
        assert metric(handle, "vector_sync_malformed_events_total", source="realtime") == 0


async def test_a_413_event_without_an_id_brings_a_pass(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    """An id over 64 bytes of text would be cut: crafted here (the table's ids are bigint) as a 413 event
    whose record lost everything; the real change behind it was dropped."""
    async with running(realtime_settings(live_dsn, live_server, **REALTIME_ONLY)) as handle:
        await settled(handle)
        drift, _ = parts(handle.daemon)
        status = handle.daemon.realtime_status
        project, _ = await insert(live_db, "row")
        await finish(live_db)
        passes, recent = drift.passes, drift.recent_passes

        live_server.drop_events(count=1)
        version = await update(live_db, project, "y" * 200)
        await live_server.flush()
        live_server.inject_error_events(413)
        live_server.emit_change("UPDATE", "projects", {"id": "9" * 70, "description": "y" * 200})
        await wait_until(lambda: status.error_events.get("413") == 1, what="the 413 event")
        await finish(live_db)
        assert await embedded_at(live_db, project, version)
        assert drift.passes + drift.recent_passes > passes + recent
        assert metric(handle, "vector_sync_malformed_events_total", source="realtime") == 0


# ------------------------------------------------------------------------------------------ 6. malformed


async def test_malformed_frames_mid_stream_are_counted_and_the_stream_goes_on(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer, warnings_logged: list[str]
) -> None:
    async with running(realtime_settings(live_dsn, live_server, **REALTIME_ONLY)) as handle:
        await settled(handle)
        status = handle.daemon.realtime_status
        generation, readiness = status.generation, status.readiness
        project, _ = await insert(live_db, "stream")
        await wait_until(lambda: realtime_events(handle) == 1, what="the first event")
        counted: dict[str, float] = {}
        for kind in sorted(set(MALFORMED_KINDS) - ENDS_THE_SESSION):
            before = metric(handle, "vector_sync_malformed_events_total", source="realtime")
            events = realtime_events(handle)
            assert live_server.send_malformed(kind) == 1
            # The next change goes out on the same socket after the bad frame: once it has arrived, the
            # bad frame has been handled.
            version = await update(live_db, project, f"after {kind}")
            await wait_until(lambda e=events: realtime_events(handle) == e + 1, what=f"the change after {kind}")
            await wait_until(lambda p=project, v=version: embedded_at(live_db, p, v), what=f"embedded after {kind}")
            counted[kind] = metric(handle, "vector_sync_malformed_events_total", source="realtime") - before
            assert (status.state, status.generation) == (State.LIVE, generation), kind
        assert {kind for kind, n in counted.items() if n == 1} >= ROUTED_TO_THE_SOURCE
        assert {kind for kind, n in counted.items() if n} <= ROUTED_TO_THE_SOURCE | WITHOUT_A_TOPIC
        assert all(counted[kind] == 0 for kind in IGNORED_BY_THE_LIBRARY)

        # Logged once per kind: the same bad frame again is counted, not logged again.
        logged = [line for line in warnings_logged if line.startswith("dropped malformed input from realtime")]
        assert 1 <= len(logged) <= len(ROUTED_TO_THE_SOURCE | WITHOUT_A_TOPIC)
        before = metric(handle, "vector_sync_malformed_events_total", source="realtime")
        live_server.send_malformed("unknown_event")
        version = await update(live_db, project, "after the repeat")
        await wait_until(lambda: embedded_at(live_db, project, version), what="the change after the repeat")
        assert metric(handle, "vector_sync_malformed_events_total", source="realtime") == before + 1
        assert [line for line in warnings_logged if line.startswith("dropped malformed input from realtime")] == logged

        _, text = await http_get(handle, "/metrics")
        assert f'vector_sync_malformed_events_total{{source="realtime"}} {before + 1}' in text
        assert (status.generation, status.readiness, status.sessions_failed) == (generation, readiness, 0)
        await finish(live_db)


async def test_malformed_frames_without_a_topic_are_counted(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    """Garbage the library rejects before reading a topic (not JSON, binary, null, a string, an array,
    `{}`, no topic) reaches the source only as the library's log line; it must still be counted."""
    async with running(realtime_settings(live_dsn, live_server, **REALTIME_ONLY)) as handle:
        await settled(handle)
        project, _ = await insert(live_db, "stream")
        uncounted = []
        for kind in sorted(WITHOUT_A_TOPIC):
            before = metric(handle, "vector_sync_malformed_events_total", source="realtime")
            live_server.send_malformed(kind)
            version = await update(live_db, project, f"after {kind}")
            await wait_until(lambda p=project, v=version: embedded_at(live_db, p, v), what=f"embedded after {kind}")
            if metric(handle, "vector_sync_malformed_events_total", source="realtime") == before:
                uncounted.append(kind)
        await finish(live_db)
        assert handle.daemon.realtime_status.generation == 1
    assert uncounted == [], f"malformed frames not counted in vector_sync_malformed_events_total: {uncounted}"


async def test_an_oversize_frame_ends_the_session_and_the_next_one_carries_on(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    async with running(realtime_settings(live_dsn, live_server, **REALTIME_ONLY)) as handle:
        await settled(handle)
        status = handle.daemon.realtime_status
        drift, _ = parts(handle.daemon)
        passes = drift.passes
        project, _ = await insert(live_db, "stream")
        await wait_until(lambda: realtime_events(handle) == 1, what="the first event")
        live_server.send_malformed("oversize")  # over websockets' 1 MiB: the client closes 1009
        await wait_until(lambda: status.generation == 2 and status.state == State.LIVE, what="the next session live")
        assert status.sessions_failed == 1 and status.readiness == 2
        assert status.last_error is not None and "1009" in status.last_error
        await wait_until(lambda: drift.passes > passes, what="the pass the new readiness asks for")
        version = await update(live_db, project, "after the oversize frame")
        await wait_until(lambda: realtime_events(handle) == 2, what="a change on the new session")
        await wait_until(lambda: embedded_at(live_db, project, version), what="the change embedded")
        await finish(live_db)


# ------------------------------------------------------------------------------------------ 7. readiness


async def test_readyz_and_metrics_follow_the_realtime_state(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    live_server.readiness_delay = 3.0
    async with running(realtime_settings(live_dsn, live_server)) as handle:
        status = handle.daemon.realtime_status
        await wait_until(lambda: status.state == State.WAITING_FOR_READINESS, what="the join reply")
        code, body = await http_get(handle, "/readyz")
        assert code == 503, body
        details = json.loads(body)
        assert details["sources"] == {"realtime": "down", "webhook": "live"}
        assert details["realtime"] == {"state": "waiting_for_readiness", "generation": 1}
        assert details["ready"] is False and details["database"] == "ok"
        _, text = await http_get(handle, "/metrics")
        assert 'vector_sync_realtime_state{state="waiting_for_readiness"} 1.0' in text
        assert 'vector_sync_realtime_state{state="live"} 0.0' in text
        # (the gauge's realtime series appears only once the source reported a state: absent or 0 here)
        assert 'vector_sync_source_up{source="realtime"} 1.0' not in text

        async def ready() -> bool:
            return (await http_get(handle, "/readyz"))[0] == 200

        await wait_until(ready, timeout=60, what="/readyz 200")
        code, body = await http_get(handle, "/readyz")
        assert code == 200, body
        details = json.loads(body)
        assert details["sources"] == {"realtime": "live", "webhook": "live"}
        assert details["realtime"] == {"state": "live", "generation": 1}
        assert details["ready"] is True
        _, text = await http_get(handle, "/metrics")
        assert 'vector_sync_realtime_state{state="live"} 1.0' in text
        assert 'vector_sync_realtime_state{state="waiting_for_readiness"} 0.0' in text
        assert "vector_sync_realtime_generation 1.0" in text
        assert "vector_sync_realtime_readiness_total 1.0" in text
        assert 'vector_sync_source_up{source="realtime"} 1.0' in text
        for code_label in ("413", "400", "401", "other"):
            assert f'vector_sync_realtime_error_events_total{{code="{code_label}"}} 0.0' in text
        await insert(live_db, "after readiness")
        await finish(live_db)


# ------------------------------------------------------------------------------------------ 8. the readiness gap


async def test_writes_between_the_join_reply_and_readiness_are_embedded(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    live_server.readiness_delay = 4.0
    async with running(realtime_settings(live_dsn, live_server, **REALTIME_ONLY)) as handle:
        status = handle.daemon.realtime_status
        drift, _ = parts(handle.daemon)
        await wait_until(lambda: status.state == State.WAITING_FOR_READINESS, what="the join reply")
        await wait_until(lambda: drift.passes >= 1, what="the start-up pass")  # so only readiness can find them
        ids = [(await insert(live_db, f"in the gap {n}"))[0] for n in range(5)]
        for project in ids[:2]:
            await update(live_db, project, "updated in the gap")
        await live_server.flush()
        # Read from the slot while nobody was subscribed: gone, as on the real server.
        assert live_server.events_sent == 0 and len(live_server.changes) == 7
        assert status.state == State.WAITING_FOR_READINESS, "readiness came before the writes: test too slow"
        await finish(live_db)
        assert status.readiness == 1 and realtime_events(handle) == 0
        assert metric(handle, "vector_sync_drift_rows_total") >= 5
        later, _ = await insert(live_db, "after readiness")
        await wait_until(lambda: realtime_events(handle) == 1, what="a change after readiness")
        await finish(live_db)
    assert later not in ids


# ------------------------------------------------------------------------------------------ unit: parse_realtime


TS = "2026-03-01T12:00:00.123Z"
TS_EPOCH = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC).timestamp()
COLUMNS = [{"name": "id", "type": "int8"}, {"name": "name", "type": "text"}, {"name": "version", "type": "int8"}]


def data(op: str = "INSERT", **fields: Any) -> dict[str, Any]:
    """A `postgres_changes` data object as in realtime-protocol.md sections 4.1 and 6."""
    values: dict[str, Any] = {
        "columns": COLUMNS,
        "commit_timestamp": TS,
        "errors": None,
        "schema": "public",
        "table": "projects",
        "type": op,
    }
    if op != "DELETE":
        values["record"] = {"id": 17, "name": "paid", "version": 3}
    if op != "INSERT":
        values["old_record"] = {"id": 17}
    values.update(fields)
    return values


def parse(raw: object, kind: IdKind = IdKind.BIGINT, id_column: str = "id") -> ChangeEvent | Truncated:
    return parse_realtime(raw, kind=kind, table="projects", schema="public", id_column=id_column)


@pytest.mark.parametrize(
    ("op", "expected_version"),
    [("INSERT", 3), ("UPDATE", 3), ("DELETE", None)],
)
def test_parse_realtime_insert_update_delete(op: str, expected_version: int | None) -> None:
    event = parse(data(op))
    assert isinstance(event, ChangeEvent)
    assert (event.project_id, event.version, event.op, event.source) == (
        "17",
        expected_version,
        Op(op),
        Source.REALTIME,
    )
    assert event.committed_at == pytest.approx(TS_EPOCH)


def test_parse_realtime_delete_reads_the_old_record() -> None:
    full_identity = parse(data("DELETE", old_record={"id": 17, "name": "paid", "version": 4}))
    assert isinstance(full_identity, ChangeEvent) and full_identity.version == 4
    # An UPDATE reads the new record, not the old one.
    update_event = parse(data("UPDATE", old_record={"id": 99, "version": 1}))
    assert isinstance(update_event, ChangeEvent) and (update_event.project_id, update_event.version) == ("17", 3)
    # The type arrives as realtime-py's enum member (a str subclass); lower case is accepted too.
    assert isinstance(parse(data("insert")), ChangeEvent)


@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        (IdKind.UUID, "8B2E5C1A-0D4F-4E7B-9C3A-1F2E3D4C5B6A", "8b2e5c1a-0d4f-4e7b-9c3a-1f2e3d4c5b6a"),
        (IdKind.TEXT, "project-\u00e9", "project-\u00e9"),
        (IdKind.TEXT, 42, "42"),
        (IdKind.BIGINT, 2**63 - 1, str(2**63 - 1)),
        (IdKind.BIGINT, -5, "-5"),
        (IdKind.BIGINT, "17", "17"),
        (IdKind.INTEGER, 2**31 - 1, str(2**31 - 1)),
    ],
)
def test_parse_realtime_id_kinds(kind: IdKind, raw: object, expected: str) -> None:
    event = parse(data(record={"id": raw, "version": 1}), kind=kind)
    assert isinstance(event, ChangeEvent) and event.project_id == expected


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        (IdKind.UUID, "not-a-uuid"),
        (IdKind.UUID, 17),
        (IdKind.TEXT, ""),
        (IdKind.TEXT, "a\x00b"),
        (IdKind.BIGINT, 2**63),
        (IdKind.BIGINT, 1.5),
        (IdKind.BIGINT, True),
        (IdKind.BIGINT, None),
        (IdKind.INTEGER, 2**31),
    ],
)
def test_parse_realtime_bad_ids(kind: IdKind, raw: object) -> None:
    with pytest.raises(MalformedEvent):
        parse(data(record={"id": raw, "version": 1}), kind=kind)


def test_parse_realtime_id_column() -> None:
    event = parse(data(record={"project_key": "k-1", "id": 5, "version": 2}), kind=IdKind.TEXT, id_column="project_key")
    assert isinstance(event, ChangeEvent) and event.project_id == "k-1"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"table": "orders"}, "another table"),
        ({"schema": "private"}, "another table"),
        ({"table": None}, "another table"),
        ({"type": "TRUNCATE"}, "type is not"),
        ({"type": None}, "type is not"),
        ({"record": None}, "record is missing"),
        ({"record": []}, "record is missing"),
        ({"record": {"id": 17}}, "version"),
        ({"record": {"id": 17, "version": 0}}, "version"),
        ({"record": {"id": 17, "version": -1}}, "version"),
        ({"record": {"id": 17, "version": "3"}}, "version"),
        ({"record": {"id": 17, "version": True}}, "version"),
        ({"record": {"id": 17, "version": 2**63}}, "version"),
        ({"record": {"id": 17, "version": 3.0}}, "version"),
        ({"errors": []}, None),  # an empty error list is no error: a normal event
    ],
)
def test_parse_realtime_refuses_wrong_shapes(fields: dict[str, Any], reason: str | None) -> None:
    if reason is None:
        assert isinstance(parse(data(**fields)), ChangeEvent)
        return
    with pytest.raises(MalformedEvent, match=reason):
        parse(data(**fields))


def test_parse_realtime_missing_records() -> None:
    without_record = data()
    del without_record["record"]
    with pytest.raises(MalformedEvent, match="record is missing"):
        parse(without_record)
    without_old = data("DELETE")
    del without_old["old_record"]
    with pytest.raises(MalformedEvent, match="old_record is missing"):
        parse(without_old)
    for raw in (None, [], "data", 17):
        with pytest.raises(MalformedEvent, match="not an object"):
            parse(raw)


def test_parse_realtime_413_truncated() -> None:
    errors = [ERROR_413]
    # id and version survived the 64-byte cut: a plain event.
    event = parse(data("UPDATE", errors=errors, record={"id": 17, "version": 9}))
    assert isinstance(event, ChangeEvent) and (event.project_id, event.version) == ("17", 9)
    # Only the id survived.
    assert parse(data("UPDATE", errors=errors, record={"id": 17, "name": "n"})) == Truncated(
        ProjectId("17"), (ERROR_413,)
    )
    assert parse(data(errors=errors, record={"id": 17, "version": "x" * 70})) == Truncated(
        ProjectId("17"), (ERROR_413,)
    )
    # Not even the id (a text id over 64 bytes), or no record at all.
    assert parse(data(errors=errors, record={"name": "n", "version": 2})) == Truncated(None, (ERROR_413,))
    assert parse(data(errors=errors, record={"id": 2**64, "version": 2})) == Truncated(None, (ERROR_413,))
    assert parse(data(errors=errors, record=None)) == Truncated(None, (ERROR_413,))
    assert parse(data("DELETE", errors=errors, old_record={})) == Truncated(None, (ERROR_413,))
    # What a 400/401 error event carries (realtime-py drops these before any callback).
    for text in (ERROR_400, ERROR_401):
        raw = data(errors=[text], columns=[], commit_timestamp=None, record={})
        assert parse(raw) == Truncated(None, (text,))
    # The other table's truncated event is still another table's.
    with pytest.raises(MalformedEvent, match="another table"):
        parse(data(errors=errors, table="orders", record={}))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (TS, TS_EPOCH),
        ("2026-03-01T12:00:00.123+00:00", TS_EPOCH),
        ("2026-03-01T14:00:00.123+02:00", TS_EPOCH),
        ("2026-03-01T12:00:00Z", TS_EPOCH - 0.123),
        (None, None),
        ("yesterday", None),
        ("", None),
        (1772366400, None),
    ],
)
def test_parse_realtime_commit_timestamp(raw: object, expected: float | None) -> None:
    event = parse(data(commit_timestamp=raw))
    assert isinstance(event, ChangeEvent)
    assert event.committed_at == (pytest.approx(expected) if expected is not None else None)
    absent = data()
    del absent["commit_timestamp"]
    event = parse(absent)
    assert isinstance(event, ChangeEvent) and event.committed_at is None


# ------------------------------------------------------------------------------------------ unit: the callbacks


class FakeSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_offers = False

    def offer(self, event: ChangeEvent) -> None:
        if self.fail_offers:
            raise RuntimeError("sink broken")
        self.calls.append(("offer", event))

    def malformed(self, source: Source, reason: str) -> None:
        self.calls.append(("malformed", (source, reason)))

    def request_drift(self, reason: str) -> None:
        self.calls.append(("request_drift", reason))

    def request_recent(self, reason: str) -> None:
        self.calls.append(("request_recent", reason))

    def recheck(self, project_id: ProjectId, reason: str) -> None:
        self.calls.append(("recheck", project_id))

    def source_state(self, source: Source, live: bool) -> None:
        self.calls.append(("source_state", (source, live)))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


def source_with(sink: FakeSink) -> RealtimeSource:
    return RealtimeSource(
        "http://127.0.0.1:9", "key", sink, id_kind=IdKind.BIGINT, schema="public", table="projects", id_column="id"
    )


def test_on_change_offers_an_event() -> None:
    sink = FakeSink()
    source = source_with(sink)
    source._on_change({"ids": [1], "data": data()})
    assert sink.kinds() == ["offer"]
    event = sink.calls[0][1]
    assert (event.project_id, event.version, event.source) == ("17", 3, Source.REALTIME)
    assert source.status.last_event_at is not None and source.status.error_events == {}


def test_on_change_413_with_id_and_version_is_an_event() -> None:
    sink = FakeSink()
    source = source_with(sink)
    source._on_change({"ids": [1], "data": data("UPDATE", errors=[ERROR_413], record={"id": 17, "version": 4})})
    assert sink.kinds() == ["offer"] and sink.calls[0][1].version == 4
    assert source.status.error_events == {"413": 1}


def test_on_change_413_with_only_the_id_rechecks_the_row() -> None:
    sink = FakeSink()
    source = source_with(sink)
    source._on_change({"ids": [1], "data": data("UPDATE", errors=[ERROR_413], record={"id": 17, "name": "n"})})
    assert sink.calls == [("recheck", "17")]
    assert source.status.error_events == {"413": 1}


def test_on_change_413_without_an_id_asks_for_a_recent_pass() -> None:
    sink = FakeSink()
    source = source_with(sink)
    source._on_change({"ids": [1], "data": data("UPDATE", errors=[ERROR_413], record={"name": "n"})})
    assert source.status.error_events == {"413": 1}
    assert sink.kinds() == ["request_recent"], f"asked for {sink.calls}"


@pytest.mark.parametrize(
    "payload",
    [
        None,
        "payload",
        {"ids": [1]},
        {"ids": [1], "data": data(table="orders")},
        {"ids": [1], "data": data(record={"id": "seventeen", "version": 1})},
        {"ids": [1], "data": data(record={"id": 17})},
    ],
)
def test_on_change_counts_malformed_payloads(payload: object) -> None:
    sink = FakeSink()
    source_with(sink)._on_change(payload)
    assert sink.kinds() == ["malformed"] and sink.calls[0][1][0] is Source.REALTIME


def test_on_change_never_raises_into_the_library() -> None:
    sink = FakeSink()
    sink.fail_offers = True
    source_with(sink)._on_change({"ids": [1], "data": data()})
    assert sink.calls == [("malformed", (Source.REALTIME, "unexpected RuntimeError while parsing"))]


def error_frame(text: str, topic: str = "realtime:t") -> dict[str, Any]:
    """A 400/401 error event as realtime-protocol.md section 6 shows it."""
    payload = {"ids": [1], "data": data(errors=[text], columns=[], commit_timestamp=None, record={})}
    return {"ref": None, "event": "postgres_changes", "payload": payload, "topic": topic}


@pytest.mark.parametrize(("text", "code"), [(ERROR_400, "400"), (ERROR_401, "401"), ("Error 500: ?", "other")])
def test_an_error_event_without_a_row_asks_for_a_recent_pass(text: str, code: str) -> None:
    sink = FakeSink()
    source = source_with(sink)
    source._on_dropped_frame(error_frame(text), realtime_module._Trouble())
    assert source.status.error_events == {code: 1}
    assert sink.kinds() == ["request_recent"], f"asked for {sink.calls}"


def test_dropped_frames_that_are_not_error_events() -> None:
    sink = FakeSink()
    source = source_with(sink)
    trouble = realtime_module._Trouble()
    disconnect = {"extension": "system", "message": "Server requested disconnect", "status": "ok"}
    source._on_dropped_frame({"ref": None, "event": "system", "payload": disconnect, "topic": "realtime:t"}, trouble)
    assert sink.calls == [] and not trouble.event.is_set()
    source._on_dropped_frame({"event": "surprise", "payload": {}, "topic": "realtime:t"}, trouble)
    source._on_dropped_frame({"event": "postgres_changes", "payload": "nope", "topic": "realtime:t"}, trouble)
    assert sink.kinds() == ["malformed", "malformed"] and source.status.error_events == {}
    assert not trouble.event.is_set()


def test_the_library_log_line_reaches_the_route_of_its_topic() -> None:
    """realtime-py logs a frame it cannot validate as `Unrecognized message format <repr>\\n<error>`; the
    handler parses it back and hands it to the session that owns the topic (two sessions here)."""
    realtime_module._install_library_handler()
    seen: dict[str, list[dict[str, Any]]] = {"realtime:unit-a": [], "realtime:unit-b": []}
    for topic, frames in seen.items():
        realtime_module._library_frames.routes[topic] = frames.append
    library = logging.getLogger("realtime._async.client")
    raw = '{"ref":null,"event":"postgres_changes","payload":{"ids":[1],"data":{"commit_timestamp":null}},"topic":"%s"}'
    try:
        library.error(f"Unrecognized message format {(raw % 'realtime:unit-a')!r}\n1 validation error for tagged-union")
        library.error(f"Unrecognized message format {(raw % 'realtime:unit-b')!r}\nerror")
        library.error(f"Unrecognized message format {(raw % 'realtime:unit-b')!r}")  # no error text
        library.error(f"Unrecognized message format {(raw % 'realtime:nobody')!r}\nerror")
    finally:
        for topic in seen:
            realtime_module._library_frames.routes.pop(topic, None)
    assert [frame["topic"] for frame in seen["realtime:unit-a"]] == ["realtime:unit-a"]
    assert [frame["topic"] for frame in seen["realtime:unit-b"]] == ["realtime:unit-b"] * 2
    assert seen["realtime:unit-a"][0]["payload"]["data"] == {"commit_timestamp": None}
