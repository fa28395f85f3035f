"""Due ids → one read → hash check → one embedding request per chunk → one guarded write.

The row is embedded as it is when read, with the version read (design.md): an event is only a reason
to look. Ids whose text and model are unchanged cost no API call; identical texts within a batch are
sent once; a vector already paid for survives a failed database write in a small cache.

Every id a batch takes is settled exactly once, by `done` or `retry_later`, whatever fails.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from loguru import logger

from vector_sync.aio import wait_or_stop
from vector_sync.embedder import (
    Embedder,
    Embedding,
    EmbeddingUnavailable,
    Refused,
    TransientEmbeddingError,
    chunk_for_requests,
    embed_isolating,
)
from vector_sync.metrics import Metrics
from vector_sync.scheduler import Due, Scheduler
from vector_sync.store import DATABASE_UNAVAILABLE, DeadLetter, RowState, Store, VectorWrite

LINGER_SECONDS = 0.005
# Ids due this soon join a batch that goes out anyway: a burst offered over a few tens of milliseconds
# (one commit's notifications, a train of Realtime frames) then goes in full batches, not one per arrival.
# Against settle delays of seconds, taking an id this much early changes nothing.
BATCH_HORIZON_SECONDS = 0.05
# Pacing never holds a partial batch back longer than this, however slow the API gets.
MAX_PACING_SECONDS = 0.5
# Weight of the newest batch in the moving average of how long a batch holds its slot.
HOLD_SMOOTHING = 0.3
PAUSE_FIRST = 30.0
PAUSE_MAX = 600.0
VECTOR_CACHE_SIZE = 4096


def is_current(row: RowState, model: str) -> bool:
    """The stored vector is of this text, by this model, at this version or later."""
    return (row.stored_version or 0) >= row.version and (row.stored_model, row.stored_sha256) == (model, row.sha256)


def retry_delay(attempt: int) -> float:
    """Back-off for an id whose batch failed: 2, 4, 8 ... up to 5 minutes, with jitter."""
    return min(300.0, 2.0 * 2.0**attempt) * random.uniform(0.75, 1.25)


@dataclass
class BatchReport:
    rows: int = 0
    embedded: int = 0
    unchanged: int = 0
    current: int = 0
    deleted: int = 0
    dead: int = 0
    deferred: int = 0
    refused: int = 0  # writes the version guard turned down: a newer vector, or the row gone
    api_inputs: int = 0
    api_requests: int = 0
    latencies: list[float] = field(default_factory=list)


class _Batch:
    """One batch's ids and what became of them; settles each id with the scheduler once."""

    def __init__(self, scheduler: Scheduler, dues: list[Due]) -> None:
        self._scheduler = scheduler
        self.dues = dues
        self.report = BatchReport(rows=len(dues))
        self._settled: set[str] = set()

    def done(self, due: Due, stored_version: int | None, row: RowState | None) -> None:
        if due.project_id not in self._settled:
            self._settled.add(due.project_id)
            self._scheduler.done(due, stored_version, None if row is None else row.version)

    def defer(self, dues: Iterable[Due], reason: str) -> None:
        count = 0
        for due in dues:
            if due.project_id not in self._settled:
                self._settled.add(due.project_id)
                self._scheduler.retry_later(due, retry_delay(due.attempt))
                count += 1
        self.report.deferred += count
        if count:
            logger.warning("{rows} rows deferred: {reason}", rows=count, reason=reason)

    def unsettled(self) -> list[Due]:
        return [due for due in self.dues if due.project_id not in self._settled]


