"""The Realtime supervisor under faults, with writes going on while the feed is down.

Each test runs the daemon against the Realtime test server and embedded Postgres (wal_level =
logical), lets a background writer insert, update and delete rows of `public.projects` every
50-100 ms, injects one fault mid-stream, and waits until the daemon is live again: a readiness
message in a session of a higher generation. Then every row must end embedded at its latest version
(the drift pass requested at readiness finds what the outage hid) and no (id, version) may have been
written twice (a trigger records each write in `test_audit.writes`).

The time from injection to live again is printed as `RECOVERY <fault> <seconds>` (run with `-s`).
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import asyncpg
import pytest
from realtime_server import RealtimeServer
from support import RunningDaemon, all_current, realtime_settings, running, stored, twice_written, wait_until
from vector_sync.events import Source
from vector_sync.sources.realtime import PING_INTERVAL, PING_TIMEOUT, State
from vector_sync.store import content_text, sha256_hex

# realtime-py 2.34.1 reads ConnectionClosed.code (deprecated in websockets 15) on its error path; with
# filterwarnings=error that warning would be raised inside its receive task. Production only prints it.
pytestmark = pytest.mark.filterwarnings(r"ignore:ConnectionClosed\.(code|reason) is deprecated:DeprecationWarning")

# Generous: the machine is shared. The slowest fault (20 s of refused handshakes, then a back-off
# of up to 16 s) recovers in well under a minute.
DEADLINE = 60.0
SEED_ROWS = 10
WRITES_AFTER_LIVE = 5
RESTARTING = "RealtimeRestarting: Realtime is restarting, please standby"
REFUSAL_SECONDS = 20.0  # longer than realtime-py's own retry budget (about 15 s)

recoveries: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _recovery_table() -> Iterator[None]:
    yield
    if recoveries:
        print("\nRealtime recovery times (injection → live again):")
        for fault, seconds in recoveries.items():
            print(f"  {fault:<28} {seconds:6.2f} s")


def report(fault: str, seconds: float) -> None:
    recoveries[fault] = seconds
    print(f"\nRECOVERY {fault} {seconds:.2f}")


# ------------------------------------------------------------------------------------------ writer


class Writer:
    """Inserts, updates and deletes rows of public.projects on its own connection, every 50-100 ms."""

    def __init__(self, dsn: str, ids: list[int], seed: str) -> None:
        self._dsn = dsn
        self.ids = list(ids)
        self._rng = random.Random(zlib.crc32(seed.encode()))
        self.writes = 0
        self._stop = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._conn = await asyncpg.connect(self._dsn)
        self._task = asyncio.create_task(self._run(self._conn), name="test-writer")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        try:
            if self._task is not None:
                await asyncio.wait_for(self._task, timeout=30)
        finally:
            if self._conn is not None:
                await self._conn.close()

    async def _run(self, conn: asyncpg.Connection) -> None:
        while not self._stop.is_set():
            await self._write(conn)
            self.writes += 1
            await asyncio.sleep(self._rng.uniform(0.05, 0.1))

    async def _write(self, conn: asyncpg.Connection) -> None:
        n = self.writes
        roll = self._rng.random()
        if len(self.ids) < SEED_ROWS // 2 or roll < 0.35:
            self.ids.append(await insert(conn, f"w{n}"))
        elif roll < 0.85:
            await conn.execute(
                "update projects set description = $2 where id = $1", self._rng.choice(self.ids), f"u{n}"
            )
        else:
            victim = self.ids.pop(self._rng.randrange(len(self.ids)))
            await conn.execute("delete from projects where id = $1", victim)

    def _alive(self) -> None:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # raises what ended it
            raise AssertionError("the writer stopped early")

    async def more(self, count: int) -> None:
        """Wait until `count` more writes have been committed."""
        target = self.writes + count
        await wait_until(lambda: self._alive() or self.writes >= target, timeout=30, what=f"{count} more writes")


async def insert(conn: asyncpg.Connection, name: str) -> int:
    return int(await conn.fetchval("insert into projects (name, description) values ($1, 'd') returning id", name))


# ------------------------------------------------------------------------------------------ daemon


@dataclass(frozen=True)
class Mark:
    """The daemon's counters just before a fault."""

    at: float
    generation: int
    readiness: int
    sessions_failed: int
    passes: int
    writes: int


