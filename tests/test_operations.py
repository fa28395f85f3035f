"""What an operator sees: metrics that move with the work, /readyz through a database outage, a
SIGTERM in the middle of a burst, and webhooks refused while the daemon stops."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
from embedding_api import EmbeddingAPI, Fault, expected_embedding
from prometheus_client.parser import text_string_to_metric_families
from support import (
    DIMENSIONS,
    RunningDaemon,
    all_current,
    make_settings,
    post_webhook,
    running,
    signed_headers,
    wait_until,
    webhook_body,
)
from test_cli import free_port, ready, served_env, serving
from vector_sync.store import content_text, sha256_hex

# --- helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """One GET /metrics, parsed: sample name + labels → value."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def __call__(self, name: str, default: float | None = None, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        if key in self.samples:
            return self.samples[key]
        if default is None:
            raise AssertionError(f"no sample {name}{labels or ''} in /metrics")
        return default


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return Scrape(samples)


def grew(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """How much a counter moved between two scrapes (a labelled sample not yet seen counts as 0)."""
    return after(name, 0.0, **labels) - before(name, 0.0, **labels)


async def readyz(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as response:
        return response.status, await response.json()


def settled(handle: RunningDaemon) -> bool:
    """Nothing pending, nothing in flight, no batch running: every counter has caught up."""
    daemon = handle.daemon
    return (
        daemon.scheduler is not None
        and daemon.scheduler.is_idle()
        and daemon.pipeline is not None
        and not daemon.pipeline.busy
    )


async def insert(db: asyncpg.Connection, name: str, description: str) -> int:
    value: int = await db.fetchval(
        "insert into projects (name, description) values ($1, $2) returning id", name, description
    )
    return value


# --- metrics -----------------------------------------------------------------------------------


async def test_metrics_move_as_events_flow(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    count = 6
    # One retry per request, so two 500s in a row exhaust it and count as a transient error.
    settings = make_settings(dsn, api.url, VECTOR_SYNC_MAX_RETRIES=1)
    async with running(settings) as handle:
        url = handle.url

        async def drift_passes() -> bool:
            return (await scrape(url))("vector_sync_drift_passes_total") >= 1

        # Inserted after the start-up pass, so each row reaches the daemon by its NOTIFY only.
        await wait_until(drift_passes, what="the start-up drift pass")
        ids = [await insert(db, f"metric project {i}", f"topic number {i}") for i in range(count)]
        await wait_until(lambda: all_current(db), what="the inserts to be embedded")
        await wait_until(lambda: settled(handle), what="the daemon to settle")
        m = await scrape(url)
        assert m("vector_sync_events_total", source="listen") >= count
        assert m("vector_sync_vectors_stored_total") == count
        assert m("vector_sync_embedding_inputs_total") == count == api.input_count
        assert m("vector_sync_embedding_requests_total") == api.request_count
        assert m("vector_sync_embedding_tokens_total") > 0
        assert m("vector_sync_batches_total") >= 1
        assert m("vector_sync_commit_to_stored_seconds_count") == count
        assert 0 < m("vector_sync_commit_to_stored_seconds_sum") < 60 * count
        assert m("vector_sync_drift_passes_total") >= 1
        assert m("vector_sync_source_up", source="listen") == 1
        assert m("vector_sync_source_up", source="webhook") == 1
        assert m("vector_sync_pending") == 0
        assert m("vector_sync_in_flight") == 0
        assert m("vector_sync_oldest_pending_seconds") == 0
        assert m("vector_sync_pending_limit") == settings.max_pending
        assert m("vector_sync_dead_letters_total") == 0
        assert m("vector_sync_skipped_unchanged_total") == 0

        # A webhook for a version already stored: a duplicate, no API call.
        body = webhook_body("INSERT", ids[0], 1)
        status, _ = await post_webhook(url, body, signed_headers(body))
        assert status == 202
        after = await scrape(url)
        assert grew(m, after, "vector_sync_offers_total", result="duplicate") == 1
        assert grew(m, after, "vector_sync_events_total", source="webhook") == 1
        assert grew(m, after, "vector_sync_webhook_responses_total", status="202") == 1
        assert grew(m, after, "vector_sync_embedding_requests_total") == 0

        # An edit of a column that is not embedded: the version moves, nothing is paid.
        m = after
        await db.execute("update projects set stars = stars + 1 where id = $1", ids[1])
        await wait_until(lambda: all_current(db), what="the stars-only edit to move the stored version")
        await wait_until(lambda: settled(handle), what="the daemon to settle")
        after = await scrape(url)
        assert grew(m, after, "vector_sync_skipped_unchanged_total") == 1
        assert grew(m, after, "vector_sync_vectors_stored_total") == 0
        assert grew(m, after, "vector_sync_embedding_inputs_total") == 0

        # Two 500s: one retry, then a transient error; the row is deferred and stored on its next try.
        m = after
        api.script(Fault.server_error(500), Fault.server_error(500))
        await db.execute("update projects set description = 'a new topic' where id = $1", ids[2])
        await wait_until(lambda: all_current(db), what="the edit to be embedded after the 500s")
        await wait_until(lambda: settled(handle), what="the daemon to settle")
        after = await scrape(url)
        assert api.failures_by_status() == {500: 2}
        assert grew(m, after, "vector_sync_embedding_retries_total") == 1
        assert grew(m, after, "vector_sync_embedding_errors_total", kind="transient") == 1
        assert grew(m, after, "vector_sync_vectors_stored_total") == 1
        assert grew(m, after, "vector_sync_dead_letters_total") == 0

        # An input the API refuses (400): one dead letter, nothing stored.
        m = after
        await insert(db, "poisoned", "POISON in the text")

        async def dead_lettered() -> bool:
            return bool(await db.fetchval("select count(*) = 1 from vector_sync.dead_letters"))

        await wait_until(dead_lettered, what="the dead letter")
        await wait_until(lambda: settled(handle), what="the daemon to settle")
        after = await scrape(url)
        assert grew(m, after, "vector_sync_dead_letters_total") == 1
        assert grew(m, after, "vector_sync_embedding_errors_total", kind="bad_input") == 1
        assert grew(m, after, "vector_sync_vectors_stored_total") == 0
        assert after("vector_sync_source_up", source="listen") == 1


# --- /readyz through a database outage ---------------------------------------------------------


def _pg_socket(dsn: str) -> tuple[str, str]:
    """(unix socket path, database name) of a DSN like postgresql://postgres:@/db?host=/dir."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    directory = query["host"][0]
    port = query.get("port", [str(parts.port or 5432)])[0]
    return f"{directory}/.s.PGSQL.{port}", parts.path.lstrip("/")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()


class PgProxy:
    """TCP on 127.0.0.1 → the embedded server's unix socket (it listens on no TCP port).

    `cut()` drops every connection and refuses new ones, as a lost network would; `restore()`
    listens again on the same port."""

    def __init__(self, socket_path: str) -> None:
        self._socket_path = socket_path
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await wait_until(lambda: not self._tasks, timeout=10, what="the proxy's links to close")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._links.add(writer)
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_unix_connection(self._socket_path)
            except OSError:
                return
            self._links.add(upstream_writer)
            try:
                await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
            finally:
                self._links.discard(upstream_writer)
                upstream_writer.transport.abort()
        finally:
            self._links.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)


async def test_readyz_follows_the_database_away_and_back(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    socket_path, database = _pg_socket(dsn)
    proxy = PgProxy(socket_path)
    await proxy.restore()
    try:
        proxied = f"postgresql://postgres@127.0.0.1:{proxy.port}/{database}"
        async with running(make_settings(proxied, api.url)) as handle:
            url = handle.url

            async def answers(status: int) -> bool:
                return (await readyz(url))[0] == status

            await wait_until(lambda: answers(200), timeout=60, what="/readyz 200 through the proxy")
            await insert(db, "before", "the outage")
            await wait_until(lambda: all_current(db), what="a change embedded through the proxy")

            await proxy.cut()
            await wait_until(lambda: answers(503), timeout=60, what="/readyz 503 with the database gone")
            status, body = await readyz(url)
            assert status == 503
            assert body["database"] == "unreachable"
            assert body["ready"] is False
            # Made while the daemon cannot see the database: its NOTIFY never reaches the daemon.
            await insert(db, "during", "the outage")

            await proxy.restore()
            await wait_until(lambda: answers(200), timeout=90, what="/readyz 200 with the database back")
            status, body = await readyz(url)
            assert body["database"] == "ok"
            assert body["sources"] == {"listen": "live", "webhook": "live"}
            await wait_until(lambda: all_current(db), timeout=60, what="the change made during the outage")
    finally:
        await proxy.cut()


# --- SIGTERM in the middle of a burst ----------------------------------------------------------

GRACE = 3.0
BURST = 60
EDITED = 10


def _json_lines(log: str) -> Iterator[dict[str, Any]]:
    for line in log.splitlines():
        if line.startswith("{"):
            yield json.loads(line)


async def _check_not_half_written(db: asyncpg.Connection, texts: dict[int, dict[int, str]]) -> int:
    """Every stored vector is the vector of the text its row had at the stored version; returns
    how many rows are not current (missing, or behind)."""
    rows = await db.fetch(
        """
        select t.id, t.version, e.version as stored, e.content_sha256, e.embedding::text as embedding
          from projects t left join vector_sync.project_embeddings e on e.project_id = t.id
        """
    )
    behind = 0
    for row in rows:
        history = texts[row["id"]]
        assert row["version"] == max(history)
        if row["stored"] is None or row["stored"] < row["version"]:
            behind += 1
        if row["stored"] is None:
            continue
        assert row["stored"] in history, f"project {row['id']}: stored version {row['stored']} never existed"
        text = history[row["stored"]]
        assert row["content_sha256"] == sha256_hex(text), f"project {row['id']}: hash of another text"
        vector = json.loads(row["embedding"])
        expected = expected_embedding(text, DIMENSIONS)
        assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(vector, expected, strict=True))
    return behind


async def test_sigterm_during_a_burst_stops_in_time_and_the_next_start_finishes(
    db: asyncpg.Connection, dsn: str, api: EmbeddingAPI
) -> None:
    port = free_port()
    env = served_env(
        dsn,
        api,
        port,
        VECTOR_SYNC_LOG_FORMAT="json",
        VECTOR_SYNC_SHUTDOWN_GRACE=f"{GRACE}s",
        VECTOR_SYNC_BATCH_SIZE="5",
        VECTOR_SYNC_MAX_CONCURRENT_REQUESTS="2",
        VECTOR_SYNC_REQUEST_TIMEOUT="120s",
    )
    url = f"http://127.0.0.1:{port}"
    api.latency = 0.3
    texts: dict[int, dict[int, str]] = {}
    async with serving("run", env=env) as process:
        assert process.stderr is not None
        log_task = asyncio.ensure_future(process.stderr.read())  # drained all along: a full pipe would block it
        await wait_until(lambda: ready(port), timeout=60, what="/readyz 200")
        names = [f"burst {i}" for i in range(BURST)]
        descriptions = [f"first text of {i}" for i in range(BURST)]
        for row in await db.fetch(
            "insert into projects (name, description) select * from unnest($1::text[], $2::text[]) "
            "returning id, name, description",
            names,
            descriptions,
        ):
            texts[row["id"]] = {1: content_text([row["name"], row["description"]])}

        async def some_stored() -> bool:
            return bool(await db.fetchval("select count(*) >= 5 from vector_sync.project_embeddings"))

        await wait_until(some_stored, what="the first batches to be stored")
        for project_id in list(texts)[:EDITED]:
            name = await db.fetchval(
                "update projects set description = 'second text' where id = $1 returning name", project_id
            )
            texts[project_id][2] = content_text([name, "second text"])

        async def all_events_seen() -> bool:
            return (await scrape(url))("vector_sync_events_total", 0, source="listen") >= BURST + EDITED

        await wait_until(all_events_seen, what="every NOTIFY to reach the daemon")
        # Both batch slots now wait on an API that does not answer: they must be cut at the grace.
        api.script(Fault.hang(300), Fault.hang(300))
        await wait_until(
            lambda: sum(1 for r in api.requests if r.in_flight and r.fault == "hang") == 2,
            what="two batches hanging on the API",
        )
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=GRACE + 60)
        took = time.monotonic() - sent
        print(f"SHUTDOWN {took:.2f}")
        log = (await log_task).decode()
    assert code == 0, log[-3000:]
    assert took < GRACE + 10, f"SIGTERM took {took:.1f}s with a {GRACE}s grace period"
    stopped = [entry for entry in _json_lines(log) if entry["message"].startswith("stopped in")]
    assert len(stopped) == 1, log[-3000:]
    assert stopped[0]["cut"] == 2
    assert not [entry for entry in _json_lines(log) if entry["level"] in ("ERROR", "CRITICAL")]

    behind = await _check_not_half_written(db, texts)
    assert behind > 0  # the burst really was cut short
    assert stopped[0]["left"] == behind  # every row not current was one of the ids left

    # The next start's drift pass finds what was left, and pays only for that.
    api.clear_script()
    api.latency = 0.0
    inputs_before = api.input_count
    port = free_port()
    async with serving("run", env=dict(env, VECTOR_SYNC_HTTP_PORT=str(port))) as process:
        await wait_until(lambda: all_current(db), timeout=60, what="the second start to finish the burst")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=GRACE + 60) == 0
    assert await _check_not_half_written(db, texts) == 0
    assert api.input_count - inputs_before == behind


# --- webhooks while stopping -------------------------------------------------------------------


async def test_webhooks_answer_503_while_stopping(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    settings = make_settings(dsn, api.url, VECTOR_SYNC_SHUTDOWN_GRACE="5s", VECTOR_SYNC_REQUEST_TIMEOUT="120s")
    api.script(Fault.hang(300))  # a batch in flight holds the daemon in its grace period
    async with running(settings) as handle:
        url = handle.url
        project = await insert(db, "Lantern", "night walks")
        await wait_until(lambda: api.in_flight == 1, what="the batch to hang on the API")
        body = webhook_body("UPDATE", project, 1)
        status, _ = await post_webhook(url, body, signed_headers(body))
        assert status == 202
        handle.stop.set()
        answers: list[tuple[int, dict[str, Any], str | None]] = []

        async def refused() -> bool:
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{url}/webhook", data=body, headers=signed_headers(body)) as response,
            ):
                answers.append((response.status, await response.json(), response.headers.get("Retry-After")))
            return answers[-1][0] == 503

        await wait_until(refused, timeout=4, what="a 503 within the grace period")
        assert answers[-1] == (503, {"error": "shutting down"}, "5")
        metrics = await scrape(url)
        assert metrics("vector_sync_webhook_responses_total", status="503") >= 1
        assert await asyncio.wait_for(handle.task, timeout=30) == 0