class Pipeline:
    def __init__(
        self,
        *,
        scheduler: Scheduler,
        store: Store,
        embedder: Embedder,
        metrics: Metrics,
        batch_size: int,
        max_concurrent_batches: int,
    ) -> None:
        self._scheduler = scheduler
        self._store = store
        self._embedder = embedder
        self._metrics = metrics
        self._batch_size = batch_size
        self._max_concurrent_batches = max_concurrent_batches
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._hold_seconds = 0.0
        self._last_dispatch = -1e9
        self._tasks: set[asyncio.Task[None]] = set()
        self._vectors: OrderedDict[tuple[str, str], Embedding] = OrderedDict()
        self._paused_until = 0.0
        self._pause_length = PAUSE_FIRST
        self._last_pause_log = -1e9

    @property
    def paused(self) -> bool:
        return time.monotonic() < self._paused_until

    @property
    def busy(self) -> int:
        return len(self._tasks)

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch due batches until `stop`; batches already running are left to `drain`."""
        while not stop.is_set():
            if self.paused:
                await wait_or_stop(stop, self._paused_until - time.monotonic())
                continue
            if not await self._scheduler.wait_due(stop):
                break
            if not await self._acquire_slot(stop):
                break
            if self._scheduler.pending_count < self._batch_size:
                await wait_or_stop(stop, self._pacing_delay())
            dues = [] if stop.is_set() else self._scheduler.take_due(self._batch_size, BATCH_HORIZON_SECONDS)
            if not dues:
                self._slots.release()
                continue
            self._last_dispatch = time.monotonic()
            task = asyncio.create_task(self._process_guarded(_Batch(self._scheduler, dues)), name="vector-sync-batch")
            self._tasks.add(task)
            task.add_done_callback(self._batch_finished)

    def _pacing_delay(self) -> float:
        """How long a partial batch waits, holding its slot, before it goes out.

        Slots freed together would otherwise go out together, one with the backlog and the rest with a
        change or two each, and the next changes wait a whole request for a slot. Spacing dispatches by
        a slot's share of the time a batch takes keeps them evenly spread, so a change waits at most
        that share before it goes. A full batch, or a first batch after a quiet spell, goes at once
        (after a few milliseconds for a burst to fill it).
        """
        spacing = min(MAX_PACING_SECONDS, self._hold_seconds / self._max_concurrent_batches)
        return max(LINGER_SECONDS, self._last_dispatch + spacing - time.monotonic())

    async def _acquire_slot(self, stop: asyncio.Event) -> bool:
        """A batch slot, or False when `stop` comes first (no batch may start after stop)."""
        acquire = asyncio.ensure_future(self._slots.acquire())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({acquire, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            acquire.cancel()  # no-op when it already got the slot
        got_slot = acquire.done() and not acquire.cancelled()
        if got_slot and stop.is_set():
            self._slots.release()
            return False
        return got_slot

    def _batch_finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` for running batches; cancel the rest and return how many were cut."""
        if not self._tasks:
            return 0
        _, unfinished = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished, timeout=5)
        return len(unfinished)

    async def _process_guarded(self, batch: _Batch) -> None:
        started = time.monotonic()
        try:
            await self._process(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not strand ids in flight: what is not settled yet goes back, loudly.
            logger.exception("batch of {rows} rows failed unexpectedly; retrying later", rows=batch.report.rows)
            batch.defer(batch.unsettled(), "unexpected error")
        held = time.monotonic() - started
        self._hold_seconds += HOLD_SMOOTHING * (held - self._hold_seconds)

    async def _process(self, batch: _Batch) -> None:
        started = time.monotonic()
        report = batch.report
        try:
            rows = await self._store.read_rows([due.project_id for due in batch.dues])
        except DATABASE_UNAVAILABLE as exc:
            batch.defer(batch.dues, f"database unavailable: {type(exc).__name__}")
            return
        model = self._embedder.model
        to_embed: list[tuple[Due, RowState]] = []
        writes: list[tuple[Due, RowState, VectorWrite]] = []
        for due in batch.dues:
            row = rows.get(due.project_id)
            if row is None:
                report.deleted += 1
                batch.done(due, None, None)
            elif (row.stored_version or 0) >= row.version and (row.stored_model, row.stored_sha256) == (
                model,
                row.sha256,
            ):
                report.current += 1
                batch.done(due, row.stored_version, row)
            elif row.stored_sha256 == row.sha256 and row.stored_model == model:
                writes.append((due, row, VectorWrite(due.project_id, row.version, row.sha256, None, due.committed_at)))
            elif row.dead_sha256 == row.sha256 and row.dead_model == model:
                await self._store.note_dead_letter_version(row.project_id, row.version)
                report.dead += 1
                batch.done(due, None, row)
            elif not row.text.strip():
                await self._dead_letter(batch, due, row, "no text to embed: every content column is empty")
            else:
                to_embed.append((due, row))
        try:
            vectors = await self._embed(batch, to_embed)
        except EmbeddingUnavailable as exc:
            self._pause(str(exc))
            batch.defer([due for due, _ in to_embed], "embedding paused")
            vectors = {}
        for due, row in to_embed:
            vector = vectors.get(row.sha256)
            if vector is not None:
                writes.append(
                    (due, row, VectorWrite(due.project_id, row.version, row.sha256, vector, due.committed_at))
                )
        await self._write(batch, writes)
        self._log(report, started)

    async def _embed(self, batch: _Batch, to_embed: list[tuple[Due, RowState]]) -> dict[str, Embedding]:
        """Vectors by text hash for `to_embed`; refused rows are dead-lettered, failed ones deferred."""
        model = self._embedder.model
        by_sha: dict[str, list[tuple[Due, RowState]]] = {}
        for due, row in to_embed:
            by_sha.setdefault(row.sha256, []).append((due, row))
        vectors: dict[str, Embedding] = {}
        missing: list[str] = []
        for sha in by_sha:
            cached = self._vectors.get((model, sha))
            if cached is not None:
                vectors[sha] = cached
            else:
                missing.append(sha)
        texts = [by_sha[sha][0][1].text for sha in missing]
        for group in chunk_for_requests(texts, self._batch_size):
            shas = [missing[index] for index in group]

            def remember(index: int, vector: Embedding, shas: list[str] = shas) -> None:
                self._remember(model, shas[index], vector)

            try:
                isolated = await embed_isolating(self._embedder, [texts[index] for index in group], remember)
            except TransientEmbeddingError as exc:
                self._metrics.errors.labels("transient").inc()
                batch.defer([due for sha in shas for due, _ in by_sha[sha]], str(exc))
                continue
            except EmbeddingUnavailable:
                self._metrics.errors.labels("unavailable").inc()
                raise
            batch.report.api_inputs += len(shas)
            batch.report.api_requests += isolated.requests
            self._pause_length = PAUSE_FIRST  # the API answered: the next pause starts short
            for sha, result in zip(shas, isolated.results, strict=True):
                if isinstance(result, Refused):
                    self._metrics.errors.labels("bad_input").inc()
                    for due, row in by_sha[sha]:
                        await self._dead_letter(batch, due, row, result.error)
                else:
                    vectors[sha] = result
        return vectors

    async def _write(self, batch: _Batch, writes: list[tuple[Due, RowState, VectorWrite]]) -> None:
        if not writes:
            return
        report = batch.report
        try:
            applied = await self._store.write([write for _, _, write in writes])
        except DATABASE_UNAVAILABLE as exc:
            batch.defer([due for due, _, _ in writes], f"database unavailable: {type(exc).__name__}")
            return
        now = time.time()
        for due, row, write in writes:
            stored = applied.get(due.project_id)
            if stored is None:
                report.refused += 1
            elif write.embedding is None:
                report.unchanged += 1
            else:
                report.embedded += 1
            if stored is not None and due.committed_at is not None:
                report.latencies.append(max(0.0, now - due.committed_at))
            # Only what the guard let through counts as done; a refused write (a newer vector, or
            # the row deleted meanwhile) records nothing, so later events are looked at afresh.
            batch.done(due, stored, row)
        for latency in report.latencies:
            self._metrics.latency.observe(latency)
        self._metrics.stored.inc(report.embedded)
        self._metrics.unchanged.inc(report.unchanged)

    async def _dead_letter(self, batch: _Batch, due: Due, row: RowState, error: str) -> None:
        try:
            await self._store.dead_letter(DeadLetter(row.project_id, row.version, row.sha256, error))
        except DATABASE_UNAVAILABLE:
            batch.defer([due], "database unavailable while dead-lettering")
            return
        batch.report.dead += 1
        self._metrics.dead_letters.inc()
        logger.warning(
            "dead letter: project {project_id} version {version}: {error}",
            project_id=row.project_id,
            version=row.version,
            error=error,
        )
        batch.done(due, None, row)

    def _pause(self, reason: str) -> None:
        now = time.monotonic()
        if now < self._paused_until:
            return  # concurrent batches report the same outage: one pause, not a doubled one
        self._paused_until = now + self._pause_length
        if now - self._last_pause_log >= 60:
            self._last_pause_log = now
            logger.error(
                "EMBEDDING PAUSED for {seconds:.0f}s: {reason}; nothing is dead-lettered, the next batch probes again",
                seconds=self._pause_length,
                reason=reason,
            )
        self._pause_length = min(PAUSE_MAX, self._pause_length * 2)

    def _remember(self, model: str, sha: str, vector: Embedding) -> None:
        self._vectors[(model, sha)] = vector
        self._vectors.move_to_end((model, sha))
        while len(self._vectors) > VECTOR_CACHE_SIZE:
            self._vectors.popitem(last=False)

    def _log(self, report: BatchReport, started: float) -> None:
        self._metrics.batches.inc()
        latency = max(report.latencies) if report.latencies else None
        logger.info(
            "batch rows={rows} embedded={embedded} unchanged={unchanged} current={current} "
            "deleted={deleted} dead={dead} deferred={deferred} refused={refused} api_requests={api_requests} "
            "api_inputs={api_inputs} "
            "took_ms={took_ms} max_commit_latency_ms={max_commit_latency_ms}",
            rows=report.rows,
            embedded=report.embedded,
            unchanged=report.unchanged,
            current=report.current,
            deleted=report.deleted,
            dead=report.dead,
            deferred=report.deferred,
            refused=report.refused,
            api_requests=report.api_requests,
            api_inputs=report.api_inputs,
            took_ms=round((time.monotonic() - started) * 1000),
            max_commit_latency_ms=None if latency is None else round(latency * 1000),
        )
