"""The one interface every source talks to. Sources never see the scheduler, each other, or metrics."""

from __future__ import annotations

from typing import Protocol

from vector_sync.events import ChangeEvent, ProjectId, Source


class EventSink(Protocol):
    def offer(self, event: ChangeEvent) -> None:
        """Hand over an event. Never blocks, never raises."""

    def malformed(self, source: Source, reason: str) -> None:
        """Count (and log once per kind) an input that could not become an event."""

    def request_drift(self, reason: str) -> None:
        """Ask for a full drift pass: events may have been missed (a reconnect, a gap)."""

    def request_recent(self, reason: str) -> None:
        """Ask for the rows changed since the last pass to be checked (an event that named no row)."""

    def recheck(self, project_id: ProjectId, reason: str) -> None:
        """Ask whether one row's vector is behind (an event that named the row but not its version)."""

    def source_state(self, source: Source, live: bool) -> None:
        """Report whether a source is live (for readiness, metrics and the log)."""
