"""Due ids → one read → hash check → one embedding request per chunk → one guarded write.

The row is embedded as it is when read, with the version read (design.md): an event is only a reason
to look. Ids whose text and model are unchanged cost no API call; identical texts within a batch are
sent once; a vector already paid for survives a failed database write in a small cache.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from loguru import logger

from vector_sync.aio import wait_or_stop
from vector_sync.embedder import (
    Embedder,
    QuotaExceeded,
    Refused,
    TransientEmbeddingError,
    chunk_for_requests,
    embed_isolating,
)
from vector_sync.metrics import Metrics
from vector_sync.scheduler import Due, Scheduler
from vector_sync.store import DATABASE_UNAVAILABLE, DeadLetter, RowState, Store, VectorWrite

LINGER_SECONDS = 0.005
QUOTA_PAUSE_FIRST = 30.0
QUOTA_PAUSE_MAX = 600.0
VECTOR_CACHE_SIZE = 4096


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
    api_inputs: int = 0
    api_requests: int = 0
    latencies: list[float] = field(default_factory=list)


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
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._tasks: set[asyncio.Task[None]] = set()
        self._vectors: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self._paused_until = 0.0
        self._pause_length = QUOTA_PAUSE_FIRST
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
            await self._slots.acquire()
            if self._scheduler.next_due_in() == 0.0 and self._scheduler.pending_count < self._batch_size:
                await asyncio.sleep(LINGER_SECONDS)  # let a burst fill the batch
            batch = self._scheduler.take_due(self._batch_size)
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._process_guarded(batch), name="vector-sync-batch")
            self._tasks.add(task)
            task.add_done_callback(self._batch_finished)

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

    async def _process_guarded(self, batch: list[Due]) -> None:
        try:
            await self.process(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not strand ids in flight: they go back with a delay and the error is loud.
            logger.exception("batch of {rows} rows failed unexpectedly; retrying later", rows=len(batch))
            for due in batch:
                self._scheduler.retry_later(due.project_id, retry_delay(due.attempt))

    async def process(self, batch: Sequence[Due]) -> BatchReport:
        started = time.monotonic()
        report = BatchReport(rows=len(batch))
        keys = [due.project_id for due in batch]
        try:
            rows = await self._store.read_rows(keys)
        except DATABASE_UNAVAILABLE as exc:
            self._defer(batch, report, f"database unavailable: {type(exc).__name__}")
            return report
        to_embed: list[tuple[Due, RowState]] = []
        writes: list[tuple[Due, RowState, VectorWrite]] = []
        for due in batch:
            row = rows.get(due.project_id)
            if row is None:
                report.deleted += 1
                self._scheduler.done(due.project_id, None)
            elif (row.stored_version or 0) >= row.version and row.stored_model == self._embedder.model:
                report.current += 1
                self._scheduler.done(due.project_id, row.stored_version)
            elif row.stored_sha256 == row.sha256 and row.stored_model == self._embedder.model:
                writes.append((due, row, VectorWrite(due.project_id, row.version, row.sha256, None, due.committed_at)))
            elif row.dead_sha256 == row.sha256 and row.dead_model == self._embedder.model:
                await self._store.note_dead_letter_version(row.project_id, row.version)
                report.dead += 1
                self._scheduler.done(due.project_id, row.version)
            elif not row.text.strip():
                await self._dead_letter(due, row, "no text to embed: every content column is empty", report)
            else:
                to_embed.append((due, row))
        try:
            await self._embed(to_embed, writes, report)
        except QuotaExceeded as exc:
            self._pause(str(exc))
            self._defer([due for due, _ in to_embed], report, "embedding paused")
        await self._write(writes, report)
        self._log(report, started)
        return report

    async def _embed(
        self,
        to_embed: list[tuple[Due, RowState]],
        writes: list[tuple[Due, RowState, VectorWrite]],
        report: BatchReport,
    ) -> None:
        model = self._embedder.model
        unique: dict[str, list[tuple[Due, RowState]]] = {}
        for due, row in to_embed:
            unique.setdefault(row.text, []).append((due, row))
        texts = [text for text in unique if (model, sha_of(unique[text])) not in self._vectors]
        for group in chunk_for_requests(texts, self._batch_size):
            chunk = [texts[index] for index in group]
            try:
                isolated = await embed_isolating(self._embedder, chunk)
            except TransientEmbeddingError as exc:
                self._metrics.errors.labels("transient").inc()
                self._defer([due for text in chunk for due, _ in unique.pop(text)], report, str(exc))
                continue
            except QuotaExceeded:
                self._metrics.errors.labels("quota").inc()
                raise
            report.api_inputs += len(chunk)
            report.api_requests += isolated.requests
            self._pause_length = QUOTA_PAUSE_FIRST  # the API answered: the next pause starts short
            for text, result in zip(chunk, isolated.results, strict=True):
                if isinstance(result, Refused):
                    self._metrics.errors.labels("bad_input").inc()
                    for due, row in unique.pop(text):
                        await self._dead_letter(due, row, result.error, report)
                else:
                    self._remember(model, sha_of(unique[text]), result)
        for items in unique.values():
            vector = self._vectors.get((model, sha_of(items)))
            if vector is None:
                continue
            for due, row in items:
                writes.append(
                    (due, row, VectorWrite(due.project_id, row.version, row.sha256, vector, due.committed_at))
                )

    async def _write(self, writes: list[tuple[Due, RowState, VectorWrite]], report: BatchReport) -> None:
        if not writes:
            return
        try:
            applied = await self._store.write([write for _, _, write in writes])
        except DATABASE_UNAVAILABLE as exc:
            self._defer([due for due, _, _ in writes], report, f"database unavailable: {type(exc).__name__}")
            return
        now = time.time()
        for due, row, write in writes:
            if write.embedding is None:
                report.unchanged += 1
            else:
                report.embedded += 1
            if due.project_id in applied and due.committed_at is not None:
                report.latencies.append(max(0.0, now - due.committed_at))
            self._scheduler.done(due.project_id, applied.get(due.project_id, row.version))
        for latency in report.latencies:
            self._metrics.latency.observe(latency)
        self._metrics.stored.inc(report.embedded)
        self._metrics.unchanged.inc(report.unchanged)

    async def _dead_letter(self, due: Due, row: RowState, error: str, report: BatchReport) -> None:
        try:
            await self._store.dead_letter(DeadLetter(row.project_id, row.version, row.sha256, error))
        except DATABASE_UNAVAILABLE:
            self._defer([due], report, "database unavailable while dead-lettering")
            return
        report.dead += 1
        self._metrics.dead_letters.inc()
        logger.warning(
            "dead letter: project {project_id} version {version}: {error}",
            project_id=row.project_id,
            version=row.version,
            error=error,
        )
        self._scheduler.done(due.project_id, row.version)

    def _defer(self, batch: Sequence[Due], report: BatchReport, reason: str) -> None:
        for due in batch:
            self._scheduler.retry_later(due.project_id, retry_delay(due.attempt))
        report.deferred += len(batch)
        if batch:
            logger.warning("{rows} rows deferred: {reason}", rows=len(batch), reason=reason)

    def _pause(self, reason: str) -> None:
        self._paused_until = time.monotonic() + self._pause_length
        now = time.monotonic()
        if now - self._last_pause_log >= 60:
            self._last_pause_log = now
            logger.error(
                "EMBEDDING PAUSED for {seconds:.0f}s: the API refused our credentials or quota ({reason}); "
                "nothing is dead-lettered, the next batch probes again",
                seconds=self._pause_length,
                reason=reason,
            )
        self._pause_length = min(QUOTA_PAUSE_MAX, self._pause_length * 2)

    def _remember(self, model: str, sha: str, vector: list[float]) -> None:
        self._vectors[(model, sha)] = vector
        self._vectors.move_to_end((model, sha))
        while len(self._vectors) > VECTOR_CACHE_SIZE:
            self._vectors.popitem(last=False)

    def _log(self, report: BatchReport, started: float) -> None:
        self._metrics.batches.inc()
        latency = max(report.latencies) if report.latencies else None
        logger.info(
            "batch rows={rows} embedded={embedded} unchanged={unchanged} current={current} "
            "deleted={deleted} dead={dead} deferred={deferred} api_requests={api_requests} api_inputs={api_inputs} "
            "took_ms={took:.0f} max_commit_latency_ms={latency}",
            rows=report.rows,
            embedded=report.embedded,
            unchanged=report.unchanged,
            current=report.current,
            deleted=report.deleted,
            dead=report.dead,
            deferred=report.deferred,
            api_requests=report.api_requests,
            api_inputs=report.api_inputs,
            took=(time.monotonic() - started) * 1000,
            latency=None if latency is None else round(latency * 1000),
        )


def sha_of(items: list[tuple[Due, RowState]]) -> str:
    return items[0][1].sha256
