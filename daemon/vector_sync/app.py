"""The composition root: builds every part from the settings, runs them, and shuts them down in order.

Start: catalog and migrations checked → pool → HTTP listener → pipeline, drift pass and sources.
Stop: intake stops (webhooks answer 503, sources close) → running batches get the grace period →
the rest is cancelled and counted (the next start's drift pass picks it up) → connections close.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

import asyncpg
from loguru import logger

from vector_sync.aio import backoff, wait_or_stop
from vector_sync.config import Settings, SourceName
from vector_sync.drift import DriftPass
from vector_sync.embedder import Embedder, EmbedStats, build_embedder
from vector_sync.events import ChangeEvent, ProjectId, Source
from vector_sync.lease import Lease
from vector_sync.metrics import Metrics
from vector_sync.migrations import Catalog, SchemaError, pending_migrations, read_catalog
from vector_sync.pending import PendingDrain
from vector_sync.pipeline import Pipeline
from vector_sync.scheduler import Offer, Scheduler
from vector_sync.sdnotify import Notifier
from vector_sync.sources.listen import CHANNEL, PENDING_CHANNEL, ListenSource, PgListener
from vector_sync.sources.realtime import RealtimeSource, RealtimeStatus
from vector_sync.sources.webhook import WebhookReceiver
from vector_sync.store import DATABASE_ERRORS, DATABASE_UNAVAILABLE, Store, vector_dimensions
from vector_sync.web import HttpServer

READINESS_QUERY_TIMEOUT = 2.0


class Role(StrEnum):
    LEADER = "leader"
    STANDBY = "standby"


class Outcome(Enum):
    """How a term as leader ended."""

    STOPPED = "stopped"
    FAILED = "failed"
    LEASE_LOST = "lease lost"


class StoppedBeforeStart(Exception):
    """A stop signal arrived while the daemon was still waiting to start: a clean exit (0)."""


class FatalError(Exception):
    """The daemon cannot run (exit code 1); the message is the one log line that says why."""


async def load_catalog(
    settings: Settings, *, wait: float = 0.0, stop: asyncio.Event | None = None, embeds: bool = True
) -> Catalog:
    """Read the catalog and insist the migrations are applied: the daemon never migrates by itself.

    An unreachable database is retried for `wait` seconds (a database that starts after the
    daemon, a restart); a missing table or migration fails at once: waiting will not fix it. When
    the caller `embeds`, the vector column must have the configured size.
    """
    assert settings.database_url is not None
    deadline = time.monotonic() + wait
    attempt = 0
    while True:
        try:
            conn = await asyncpg.connect(settings.database_url.get_secret_value(), timeout=10)
            break
        except DATABASE_UNAVAILABLE as exc:
            left = deadline - time.monotonic()
            if stop is not None and stop.is_set():
                raise StoppedBeforeStart from exc
            if left <= 0:
                raise FatalError(f"cannot reach the database (for {wait:.0f}s): {type(exc).__name__}: {exc}") from exc
            delay = min(left, backoff(attempt, first=0.5, cap=5.0))
            attempt += 1
            logger.warning(
                "cannot reach the database yet ({error}); retrying for {left:.0f}s more",
                error=type(exc).__name__,
                left=left,
            )
            if stop is not None and await wait_or_stop(stop, delay):
                raise StoppedBeforeStart from exc
            if stop is None:
                await asyncio.sleep(delay)
        except DATABASE_ERRORS as exc:
            raise FatalError(f"cannot reach the database: {type(exc).__name__}: {exc}") from exc
    try:
        catalog = await read_catalog(conn, settings)
        behind = await pending_migrations(conn, settings, catalog)
        dimensions = await vector_dimensions(conn)
    except SchemaError as exc:
        raise FatalError(str(exc)) from exc
    finally:
        await conn.close()
    if behind:
        raise FatalError(f"migrations {behind} are not applied; run `vector-sync migrate`")
    if embeds and dimensions is not None and dimensions != settings.embedding_dimensions:
        raise FatalError(
            f"vector_sync.project_embeddings holds {dimensions}-dimension vectors but "
            f"VECTOR_SYNC_EMBEDDING_DIMENSIONS is {settings.embedding_dimensions}; a new size needs a new column "
            "(docs/operations.md, changing the model)"
        )
    return catalog


@dataclass
class Intake:
    """The `EventSink` every source talks to: counts, logs, and hands events to the scheduler."""

    scheduler: Scheduler
    metrics: Metrics
    drift: DriftPass | None = None
    pending: PendingDrain | None = None
    on_state: Callable[[], None] = lambda: None
    live: dict[Source, bool] = field(default_factory=dict)
    _malformed_seen: set[tuple[Source, str]] = field(default_factory=set)

    def offer(self, event: ChangeEvent) -> None:
        self.metrics.events.labels(event.source.value).inc()
        result = self.scheduler.offer(event)
        self.metrics.offers.labels(result.value).inc()
        logger.debug(
            "event {op} project {project_id} version {version} from {source}: {result}",
            op=event.op.value,
            project_id=event.project_id,
            version=event.version,
            source=event.source.value,
            result=result.value,
        )
        if result is Offer.FULL and self.drift is not None:
            # Cheap: requests coalesce into at most one more pass after the one running.
            self.drift.request("scheduler was full")

    def malformed(self, source: Source, reason: str) -> None:
        self.metrics.malformed.labels(source.value).inc()
        if (source, reason) not in self._malformed_seen and len(self._malformed_seen) < 1000:
            self._malformed_seen.add((source, reason))
            logger.warning("dropped malformed input from {source}: {reason}", source=source.value, reason=reason)

    # A source asks the database only when it may have lost events, a DELETE among them: the versions
    # the scheduler holds may then be an old life's (versions start again after a re-insert).

    def request_drift(self, reason: str) -> None:
        self.scheduler.forget()
        if self.drift is not None:
            self.drift.request(reason)

    def request_recent(self, reason: str) -> None:
        self.scheduler.forget()
        if self.drift is not None:
            self.drift.request_recent(reason)

    def recheck(self, project_id: ProjectId, reason: str) -> None:
        logger.debug("re-check project {project_id}: {reason}", project_id=project_id, reason=reason)
        self.scheduler.forget(project_id)
        if self.drift is not None:
            self.drift.recheck(project_id, reason)

    def source_state(self, source: Source, live: bool) -> None:
        if self.live.get(source) != live:
            logger.info("source {source} is {state}", source=source.value, state="live" if live else "down")
            if live and source in self.live:
                self.metrics.reconnects.labels(source.value).inc()
            if live and source is Source.REALTIME and self.pending is not None:
                self.pending.request("realtime ready")
        self.live[source] = live
        self.metrics.source_up.labels(source.value).set(1 if live else 0)
        self.on_state()


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.embed_stats = EmbedStats()
        self.realtime_status = RealtimeStatus()
        self._embedder: Embedder | None = None
        self._catalog: Catalog | None = None
        self._stopping = asyncio.Event()
        self.store: Store | None = None
        self.scheduler: Scheduler | None = None
        self.pipeline: Pipeline | None = None
        self.drift: DriftPass | None = None
        self.pending: PendingDrain | None = None
        self.intake: Intake | None = None
        self.http: HttpServer | None = None
        self.webhook: WebhookReceiver | None = None
        self.started = asyncio.Event()
        self.role = Role.STANDBY
        self._terms = 0
        self._tasks: dict[asyncio.Task[None], str] = {}
        self.notifier = Notifier()
        self._ready_told = False

    async def run(self, stop: asyncio.Event) -> int:
        """Run until `stop` is set (exit 0) or a part fails for good (exit 1).

        Between start and stop the instance is a standby until it holds the lease, then the leader
        until `stop`, a failure, or the loss of the lease (back to standby).
        """
        try:
            await self._start(stop)
        except FatalError as exc:
            logger.error("cannot start: {error}", error=str(exc))
            await self._close()
            return 1
        except StoppedBeforeStart:
            logger.info("stopped before the database could be reached")
            await self._close()
            return 0
        except BaseException:
            await self._close()
            raise
        assert self.settings.database_url is not None
        lease = Lease(self.settings.database_url.get_secret_value(), self.settings.table)
        systemd = asyncio.create_task(self._tell_systemd(stop), name="vector-sync-systemd")
        code = 0
        try:
            while not stop.is_set():
                self.role = Role.STANDBY
                # Started means serving: as the leader once its parts run, or as a standby.
                if not await lease.acquire(stop, waiting=self._standing_by):
                    break
                self.role = Role.LEADER
                logger.info("leader: this instance holds the lease and embeds")
                outcome = await self._lead(stop, lease)
                if outcome is not Outcome.LEASE_LOST:
                    code = 1 if outcome is Outcome.FAILED else 0
                    break
        finally:
            systemd.cancel()
            await lease.release()
            await self._close()
        return code

    def _standing_by(self) -> None:
        self.started.set()
        self._tell_ready("standby: another instance holds the lease")

    def _tell_ready(self, status: str) -> None:
        # READY=1 once per process (as a standby or as the leader), STATUS= lines after it.
        if self._ready_told:
            self.notifier.status(status)
        else:
            self._ready_told = self.notifier.ready(status) or not self.notifier.enabled

    async def _tell_systemd(self, stop: asyncio.Event) -> None:
        """Watchdog pings while healthy, and STOPPING=1 as soon as a stop begins."""
        watchdog = asyncio.create_task(self.notifier.run_watchdog(self._healthy, stop))
        try:
            await stop.wait()
            self.notifier.stopping("stopping: intake closed, draining")
            await watchdog
        finally:
            watchdog.cancel()

    def _healthy(self) -> bool:
        """For the systemd watchdog: no supervised part of the leader has ended on its own."""
        return not any(task.done() for task in self._tasks)

    def _sources_changed(self) -> None:
        if self.role is not Role.LEADER or self.intake is None:
            return
        down = sorted(
            source.value for source in self.settings.active_sources if not self.intake.live.get(Source(source.value))
        )
        if not down:
            self.notifier.ready(f"leader: {', '.join(sorted(s.value for s in self.settings.active_sources))} live")
        else:
            self.notifier.status(f"leader: waiting for {', '.join(down)}")

    async def _lead(self, stop: asyncio.Event, lease: Lease) -> Outcome:
        if self._terms:
            self._build_term()  # the first term's parts were built at start
        self._terms += 1
        if self.webhook is not None:
            self.webhook.sink = self.intake
        tasks = self._spawn()
        self._tasks = tasks
        self.started.set()
        # What start-up loaded (modules, clients, settings) lives as long as the process: out of the
        # collector's sight, a full collection no longer walks it (50-80 ms pauses under webhook load).
        gc.freeze()
        self._sources_changed()
        outcome = await self._supervise(tasks, stop, lease.lost)
        if outcome is Outcome.LEASE_LOST:
            # Another instance may already be embedding: stop at once, no grace, nothing new.
            logger.error("lost the lease (its database connection ended): stopping now, standing by")
            self._stopping.set()
            if self.webhook is not None:
                self.webhook.sink = None
                if self.intake is not None:
                    self.intake.source_state(Source.WEBHOOK, False)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.pipeline is not None:
                await self.pipeline.drain(0)
            # A standby has no parts at work: the watchdog and the gauges must not see this term's.
            self._tasks = {}
            if self.scheduler is not None:
                self.scheduler.drain_all()
            return outcome
        await self._shutdown(tasks)
        return outcome

    async def _start(self, stop: asyncio.Event) -> None:
        settings = self.settings
        catalog = await load_catalog(settings, wait=settings.startup_timeout, stop=stop)
        try:
            self.store = await Store.connect(settings, catalog)
        except DATABASE_ERRORS as exc:
            raise FatalError(f"cannot open the database pool: {type(exc).__name__}: {exc}") from exc
        embedder = build_embedder(settings, self.embed_stats)
        self._embedder = embedder
        self.metrics.watch_embedder(self.embed_stats)
        if SourceName.REALTIME in settings.active_sources:
            self.metrics.watch_realtime(self.realtime_status)
        for source in settings.active_sources:
            self.metrics.source_up.labels(source.value).set(0)  # present (and 0) before the first report
        self.metrics.pending.set_function(lambda: self.scheduler.pending_count if self.scheduler else 0)
        self.metrics.in_flight.set_function(lambda: self.scheduler.in_flight_count if self.scheduler else 0)
        self.metrics.oldest_pending.set_function(self._oldest_pending_age)
        self.metrics.pending_limit.set(settings.max_pending)
        self._build_term()
        if SourceName.WEBHOOK in settings.active_sources:
            self.webhook = WebhookReceiver(
                sink=None,  # a standby until it holds the lease
                id_kind=catalog.id_kind,
                table=settings.table,
                id_column=settings.id_column,
                key=settings.webhook_key,
                token=settings.webhook_token.get_secret_value() if settings.webhook_token else None,
                rate_limit=settings.webhook_rate_limit,
            )
        self.http = HttpServer(
            settings.http_host,
            settings.http_port,
            metrics=self.metrics,
            readiness=self.readiness,
            webhook=self.webhook,
        )
        try:
            await self.http.start()
        except OSError as exc:
            raise FatalError(f"cannot listen on {settings.http_host}:{settings.http_port}: {exc}") from exc
        self._catalog = catalog
        if settings.active_sources == {SourceName.REALTIME} and settings.safety_interval == 0:
            logger.warning(
                "realtime is the only source and VECTOR_SYNC_SAFETY_INTERVAL is off: events Realtime drops "
                "without a trace (its rate limit) wait for the next reconnect; 1m is recommended"
            )
        logger.info(
            "vector-sync started: table {table}, sources {sources}, embedder {embedder} model {model}",
            table=str(settings.table),
            sources=",".join(sorted(source.value for source in settings.active_sources)),
            embedder=settings.active_embedder.value,
            model=embedder.model,
        )

    def _build_term(self) -> None:
        """Fresh working parts for a term as leader (a previous term's queue is the drift pass's now)."""
        settings = self.settings
        assert self.store is not None and self._embedder is not None
        self._stopping = asyncio.Event()
        self.scheduler = Scheduler(
            insert_delay=settings.insert_delay, update_delay=settings.update_delay, max_pending=settings.max_pending
        )
        self.intake = Intake(self.scheduler, self.metrics, on_state=self._sources_changed)
        self.drift = DriftPass(
            self.store, self.scheduler, self.intake.offer, on_found=self._count_drift, prune_log=True
        )
        self.intake.drift = self.drift
        self.pending = PendingDrain(self.store, self.intake.recheck)
        self.intake.pending = self.pending
        self.pipeline = Pipeline(
            scheduler=self.scheduler,
            store=self.store,
            embedder=self._embedder,
            metrics=self.metrics,
            batch_size=settings.batch_size,
            max_concurrent_batches=settings.max_concurrent_requests,
        )

    def _spawn(self) -> dict[asyncio.Task[None], str]:
        assert self.pipeline and self.drift and self.intake and self.pending and self._catalog
        assert self.settings.database_url
        pending = self.pending
        jobs: dict[str, Coroutine[Any, Any, None]] = {
            "pipeline": self.pipeline.run(self._stopping),
            "drift": self.drift.run(self._stopping),
            "pending drain": pending.run(self._stopping),
        }
        # One LISTEN connection: change notifications when `listen` is a source, and always the
        # reconciler's word that a change is waiting in pending_webhooks.
        listen = (
            ListenSource(self.intake, self._catalog.id_kind)
            if SourceName.LISTEN in self.settings.active_sources
            else None
        )
        channels: dict[str, Callable[[str], None]] = {PENDING_CHANNEL: lambda _: pending.request("notified")}
        if listen is not None:
            channels[CHANNEL] = listen.on_notification

        def connected() -> None:
            if listen is not None:
                listen.on_connect()
            pending.request("listener connected")

        listener = PgListener(
            self.settings.database_url.get_secret_value(),
            channels,
            on_connect=connected,
            on_disconnect=listen.on_disconnect if listen is not None else lambda: None,
        )
        jobs["listen"] = listener.run(self._stopping)
        if SourceName.REALTIME in self.settings.active_sources:
            assert self.settings.supabase_url and self.settings.supabase_key
            realtime = RealtimeSource(
                self.settings.supabase_url,
                self.settings.supabase_key.get_secret_value(),
                self.intake,
                id_kind=self._catalog.id_kind,
                schema=self.settings.table.schema,
                table=self.settings.table.name,
                id_column=self.settings.id_column,
                status=self.realtime_status,
                ready_timeout=self.settings.realtime_ready_timeout,
            )
            jobs["realtime"] = realtime.run(self._stopping)
        if self.settings.safety_interval > 0:
            jobs["safety interval"] = self.drift.run_every(self.settings.safety_interval, self._stopping)
        if self.webhook is not None:
            self.intake.source_state(Source.WEBHOOK, True)
        if SourceName.LISTEN not in self.settings.active_sources:
            # Otherwise the listener asks once it is connected: a pass before that could miss
            # changes made between the pass and the LISTEN.
            self.drift.request("start-up")
        return {asyncio.create_task(job, name=f"vector-sync-{name}"): name for name, job in jobs.items()}

    async def _supervise(
        self, tasks: dict[asyncio.Task[None], str], stop: asyncio.Event, lease_lost: asyncio.Event
    ) -> Outcome:
        waiters: dict[asyncio.Future[Any], Outcome] = {
            asyncio.ensure_future(stop.wait()): Outcome.STOPPED,
            asyncio.ensure_future(lease_lost.wait()): Outcome.LEASE_LOST,
        }
        try:
            done, _ = await asyncio.wait([*tasks, *waiters], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        for task in done:
            if task not in tasks:
                continue
            error = task.exception() if not task.cancelled() else None
            # A supervised part ending on its own is a bug or a fatal error: never silent.
            logger.opt(exception=error).error(
                "{name} stopped unexpectedly: {error}; shutting down", name=tasks[task], error=repr(error)
            )
            return Outcome.FAILED
        return next(outcome for waiter, outcome in waiters.items() if waiter in done)

    async def _shutdown(self, tasks: dict[asyncio.Task[None], str]) -> None:
        started = time.monotonic()
        logger.info("stopping: intake closed, draining for up to {grace:.0f}s", grace=self.settings.shutdown_grace)
        if self.webhook is not None:
            self.webhook.stopping = True
        self._stopping.set()
        await asyncio.wait(list(tasks), timeout=self.settings.shutdown_grace)
        cut = (
            await self.pipeline.drain(max(0.0, self.settings.shutdown_grace - (time.monotonic() - started)))
            if self.pipeline
            else 0
        )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        left = self.scheduler.drain_all() if self.scheduler else []
        logger.info(
            "stopped in {took:.1f}s: {cut} batches cancelled, {left} ids left for the next start's drift pass",
            took=time.monotonic() - started,
            cut=cut,
            left=len(left),
        )

    async def _close(self) -> None:
        if self.http is not None:
            await self.http.stop()
        if self._embedder is not None:
            await self._embedder.close()
        if self.store is not None:
            await self.store.close()

    async def readiness(self) -> dict[str, Any]:
        details: dict[str, Any] = {}
        database = False
        if self.store is not None:
            try:
                async with asyncio.timeout(READINESS_QUERY_TIMEOUT):
                    await self.store.pool.fetchval("select 1")
                database = True
            except DATABASE_ERRORS:
                database = False
        details["database"] = "ok" if database else "unreachable"
        sources = {}
        live = self.intake.live if self.intake else {}
        for name in sorted(self.settings.active_sources):
            sources[name.value] = "live" if live.get(Source(name.value)) else "down"
        details["sources"] = sources
        if SourceName.REALTIME in self.settings.active_sources:
            details["realtime"] = {
                "state": self.realtime_status.state,
                "generation": self.realtime_status.generation,
            }
        paused = self.pipeline.paused if self.pipeline else False
        details["embedding"] = "paused" if paused else "ok"
        details["role"] = self.role.value
        details["ready"] = (
            database and self.role is Role.LEADER and not paused and all(state == "live" for state in sources.values())
        )
        return details

    def _oldest_pending_age(self) -> float:
        if self.scheduler is None:
            return 0.0
        since = self.scheduler.oldest_pending_since()
        return 0.0 if since is None else max(0.0, time.monotonic() - since)

    def _count_drift(self, found: int) -> None:
        self.metrics.drift_passes.inc()
        self.metrics.drift_rows.inc(found)
