"""The drift pass: the database says which rows have a missing or outdated vector.

Runs at start-up and whenever a source asks (a reconnect, a readiness, a full scheduler). Requests
that arrive during a pass coalesce into one more pass after it. Pages are keyset-ordered by id and
the pass waits for room in the scheduler instead of growing memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from loguru import logger

from vector_sync.aio import backoff, wait_first, wait_or_stop
from vector_sync.events import ChangeEvent, Op, Source
from vector_sync.scheduler import Scheduler
from vector_sync.store import DATABASE_ERRORS, Store

PAGE_SIZE = 2000


class DriftPass:
    def __init__(
        self,
        store: Store,
        scheduler: Scheduler,
        offer: Callable[[ChangeEvent], object],
        *,
        on_found: Callable[[int], None] | None = None,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self._store = store
        self._scheduler = scheduler
        self._offer = offer
        self._on_found = on_found
        self._page_size = page_size
        self._requested = asyncio.Event()
        self._reasons: list[str] = []
        self.passes = 0

    def request(self, reason: str) -> None:
        if reason not in self._reasons:
            self._reasons.append(reason)
        self._requested.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Run a pass each time one is requested, until `stop`."""
        failures = 0
        while not stop.is_set():
            await wait_first(self._requested, stop)
            if stop.is_set():
                return
            self._requested.clear()
            reasons, self._reasons = self._reasons, []
            try:
                await self.run_once(", ".join(reasons) or "requested", stop=stop)
                failures = 0
            except DATABASE_ERRORS as exc:
                # Unreachable, or e.g. a statement timeout on a large table: back off and try again.
                failures += 1
                delay = backoff(failures, first=1.0, cap=60.0)
                logger.warning(
                    "drift pass failed ({error}); again in {delay:.1f}s",
                    error=type(exc).__name__,
                    delay=delay,
                )
                self.request("retry after failure")
                if await wait_or_stop(stop, delay):
                    return

    async def run_once(
        self,
        reason: str = "requested",
        progress: Callable[[int], None] | None = None,
        stop: asyncio.Event | None = None,
    ) -> int:
        """One full pass; returns how many rows it found missing or behind (so far, if stopped)."""
        started = time.monotonic()
        stop = stop or asyncio.Event()
        found = 0
        after: str | None = None
        while not stop.is_set():
            page = await self._store.drift_page(after, self._page_size)
            for project_id, version in page:
                while not self._scheduler.has_room and not stop.is_set():
                    await wait_first(self._scheduler.room, stop)
                if stop.is_set():
                    break
                self._offer(ChangeEvent(project_id, version, Op.UPDATE, Source.DRIFT))
            found += len(page)
            if progress is not None:
                progress(found)
            if len(page) < self._page_size:
                break
            after = page[-1][0]
        self.passes += 1
        if self._on_found is not None:
            self._on_found(found)
        logger.info(
            "drift pass found {rows} rows missing or behind in {took_ms:.0f}ms ({reason})",
            rows=found,
            took_ms=(time.monotonic() - started) * 1000,
            reason=reason,
        )
        return found
