"""Per-project state: dedupe by version, settle delays, and the hand-off of due ids to the pipeline.

States per id (design.md): idle (a cached "done" version), pending (target version, due time) and in
flight (target version, plus the newest version that arrived meanwhile). Pure in-memory logic with an
injectable clock; the only awaits are for "something is due" and "there is room".

Every duplicate this drops rests on one assumption: the versions compared belong to the same life of
the row. Versions start again at 1 after a delete and re-insert, so a DELETE the daemon never saw (a
Realtime outage, an error event) leaves an old life's version behind, and the new life's edits would
look old. Hence `forget` when a source may have lost events, and a second look at a row read gone or
younger than the version it was taken for when duplicates were dropped during that batch.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from loguru import logger

from vector_sync.aio import wait_first
from vector_sync.events import ChangeEvent, Op, ProjectId, Source

Clock = Callable[[], float]

# Drift-pass events come from the database itself: they are the truth, so they are never dropped as
# duplicates of a cached "done" version (which may be wrong after a delete and re-insert).
AUTHORITATIVE_SOURCES = frozenset({Source.DRIFT})

# A row edited again while it settles waits a settle delay after its latest edit, so a burst of edits is
# embedded once, after the burst; but never longer than this many settle delays after its first edit,
# so a row edited without pause is still embedded now and then.
SETTLE_CAP = 5


class Offer(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    CANCELLED = "cancelled"
    FULL = "full"


@dataclass(slots=True)
class _Pending:
    target: int
    due: float
    committed_at: float | None
    attempt: int = 0
    since: float = 0.0


@dataclass(slots=True)
class _InFlight:
    target: int
    committed_at: float | None
    token: int
    epoch: int  # the scheduler's epoch when taken: what it learns belongs to that epoch
    attempt: int = 0
    newer: int | None = None  # a newer version arrived while embedding: run again after
    newer_due: float = 0.0  # ... once that version has settled
    dropped: int | None = None  # the highest version dropped as a duplicate meanwhile
    deleted: bool = False  # deleted while embedding: whatever this batch stores is already gone


@dataclass(frozen=True, slots=True)
class Due:
    """An id handed to the pipeline. `token` ties `done`/`retry_later` to this hand-off only, so a
    batch that finishes late cannot settle the same id taken again by another batch."""

    project_id: ProjectId
    target: int
    committed_at: float | None
    attempt: int
    token: int


class Scheduler:
    def __init__(
        self,
        *,
        insert_delay: float,
        update_delay: float,
        max_pending: int,
        clock: Clock = time.monotonic,
        done_cache_size: int | None = None,
    ) -> None:
        self._insert_delay = insert_delay
        self._update_delay = update_delay
        self._max_pending = max_pending
        self._clock = clock
        self._done_cache_size = done_cache_size or max_pending
        self._pending: dict[ProjectId, _Pending] = {}
        self._in_flight: dict[ProjectId, _InFlight] = {}
        self._done: OrderedDict[ProjectId, int] = OrderedDict()
        # INSERTs dropped as duplicates, by version. An INSERT's versions start again at 1, so one that
        # looks old may be a new life of the id, with the old life's DELETE still on its way (a retried
        # webhook): when that DELETE comes, the row is looked at again.
        self._inserts_dropped: OrderedDict[ProjectId, int] = OrderedDict()
        self._heap: list[tuple[float, int, ProjectId]] = []
        self._sequence = 0
        # Moves on at every `forget`: batches taken before it may have read another life of their row.
        self._epoch = 0
        self._changed = asyncio.Event()
        self.room = asyncio.Event()
        """Set while there is room for new ids."""
        self.room.set()
        self._last_full_log = -1e9
        self.counts: dict[str, int] = {offer.value: 0 for offer in Offer}

    # --- sizes, for metrics and tests -------------------------------------------------------

    @property
    def limit(self) -> int:
        return self._max_pending

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def in_flight_count(self) -> int:
        return len(self._in_flight)

    @property
    def has_room(self) -> bool:
        return len(self._pending) + len(self._in_flight) < self._max_pending

    def oldest_pending_since(self) -> float | None:
        """When the longest-waiting pending id was first offered (clock time), for the age metric."""
        return min((pending.since for pending in self._pending.values()), default=None)

    def is_idle(self) -> bool:
        return not self._pending and not self._in_flight

    def stalled(self, attempts: int) -> bool:
        """Nothing in flight, and every pending id has already failed `attempts` times."""
        return (
            not self._in_flight
            and bool(self._pending)
            and all(pending.attempt >= attempts for pending in self._pending.values())
        )

    # --- intake ------------------------------------------------------------------------------

    def offer(self, event: ChangeEvent) -> Offer:
        """Take an event; never blocks and never raises for a well-typed event."""
        result = self._offer(event)
        self.counts[result.value] += 1
        if result is Offer.DUPLICATE and event.op is Op.INSERT and event.version is not None:
            self._inserts_dropped[event.project_id] = event.version
            self._inserts_dropped.move_to_end(event.project_id)
            while len(self._inserts_dropped) > self._done_cache_size:
                self._inserts_dropped.popitem(last=False)
        return result

    def _offer(self, event: ChangeEvent) -> Offer:
        key = event.project_id
        if event.op is Op.DELETE:
            return self._offer_delete(key)
        version = event.version
        assert version is not None, "only DELETE events may lack a version"
        authoritative = event.source in AUTHORITATIVE_SOURCES
        flight = self._in_flight.get(key)
        if flight is not None:
            offer = self._offer_in_flight(flight, version, authoritative or flight.epoch != self._epoch)
            if offer is Offer.ACCEPTED:
                flight.newer_due = self._clock() + self._delay(event)
            return offer
        pending = self._pending.get(key)
        if pending is not None:
            if version > pending.target:
                pending.target = version
                self._settle_again(key, pending, self._delay(event))
                return Offer.ACCEPTED
            return Offer.DUPLICATE
        done = self._done.get(key)
        if done is not None and version <= done and not authoritative:
            self._done.move_to_end(key)
            return Offer.DUPLICATE
        if not self.has_room:
            return self._refuse_for_room()
        self._add_pending(key, _Pending(version, self._clock() + self._delay(event), event.committed_at))
        return Offer.ACCEPTED

    def _delay(self, event: ChangeEvent) -> float:
        if event.source in AUTHORITATIVE_SOURCES:
            return 0.0  # the change is already old
        return self._insert_delay if event.op is Op.INSERT else self._update_delay

    def _settle_again(self, key: ProjectId, pending: _Pending, delay: float) -> None:
        """Move `pending`'s due time to a settle delay after now, within SETTLE_CAP delays of its start."""
        settled = min(self._clock() + delay, pending.since + SETTLE_CAP * delay)
        if settled > pending.due:
            pending.due = settled
            self._sequence += 1
            heapq.heappush(self._heap, (settled, self._sequence, key))  # the earlier entry is now stale

    def _offer_delete(self, key: ProjectId) -> Offer:
        # A delete carries no order against a re-insert (whose versions start again at 1): a late
        # DELETE (a retried webhook, a pending drain) may follow the new row's INSERT. So it drops
        # nothing queued: the batch reads the row, and a row that is gone settles without a call.
        self._done.pop(key, None)
        reinserted = self._inserts_dropped.pop(key, None)
        flight = self._in_flight.get(key)
        if flight is not None:
            # The batch may have read the row before the delete; the store's guard refuses its
            # write, and any later event for the id counts as new.
            flight.deleted = True
            if reinserted is not None:
                flight.newer = max(reinserted, flight.newer or 0)
        elif reinserted is not None and key not in self._pending:
            # Past the room limit if need be: no event will bring this row back (bounded by the record's size).
            self._add_pending(key, _Pending(reinserted, self._clock(), None))
        return Offer.CANCELLED

    @staticmethod
    def _offer_in_flight(flight: _InFlight, version: int, unsure: bool) -> Offer:
        """`unsure`: the event is the database's word, or the flight's target may be another life's."""
        if flight.deleted:
            flight.newer = max(version, flight.newer or 0)
            return Offer.ACCEPTED
        if version > max(flight.target, flight.newer or 0) or (unsure and flight.newer is None):
            flight.newer = max(version, flight.target)
            return Offer.ACCEPTED
        flight.dropped = max(version, flight.dropped or 0)
        return Offer.DUPLICATE

    def forget(self, project_id: ProjectId | None = None) -> None:
        """A source may have lost events, DELETEs among them: stop trusting the versions it told us.

        Drops the cached "done" versions (of one id, or all), and makes events for ids in flight count
        as news. A batch taken before this records nothing when it finishes; the pass that goes with
        the loss asks the database what is behind.
        """
        if project_id is None:
            self._done.clear()
            self._epoch += 1
            return
        self._done.pop(project_id, None)
        flight = self._in_flight.get(project_id)
        if flight is not None:
            flight.epoch = -1

    def _refuse_for_room(self) -> Offer:
        now = self._clock()
        if now - self._last_full_log >= 60:
            self._last_full_log = now
            logger.warning(
                "scheduler full ({limit} ids pending or in flight): new ids wait for the next drift pass",
                limit=self._max_pending,
            )
        return Offer.FULL

    def _add_pending(self, key: ProjectId, pending: _Pending) -> None:
        pending.since = pending.since or self._clock()
        self._pending[key] = pending
        self._sequence += 1
        heapq.heappush(self._heap, (pending.due, self._sequence, key))
        self._update_room()
        self._changed.set()

    def _update_room(self) -> None:
        if self.has_room:
            self.room.set()
        else:
            self.room.clear()

    # --- hand-off to the pipeline ------------------------------------------------------------

    def take_due(self, limit: int, horizon: float = 0.0) -> list[Due]:
        """Move up to `limit` ids due now, or within `horizon` seconds, to in flight, oldest due first."""
        now = self._clock()
        taken: list[Due] = []
        while self._heap and len(taken) < limit:
            due, _, key = self._heap[0]
            pending = self._pending.get(key)
            if pending is None or pending.due != due:
                heapq.heappop(self._heap)  # stale heap entry: cancelled or rescheduled
                continue
            if due > now + horizon:
                break
            heapq.heappop(self._heap)
            del self._pending[key]
            self._sequence += 1
            self._in_flight[key] = _InFlight(
                pending.target, pending.committed_at, self._sequence, self._epoch, pending.attempt
            )
            taken.append(Due(key, pending.target, pending.committed_at, pending.attempt, self._sequence))
        return taken

    def next_due_in(self) -> float | None:
        """Seconds until the earliest pending id is due (0 if already), None if nothing is pending."""
        while self._heap:
            due, _, key = self._heap[0]
            pending = self._pending.get(key)
            if pending is None or pending.due != due:
                heapq.heappop(self._heap)
                continue
            return max(0.0, due - self._clock())
        return None

    async def wait_due(self, stop: asyncio.Event) -> bool:
        """Wait until an id is due or `stop` is set; True when something is due.

        With nothing pending this waits on events only: no timer runs while the daemon is idle.
        """
        while not stop.is_set():
            delay = self.next_due_in()
            if delay == 0.0:
                return True
            self._changed.clear()
            await wait_first(self._changed, stop, timeout=delay)
        return False

    def _settle(self, due: Due) -> _InFlight | None:
        flight = self._in_flight.get(due.project_id)
        if flight is None or flight.token != due.token:
            return None  # already settled, or taken again by another batch: not ours to touch
        del self._in_flight[due.project_id]
        return flight

    def done(self, due: Due, stored_version: int | None, read_version: int | None) -> None:
        """The pipeline finished `due`: `stored_version` is the version it knows is stored now, or
        None when it stored nothing (row gone, or the store refused the write); `read_version` is the
        version it read (None: the row was gone)."""
        flight = self._settle(due)
        if flight is None:
            return
        key = due.project_id
        if flight.dropped is not None and flight.newer is None and (read_version or 0) < flight.target:
            # The target was committed, so a row read gone or younger than it was deleted (and perhaps
            # inserted again) behind the target's back: the events dropped as duplicates meanwhile were
            # compared against the old life, and may be the new one's. Look again.
            flight.newer, flight.newer_due = flight.dropped, self._clock()
        if flight.newer is not None:
            self._add_pending(key, _Pending(flight.newer, max(self._clock(), flight.newer_due), flight.committed_at))
            return
        if stored_version is None or flight.deleted or flight.epoch != self._epoch:
            self._done.pop(key, None)
        else:
            self._remember_done(key, stored_version)
        self._update_room()

    def retry_later(self, due: Due, delay: float) -> None:
        """Put an in-flight id back to pending after a failure that may pass."""
        flight = self._settle(due)
        if flight is None:
            return
        if flight.deleted:
            if flight.newer is None:
                self._update_room()
                return
            target = flight.newer  # a new life of the id: its own versions only
        else:
            target = max(flight.target, flight.newer or 0)
        self._add_pending(
            due.project_id, _Pending(target, self._clock() + delay, flight.committed_at, flight.attempt + 1)
        )

    def _remember_done(self, key: ProjectId, version: int) -> None:
        # What the store holds now, not the largest version seen: after a re-insert it is lower.
        self._done[key] = version
        self._done.move_to_end(key)
        while len(self._done) > self._done_cache_size:
            self._done.popitem(last=False)

    def drain_all(self) -> list[ProjectId]:
        """At shutdown: forget every pending id and return them (the next start's drift pass has them)."""
        left = list(self._pending) + list(self._in_flight)
        self._pending.clear()
        self._heap.clear()
        return left
