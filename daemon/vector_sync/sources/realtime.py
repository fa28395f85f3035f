"""Supabase Realtime `postgres_changes`: the primary stream, behind a supervisor of our own.

Realtime delivers at most once and replays nothing, and realtime-py 2.34.1 loses events silently
in several ways (see `docs/design.md`, "Realtime"). So each client is disposable: one client, one
socket, one channel with a topic name never used before. Anything unhealthy (socket closed, the
client's receive task ended, CLOSED / TIMED_OUT / CHANNEL_ERROR, no readiness in time, a system
error, no pong) ends the session and the supervisor builds the next one after a capped, jittered
back-off. The library's own reconnect is off: after it gives up it stays down without a word.

The feed is live only on the server's readiness message (`system`, extension `postgres_changes`,
status ok), never on the library's SUBSCRIBED, which comes before the server listens. Each
readiness asks for a drift pass, since everything before it was lost.
"""

from __future__ import annotations

import ast
import asyncio
import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from realtime import (
    AsyncRealtimeChannel,
    AsyncRealtimeClient,
    RealtimePostgresChangesListenEvent,
    RealtimeSubscribeStates,
)

from vector_sync.aio import backoff, wait_first, wait_or_stop
from vector_sync.events import IdKind, MalformedEvent, Source, Truncated, parse_realtime
from vector_sync.ports import EventSink

# A session that stayed live this long resets the back-off.
STABLE_SECONDS = 30.0
# Our own keepalive: websockets' default (20 s + 20 s) notices a frozen link only after ~50 s.
PING_INTERVAL = 10.0
PING_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0
LIBRARY_LOGGER = "realtime"
_UNRECOGNIZED = "Unrecognized message format "


class State:
    """What the supervisor is doing; exported as a label, so the values are stable."""

    CONNECTING = "connecting"
    JOINING = "joining"
    WAITING_FOR_READINESS = "waiting_for_readiness"
    LIVE = "live"
    BACKING_OFF = "backing_off"
    STOPPED = "stopped"

    ALL = (CONNECTING, JOINING, WAITING_FOR_READINESS, LIVE, BACKING_OFF, STOPPED)


@dataclass
class RealtimeStatus:
    """The source's counters, kept without knowing about Prometheus (metrics.py exports them)."""

    state: str = State.STOPPED
    generation: int = 0
    sessions_failed: int = 0
    readiness: int = 0
    last_event_at: float | None = None  # monotonic
    last_error: str | None = None
    error_events: dict[str, int] = field(default_factory=dict)

    def count_error_event(self, kind: str) -> None:
        self.error_events[kind] = self.error_events.get(kind, 0) + 1

    def last_event_age(self) -> float | None:
        return None if self.last_event_at is None else time.monotonic() - self.last_event_at


class SessionEnded(Exception):
    """Why a session is no longer healthy; the message goes to the log."""