def is_live(handle: RunningDaemon) -> bool:
    intake = handle.daemon.intake
    return intake is not None and intake.live.get(Source.REALTIME) is True


def mark(handle: RunningDaemon, writer: Writer | None = None) -> Mark:
    status = handle.daemon.realtime_status
    assert handle.daemon.drift is not None
    return Mark(
        at=time.monotonic(),
        generation=status.generation,
        readiness=status.readiness,
        sessions_failed=status.sessions_failed,
        passes=handle.daemon.drift.passes,
        writes=0 if writer is None else writer.writes,
    )


async def steady(handle: RunningDaemon, db: asyncpg.Connection) -> list[int]:
    """Live, with SEED_ROWS rows embedded; returns their ids."""
    await wait_until(lambda: is_live(handle), timeout=DEADLINE, what="the first readiness")
    ids = [await insert(db, f"seed{n}") for n in range(SEED_ROWS)]
    await wait_until(lambda: all_current(db), timeout=DEADLINE, what="the seed rows embedded")
    return ids


async def back_live(handle: RunningDaemon, before: Mark) -> float:
    """Seconds from `before` until a later session is live (its readiness arrived)."""
    status = handle.daemon.realtime_status
    await wait_until(
        lambda: is_live(handle) and status.generation > before.generation and status.readiness > before.readiness,
        timeout=DEADLINE,
        what="the daemon live again in a new session",
    )
    return time.monotonic() - before.at


async def settled(handle: RunningDaemon, db: asyncpg.Connection, before: Mark) -> None:
    drift = handle.daemon.drift
    assert drift is not None
    await wait_until(lambda: drift.passes > before.passes, timeout=DEADLINE, what="the drift pass after readiness")
    await wait_until(lambda: all_current(db), timeout=DEADLINE, what="every row embedded at its latest version")
    assert await twice_written(db) == []
    status = handle.daemon.realtime_status
    assert status.sessions_failed > before.sessions_failed
    assert status.state == State.LIVE


async def recover(
    fault: str,
    handle: RunningDaemon,
    db: asyncpg.Connection,
    writer: Writer,
    inject: Callable[[], object],
) -> Mark:
    """Inject mid-stream, wait until live again, a few more writes; returns the mark before the fault."""
    await writer.more(3)
    before = mark(handle, writer)
    inject()
    took = await back_live(handle, before)
    assert writer.writes > before.writes, "no write happened during the outage"
    await writer.more(WRITES_AFTER_LIVE)
    report(fault, took)
    return before


# ------------------------------------------------------------------------------------------ faults


def close_with(code: int, *, announce: bool) -> Callable[[RealtimeServer], None]:
    def inject(server: RealtimeServer) -> None:
        # announce: "Server requested disconnect" on each joined channel before the close frame.
        assert server.disconnect(code, announce=announce) == 1

    return inject


def abort(server: RealtimeServer) -> None:
    assert server.abort() == 1


def phx_error(server: RealtimeServer) -> None:
    assert server.send_phx_error() == 1


def system_error(server: RealtimeServer) -> None:
    assert server.send_system_error() == 1


def refuse_reconnects(server: RealtimeServer) -> None:
    server.refuse_connections(REFUSAL_SECONDS)
    assert server.disconnect(1012) == 1


def drop_next_join_reply(server: RealtimeServer) -> None:
    server.drop_join_replies(1)
    assert server.disconnect(1012) == 1


def refuse_next_join(server: RealtimeServer) -> None:
    server.fail_joins(RESTARTING, count=1)
    assert server.disconnect(1012) == 1


