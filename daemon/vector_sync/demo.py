"""`vector-sync demo`: the whole path on this machine, with no account and no key.

Embedded Postgres in a temporary directory → migrations → sample projects → the daemon (LISTEN and
webhook sources) → an edit, an edit that changes nothing embedded, a delete, an insert, a duplicate
webhook → what happened to each, and a search.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from vector_sync import logs
from vector_sync.app import Daemon
from vector_sync.config import EmbedderName, decode_webhook_secret, load_settings
from vector_sync.embedded import EmbeddedPostgres, ensure_sample_table
from vector_sync.embedder import Embedding, build_embedder
from vector_sync.migrations import migrate
from vector_sync.sources.webhook import sign

INSERT_DELAY = "2s"
DEADLINE_SECONDS = 30.0

SAMPLE_PROJECTS = [
    ("Tidewater", "Offline-first note taking app that syncs markdown files between laptop and phone."),
    ("Ledgerline", "Double-entry bookkeeping for freelancers, with invoice reminders and tax estimates."),
    ("Birdsong", "Identifies bird species from short audio recordings made in the field."),
    ("Kilnwise", "Firing schedules and glaze recipes for pottery studios, shared between members."),
    ("Trailhead", "Plans multi-day hikes with water sources, campsites and elevation profiles."),
    ("Quillmate", "A writing assistant that tracks characters and timelines across novel chapters."),
    ("Harborview", "Berth booking and fuel ordering for small marinas."),
    ("Sprocket", "Maintenance log for bicycles: chain wear, tyre pressure and service intervals."),
    ("Pantry Pal", "Tracks what is in the kitchen and suggests recipes before food expires."),
    ("Greenhouse", "Sensor dashboard for greenhouse temperature, humidity and soil moisture."),
    ("Metronome", "Practice planner for musicians with tempo ramps and progress charts."),
    ("Relay", "Volunteer shift scheduling for food banks and community kitchens."),
    ("Atlas Tiles", "Self-hosted map tile server for offline maps on field tablets."),
    ("Pulsecheck", "Uptime monitoring for small websites with SMS alerts."),
    ("Loomwork", "Pattern designer for hand weavers with yarn quantity calculations."),
    ("Courtside", "Booking and league tables for a neighbourhood tennis club."),
    ("Fieldnotes", "Structured observation forms for ecologists, exported to CSV."),
    ("Brewlog", "Home brewing recipes, fermentation temperatures and gravity readings."),
    ("Signpost", "Accessible wayfinding for large buildings using QR codes and audio."),
    ("Tallyho", "Inventory counts for small shops with barcode scanning on a phone."),
    ("Moodboard", "Collects images and colour palettes for interior design projects."),
    ("Stargazer", "Tonight's visible planets and satellites for amateur astronomers."),
    ("Petals", "Florist order management with delivery routes and stem inventory."),
    ("Chalkboard", "Lesson plans and homework tracking for primary school teachers."),
    ("Waypoint", "Fleet tracking for delivery bikes with battery levels and routes."),
    ("Sourdough", "Starter feeding reminders and bake timelines for home bakers."),
    ("Keystone", "Password rotation reminders and audit reports for small IT teams."),
    ("Riverwatch", "Flood level alerts from community river gauges."),
    ("Canopy", "Tree inventory and pruning schedules for city arborists."),
    ("Sketchpad", "Shared whiteboard for remote design critiques."),
]


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _wait_for(check: Callable[[], Awaitable[bool]], what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < DEADLINE_SECONDS:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise TimeoutError(f"demo: timed out waiting for {what}")


async def _demo(dsn: str) -> int:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    use_openai = bool(os.environ.get("OPENAI_API_KEY"))
    settings = load_settings(
        require_database=False,
        DATABASE_URL=dsn,
        VECTOR_SYNC_SOURCES="listen,webhook",
        VECTOR_SYNC_WEBHOOK_SECRET=secret,
        VECTOR_SYNC_EMBEDDER=EmbedderName.OPENAI if use_openai else EmbedderName.HASH,
        VECTOR_SYNC_EMBEDDING_DIMENSIONS=1536 if use_openai else 256,
        VECTOR_SYNC_INSERT_DELAY=INSERT_DELAY,
        VECTOR_SYNC_HTTP_HOST="127.0.0.1",
        VECTOR_SYNC_HTTP_PORT=0,
        VECTOR_SYNC_LOG_LEVEL=os.environ.get("VECTOR_SYNC_LOG_LEVEL", "WARNING"),
    )
    logs.setup(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    embedder_name = f"openai {settings.embedding_model}" if use_openai else "hash (offline, lexical only)"
    _say(f"embedder: {embedder_name}; INSERT settle delay shortened to {INSERT_DELAY} for the demo (default 20s)")

    conn = await asyncpg.connect(dsn)
    try:
        await ensure_sample_table(dsn)
        await migrate(conn, settings)
        await conn.executemany("insert into projects (name, description) values ($1, $2)", SAMPLE_PROJECTS)
        _say(f"inserted {len(SAMPLE_PROJECTS)} sample projects")

        daemon = Daemon(settings)
        stop = asyncio.Event()
        runner = asyncio.create_task(daemon.run(stop))
        await asyncio.wait_for(daemon.started.wait(), timeout=DEADLINE_SECONDS)

        async def stored_version(project_id: int) -> int | None:
            value: int | None = await conn.fetchval(
                "select version from vector_sync.project_embeddings where project_id = $1", project_id
            )
            return value

        async def all_embedded() -> bool:
            return bool(
                await conn.fetchval(
                    "select count(*) = (select count(*) from projects) from vector_sync.project_embeddings"
                )
            )

        took = await _wait_for(all_embedded, "the sample projects to be embedded")
        stats = daemon.embed_stats
        _say(
            f"all {len(SAMPLE_PROJECTS)} embedded {took:.1f}s after start "
            f"({stats.requests} API request(s), {stats.inputs} inputs)"
        )
        before = (stats.requests, stats.inputs)
        results: list[tuple[str, str]] = []

        # 1. A real edit of embedded text, announced by NOTIFY and (as pg_net would) by a webhook.
        edited = 2
        version = await conn.fetchval(
            "update projects set description = description || ' Now with receipt scanning.' "
            "where id = $1 returning version",
            edited,
        )
        inputs = stats.inputs
        status = await _post_webhook(daemon, secret, edited, version)
        await _wait_for(lambda: _equals(stored_version(edited), version), "the edit to be embedded")
        await _wait_for(lambda: _true(daemon.scheduler is not None and daemon.scheduler.is_idle()), "idle")
        results.append((f"project {edited} (description edited)", f"embedded at version {version}"))
        sent = stats.inputs - inputs
        verdict = "deduplicated: one API input for both" if sent == 1 else f"SENT {sent} TIMES"
        results.append(("  same change by webhook", f"HTTP {status}, {verdict}"))
        checks = [sent == 1]

        # 2. A change in a column that is not embedded: the version moves, no API call.
        unchanged = 5
        version = await conn.fetchval(
            "update projects set stars = stars + 1 where id = $1 returning version", unchanged
        )
        inputs = stats.inputs
        await _wait_for(lambda: _equals(stored_version(unchanged), version), "the stars-only change")
        skipped = stats.inputs == inputs
        verdict = "skipped as unchanged (no API call)" if skipped else "RE-EMBEDDED (an API call)"
        results.append((f"project {unchanged} (stars only)", f"{verdict}, stored version now {version}"))
        checks.append(skipped)

        # 3. A delete: the foreign key cascade removes the vector in the same transaction.
        deleted = 9
        await conn.execute("delete from projects where id = $1", deleted)
        gone = await stored_version(deleted) is None
        results.append((f"project {deleted} (deleted)", "vector removed" if gone else "VECTOR STILL PRESENT"))

        # 4. An insert waits for its settle delay before it is embedded.
        new_id = await conn.fetchval(
            "insert into projects (name, description) values ($1, $2) returning id",
            "Compost Club",
            "Tracks neighbourhood compost bins, pickup days and finished compost for gardens.",
        )
        waited = await _wait_for(lambda: _equals(stored_version(new_id), 1), "the insert to be embedded")
        results.append((f"project {new_id} (inserted)", f"embedded {waited:.1f}s after commit"))

        calls = (stats.requests - before[0], stats.inputs - before[1])
        _say()
        for what, outcome in results:
            _say(f"  {what:<36} {outcome}")
        _say(f"\nAPI use for these changes: {calls[0]} request(s), {calls[1]} input(s) (one per real text change)")

        query = "bird recordings"
        vector = (await daemon_embed(daemon, query))[0]
        assert daemon.store is not None
        hits = await daemon.store.search(vector, 3, min_similarity=0.05)
        _say(f'\nsearch "{query}":')
        for hit in hits:
            _say(f"  {hit.similarity:.3f}  {hit.text.splitlines()[0]}")

        stop.set()
        code = await runner
        return 0 if code == 0 and gone and all(checks) else 1
    finally:
        await conn.close()


async def _true(value: bool) -> bool:
    return value


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool((await value) == expected)


async def daemon_embed(daemon: Daemon, text: str) -> list[Embedding]:
    embedder = build_embedder(daemon.settings)
    try:
        return await embedder.embed([text])
    finally:
        await embedder.close()


async def _post_webhook(daemon: Daemon, secret: str, project_id: int, version: int) -> int:
    """Send the change as the database's pg_net trigger would, signed with Standard Webhooks."""
    assert daemon.http is not None
    body = json.dumps(
        {"type": "UPDATE", "table": "projects", "schema": "public", "record": {"id": project_id, "version": version}}
    ).encode()
    webhook_id = f"demo-{project_id}-{version}"
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": "v1," + sign(decode_webhook_secret(secret), webhook_id, timestamp, body),
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{daemon.http.port}/webhook", data=body, headers=headers) as response,
    ):
        return response.status


def run_demo(*, keep: bool = False) -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="vector-sync-demo-"))
    server = EmbeddedPostgres(workdir / "pgdata", delete=not keep)
    try:
        dsn = server.start()
        _say(f"embedded PostgreSQL with pgvector started in {workdir}")
        code = asyncio.run(_demo(dsn))
    finally:
        server.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    _say(f"\ndemo finished in {time.monotonic() - started:.1f}s" + ("" if keep else "; temporary files removed"))
    return code
