"""The drift pass's three questions against embedded Postgres: full, recent (change log), per row."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from support import DIMENSIONS, make_settings
from vector_sync import drift as drift_module
from vector_sync.drift import DriftPass
from vector_sync.events import ChangeEvent, ProjectId
from vector_sync.migrations import read_catalog
from vector_sync.scheduler import Scheduler
from vector_sync.store import Store, VectorWrite, content_text, sha256_hex


class Recorder:
    def __init__(self) -> None:
        self.events: list[ChangeEvent] = []

    def __call__(self, event: ChangeEvent) -> None:
        self.events.append(event)

    def ids(self) -> set[int]:
        return {int(event.project_id) for event in self.events}

    def clear(self) -> None:
        self.events.clear()


@pytest.fixture
async def store(db: asyncpg.Connection, dsn: str) -> AsyncIterator[Store]:
    settings = make_settings(dsn)
    opened = await Store.connect(settings, await read_catalog(db, settings))
    yield opened
    await opened.close()


def drift_pass(store: Store, recorder: Recorder) -> DriftPass:
    return DriftPass(store, Scheduler(insert_delay=0, update_delay=0, max_pending=100_000), recorder)


async def insert(db: asyncpg.Connection, count: int) -> list[int]:
    rows = await db.fetch(
        "insert into projects (name) select 'p' || n from generate_series(1, $1) n returning id", count
    )
    return [row[0] for row in rows]


async def embed(store: Store, db: asyncpg.Connection, ids: list[int]) -> None:
    """Store a vector at each row's current version (what the pipeline would do)."""
    rows = await db.fetch("select id, version, name, description from projects where id = any($1::bigint[])", ids)
    await store.write(
        [
            VectorWrite(str(row[0]), row[1], sha256_hex(content_text([row[2], row[3]])), [1.0] * DIMENSIONS)
            for row in rows
        ]
    )


async def test_a_recent_pass_finds_only_what_changed_since_the_last_pass(db: asyncpg.Connection, store: Store) -> None:
    ids = await insert(db, 20)
    recorder = Recorder()
    passes = drift_pass(store, recorder)
    assert await passes.run_once() == 20
    await embed(store, db, ids)
    # Stale since before the pass, but not changed since: only a full pass looks at it.
    await db.execute("delete from vector_sync.project_embeddings where project_id = $1", ids[0])
    await db.execute("update projects set name = 'changed' where id = any($1::bigint[])", ids[5:8])
    recorder.clear()
    assert await passes.run_recent("test") == 3
    assert recorder.ids() == set(ids[5:8])
    assert {event.version for event in recorder.events} == {2}
    recorder.clear()
    # Handed to the scheduler, which keeps them until they are stored: not offered twice.
    assert await passes.run_recent("again") == 0
    assert await passes.run_once() == 4  # the full pass also finds the gap from before


async def test_a_transaction_that_commits_after_a_pass_began_is_not_missed(
    db: asyncpg.Connection, dsn: str, store: Store
) -> None:
    ids = await insert(db, 3)
    recorder = Recorder()
    passes = drift_pass(store, recorder)
    await passes.run_once()
    await embed(store, db, ids)
    # A writer that took its transaction id before the next pass and commits after it: a
    # timestamp watermark would skip it, the snapshot xmin must not.
    slow = await asyncpg.connect(dsn)
    try:
        transaction = slow.transaction()
        await transaction.start()
        await slow.execute("update projects set name = 'slow writer' where id = $1", ids[0])
        recorder.clear()
        assert await passes.run_recent("while the writer is open") == 0
        await transaction.commit()
    finally:
        await slow.close()
    await db.execute("update projects set name = 'fast writer' where id = $1", ids[1])
    recorder.clear()
    assert await passes.run_recent("after the commit") == 2
    assert recorder.ids() == {ids[0], ids[1]}


async def test_deleted_rows_drop_out_of_a_recent_pass(db: asyncpg.Connection, store: Store) -> None:
    ids = await insert(db, 4)
    recorder = Recorder()
    passes = drift_pass(store, recorder)
    await passes.run_once()
    await embed(store, db, ids)
    await db.execute("update projects set name = 'x' where id = $1", ids[0])
    await db.execute("delete from projects where id = any($1::bigint[])", ids[:2])
    recorder.clear()
    assert await passes.run_recent("deletes") == 0


async def test_too_many_changes_become_a_full_pass(
    db: asyncpg.Connection, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(drift_module, "RECENT_LIMIT", 5)
    ids = await insert(db, 4)
    recorder = Recorder()
    passes = drift_pass(store, recorder)
    await passes.run_once()
    await embed(store, db, ids)
    await insert(db, 10)
    recorder.clear()
    assert await passes.run_recent("bulk") == 10
    assert passes.passes == 2  # the fallback was a full pass


async def test_recheck_and_requests_through_the_running_loop(db: asyncpg.Connection, store: Store) -> None:
    import asyncio

    from support import wait_until

    ids = await insert(db, 6)
    recorder = Recorder()
    passes = drift_pass(store, recorder)
    stop = asyncio.Event()
    loop = asyncio.create_task(passes.run(stop))
    try:
        passes.request_recent("no pass yet: runs as a full pass")
        await wait_until(lambda: passes.passes == 1, what="the first full pass")
        assert recorder.ids() == set(ids)
        await embed(store, db, ids)
        await db.execute("update projects set name = 'y' where id = any($1::bigint[])", ids[:2])
        recorder.clear()
        passes.recheck(ProjectId(str(ids[0])), "an event without a version")
        await wait_until(lambda: recorder.ids() == {ids[0]}, what="the re-check of one row")
        recorder.clear()
        passes.request_recent("safety interval")
        await wait_until(lambda: passes.recent_passes == 1, what="a recent pass")
        assert recorder.ids() == set(ids[:2])
    finally:
        stop.set()
        await asyncio.wait_for(loop, 10)


async def test_the_change_log_is_pruned_by_age_but_not_what_is_still_being_delivered(
    db: asyncpg.Connection, store: Store
) -> None:
    await insert(db, 4)
    await db.execute("update vector_sync.webhook_logs set created_at = now() - interval '15 days'")
    await db.execute(
        "update vector_sync.webhook_logs set status = 'in_flight'"
        " where id = (select min(id) from vector_sync.webhook_logs)"
    )
    await insert(db, 2)
    assert await store.prune_change_log() == 3  # 14 days by default (vector_sync.config log_retention)
    assert await db.fetchval("select count(*) from vector_sync.webhook_logs") == 3
