"""The scheduler's state machine (design.md, "Scheduler state per id"), with a clock the test moves."""

from __future__ import annotations

import asyncio

import pytest
from vector_sync.events import ChangeEvent, Op, ProjectId, Source
from vector_sync.scheduler import SETTLE_CAP, Due, Offer, Scheduler


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def event(key: str, version: int | None, op: Op = Op.UPDATE, source: Source = Source.LISTEN) -> ChangeEvent:
    return ChangeEvent(ProjectId(key), version, op, source)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def scheduler(clock: Clock) -> Scheduler:
    return Scheduler(insert_delay=20, update_delay=0, max_pending=5, clock=clock)


# The last hand-off of each id, as the pipeline would hold it.
in_hand: dict[str, Due] = {}


@pytest.fixture(autouse=True)
def _clear_hand() -> None:
    in_hand.clear()


def taken(scheduler: Scheduler, limit: int = 100) -> list[tuple[str, int]]:
    dues = scheduler.take_due(limit)
    in_hand.update((due.project_id, due) for due in dues)
    return [(due.project_id, due.target) for due in dues]


def finish(scheduler: Scheduler, key: str, stored: int | None, *, read: int | None = None) -> None:
    """The batch settles `key`; it read the row at `read` (by default the version it came for)."""
    due = in_hand[key]
    scheduler.done(due, stored, due.target if read is None else read)


def test_update_is_due_at_once_insert_after_its_delay(scheduler: Scheduler, clock: Clock) -> None:
    assert scheduler.offer(event("a", 1, Op.INSERT)) is Offer.ACCEPTED
    assert scheduler.offer(event("b", 2)) is Offer.ACCEPTED
    assert taken(scheduler) == [("b", 2)]
    clock.now += 19.9
    assert taken(scheduler) == []
    clock.now += 0.1
    assert taken(scheduler) == [("a", 1)]


def test_events_at_or_below_the_known_version_are_duplicates(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 3))
    assert scheduler.offer(event("a", 3, source=Source.WEBHOOK)) is Offer.DUPLICATE
    assert scheduler.offer(event("a", 2)) is Offer.DUPLICATE
    assert taken(scheduler) == [("a", 3)]
    assert scheduler.offer(event("a", 3)) is Offer.DUPLICATE  # in flight
    finish(scheduler, "a", 3)
    assert scheduler.offer(event("a", 3, source=Source.WEBHOOK)) is Offer.DUPLICATE  # done
    assert scheduler.offer(event("a", 4)) is Offer.ACCEPTED
    assert scheduler.counts["duplicate"] == 4


def test_a_newer_version_while_pending_keeps_the_earlier_due_time(scheduler: Scheduler, clock: Clock) -> None:
    scheduler.offer(event("a", 1, Op.INSERT))
    for step in range(1, 30):
        clock.now += 1
        scheduler.offer(event("a", 1 + step))
        if clock.now >= 1020:
            break
    # Constant edits do not push the insert's due time back: no starvation.
    assert taken(scheduler) == [("a", 21)]


def test_a_burst_of_edits_settles_after_its_last_edit(clock: Clock) -> None:
    scheduler = Scheduler(insert_delay=20, update_delay=2, max_pending=5, clock=clock)
    start = clock.now
    for version in range(1, 5):  # four edits half a second apart
        scheduler.offer(event("a", version))
        clock.now += 0.5
    assert scheduler.next_due_in() == pytest.approx(start + 1.5 + 2 - clock.now)  # 2 s after the last edit
    clock.now = start + 3.4
    assert taken(scheduler) == []
    clock.now = start + 3.5
    assert taken(scheduler) == [("a", 4)]  # once, at the last version


def test_a_row_edited_without_pause_is_still_embedded(clock: Clock) -> None:
    scheduler = Scheduler(insert_delay=20, update_delay=2, max_pending=5, clock=clock)
    start = clock.now
    version = 1
    scheduler.offer(event("a", version))
    while not (dues := taken(scheduler)):
        clock.now += 1
        version += 1
        scheduler.offer(event("a", version))
    assert clock.now - start == pytest.approx(SETTLE_CAP * 2)  # held at most SETTLE_CAP settle delays
    assert dues == [("a", version)]


