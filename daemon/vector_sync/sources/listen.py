"""LISTEN on a dedicated connection: the trigger's change notifications (channel vector_sync) and
the webhook reconciler's "a change is waiting in pending_webhooks" (channel vector_sync_pending).

Notifications sent while the connection is down are gone for good, so every (re)connect asks the
database (a drift pass, a pending drain). The connection runs no queries of its own while idle.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Mapping

import asyncpg
from loguru import logger

from vector_sync.aio import backoff, wait_first, wait_or_stop
from vector_sync.events import IdKind, MalformedEvent, Source, parse_notify
from vector_sync.ports import EventSink

CHANNEL = "vector_sync"
PENDING_CHANNEL = "vector_sync_pending"
# A connection that stays up this long resets the reconnect back-off; one that drops sooner (a
# pooler or idle timeout closing it at once) keeps backing off instead of reconnecting in a loop.
STABLE_SECONDS = 30.0
# TCP keepalive on the LISTEN socket: a half-open link (a NAT or proxy that forgot the connection)
# is noticed in about a minute, without a single query.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3


def enable_keepalive(conn: asyncpg.Connection) -> bool:
    """Turn on TCP keepalive for the connection's socket; False where there is none (Unix socket)."""
    transport = getattr(conn, "_transport", None)  # asyncpg exposes no public handle to the socket
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return True


class PgListener:
    """One LISTEN connection for any number of channels, reconnected with back-off.

    `on_connect` runs after every (re)connect, once the channels are listened to: whatever was
    notified while the connection was down is lost, so callers ask the database there.
    """

    def __init__(
        self,
        dsn: str,
        channels: Mapping[str, Callable[[str], None]],
        *,
        on_connect: Callable[[], None],
        on_disconnect: Callable[[], None],
    ) -> None:
        self._dsn = dsn
        self._channels = dict(channels)
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            try:
                conn = await asyncpg.connect(
                    self._dsn, server_settings={"application_name": "vector-sync-listen"}, timeout=10
                )
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                delay = backoff(attempt)
                attempt += 1
                logger.warning(
                    "listen: cannot connect ({error}); retry {attempt} in {delay:.1f}s",
                    error=type(exc).__name__,
                    attempt=attempt,
                    delay=delay,
                )
                if await wait_or_stop(stop, delay):
                    return
                continue
            connected = time.monotonic()
            await self._listen(conn, stop)
            if time.monotonic() - connected >= STABLE_SECONDS:
                attempt = 0
            elif not stop.is_set():
                delay = backoff(attempt)
                attempt += 1
                if await wait_or_stop(stop, delay):
                    return

    async def _listen(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        enable_keepalive(conn)
        connected = False
        try:
            for channel, handler in self._channels.items():
                await conn.add_listener(channel, _payload_only(handler))
            connected = True
            self._on_connect()
            await wait_first(stop, lost)
            if lost.is_set():
                logger.warning("listen: connection lost; reconnecting")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.warning("listen: connection failed ({error}); reconnecting", error=type(exc).__name__)
        finally:
            if connected:
                self._on_disconnect()
            if not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), timeout=5)
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    conn.terminate()


def _payload_only(handler: Callable[[str], None]) -> Callable[[object, int, str, object], None]:
    def on_notification(_conn: object, _pid: int, _channel: str, payload: object) -> None:
        handler(str(payload))

    return on_notification


class ListenSource:
    """The trigger's change notifications as events."""

    def __init__(self, sink: EventSink, id_kind: IdKind) -> None:
        self._sink = sink
        self._id_kind = id_kind

    def on_connect(self) -> None:
        self._sink.source_state(Source.LISTEN, True)
        # Anything notified before this point is lost: the database must tell us.
        self._sink.request_drift("listen connected")

    def on_disconnect(self) -> None:
        self._sink.source_state(Source.LISTEN, False)

    def on_notification(self, payload: str) -> None:
        try:
            event = parse_notify(payload, kind=self._id_kind)
        except MalformedEvent as exc:
            self._sink.malformed(Source.LISTEN, exc.reason)
            return
        self._sink.offer(event)
