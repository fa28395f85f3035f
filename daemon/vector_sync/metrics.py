"""Prometheus metrics, in a registry of their own per daemon (tests run several daemons in one process)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vector_sync.embedder import EmbedStats
from vector_sync.sources.realtime import RealtimeStatus, State

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.events = Counter("vector_sync_events_total", "Change events received", ["source"], registry=registry)
        self.offers = Counter(
            "vector_sync_offers_total",
            "What the scheduler did with an event (accepted, duplicate, cancelled, full)",
            ["result"],
            registry=registry,
        )
        self.malformed = Counter(
            "vector_sync_malformed_events_total", "Inputs dropped as malformed", ["source"], registry=registry
        )
        self.pending = Gauge("vector_sync_pending", "Ids waiting for their due time", registry=registry)
        self.in_flight = Gauge("vector_sync_in_flight", "Ids being embedded", registry=registry)
        self.pending_limit = Gauge(
            "vector_sync_pending_limit", "Ids the scheduler may hold (VECTOR_SYNC_MAX_PENDING)", registry=registry
        )
        self.oldest_pending = Gauge(
            "vector_sync_oldest_pending_seconds",
            "How long the longest-waiting pending id has waited",
            registry=registry,
        )
        self.errors = Counter(
            "vector_sync_embedding_errors_total", "Embedding failures by kind", ["kind"], registry=registry
        )
        self.stored = Counter("vector_sync_vectors_stored_total", "Vectors written", registry=registry)
        self.unchanged = Counter(
            "vector_sync_skipped_unchanged_total",
            "Rows whose text and model were unchanged (version moved, no API call)",
            registry=registry,
        )
        self.dead_letters = Counter(
            "vector_sync_dead_letters_total", "Rows the API refused for good", registry=registry
        )
        self.batches = Counter("vector_sync_batches_total", "Batches processed", registry=registry)
        self.latency = Histogram(
            "vector_sync_commit_to_stored_seconds",
            "From the change's commit to its vector being stored",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.drift_passes = Counter("vector_sync_drift_passes_total", "Drift passes run", registry=registry)
        self.drift_rows = Counter(
            "vector_sync_drift_rows_total", "Rows found missing or behind by drift passes", registry=registry
        )
        self.source_up = Gauge("vector_sync_source_up", "1 while a source is live", ["source"], registry=registry)
        self.reconnects = Counter(
            "vector_sync_source_reconnects_total", "Source reconnects", ["source"], registry=registry
        )
        self.webhook_responses = Counter(
            "vector_sync_webhook_responses_total", "Webhook answers by status", ["status"], registry=registry
        )

    def watch_embedder(self, stats: EmbedStats) -> None:
        """Export the embedder's own counters (it keeps them without knowing about Prometheus)."""
        self.registry.register(_EmbedStatsCollector(stats))

    def watch_realtime(self, status: RealtimeStatus) -> None:
        self.registry.register(_RealtimeCollector(status))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EmbedStatsCollector(Collector):
    def __init__(self, stats: EmbedStats) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        for name, help_text, value in (
            ("vector_sync_embedding_requests", "Embedding API requests sent", self._stats.requests),
            ("vector_sync_embedding_inputs", "Texts embedded by the API", self._stats.inputs),
            ("vector_sync_embedding_tokens", "Tokens the API reported", self._stats.tokens),
            ("vector_sync_embedding_retries", "Embedding requests retried", self._stats.retries),
        ):
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family


class _RealtimeCollector(Collector):
    def __init__(self, status: RealtimeStatus) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        status = self._status
        state = GaugeMetricFamily(
            "vector_sync_realtime_state", "1 for the Realtime supervisor's current state", labels=["state"]
        )
        for name in State.ALL:
            state.add_metric([name], 1 if status.state == name else 0)
        yield state
        generation = GaugeMetricFamily(
            "vector_sync_realtime_generation", "Realtime sessions built so far (each is a new client and topic)"
        )
        generation.add_metric([], status.generation)
        yield generation
        failed = CounterMetricFamily("vector_sync_realtime_sessions_failed", "Realtime sessions that ended unhealthy")
        failed.add_metric([], status.sessions_failed)
        yield failed
        readiness = CounterMetricFamily(
            "vector_sync_realtime_readiness", "Readiness messages (Subscribed to PostgreSQL) received"
        )
        readiness.add_metric([], status.readiness)
        yield readiness
        age = status.last_event_age()
        if age is not None:
            last = GaugeMetricFamily(
                "vector_sync_realtime_last_event_age_seconds", "Seconds since the last postgres_changes frame"
            )
            last.add_metric([], age)
            yield last
        errors = CounterMetricFamily(
            "vector_sync_realtime_error_events",
            "postgres_changes error events (413 truncated, 400/401 dropped by the client library)",
            labels=["code"],
        )
        for code in ("413", "400", "401", "other"):
            errors.add_metric([code], status.error_events.get(code, 0))
        yield errors