def test_an_edit_during_embedding_settles_before_it_goes_again(clock: Clock) -> None:
    scheduler = Scheduler(insert_delay=20, update_delay=2, max_pending=5, clock=clock)
    scheduler.offer(event("a", 1))
    clock.now += 2
    assert taken(scheduler) == [("a", 1)]
    clock.now += 0.5
    scheduler.offer(event("a", 2))  # arrives while version 1 is being embedded
    clock.now += 0.5
    finish(scheduler, "a", 1)
    assert taken(scheduler) == []  # not at once: version 2 settles first
    clock.now += 1.5
    assert taken(scheduler) == [("a", 2)]


def test_delete_keeps_what_is_pending_and_forgets_the_version(scheduler: Scheduler, clock: Clock) -> None:
    scheduler.offer(event("a", 5, Op.INSERT))
    assert scheduler.offer(event("a", None, Op.DELETE)) is Offer.CANCELLED
    clock.now += 100
    # Still handed out: the batch reads the row, and a row that is gone settles without an API call.
    assert taken(scheduler) == [("a", 5)]
    finish(scheduler, "a", None)
    # The same id inserted again starts at version 1, below what was seen before: not a duplicate.
    assert scheduler.offer(event("a", 1, Op.INSERT)) is Offer.ACCEPTED


def test_a_late_delete_does_not_cancel_the_insert_of_a_row_inserted_again(scheduler: Scheduler, clock: Clock) -> None:
    # The re-insert's INSERT arrives first, the old life's DELETE (a retried webhook) after it.
    scheduler.offer(event("a", 1, Op.INSERT))
    scheduler.offer(event("a", None, Op.DELETE))
    clock.now += 100
    assert taken(scheduler) == [("a", 1)]


def test_a_late_delete_while_in_flight_keeps_the_newer_version_it_follows(scheduler: Scheduler, clock: Clock) -> None:
    scheduler.offer(event("a", 5))
    assert taken(scheduler) == [("a", 5)]
    scheduler.offer(event("a", None, Op.DELETE))
    scheduler.offer(event("a", 1, Op.INSERT))  # the row inserted again
    scheduler.offer(event("a", None, Op.DELETE))  # the first delete, delivered twice
    finish(scheduler, "a", None)  # the old life's write was refused
    assert taken(scheduler) == []  # the new life's INSERT settles first
    clock.now += 20
    assert taken(scheduler) == [("a", 1)]


def test_a_newer_version_while_in_flight_runs_again_after(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 1))
    assert taken(scheduler) == [("a", 1)]
    assert scheduler.offer(event("a", 2)) is Offer.ACCEPTED
    assert scheduler.offer(event("a", 3)) is Offer.ACCEPTED
    assert scheduler.offer(event("a", 3)) is Offer.DUPLICATE
    assert taken(scheduler) == []  # not twice at once
    finish(scheduler, "a", 1)
    assert taken(scheduler) == [("a", 3)]
    finish(scheduler, "a", 3)
    assert scheduler.is_idle()


def test_drift_events_are_not_dropped_by_the_done_cache(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 4))
    taken(scheduler)
    finish(scheduler, "a", 4)
    assert scheduler.offer(event("a", 4)) is Offer.DUPLICATE
    # The database says the vector is behind: the cache is wrong, look again.
    assert scheduler.offer(event("a", 4, source=Source.DRIFT)) is Offer.ACCEPTED
    assert taken(scheduler) == [("a", 4)]
    # In flight, the drift pass asks for another look after this one.
    assert scheduler.offer(event("a", 4, source=Source.DRIFT)) is Offer.ACCEPTED
    finish(scheduler, "a", 4)
    assert taken(scheduler) == [("a", 4)]


def test_drift_events_have_no_settle_delay(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 1, Op.INSERT, Source.DRIFT))
    assert taken(scheduler) == [("a", 1)]


