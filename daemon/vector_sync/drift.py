"""The drift pass: the database says which rows have a missing or outdated vector.

Three sizes of question, each answered by the database, never by the events:
- a full pass compares the whole table (start-up, every readiness or reconnect, a full scheduler);
- a recent pass reads the change log for transactions the last pass could not see yet (the safety
  interval, an error event that named no row): an index range scan, cheap on any table size;
- a re-check looks at a few named rows (an event that carried an id but no version).
Requests that arrive during a pass coalesce into one more pass after it. Pages are keyset-ordered
by id and the pass waits for room in the scheduler instead of growing memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from loguru import logger

from vector_sync.aio import backoff, wait_first, wait_or_stop
from vector_sync.events import ChangeEvent, Op, ProjectId, Source
from vector_sync.scheduler import Scheduler
from vector_sync.store import DATABASE_ERRORS, Store

PAGE_SIZE = 2000
# A recent pass that finds more changed ids than this runs as a full pass instead: a keyset walk
# is cheaper than a huge id list, and memory stays bounded.
RECENT_LIMIT = 50_000
# Ids waiting for a re-check beyond this become a full pass.
RECHECK_LIMIT = 10_000
# The change log is pruned after a pass at most this often (where pg_cron does not do it).
PRUNE_EVERY = 3600.0


class DriftPass:
    def __init__(
        self,
        store: Store,
        scheduler: Scheduler,
        offer: Callable[[ChangeEvent], object],
        *,
        on_found: Callable[[int], None] | None = None,
        page_size: int = PAGE_SIZE,
        prune_log: bool = False,
    ) -> None:
        self._store = store
        self._scheduler = scheduler
        self._offer = offer
        self._on_found = on_found
        self._page_size = page_size
        self._prune_log = prune_log
        self._last_prune = time.monotonic()
        self._requested = asyncio.Event()
        self._full: list[str] = []
        self._recent: list[str] = []
        self._ids: set[str] = set()
        # The xmin of the last pass's first snapshot: later transactions are in the change log.
        self._watermark: int | None = None
        self.passes = 0
        self.recent_passes = 0

    def request(self, reason: str) -> None:
        """Ask for a full pass."""
        if reason not in self._full:
            self._full.append(reason)
        self._requested.set()

    def request_recent(self, reason: str) -> None:
        """Ask for the changes since the last pass (a full pass when there was none)."""
        if reason not in self._recent:
            self._recent.append(reason)
        self._requested.set()

    def recheck(self, project_id: ProjectId, reason: str) -> None:
        """Ask whether one row's vector is behind."""
        if len(self._ids) >= RECHECK_LIMIT:
            self.request(f"more than {RECHECK_LIMIT} rows to re-check")
            return
        self._ids.add(project_id)
        self._requested.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Answer requests as they come, until `stop`."""
        failures = 0
        while not stop.is_set():
            await wait_first(self._requested, stop)
            if stop.is_set():
                return
            self._requested.clear()
            full, self._full = self._full, []
            recent, self._recent = self._recent, []
            ids, self._ids = self._ids, set()
            try:
                if full or (recent and self._watermark is None):
                    await self.run_once(", ".join(full + recent), stop=stop)
                else:
                    if recent:
                        await self.run_recent(", ".join(recent), stop=stop)
                    if ids:
                        await self._check(sorted(ids), stop)
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
                self._full.extend(reason for reason in full if reason not in self._full)
                self._recent.extend(reason for reason in recent if reason not in self._recent)
                self._ids |= ids
                if not (full or recent or ids):
                    self._full.append("retry after failure")
                self._requested.set()
                if await wait_or_stop(stop, delay):
                    return
                continue
            await self._maybe_prune()

    async def run_every(self, interval: float, stop: asyncio.Event) -> None:
        """The safety interval: a recent pass every `interval` seconds, for drops no event reveals."""
        while not await wait_or_stop(stop, interval):
            self.request_recent("safety interval")

    async def run_once(
        self,
        reason: str = "requested",
        progress: Callable[[int], None] | None = None,
        stop: asyncio.Event | None = None,
    ) -> int:
        """One full pass; returns how many rows it found missing or behind (so far, if stopped)."""
        started = time.monotonic()
        stop = stop or asyncio.Event()
        watermark = await self._store.snapshot_xmin()
        found = 0
        after: str | None = None
        while not stop.is_set():
            page = await self._store.drift_page(after, self._page_size)
            await self._offer_all(page, stop)
            found += len(page)
            if progress is not None:
                progress(found)
            if len(page) < self._page_size:
                break
            after = page[-1][0]
        if not stop.is_set():
            self._watermark = watermark
        self.passes += 1
        self._report(found, "drift pass", started, reason)
        return found

    async def run_recent(self, reason: str, stop: asyncio.Event | None = None) -> int:
        """The rows changed since the last pass whose vector is behind; returns how many."""
        assert self._watermark is not None
        started = time.monotonic()
        stop = stop or asyncio.Event()
        watermark = await self._store.snapshot_xmin()
        changed = await self._store.changed_since(self._watermark, RECENT_LIMIT + 1)
        if len(changed) > RECENT_LIMIT:
            return await self.run_once(f"{reason}; over {RECENT_LIMIT} rows changed", stop=stop)
        found = await self._check(changed, stop)
        if not stop.is_set():
            self._watermark = watermark
        self.recent_passes += 1
        self._report(found, f"recent pass over {len(changed)} changed rows", started, reason)
        return found

    async def _check(self, ids: list[str], stop: asyncio.Event) -> int:
        found = 0
        for start in range(0, len(ids), self._page_size):
            stale = await self._store.stale_among(ids[start : start + self._page_size])
            await self._offer_all(stale, stop)
            found += len(stale)
        return found

    async def _offer_all(self, rows: Iterable[tuple[ProjectId, int]], stop: asyncio.Event) -> None:
        for project_id, version in rows:
            while not self._scheduler.has_room and not stop.is_set():
                await wait_first(self._scheduler.room, stop)
            if stop.is_set():
                return
            self._offer(ChangeEvent(project_id, version, Op.UPDATE, Source.DRIFT))

    async def _maybe_prune(self) -> None:
        """Prune the change log at most once an hour; a failure waits for the next hour and never
        repeats the pass that just succeeded."""
        if not self._prune_log or time.monotonic() - self._last_prune < PRUNE_EVERY:
            return
        self._last_prune = time.monotonic()
        try:
            deleted = await self._store.prune_change_log()
        except DATABASE_ERRORS as exc:
            logger.warning("pruning the change log failed ({error}); next try in an hour", error=type(exc).__name__)
            return
        logger.info("pruned {rows} change log rows older than the retention", rows=deleted)

    def _report(self, found: int, what: str, started: float, reason: str) -> None:
        if self._on_found is not None:
            self._on_found(found)
        logger.info(
            "{what} found {rows} rows missing or behind in {took_ms:.0f}ms ({reason})",
            what=what,
            rows=found,
            took_ms=(time.monotonic() - started) * 1000,
            reason=reason,
        )
