"""The leader lease: one daemon per source table embeds; any other is a hot standby.

A session-level Postgres advisory lock, held on a dedicated connection. Postgres releases it the
moment that connection ends, so a leader that dies (kill -9, a lost host) frees it at once, and a
standby polling every `poll` seconds takes over within that time. A leader whose lease connection
drops must stop embedding at once: it cannot know whether another instance already won. (A write
it still makes is refused or harmless: every write is version-guarded.)
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

import asyncpg
from loguru import logger

from vector_sync.aio import backoff, wait_or_stop
from vector_sync.config import TableName
from vector_sync.sources.listen import enable_keepalive
from vector_sync.store import DATABASE_ERRORS

POLL_SECONDS = 2.0


def lease_key(table: TableName) -> int:
    """A stable 64-bit advisory lock key per source table (two tables, two leaders)."""
    digest = hashlib.sha256(f"vector-sync lease {table.schema}.{table.name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Lease:
    def __init__(self, dsn: str, table: TableName, *, poll: float = POLL_SECONDS) -> None:
        self._dsn = dsn
        self._key = lease_key(table)
        self._poll = poll
        self._conn: asyncpg.Connection | None = None
        self.lost = asyncio.Event()

    async def acquire(self, stop: asyncio.Event, *, waiting: Callable[[], None] = lambda: None) -> bool:
        """Wait until this instance holds the lease (True) or `stop` is set (False).

        `waiting` is called once, when the first attempt did not win.
        """
        failures = 0
        announced = False
        first = True
        while not stop.is_set():
            try:
                if await self._try_lock():
                    assert self._conn is not None
                    self.lost.clear()
                    self._conn.add_termination_listener(lambda _conn: self.lost.set())
                    return True
                failures = 0
                if not announced:
                    logger.info("standby: another instance holds the lease; polling every {poll:.0f}s", poll=self._poll)
                    announced = True
                delay = self._poll
            except DATABASE_ERRORS as exc:
                await self._drop()
                failures += 1
                delay = backoff(failures, first=1.0, cap=self._poll * 5)
                logger.warning("lease: cannot reach the database ({error})", error=type(exc).__name__)
            if first:
                first = False
                waiting()
            if await wait_or_stop(stop, delay):
                break
        return False

    async def try_acquire(self) -> bool:
        """One attempt: True when this process now holds the lease (for one-shot commands)."""
        held = await self._try_lock()
        if not held:
            await self._drop()
        return held

    async def _try_lock(self) -> bool:
        conn = await self._connection()
        return bool(await conn.fetchval("select pg_try_advisory_lock($1)", self._key))

    async def release(self) -> None:
        """Give the lease up (a clean stop): a standby takes over at its next poll."""
        await self._drop()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                self._dsn, server_settings={"application_name": "vector-sync-lease"}, timeout=10
            )
            # A half-open link to the database is noticed without queries (the leader runs none).
            enable_keepalive(self._conn)
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=5)
            except (*DATABASE_ERRORS, TimeoutError):
                conn.terminate()