def test_a_full_scheduler_refuses_new_ids_but_not_known_ones(scheduler: Scheduler) -> None:
    for index in range(5):
        assert scheduler.offer(event(f"id{index}", 1)) is Offer.ACCEPTED
    assert not scheduler.has_room
    assert scheduler.offer(event("new", 1)) is Offer.FULL
    assert scheduler.offer(event("id0", 2)) is Offer.ACCEPTED  # already tracked: no new memory
    batch = taken(scheduler, 2)
    assert len(batch) == 2
    finish(scheduler, batch[0][0], batch[0][1])
    assert scheduler.has_room


async def test_wait_for_room_wakes_when_an_id_is_done(scheduler: Scheduler) -> None:
    for index in range(5):
        scheduler.offer(event(f"id{index}", 1))
    taken(scheduler, 1)
    waiter = asyncio.create_task(scheduler.room.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    finish(scheduler, "id0", 1)
    await asyncio.wait_for(waiter, timeout=5)


def test_retry_later_backs_off_and_counts_attempts(scheduler: Scheduler, clock: Clock) -> None:
    scheduler.offer(event("a", 1))
    (due,) = scheduler.take_due(10)
    assert due.attempt == 0
    scheduler.offer(event("a", 2))
    scheduler.retry_later(due, 30)
    clock.now += 29
    assert taken(scheduler) == []
    clock.now += 1
    (due,) = scheduler.take_due(10)
    assert (due.target, due.attempt) == (2, 1)


def test_take_due_is_earliest_due_first_and_bounded(scheduler: Scheduler, clock: Clock) -> None:
    scheduler.offer(event("insert", 1, Op.INSERT))  # due at +20
    clock.now += 5
    scheduler.offer(event("u1", 1))  # due at +5
    clock.now += 10
    scheduler.offer(event("u2", 1))  # due at +15
    clock.now += 10
    assert taken(scheduler, 2) == [("u1", 1), ("u2", 1)]
    assert taken(scheduler, 2) == [("insert", 1)]


def test_ids_due_within_the_horizon_join_the_batch(clock: Clock) -> None:
    scheduler = Scheduler(insert_delay=2, update_delay=2, max_pending=10, clock=clock)
    start = clock.now
    scheduler.offer(event("first", 1))  # due at +2.00
    clock.now += 0.03
    scheduler.offer(event("soon", 1))  # due at +2.03
    clock.now += 0.5
    scheduler.offer(event("later", 1))  # due at +2.53
    clock.now = start + 2.0
    assert [(due.project_id, due.target) for due in scheduler.take_due(10, horizon=0.05)] == [("first", 1), ("soon", 1)]
    assert scheduler.take_due(10, horizon=0.05) == []  # "later" is half a second off: it waits its turn
    assert scheduler.next_due_in() == pytest.approx(0.53)


def test_the_done_cache_is_bounded(clock: Clock) -> None:
    scheduler = Scheduler(insert_delay=0, update_delay=0, max_pending=10, clock=clock, done_cache_size=3)
    for index in range(6):
        scheduler.offer(event(f"id{index}", 1))
        taken(scheduler)
        finish(scheduler, f"id{index}", 1)
    assert scheduler.offer(event("id5", 1)) is Offer.DUPLICATE
    # Evicted from the cache: accepted again; the pipeline's hash check keeps that free.
    assert scheduler.offer(event("id0", 1)) is Offer.ACCEPTED


async def test_wait_due_wakes_on_a_new_event_and_on_stop(scheduler: Scheduler) -> None:
    stop = asyncio.Event()
    waiter = asyncio.create_task(scheduler.wait_due(stop))
    await asyncio.sleep(0)
    assert not waiter.done()
    scheduler.offer(event("a", 1))
    assert await asyncio.wait_for(waiter, timeout=5) is True
    taken(scheduler)
    waiter = asyncio.create_task(scheduler.wait_due(stop))
    await asyncio.sleep(0)
    stop.set()
    assert await asyncio.wait_for(waiter, timeout=5) is False


def test_next_due_in_reports_the_wait(scheduler: Scheduler, clock: Clock) -> None:
    assert scheduler.next_due_in() is None
    scheduler.offer(event("a", 1, Op.INSERT))
    assert scheduler.next_due_in() == 20
    clock.now += 25
    assert scheduler.next_due_in() == 0


def test_a_late_batch_cannot_settle_an_id_taken_again(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 1))
    (first,) = scheduler.take_due(10)
    scheduler.retry_later(first, 0)
    (second,) = scheduler.take_due(10)
    # The first batch's late outcome is ignored: the id stays with the second batch.
    scheduler.done(first, 1, 1)
    scheduler.retry_later(first, 0)
    assert scheduler.in_flight_count == 1 and scheduler.take_due(10) == []
    scheduler.done(second, 1, 1)
    assert scheduler.is_idle()


