"""How `Pipeline.run` spreads batches over its slots: partial batches are paced, full ones are not.

A fake Store and a fake Embedder that takes a fixed time per request stand in for Postgres and the
API; the Scheduler and Metrics are the real ones. Timing assertions are lower bounds on spacing
(which a noisy machine can only increase) or generous upper bounds where something must go at once.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

from support import wait_until
from vector_sync.embedder import Embedding
from vector_sync.events import ChangeEvent, Op, ProjectId, Source
from vector_sync.metrics import Metrics
from vector_sync.pipeline import Pipeline
from vector_sync.scheduler import Offer, Scheduler
from vector_sync.store import DeadLetter, RowState, Store, VectorWrite, sha256_hex


class FakeStore:
    """Every id is a row at version 1 whose text is its id, with nothing stored yet."""

    def __init__(self) -> None:
        self.writes: list[VectorWrite] = []

    async def read_rows(self, ids: Sequence[ProjectId]) -> dict[ProjectId, RowState]:
        return {pid: RowState(pid, 1, pid, sha256_hex(pid), None, None, None, None, None) for pid in ids}

    async def write(self, writes: Sequence[VectorWrite]) -> dict[ProjectId, int]:
        self.writes.extend(writes)
        return {write.project_id: write.version for write in writes}

    async def note_dead_letter_version(self, project_id: ProjectId, version: int) -> None:
        raise AssertionError("no row is dead-lettered here")

    async def dead_letter(self, letter: DeadLetter) -> None:
        raise AssertionError("no row is dead-lettered here")

    def written(self) -> set[str]:
        return {write.project_id for write in self.writes}


@dataclass(frozen=True)
class Request:
    started: float
    texts: tuple[str, ...]


@dataclass
class SlowEmbedder:
    """An API that answers every request after `latency` seconds, recording when each one started."""

    latency: float
    model: str = "fake-model"
    dimensions: int = 3
    requests: list[Request] = field(default_factory=list)

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        self.requests.append(Request(time.monotonic(), tuple(texts)))
        await asyncio.sleep(self.latency)
        return [array.array("f", [1.0, 0.0, 0.0]) for _ in texts]

    async def close(self) -> None:
        return None

    def request_with(self, pid: str) -> Request | None:
        return next((request for request in self.requests if pid in request.texts), None)


@dataclass
class Harness:
    scheduler: Scheduler
    store: FakeStore
    embedder: SlowEmbedder
    pipeline: Pipeline
    stop: asyncio.Event
    task: asyncio.Task[None]

    def offer(self, *pids: str) -> float:
        """Offer one UPDATE per id (no settle delay) and return when it was offered."""
        for pid in pids:
            assert self.scheduler.offer(ChangeEvent(ProjectId(pid), 1, Op.UPDATE, Source.LISTEN)) is Offer.ACCEPTED
        return time.monotonic()

    async def started(self, pid: str) -> Request:
        await wait_until(lambda: self.embedder.request_with(pid) is not None, what=f"a request with {pid}")
        request = self.embedder.request_with(pid)
        assert request is not None
        return request

    async def warm_up(self, batches: int) -> None:
        """Run `batches` one-id batches through concurrently and wait for them all, so the moving
        average of the slot hold time is high (each batch holds its slot for the embedder latency)."""
        pids = [f"warm-{index}" for index in range(batches)]
        for pid in pids:
            self.offer(pid)
            await self.started(pid)  # each its own batch
        await wait_until(lambda: set(pids) <= self.store.written(), what="the warm-up batches")


@asynccontextmanager
async def running(*, latency: float, slots: int, batch_size: int) -> AsyncIterator[Harness]:
    scheduler = Scheduler(insert_delay=0, update_delay=0, max_pending=100_000)
    store = FakeStore()
    embedder = SlowEmbedder(latency)
    pipeline = Pipeline(
        scheduler=scheduler,
        store=cast(Store, store),
        embedder=embedder,
        metrics=Metrics(),
        batch_size=batch_size,
        max_concurrent_batches=slots,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    try:
        yield Harness(scheduler, store, embedder, pipeline, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)
        await pipeline.drain(0)  # batches still waiting on the fake API are cut


async def test_steady_stream_with_a_slow_api_is_spread_evenly_over_the_slots() -> None:
    latency, slots, interval, count = 0.2, 4, 0.01, 300
    pids = [f"p{index}" for index in range(count)]
    async with running(latency=latency, slots=slots, batch_size=100) as harness:
        began = time.monotonic()
        for index, pid in enumerate(pids):
            harness.offer(pid)
            await asyncio.sleep(max(0.0, began + (index + 1) * interval - time.monotonic()))  # the workload's pace
        await wait_until(lambda: set(pids) <= harness.store.written(), what="every change to be written")
    requests = harness.embedder.requests
    # Every change is embedded and written exactly once.
    assert Counter(text for request in requests for text in request.texts) == Counter(pids)
    assert Counter(write.project_id for write in harness.store.writes) == Counter(pids)
    # Changes are batched: about latency / slots / interval = 5 a request, not one each.
    assert count / len(requests) > 1
    # Once the moving average has settled, dispatches are a slot's share of the request time apart
    # (0.2 / 4 = 0.05 s), never two together; without pacing they follow the stream (0.01 s).
    starts = [request.started for request in requests[8:]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert len(gaps) >= 20
    assert min(gaps) >= 0.03, sorted(round(gap, 3) for gap in gaps)[:10]


async def test_a_full_batch_is_not_held() -> None:
    # Three one-id batches of 2 s leave a moving average of 2 * (1 - 0.7**3) = 1.3 s (more on a busy
    # machine): a partial batch waits 1.3 / 3 = 0.44 s after the last dispatch.
    batch_size = 10
    async with running(latency=2.0, slots=3, batch_size=batch_size) as harness:
        await harness.warm_up(3)
        harness.offer("single")  # goes at once: nothing went out lately
        last = await harness.started("single")
        full = [f"full-{index}" for index in range(batch_size)]
        offered = harness.offer(*full)
        request = await harness.started(full[0])
        assert request.texts == tuple(full)
        assert request.started - offered < 0.2
        # Pacing is in force meanwhile: a partial batch right after it is held a slot's share.
        harness.offer("after")
        held = await harness.started("after")
        assert held.started - request.started >= 0.3
        assert held.started - last.started >= 0.3


async def test_after_a_quiet_spell_a_single_change_goes_at_once() -> None:
    # Two one-id batches of 1.6 s leave a moving average of 1.6 * (1 - 0.7**2) = 0.82 s: a slot's
    # share is 0.41 s, but that long has passed since the last dispatch when the change comes.
    async with running(latency=1.6, slots=2, batch_size=100) as harness:
        await harness.warm_up(2)
        offered = harness.offer("quiet")
        first = await harness.started("quiet")
        assert first.texts == ("quiet",)
        assert first.started - offered < 0.1
        # The moving average is high: a second change right behind it is held.
        harness.offer("behind")
        second = await harness.started("behind")
        assert second.texts == ("behind",)
        assert second.started - first.started >= 0.3


async def test_stop_during_a_pacing_wait_returns_at_once_and_dispatches_nothing() -> None:
    async with running(latency=1.6, slots=2, batch_size=100) as harness:
        await harness.warm_up(2)
        harness.offer("first")
        await harness.started("first")
        pipeline = harness.pipeline
        pacing = pipeline._pacing_delay
        held_until: list[float] = []
        waiting = asyncio.Event()

        def spy() -> float:
            delay = pacing()
            held_until.append(time.monotonic() + delay)
            waiting.set()
            return delay

        pipeline._pacing_delay = spy  # type: ignore[method-assign]
        harness.offer("held")
        await asyncio.wait_for(waiting.wait(), timeout=10)
        # `run` is now waiting out the delay (a slot's share, about 0.4 s), holding a slot for "held".
        stopped = time.monotonic()
        assert held_until[-1] - stopped > 0.2
        harness.stop.set()
        await asyncio.wait_for(harness.task, timeout=10)
        returned = time.monotonic()
        assert returned - stopped < 1.0
        assert returned < held_until[-1]  # the wait was cut short, not sat out
        assert harness.embedder.request_with("held") is None
        assert harness.scheduler.pending_count == 1  # nothing was taken after the stop
        assert harness.scheduler.take_due(100)[0].project_id == "held"
