"""Draining `pending_webhooks`: changes whose webhook failed every attempt, handed over by the database.

A drain claims open rows (FOR UPDATE SKIP LOCKED, so two daemons never take the same row), asks
for a re-check of each row (the database, not the logged event, says what to embed: the logged
change may be a DELETE older than the row's re-insert), and marks a row resolved only once the
database shows the change embedded (or the row deleted, or dead-lettered at its text). Until then it looks again with a
growing pause; a claim it never settles (a crash) expires after five minutes and is taken again.
Drains run at start-up, after each Realtime readiness, when the reconciler notifies
`vector_sync_pending`, after the LISTEN connection comes back (a notification may have been
missed), and when a claim another daemon left behind expires. While nothing is pending it runs no
queries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from loguru import logger

from vector_sync.aio import backoff, wait_first, wait_or_stop
from vector_sync.events import ProjectId
from vector_sync.store import DATABASE_ERRORS, Store

CLAIM_BATCH = 500
# Claimed changes wait for their embedding; checks start at this pause and double up to the cap.
FIRST_CHECK = 0.5
CHECK_CAP = 30.0
# More open claims than this and the drain stops claiming until some are settled.
MAX_OPEN = 10_000


class PendingDrain:
    def __init__(self, store: Store, recheck: Callable[[ProjectId, str], None]) -> None:
        self._store = store
        self._recheck = recheck
        self._requested = asyncio.Event()
        self._open: set[int] = set()  # log ids this drain claimed and has not settled
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._full = False
        self.resolved = 0

    def request(self, reason: str) -> None:
        logger.debug("pending drain requested: {reason}", reason=reason)
        self._requested.set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        finally:
            if self._expiry_timer is not None:
                self._expiry_timer.cancel()

    async def _run(self, stop: asyncio.Event) -> None:
        failures = 0
        check_in = FIRST_CHECK
        while not stop.is_set():
            # Idle: wait for a request. With open claims: also wake up to check on them.
            await wait_first(self._requested, stop, timeout=check_in if self._open else None)
            if stop.is_set():
                return
            requested = self._requested.is_set()
            self._requested.clear()
            try:
                if requested:
                    await self._claim_all()
                settled = await self._settle()
                if settled and self._full:
                    # Claiming stopped at MAX_OPEN: settled rows made room for more.
                    self._requested.set()
                failures = 0
                check_in = FIRST_CHECK if settled or requested else min(CHECK_CAP, check_in * 2)
            except DATABASE_ERRORS as exc:
                failures += 1
                delay = backoff(failures, first=1.0, cap=60.0)
                logger.warning(
                    "pending drain failed ({error}); again in {delay:.1f}s", error=type(exc).__name__, delay=delay
                )
                self._requested.set()
                if await wait_or_stop(stop, delay):
                    return

    async def _claim_all(self) -> None:
        started = time.monotonic()
        claimed = 0
        self._full = False
        while True:
            if len(self._open) >= MAX_OPEN:
                self._full = True
                break
            wanted = min(CLAIM_BATCH, MAX_OPEN - len(self._open))
            batch = await self._store.claim_pending(wanted)
            for log_id, project_id in batch:
                self._open.add(log_id)
                self._recheck(project_id, "a webhook that failed every attempt")
            claimed += len(batch)
            if len(batch) < wanted:
                break
        if claimed:
            logger.info(
                "claimed {rows} pending webhook changes in {took_ms:.0f}ms",
                rows=claimed,
                took_ms=(time.monotonic() - started) * 1000,
            )
        # Rows another daemon claimed and never settled (it died, or lost its lease) become
        # claimable five minutes after their claim: come back then, not at the next notification.
        expiry = await self._store.foreign_claim_expiry(list(self._open))
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if expiry is not None:
            self._expiry_timer = asyncio.get_running_loop().call_later(
                expiry + 1.0, self.request, "a claim of another daemon expired"
            )

    async def _settle(self) -> int:
        if not self._open:
            return 0
        resolved = await self._store.resolve_pending(list(self._open))
        self._open.difference_update(resolved)
        self.resolved += len(resolved)
        if resolved:
            logger.info(
                "resolved {rows} pending webhook changes ({open} still open)", rows=len(resolved), open=len(self._open)
            )
        return len(resolved)