def test_delete_and_insert_again_while_in_flight_is_a_new_life(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 5))
    assert taken(scheduler) == [("a", 5)]
    assert scheduler.offer(event("a", None, Op.DELETE)) is Offer.CANCELLED
    # Versions start again at 1 after a re-insert: they are not duplicates of the old life's 5.
    assert scheduler.offer(event("a", 1, Op.INSERT)) is Offer.ACCEPTED
    assert scheduler.offer(event("a", 2)) is Offer.ACCEPTED
    finish(scheduler, "a", None)  # the store refused the old life's write
    assert taken(scheduler) == [("a", 2)]


def test_delete_while_in_flight_forgets_the_id(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 3))
    taken(scheduler)
    scheduler.offer(event("a", None, Op.DELETE))
    finish(scheduler, "a", 3)
    assert scheduler.is_idle()
    assert scheduler.offer(event("a", 1, Op.INSERT)) is Offer.ACCEPTED


def test_a_refused_write_records_nothing(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 3))
    taken(scheduler)
    finish(scheduler, "a", None)
    assert scheduler.offer(event("a", 3, source=Source.WEBHOOK)) is Offer.ACCEPTED


def test_a_late_delete_brings_back_a_reinsert_that_looked_like_a_duplicate(scheduler: Scheduler, clock: Clock) -> None:
    scheduler.offer(event("a", 4))
    assert taken(scheduler) == [("a", 4)]
    finish(scheduler, "a", 4)  # the first life reached version 4
    # Deleted and inserted again; the new life's INSERT looks old, and its DELETE comes late (a retried
    # webhook), after the new life's events.
    assert scheduler.offer(event("a", 1, Op.INSERT)) is Offer.DUPLICATE
    assert scheduler.offer(event("a", 2)) is Offer.DUPLICATE
    scheduler.offer(event("a", None, Op.DELETE))
    assert [project for project, _ in taken(scheduler)] == ["a"]  # looked at again: the batch reads the row


def test_a_late_delete_during_the_old_lifes_flight_runs_the_reinsert_after(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 4))
    assert taken(scheduler) == [("a", 4)]
    assert scheduler.offer(event("a", 1, Op.INSERT)) is Offer.DUPLICATE  # below the flight's target
    scheduler.offer(event("a", None, Op.DELETE))
    finish(scheduler, "a", None)  # the old life's write was refused: the row it read is gone
    assert [project for project, _ in taken(scheduler)] == ["a"]


# A DELETE the daemon never saw (lost in a Realtime outage) leaves an old life's versions behind.


def test_a_new_life_stored_after_an_old_one_is_what_the_done_cache_holds(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 12))
    taken(scheduler)
    finish(scheduler, "a", 12)  # the first life reached 12; its DELETE was lost with the session
    # The drift pass after readiness finds the new life at 1, and it is stored.
    assert scheduler.offer(event("a", 1, source=Source.DRIFT)) is Offer.ACCEPTED
    taken(scheduler)
    finish(scheduler, "a", 1)
    # The new life's next edit is news, not a duplicate of the old life's 12.
    assert scheduler.offer(event("a", 2, source=Source.REALTIME)) is Offer.ACCEPTED