FAULTS: dict[str, Callable[[RealtimeServer], None]] = {
    "close-1000": close_with(1000, announce=True),
    "close-1001": close_with(1001, announce=True),
    "close-1011": close_with(1011, announce=True),
    "close-1012": close_with(1012, announce=True),
    "close-1000-unannounced": close_with(1000, announce=False),
    "close-1011-unannounced": close_with(1011, announce=False),
    "tcp-abort": abort,
    "phx-error": phx_error,
    "system-error": system_error,
    "join-reply-dropped": drop_next_join_reply,
    "join-refused-once": refuse_next_join,
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_recovers_from(
    fault: str, live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    async with running(realtime_settings(live_dsn, live_server)) as handle:
        ids = await steady(handle, live_db)
        async with Writer(live_dsn, ids, fault) as writer:
            before = await recover(fault, handle, live_db, writer, lambda: FAULTS[fault](live_server))
        await settled(handle, live_db, before)
        status = handle.daemon.realtime_status
        if fault == "join-reply-dropped":
            assert status.sessions_failed >= before.sessions_failed + 2
            assert status.last_error == "channel TIMED_OUT"
            assert recoveries[fault] >= 10.0  # realtime-py's join timeout, as the daemon sets it
        elif fault == "join-refused-once":
            assert status.sessions_failed >= before.sessions_failed + 2
            assert status.last_error is not None and "RealtimeRestarting" in status.last_error
        elif fault == "system-error":
            # realtime-py reports a system error as CHANNEL_ERROR before the system callback sees it.
            assert status.last_error is not None and "Too many database timeouts" in status.last_error


@pytest.mark.timeout(180)
async def test_recovers_from_a_frozen_link(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    """Half-open: nothing arrives, nothing is read. Only the daemon's own ping can tell."""
    noticed: list[float] = []

    async with running(realtime_settings(live_dsn, live_server)) as handle:
        ids = await steady(handle, live_db)

        async def watch_for_down() -> None:
            await wait_until(lambda: not is_live(handle), timeout=DEADLINE, what="the frozen link noticed")
            noticed.append(time.monotonic())

        async with Writer(live_dsn, ids, "freeze") as writer:
            await writer.more(3)
            before = mark(handle, writer)
            assert live_server.freeze() == 1
            watcher = asyncio.create_task(watch_for_down())
            took = await back_live(handle, before)
            await watcher
            live_server.thaw()
            assert writer.writes > before.writes
            await writer.more(WRITES_AFTER_LIVE)
        report("frozen-link", took)
        await settled(handle, live_db, before)
        status = handle.daemon.realtime_status
        assert status.last_error is not None and "no pong" in status.last_error
    detected = noticed[0] - before.at
    print(f"DETECTED frozen-link {detected:.2f}")
    assert detected <= PING_INTERVAL + PING_TIMEOUT + 5.0


@pytest.mark.timeout(180)
async def test_recovers_after_refused_reconnects(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    """Handshakes are refused (503) for longer than realtime-py would retry on its own."""
    async with running(realtime_settings(live_dsn, live_server)) as handle:
        ids = await steady(handle, live_db)
        async with Writer(live_dsn, ids, "refused") as writer:
            before = await recover(
                "refused-reconnects-20s", handle, live_db, writer, lambda: refuse_reconnects(live_server)
            )
        await settled(handle, live_db, before)
        assert live_server.refused_handshakes >= 3
        assert recoveries["refused-reconnects-20s"] >= REFUSAL_SECONDS - 0.5


async def test_writes_before_a_slow_readiness_are_found(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    """Between the join reply and the readiness the server sends nothing: the drift pass finds those writes."""
    async with running(realtime_settings(live_dsn, live_server)) as handle:
        ids = await steady(handle, live_db)
        status = handle.daemon.realtime_status
        async with Writer(live_dsn, ids, "slow readiness") as writer:
            await writer.more(3)
            before = mark(handle, writer)
            live_server.readiness_delay = 3.0
            assert live_server.disconnect(1012) == 1
            await wait_until(
                lambda: status.generation > before.generation and status.state == State.WAITING_FOR_READINESS,
                timeout=DEADLINE,
                what="the new session's join accepted",
            )
            window = [await insert(live_db, f"window{n}") for n in range(3)]
            for project in ids[:3]:
                await live_db.execute("update projects set description = 'in the window' where id = $1", project)
            # Still before the readiness: the server had no subscribed channel for these changes.
            assert status.state == State.WAITING_FOR_READINESS and live_server.subscribed() == 0
            took = await back_live(handle, before)
            await writer.more(WRITES_AFTER_LIVE)
        report("slow-readiness-3s", took)
        await settled(handle, live_db, before)
        stored = await live_db.fetchval(
            "select count(*) from vector_sync.project_embeddings where project_id = any($1::bigint[])", window
        )
        assert stored == len(window)


async def test_a_missing_readiness_rebuilds_the_session(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    """The join is accepted but the CDC side never comes up: after the ready timeout, a new session."""
    settings = realtime_settings(live_dsn, live_server, VECTOR_SYNC_REALTIME_READY_TIMEOUT=3)
    async with running(settings) as handle:
        ids = await steady(handle, live_db)
        status = handle.daemon.realtime_status
        async with Writer(live_dsn, ids, "no readiness") as writer:
            await writer.more(3)
            before = mark(handle, writer)
            live_server.readiness_enabled = False
            assert live_server.disconnect(1012) == 1
            await wait_until(
                lambda: status.last_error == "no readiness within 3s",
                timeout=DEADLINE,
                what="a session ended for want of readiness",
            )
            assert not is_live(handle)
            live_server.readiness_enabled = True
            took = await back_live(handle, before)
            await writer.more(WRITES_AFTER_LIVE)
        report("no-readiness-3s-timeout", took)
        await settled(handle, live_db, before)
        assert status.sessions_failed >= before.sessions_failed + 2


async def test_a_row_deleted_while_the_feed_was_down_keeps_its_new_lifes_edits(
    live_db: asyncpg.Connection, live_dsn: str, live_server: RealtimeServer
) -> None:
    """Realtime alone: DELETEs committed during an outage never arrive, and a re-inserted row's versions
    start again at 1. Its new life's edits must not be taken for the old life's (found by the fault storm:
    a row stayed at version 1 of its new life after an edit to 2)."""
    settings = realtime_settings(live_dsn, live_server, VECTOR_SYNC_SOURCES="realtime")
    async with running(settings) as handle:
        ids = await steady(handle, live_db)
        reinserted_in_gap, reinserted_after = ids[0], ids[1]
        for n in range(4):  # both rows' first life reaches version 5, embedded
            await live_db.execute("update projects set description = $2 where id = any($1)", ids[:2], f"old{n}")
        await wait_until(lambda: all_current(live_db), timeout=DEADLINE, what="the first lives embedded")
        assert await live_db.fetchval("select min(version) from projects where id = any($1)", ids[:2]) == 5
        status = handle.daemon.realtime_status
        drift = handle.daemon.drift
        assert drift is not None
        before_gap = mark(handle)
        live_server.readiness_enabled = False
        assert live_server.disconnect(1012) == 1
        await wait_until(
            lambda: status.generation > before_gap.generation and status.state == State.WAITING_FOR_READINESS,
            timeout=DEADLINE,
            what="the new session's join accepted, no readiness yet",
        )
        # The gap: nothing is sent for these.
        await live_db.execute("delete from projects where id = any($1)", ids[:2])
        await live_db.execute("insert into projects (id, name, description) values ($1, 'new life', 'v1')", ids[0])
        assert live_server.subscribed() == 0
        live_server.readiness_enabled = True
        assert live_server.resubscribe() == 1
        await back_live(handle, before_gap)
        await wait_until(lambda: drift.passes > before_gap.passes, timeout=DEADLINE, what="the drift pass done")
        await wait_until(lambda: all_current(live_db), timeout=DEADLINE, what="the new life's version 1 embedded")
        # After readiness every change is sent: the new lives' edits are news, not old versions.
        await live_db.execute("update projects set description = 'v2' where id = $1", reinserted_in_gap)
        await live_db.execute(
            "insert into projects (id, name, description) values ($1, 'new life', 'v1')", reinserted_after
        )
        await live_db.execute("update projects set description = 'v2' where id = $1", reinserted_after)
        await wait_until(lambda: all_current(live_db), timeout=DEADLINE, what="the new lives' edits embedded")
        rows = await live_db.fetch("select id, name, description from projects where id = any($1) order by id", ids[:2])
        texts = {row["id"]: sha256_hex(content_text([row["name"], row["description"]])) for row in rows}
        embedded = await stored(live_db)
        assert {project: embedded[project] for project in ids[:2]} == {
            project: (2, texts[project]) for project in ids[:2]
        }