class _Trouble:
    """The first reason a session went bad; callbacks set it, the session loop waits on it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            self.event.set()


class _LibraryFrames(logging.Handler):
    """Frames realtime-py refuses to parse reach us only through its log: route them by topic.

    The library drops error events (`commit_timestamp: null`) and the "Server requested disconnect"
    system message this way. Its other warnings and errors go to our log at debug level: the
    supervisor logs what matters once, in its own words.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.routes: dict[str, Callable[[dict[str, Any]], None]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if text.startswith(_UNRECOGNIZED):
                frame = _frame_from_log(text)
                route = self.routes.get(str(frame.get("topic"))) if frame is not None else None
                if route is None and len(self.routes) == 1:
                    # No usable topic (not JSON, not an object): it can only be our one session's.
                    route = next(iter(self.routes.values()))
                if route is not None:
                    route(frame if frame is not None else {})
                    return
            logger.debug("realtime library: {message}", message=text.splitlines()[0][:500])
        except Exception:  # a log handler must never raise into the library's receive task
            self.handleError(record)


def _frame_from_log(text: str) -> dict[str, Any] | None:
    literal = text[len(_UNRECOGNIZED) :].split("\n", 1)[0]
    try:
        raw = ast.literal_eval(literal)
        frame = json.loads(raw)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        return None
    return frame if isinstance(frame, dict) else None


_library_frames = _LibraryFrames()


def _install_library_handler() -> None:
    library = logging.getLogger(LIBRARY_LOGGER)
    if _library_frames not in library.handlers:
        library.addHandler(_library_frames)


class RealtimeSource:
    def __init__(
        self,
        url: str,
        key: str,
        sink: EventSink,
        *,
        id_kind: IdKind,
        schema: str,
        table: str,
        id_column: str,
        status: RealtimeStatus | None = None,
        ready_timeout: float = 30.0,
        join_timeout: int = 10,
        max_backoff: float = 30.0,
    ) -> None:
        self._url = url.rstrip("/") + "/realtime/v1"
        self._key = key
        self._sink = sink
        self._id_kind = id_kind
        self._schema = schema
        self._table = table
        self._id_column = id_column
        self.status = status or RealtimeStatus()
        self._ready_timeout = ready_timeout
        self._join_timeout = join_timeout
        self._max_backoff = max_backoff
        # Topics are never reused: a rejoin on a topic the server still holds ends in phx_close
        # for the new channel (Phoenix's duplicate-join order), which realtime-py takes as CLOSED.
        self._topic_prefix = f"vector-sync-{table}-{secrets.token_hex(3)}"
        self._generations = itertools.count(1)

    async def run(self, stop: asyncio.Event) -> None:
        _install_library_handler()
        attempt = 0
        try:
            while not stop.is_set():
                generation = next(self._generations)
                self.status.generation = generation
                live_for = await self._session(generation, stop)
                if stop.is_set():
                    return
                if live_for is not None and live_for >= STABLE_SECONDS:
                    attempt = 0
                delay = backoff(attempt, first=1.0, cap=self._max_backoff)
                attempt += 1
                self._set_state(State.BACKING_OFF)
                logger.info("realtime: next session in {delay:.1f}s", delay=delay)
                if await wait_or_stop(stop, delay):
                    return
        finally:
            self._set_state(State.STOPPED)

    async def _session(self, generation: int, stop: asyncio.Event) -> float | None:
        """One client from connect to its end; returns how long it was live (None: never)."""
        sub_topic = f"{self._topic_prefix}-{generation}"
        topic = f"realtime:{sub_topic}"
        trouble = _Trouble()
        ready = asyncio.Event()
        live_since: float | None = None
        client = AsyncRealtimeClient(
            self._url, token=self._key, auto_reconnect=False, max_retries=1, timeout=self._join_timeout
        )
        _library_frames.routes[topic] = lambda frame: self._on_dropped_frame(frame, trouble)
        ping: asyncio.Task[None] | None = None
        try:
            channel = self._channel(client, sub_topic, trouble, ready)
            self._set_state(State.CONNECTING)
            try:
                async with asyncio.timeout(self._join_timeout + 5):
                    await client.connect()
            except Exception as exc:  # the library raises bare Exception, InvalidStatus, OSError, …
                raise SessionEnded(f"cannot connect: {type(exc).__name__}: {exc}") from None
            self._watch_receive_task(client, trouble)
            ping = asyncio.create_task(self._keepalive(client, trouble), name=f"vector-sync-realtime-ping-{generation}")
            self._set_state(State.JOINING)
            async with asyncio.timeout(self._join_timeout + 5):
                await channel.subscribe(lambda state, error: self._on_subscribe_state(state, error, trouble))
            self._set_state(State.WAITING_FOR_READINESS)
            await wait_first(ready, trouble.event, stop, timeout=self._ready_timeout)
            if stop.is_set():
                return None
            if not ready.is_set():
                raise SessionEnded(trouble.reason or f"no readiness within {self._ready_timeout:.0f}s")
            live_since = time.monotonic()
            await wait_first(trouble.event, stop)
            if trouble.event.is_set():
                raise SessionEnded(trouble.reason)
            return time.monotonic() - live_since
        except SessionEnded as ended:
            self.status.sessions_failed += 1
            self.status.last_error = str(ended)
            logger.warning(
                "realtime: session {generation} ended: {reason}",
                generation=generation,
                reason=str(ended),
            )
            return None if live_since is None else time.monotonic() - live_since
        except TimeoutError:
            self.status.sessions_failed += 1
            self.status.last_error = "join timed out"
            logger.warning("realtime: session {generation} ended: join timed out", generation=generation)
            return None
        finally:
            self._sink.source_state(Source.REALTIME, False)
            _library_frames.routes.pop(topic, None)
            if ping is not None:
                ping.cancel()
            await self._close(client, half_open=trouble.reason.startswith("no pong"))

    def _channel(
        self, client: AsyncRealtimeClient, sub_topic: str, trouble: _Trouble, ready: asyncio.Event
    ) -> AsyncRealtimeChannel:
        channel = client.channel(sub_topic)
        for event in (
            RealtimePostgresChangesListenEvent.Insert,
            RealtimePostgresChangesListenEvent.Update,
            RealtimePostgresChangesListenEvent.Delete,
        ):
            channel.on_postgres_changes(event, self._on_change, table=self._table, schema=self._schema)
        channel.on_system(lambda message: self._on_system(message, trouble, ready))
        self._guard_frames(channel)
        return channel

    def _guard_frames(self, channel: AsyncRealtimeChannel) -> None:
        """A frame the channel fails to handle is dropped, not allowed to end the client's receive task.

        realtime 2.34.1 handles each frame inside its receive loop: a presence meta without `phx_ref`
        (optional in its own types) raises KeyError there and ends the session. We use no presence,
        so such a frame is junk to us: counted and logged like any malformed frame.
        """
        handle = channel._handle_message  # private method of the pinned realtime 2.34.1

        def guarded(message: Any) -> None:
            try:
                handle(message)
            except Exception as exc:
                event = str(getattr(message, "event", "?"))[:40]
                self._sink.malformed(Source.REALTIME, f"{event} frame the client cannot handle ({type(exc).__name__})")
                if event == "postgres_changes":
                    self._sink.request_recent("a change frame the client could not handle")

        channel._handle_message = guarded  # type: ignore[method-assign]

    # ---------------------------------------------------------------- callbacks: never raise, never block

    def _on_change(self, payload: Any) -> None:
        try:
            self.status.last_event_at = time.monotonic()
            data = payload.get("data") if isinstance(payload, dict) else None
            parsed = parse_realtime(
                data, kind=self._id_kind, table=self._table, schema=self._schema, id_column=self._id_column
            )
            if isinstance(parsed, Truncated):
                self._on_truncated(parsed)
                return
            if isinstance(data, dict) and data.get("errors"):
                self.status.count_error_event(_error_kind(data["errors"]))
            self._sink.offer(parsed)
        except MalformedEvent as exc:
            self._sink.malformed(Source.REALTIME, exc.reason)
        except Exception as exc:  # a raise here would end realtime-py's receive task in silence
            self._sink.malformed(Source.REALTIME, f"unexpected {type(exc).__name__} while parsing")

    def _on_truncated(self, truncated: Truncated) -> None:
        self.status.count_error_event(_error_kind(list(truncated.errors)))
        if truncated.project_id is not None:
            self._sink.recheck(truncated.project_id, "realtime event without a version")
        else:
            self._sink.request_recent("realtime event without an id")

    def _on_system(self, message: Any, trouble: _Trouble, ready: asyncio.Event) -> None:
        try:
            extension = getattr(message, "extension", None)
            status = getattr(message, "status", None)
            text = getattr(message, "message", "")
            if extension == "postgres_changes" and status == "ok":
                first = not ready.is_set()
                ready.set()
                self.status.readiness += 1
                self._set_state(State.LIVE)
                self._sink.source_state(Source.REALTIME, True)
                # Everything committed before this message was not sent to us.
                self._sink.request_drift("realtime ready" if first else "realtime re-subscribed")
            elif status != "ok":
                trouble.set(f"system error from {extension}: {text}")
        except Exception as exc:
            trouble.set(f"unexpected {type(exc).__name__} in the system callback")

    def _on_subscribe_state(self, state: RealtimeSubscribeStates, error: Exception | None, trouble: _Trouble) -> None:
        try:
            if state == RealtimeSubscribeStates.SUBSCRIBED:
                logger.debug("realtime: join accepted; waiting for the server's readiness")
            else:
                detail = f": {error}" if error is not None else ""
                trouble.set(f"channel {state.value if hasattr(state, 'value') else state}{detail}")
        except Exception as exc:
            trouble.set(f"unexpected {type(exc).__name__} in the subscribe callback")

    def _on_dropped_frame(self, frame: dict[str, Any], trouble: _Trouble) -> None:
        payload = frame.get("payload")
        event = frame.get("event")
        if event == "postgres_changes" and isinstance(payload, dict):
            data = payload.get("data")
            errors = data.get("errors") if isinstance(data, dict) else None
            if errors:
                # 400/401 error events carry no row: only the database can say what changed.
                self.status.count_error_event(_error_kind(errors))
                self.status.last_event_at = time.monotonic()
                logger.warning(
                    "realtime: error event without a row ({errors}); checking the rows changed since the last pass",
                    errors=errors,
                )
                self._sink.request_recent("realtime error event")
                return
        if event == "system" and isinstance(payload, dict) and payload.get("message") == "Server requested disconnect":
            logger.info("realtime: server requested disconnect")
            return
        if not isinstance(event, str):
            self._sink.malformed(Source.REALTIME, "frame that is not a Phoenix message")
            return
        self._sink.malformed(Source.REALTIME, f"unrecognized {event[:40]} frame")

    # ---------------------------------------------------------------- health

    @staticmethod
    def _watch_receive_task(client: AsyncRealtimeClient, trouble: _Trouble) -> None:
        # Private attribute of the pinned realtime 2.34.1: its receive task can end without a callback.
        task: asyncio.Task[None] | None = client._listen_task
        if task is None:
            trouble.set("the client has no receive task")
            return

        def ended(done: asyncio.Task[None]) -> None:
            error = None if done.cancelled() else done.exception()
            trouble.set(f"the client's receive task ended ({type(error).__name__ if error else 'no error'})")

        task.add_done_callback(ended)

    @staticmethod
    async def _keepalive(client: AsyncRealtimeClient, trouble: _Trouble) -> None:
        while not trouble.event.is_set():
            await asyncio.sleep(PING_INTERVAL)
            connection = client._ws_connection
            if connection is None:
                trouble.set("socket closed")
                return
            try:
                pong = await connection.ping()
                async with asyncio.timeout(PING_TIMEOUT):
                    await pong
            except TimeoutError:
                trouble.set(f"no pong within {PING_TIMEOUT:.0f}s (a half-open link?)")
                return
            except Exception as exc:
                trouble.set(f"ping failed: {type(exc).__name__}")
                return

    async def _close(self, client: AsyncRealtimeClient, *, half_open: bool) -> None:
        listen = client._listen_task
        connection = client._ws_connection
        if half_open and connection is not None:
            # A closing handshake over a dead link only ends in the close timeout: drop the socket.
            connection.transport.abort()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await client.close()
        except Exception as exc:
            # Cut short, client.close() never reached its own clean-up: do it, or the old
            # session's receive task would live on and call the old callbacks.
            logger.debug("realtime: close failed: {error}", error=repr(exc))
            if connection is not None:
                connection.transport.abort()
            if listen is not None:
                listen.cancel()
        if listen is not None and listen.done() and not listen.cancelled():
            listen.exception()  # retrieved: it was reported through the trouble reason

    def _set_state(self, state: str) -> None:
        if self.status.state != state:
            logger.info("realtime: {state} (session {generation})", state=state, generation=self.status.generation)
            self.status.state = state


def _error_kind(errors: object) -> str:
    text = " ".join(str(error) for error in errors) if isinstance(errors, list) else str(errors)
    for code in ("413", "400", "401"):
        if f"Error {code}" in text:
            return code
    return "other"


class _ProbeSink:
    """An EventSink that only notices readiness (for `vector-sync check`)."""

    def __init__(self) -> None:
        self.live = asyncio.Event()

    def offer(self, event: object) -> None:
        pass

    def malformed(self, source: Source, reason: str) -> None:
        pass

    def request_drift(self, reason: str) -> None:
        pass

    def request_recent(self, reason: str) -> None:
        pass

    def recheck(self, project_id: object, reason: str) -> None:
        pass

    def source_state(self, source: Source, live: bool) -> None:
        if live:
            self.live.set()


async def probe(url: str, key: str, *, schema: str, table: str, timeout: float) -> float:
    """Connect, join and wait for the server's readiness once; seconds it took, or SessionEnded."""
    sink = _ProbeSink()
    source = RealtimeSource(
        url, key, sink, id_kind=IdKind.TEXT, schema=schema, table=table, id_column="id", ready_timeout=timeout
    )
    stop = asyncio.Event()
    started = time.monotonic()
    session = asyncio.create_task(source._session(1, stop))
    try:
        await asyncio.wait(
            [session, asyncio.ensure_future(sink.live.wait())],
            timeout=timeout + 20,
            return_when=asyncio.FIRST_COMPLETED,
        )
        took = time.monotonic() - started
    finally:
        stop.set()
        await asyncio.gather(session, return_exceptions=True)
    if not sink.live.is_set():
        raise SessionEnded(source.status.last_error or "no readiness")
    return took