def test_forget_drops_the_done_versions_a_lost_delete_made_wrong(scheduler: Scheduler) -> None:
    for key in ("a", "b"):
        scheduler.offer(event(key, 5))
    taken(scheduler)
    finish(scheduler, "a", 5)
    finish(scheduler, "b", 5)
    scheduler.forget("a")
    assert scheduler.offer(event("a", 1, Op.INSERT, Source.REALTIME)) is Offer.ACCEPTED
    assert scheduler.offer(event("b", 5, source=Source.REALTIME)) is Offer.DUPLICATE
    scheduler.forget()
    assert scheduler.offer(event("b", 1, Op.INSERT, Source.REALTIME)) is Offer.ACCEPTED


def test_a_batch_taken_before_forget_takes_later_events_and_records_nothing(scheduler: Scheduler, clock: Clock) -> None:
    scheduler.offer(event("a", 12))
    scheduler.offer(event("b", 7))
    taken(scheduler)  # both read before the outage: perhaps the old life of their rows
    scheduler.forget()  # the source was down: DELETEs may have been lost
    # The new life of a is inserted after readiness: its INSERT is below the flight's 12, yet news.
    assert scheduler.offer(event("a", 1, Op.INSERT, Source.REALTIME)) is Offer.ACCEPTED
    finish(scheduler, "a", 12)
    clock.now += 20  # the INSERT's settle delay
    assert taken(scheduler) == [("a", 12)]  # looked at again: the batch reads whichever life is there
    finish(scheduler, "b", 7)
    # What b's batch stored may be a deleted life's: not remembered, so its copy is looked at.
    assert scheduler.offer(event("b", 7, source=Source.WEBHOOK)) is Offer.ACCEPTED


def test_a_row_read_younger_than_its_target_is_looked_at_again(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 12))  # the old life's last edit, still pending when the row was re-inserted
    assert taken(scheduler) == [("a", 12)]
    # The batch reads the new life at 1; its edit to 2 arrives meanwhile and looks older than 12.
    assert scheduler.offer(event("a", 2, source=Source.REALTIME)) is Offer.DUPLICATE
    finish(scheduler, "a", 1, read=1)
    assert taken(scheduler) == [("a", 2)]  # a second look reads 2
    finish(scheduler, "a", 2)
    assert scheduler.is_idle()


def test_a_row_read_younger_with_nothing_dropped_meanwhile_costs_no_second_look(scheduler: Scheduler) -> None:
    scheduler.offer(event("a", 12))
    taken(scheduler)
    finish(scheduler, "a", 1, read=1)  # every event before the read was covered by the read
    assert scheduler.is_idle()
    assert scheduler.offer(event("a", 2, source=Source.REALTIME)) is Offer.ACCEPTED


def test_a_reinsert_after_the_batch_read_the_row_gone_is_looked_at(scheduler: Scheduler) -> None:
    """Found in review: the DELETE came while the id was pending, the batch read the row gone, and the
    new life's INSERT (and edit) came while the batch was still in flight, below its target."""
    scheduler.offer(event("a", 12))
    scheduler.offer(event("a", None, Op.DELETE))  # pending is kept: a late DELETE may follow a re-insert
    assert taken(scheduler) == [("a", 12)]
    assert scheduler.offer(event("a", 1, Op.INSERT)) is Offer.DUPLICATE
    assert scheduler.offer(event("a", 2)) is Offer.DUPLICATE
    scheduler.done(in_hand["a"], None, None)  # the row was gone when read
    assert taken(scheduler) == [("a", 2)]


def test_a_late_delete_brings_back_a_reinsert_even_when_the_scheduler_is_full(clock: Clock) -> None:
    scheduler = Scheduler(insert_delay=0, update_delay=0, max_pending=2, clock=clock)
    scheduler.offer(event("a", 4))
    taken(scheduler)
    finish(scheduler, "a", 4)
    assert scheduler.offer(event("a", 1, Op.INSERT, Source.WEBHOOK)) is Offer.DUPLICATE  # the new life
    for key in ("b", "c"):
        scheduler.offer(event(key, 1))
    assert not scheduler.has_room
    scheduler.offer(event("a", None, Op.DELETE, Source.WEBHOOK))  # the old life's, late
    assert sorted(project for project, _ in taken(scheduler)) == ["a", "b", "c"]
