"""The path of one change, end to end, against embedded Postgres and the real openai client."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from embedding_api import EmbeddingAPI, Fault, expected_embedding
from support import (
    DIMENSIONS,
    all_current,
    make_settings,
    post_webhook,
    running,
    signed_headers,
    stored,
    wait_until,
    webhook_body,
)


async def insert(db: asyncpg.Connection, name: str, description: str = "") -> int:
    value: int = await db.fetchval(
        "insert into projects (name, description) values ($1, $2) returning id", name, description
    )
    return value


async def test_a_change_is_embedded_with_the_api_vector(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    async with running(make_settings(dsn, api.url)):
        project = await insert(db, "Birdsong", "Identifies birds from audio")
        await wait_until(lambda: all_current(db), what="the insert to be embedded")
    row = await db.fetchrow(
        "select version, model, embedding::text as e from vector_sync.project_embeddings where project_id = $1",
        project,
    )
    assert row["version"] == 1
    assert row["model"] == "text-embedding-3-small"
    expected = expected_embedding("Birdsong\n\nIdentifies birds from audio", DIMENSIONS)
    got = [float(value) for value in row["e"].strip("[]").split(",")]
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-5
    assert api.all_inputs == ["Birdsong\n\nIdentifies birds from audio"]


async def embedded_inputs_for(api: EmbeddingAPI, fragment: str) -> int:
    return sum(1 for text in api.all_inputs if fragment in text)


async def test_same_change_by_webhook_and_notify_costs_one_call(
    db: asyncpg.Connection, dsn: str, api: EmbeddingAPI
) -> None:
    async with running(make_settings(dsn, api.url)) as handle:
        project = await insert(db, "Tidewater", "notes that sync")
        version = await db.fetchval("select version from projects where id = $1", project)
        body = webhook_body("INSERT", project, version)
        status, _ = await post_webhook(handle.url, body, signed_headers(body))
        assert status == 202
        await wait_until(lambda: all_current(db), what="the insert to be embedded")
        # The webhook may arrive before or after NOTIFY; a second copy arrives after the embedding too.
        status, _ = await post_webhook(handle.url, body, signed_headers(body))
        assert status == 202
        await wait_until(lambda: handle.daemon.scheduler is not None and handle.daemon.scheduler.is_idle())
        offers = handle.daemon.scheduler.counts if handle.daemon.scheduler else {}
    assert api.input_count == 1
    assert api.request_count == 1
    assert offers["duplicate"] >= 1


async def test_ten_rapid_edits_cost_one_call(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    project = await insert(db, "Ledgerline", "v0")
    async with running(make_settings(dsn, api.url, VECTOR_SYNC_UPDATE_DELAY="2s")) as handle:
        await wait_until(lambda: all_current(db), what="the initial embedding")
        before = api.input_count
        for edit in range(1, 11):
            await db.execute("update projects set description = $2 where id = $1", project, f"edit {edit}")
        await wait_until(lambda: all_current(db), what="the last edit to be embedded")
        assert handle.daemon.scheduler is not None
    assert api.input_count - before == 1
    assert api.all_inputs[-1] == "Ledgerline\n\nedit 10"
    assert (await stored(db))[project][0] == 11


async def test_edit_of_a_column_that_is_not_embedded_costs_nothing(
    db: asyncpg.Connection, dsn: str, api: EmbeddingAPI
) -> None:
    project = await insert(db, "Sprocket", "bicycle maintenance")
    async with running(make_settings(dsn, api.url)):
        await wait_until(lambda: all_current(db), what="the initial embedding")
        sha_before = (await stored(db))[project][1]
        await db.execute("update projects set stars = stars + 1 where id = $1", project)
        await wait_until(lambda: all_current(db), what="the version to move")
    assert api.input_count == 1
    assert (await stored(db))[project] == (2, sha_before)


async def test_insert_waits_its_delay_update_does_not(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    delay = 3.0
    settings = make_settings(dsn, api.url, VECTOR_SYNC_INSERT_DELAY=f"{delay}s", VECTOR_SYNC_UPDATE_DELAY="0s")
    async with running(settings) as handle:
        # After the start-up drift pass: a row it finds counts as old and has no settle delay.
        await wait_until(lambda: handle.daemon.drift is not None and handle.daemon.drift.passes >= 1)
        project = await insert(db, "Birdsong", "birds")
        await wait_until(lambda: all_current(db), what="the insert to be embedded")
        insert_wait = await db.fetchval(
            "select extract(epoch from embedded_at - committed_at) from vector_sync.project_embeddings "
            "where project_id = $1",
            project,
        )
        await db.execute("update projects set description = 'birds and bats' where id = $1", project)
        await wait_until(lambda: all_current(db), what="the update to be embedded")
        update_wait = await db.fetchval(
            "select extract(epoch from embedded_at - committed_at) from vector_sync.project_embeddings "
            "where project_id = $1",
            project,
        )
    assert insert_wait >= delay
    assert update_wait < delay


async def test_version_guard_refuses_an_older_result(db: asyncpg.Connection, dsn: str) -> None:
    from vector_sync.migrations import read_catalog
    from vector_sync.store import Store, VectorWrite, content_text, sha256_hex

    settings = make_settings(dsn)
    project = await insert(db, "Kilnwise", "glazes")
    await db.execute("update projects set description = 'glazes and kilns' where id = $1", project)
    current = sha256_hex(content_text(["Kilnwise", "glazes and kilns"]))
    catalog = await read_catalog(db, settings)
    store = await Store.connect(settings, catalog)
    try:
        newer = await store.write([VectorWrite(str(project), 2, current, [1.0] + [0.0] * (DIMENSIONS - 1))])
        older = await store.write([VectorWrite(str(project), 1, "sha-old", [0.0, 1.0] + [0.0] * (DIMENSIONS - 2))])
        ahead = await store.write([VectorWrite(str(project), 3, "sha-future", [1.0] * DIMENSIONS)])
        # The row deleted and inserted again (versions restart at 1) and edited to version 2 while a
        # batch held the old life's version 2: same version, other text. The old text is refused, the
        # new life's is stored.
        await db.execute("delete from projects where id = $1", project)
        await db.execute("insert into projects (id, name, description) values ($1, 'Kilnwise', 'x')", project)
        await db.execute("update projects set description = 'reborn' where id = $1", project)
        old_life = await store.write([VectorWrite(str(project), 2, current, [0.0, 0.0, 1.0] + [0.0] * 61)])
        reborn = sha256_hex(content_text(["Kilnwise", "reborn"]))
        new_life = await store.write([VectorWrite(str(project), 2, reborn, [0.0, 0.0, 1.0] + [0.0] * 61)])
    finally:
        await store.close()
    assert newer == {str(project): 2}
    assert older == {}
    assert ahead == {}  # never ahead of the row's own version
    assert old_life == {}
    assert new_life == {str(project): 2}
    assert (await stored(db))[project] == (2, reborn)


async def test_a_write_racing_deletes_waits_for_them_instead_of_failing(db: asyncpg.Connection, dsn: str) -> None:
    """Deletes that have not committed when the write reads the rows: the write waits for each (the
    foreign key lock), then leaves the row out. Before, each commit failed the write's foreign key
    check, and a batch racing two deletes failed ("batch failed unexpectedly", deferred)."""
    from vector_sync.migrations import read_catalog
    from vector_sync.store import Store, VectorWrite, content_text, sha256_hex

    settings = make_settings(dsn)
    projects = [await insert(db, "Tidewell", "pumps"), await insert(db, "Tidewell", "pumps")]
    sha = sha256_hex(content_text(["Tidewell", "pumps"]))
    store = await Store.connect(settings, await read_catalog(db, settings))
    deleters = [await asyncpg.connect(dsn) for _ in projects]
    try:
        transactions = [deleter.transaction() for deleter in deleters]
        for deleter, transaction, project in zip(deleters, transactions, projects, strict=True):
            await transaction.start()
            await deleter.execute("delete from projects where id = $1", project)
        write = asyncio.create_task(
            store.write([VectorWrite(str(project), 1, sha, [1.0] * DIMENSIONS) for project in projects])
        )
        for deleter, transaction in zip(deleters, transactions, strict=True):
            pid = deleter.get_server_pid()

            async def write_waits_on_the_delete(pid: int = pid) -> bool:
                return bool(
                    await db.fetchval(
                        "select count(*) from pg_stat_activity where $1 = any(pg_blocking_pids(pid))", pid
                    )
                )

            await wait_until(write_waits_on_the_delete, what=f"the write waiting on the delete of backend {pid}")
            await transaction.commit()
        assert await write == {}
    finally:
        for deleter in deleters:
            await deleter.close()
        await store.close()
    assert not set(projects) & set(await stored(db))


async def test_delete_removes_the_vector_and_a_late_event_does_not_bring_it_back(
    db: asyncpg.Connection, dsn: str, api: EmbeddingAPI
) -> None:
    async with running(make_settings(dsn, api.url)) as handle:
        project = await insert(db, "Harborview", "marinas")
        await wait_until(lambda: all_current(db), what="the insert to be embedded")
        await db.execute("delete from projects where id = $1", project)
        assert await stored(db) == {}
        body = webhook_body("UPDATE", project, 1)
        status, _ = await post_webhook(handle.url, body, signed_headers(body))
        assert status == 202
        await wait_until(lambda: handle.daemon.scheduler is not None and handle.daemon.scheduler.is_idle())
    assert await stored(db) == {}


async def test_changes_made_while_stopped_are_found_at_start(
    db: asyncpg.Connection, dsn: str, api: EmbeddingAPI
) -> None:
    await db.executemany(
        "insert into projects (name, description) values ($1, $2)", [(f"p{i}", "first") for i in range(100)]
    )
    async with running(make_settings(dsn, api.url)):
        await wait_until(lambda: all_current(db), what="the first embedding")
    await db.execute("update projects set description = 'second ' || id")
    await db.execute("update projects set description = 'third ' || id where id % 2 = 0")
    assert not await all_current(db)
    async with running(make_settings(dsn, api.url)):
        await wait_until(lambda: all_current(db), what="all 100 rows at their latest version")
    rows = await db.fetch(
        "select t.version, e.version as stored from projects t "
        "join vector_sync.project_embeddings e on e.project_id = t.id"
    )
    assert len(rows) == 100
    assert all(row["version"] == row["stored"] for row in rows)
    assert {row["version"] for row in rows} == {2, 3}


async def test_transient_api_failures_recover_without_dead_letters(
    db: asyncpg.Connection, dsn: str, api: EmbeddingAPI
) -> None:
    api.script(
        Fault.rate_limit(retry_after=0.2),
        Fault.server_error(503),
        Fault.rate_limit(retry_after=None, retry_after_ms=100),
        Fault.hang(seconds=60),
        Fault.server_error(500),
    )
    settings = make_settings(dsn, api.url, VECTOR_SYNC_REQUEST_TIMEOUT="1s")
    async with running(settings):
        await insert(db, "Pulsecheck", "uptime monitoring")
        await wait_until(lambda: all_current(db), what="embedding after transient failures")
    assert api.failures_by_status().get(429) == 2
    assert api.pending_faults == 0
    assert api.input_count == 1
    assert await db.fetchval("select count(*) from vector_sync.dead_letters") == 0
    gaps = [b.started_at - a.started_at for a, b in zip(api.requests, api.requests[1:], strict=False)]
    assert gaps[0] >= 0.2  # Retry-After honoured


async def test_poison_input_is_dead_lettered_and_its_batch_mates_stored(
    db: asyncpg.Connection, dsn: str, api: EmbeddingAPI
) -> None:
    await db.executemany(
        "insert into projects (name, description) values ($1, $2)",
        [(f"ok {i}", "fine") for i in range(6)] + [("bad", "POISON pill")] + [(f"ok {i}", "fine") for i in range(6, 9)],
    )
    async with running(make_settings(dsn, api.url)) as handle:
        await wait_until(
            lambda: db.fetchval("select count(*) = 9 from vector_sync.project_embeddings"), what="good rows stored"
        )
        await wait_until(lambda: db.fetchval("select count(*) = 1 from vector_sync.dead_letters"), what="dead letter")
        await wait_until(lambda: handle.daemon.scheduler is not None and handle.daemon.scheduler.is_idle())
    letter = await db.fetchrow(
        "select d.*, p.name from vector_sync.dead_letters d join projects p on p.id = d.project_id"
    )
    assert letter["name"] == "bad"
    assert "400" in letter["error"]
    calls = api.request_count
    # A restart does not pay for the poison again: the drift pass skips what is dead-lettered.
    async with running(make_settings(dsn, api.url)) as handle:
        await wait_until(lambda: handle.daemon.drift is not None and handle.daemon.drift.passes >= 1)
        await wait_until(lambda: handle.daemon.scheduler is not None and handle.daemon.scheduler.is_idle())
    assert api.request_count == calls
    # Once the text is fixed the row is embedded and leaves dead_letters.
    async with running(make_settings(dsn, api.url)):
        await db.execute("update projects set description = 'cured' where name = 'bad'")
        await wait_until(lambda: all_current(db), what="the fixed row to be embedded")
    assert await db.fetchval("select count(*) from vector_sync.dead_letters") == 0


async def test_quota_pauses_embedding_without_dead_letters(
    db: asyncpg.Connection, dsn: str, api: EmbeddingAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vector_sync import pipeline

    monkeypatch.setattr(pipeline, "PAUSE_FIRST", 1.0)
    api.script(Fault.quota())
    async with running(make_settings(dsn, api.url)) as handle:
        await insert(db, "Relay", "volunteer shifts")
        await wait_until(lambda: api.failures_by_status().get(429) == 1, what="the quota error")
        ready = await handle.daemon.readiness()
        assert ready["embedding"] == "paused" and ready["ready"] is False
        await wait_until(lambda: all_current(db), what="embedding after the pause")
    assert await db.fetchval("select count(*) from vector_sync.dead_letters") == 0
    assert api.input_count == 1


async def test_rows_waiting_at_start_go_in_full_batches(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    await db.executemany(
        "insert into projects (name, description) values ($1, $2)", [(f"p{i}", f"text {i}") for i in range(250)]
    )
    async with running(make_settings(dsn, api.url, VECTOR_SYNC_BATCH_SIZE=100)):
        await wait_until(lambda: all_current(db), what="250 rows embedded")
    assert api.input_count == 250
    assert api.request_count == 3


async def test_identical_texts_are_sent_once(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    await db.executemany("insert into projects (name, description) values ($1, $2)", [("same", "text")] * 5)
    async with running(make_settings(dsn, api.url)):
        await wait_until(lambda: all_current(db), what="5 rows embedded")
    assert api.input_count == 1


async def test_a_full_scheduler_loses_nothing(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    settings = make_settings(dsn, api.url, VECTOR_SYNC_MAX_PENDING=10, VECTOR_SYNC_BATCH_SIZE=5)
    async with running(settings) as handle:
        await wait_until(lambda: handle.daemon.drift is not None and handle.daemon.drift.passes >= 1)
        await db.executemany(
            "insert into projects (name, description) values ($1, $2)", [(f"p{i}", f"text {i}") for i in range(60)]
        )
        await wait_until(lambda: all_current(db), what="60 rows embedded through a 10-slot scheduler")
        assert handle.daemon.scheduler is not None
        assert handle.daemon.scheduler.counts["full"] > 0
    assert api.input_count == 60


async def test_a_new_model_re_embeds_everything(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    await db.executemany("insert into projects (name, description) values ($1, $2)", [("a", "x"), ("b", "y")])
    async with running(make_settings(dsn, api.url)):
        await wait_until(lambda: all_current(db))
    async with running(make_settings(dsn, api.url, VECTOR_SYNC_EMBEDDING_MODEL="text-embedding-3-large")):
        await wait_until(
            lambda: db.fetchval(
                "select count(*) = 2 from vector_sync.project_embeddings where model = 'text-embedding-3-large'"
            ),
            what="re-embedding with the new model",
        )
    assert api.input_count == 4


async def test_delete_and_insert_again_with_the_same_id(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    async with running(make_settings(dsn, api.url)):
        await db.execute("insert into projects (id, name, description) values (7, 'first life', 'a')")
        for edit in range(3):
            await db.execute("update projects set description = $1 where id = 7", f"edit {edit}")
        await wait_until(lambda: all_current(db))
        await db.execute("delete from projects where id = 7")
        await db.execute("insert into projects (id, name, description) values (7, 'second life', 'b')")
        await wait_until(lambda: all_current(db), what="the re-inserted row to be embedded")
    assert api.all_inputs[-1] == "second life\n\nb"


async def test_listen_reconnects_and_catches_up(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    from vector_sync.events import Source

    async with running(make_settings(dsn, api.url, VECTOR_SYNC_SOURCES="listen")) as handle:
        intake = handle.daemon.intake
        assert intake is not None
        await wait_until(lambda: intake.live.get(Source.LISTEN) is True, what="listen to be live")
        await db.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'vector-sync-listen'"
        )
        # Written while the listener may be down: only the drift pass after reconnect can find it.
        await insert(db, "Riverwatch", "flood alerts")
        await wait_until(lambda: all_current(db), what="the change made across the reconnect")
        await wait_until(lambda: intake.live.get(Source.LISTEN) is True, what="listen to be live again")
    metric = handle.daemon.metrics.render().decode()
    assert 'vector_sync_source_reconnects_total{source="listen"} 1.0' in metric


async def test_clean_shutdown_reports_and_exits_zero(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    api.latency = 0.5
    async with running(make_settings(dsn, api.url)) as handle:
        await insert(db, "Canopy", "trees")
        await wait_until(lambda: api.in_flight == 1, what="a request in flight")
        code = await handle.shutdown()
    assert code == 0
    assert await all_current(db)  # the batch in flight finished within the grace period


@pytest.mark.parametrize(
    ("id_type", "default"),
    [("uuid", "gen_random_uuid()"), ("text", "md5(random()::text)"), ("integer", None)],
    ids=["uuid", "text", "integer"],
)
async def test_other_id_types_and_the_supabase_extensions_schema(
    pg_server: str, api: EmbeddingAPI, id_type: str, default: str | None
) -> None:
    """Supabase keeps pgvector in schema `extensions`; ids may be uuid, text or integer."""
    from support import create_database
    from vector_sync.migrations import migrate

    dsn = await create_database(pg_server, template="template0")
    db = await asyncpg.connect(dsn)
    try:
        await db.execute("create schema extensions; create extension vector with schema extensions")
        key = (
            f"{id_type} primary key default {default}"
            if default
            else f"{id_type} generated by default as identity primary key"
        )
        if id_type == "integer":
            key = "integer generated by default as identity primary key"
        await db.execute(f"create table public.projects (id {key}, name text, description text)")
        settings = make_settings(dsn, api.url)
        await migrate(db, settings)
        async with running(settings) as handle:
            ids = [
                await db.fetchval("insert into projects (name, description) values ($1, 'x') returning id", f"p{i}")
                for i in range(3)
            ]
            await db.execute("update projects set description = 'y' where id = $1", ids[0])
            await db.execute("delete from projects where id = $1", ids[1])
            body = webhook_body("UPDATE", str(ids[2]) if id_type != "integer" else ids[2], 1)
            status, _ = await post_webhook(handle.url, body, signed_headers(body))
            assert status == 202
            await wait_until(lambda: all_current(db), what=f"{id_type} ids embedded")
            assert handle.daemon.store is not None
            hits = await handle.daemon.store.search([1.0] * DIMENSIONS, 5, min_similarity=-1)
        assert {str(hit.project_id) for hit in hits} == {str(ids[0]), str(ids[2])}
        assert (await stored(db))[ids[0]][0] == 2
    finally:
        await db.close()


async def test_a_row_whose_new_text_is_refused_loses_its_old_vector(
    db: asyncpg.Connection, dsn: str, api: EmbeddingAPI
) -> None:
    project = await insert(db, "Moodboard", "palettes")
    async with running(make_settings(dsn, api.url)):
        await wait_until(lambda: all_current(db), what="the first embedding")
        await db.execute("update projects set description = 'POISON palettes' where id = $1", project)
        await wait_until(lambda: db.fetchval("select count(*) = 1 from vector_sync.dead_letters"), what="dead letter")
    # Search must not find the row for words it no longer has.
    assert await stored(db) == {}


async def test_wrong_vector_size_pauses_instead_of_paying_again(
    db: asyncpg.Connection, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vector_sync import pipeline

    monkeypatch.setattr(pipeline, "PAUSE_FIRST", 60.0)
    async with EmbeddingAPI(dimensions=DIMENSIONS // 2) as small:
        # A model without a `dimensions` parameter answers in its own size.
        settings = make_settings(dsn, small.url, VECTOR_SYNC_EMBEDDING_MODEL="nomic-embed-text")
        async with running(settings) as handle:
            await insert(db, "Stargazer", "planets")
            await wait_until(lambda: handle.daemon.pipeline is not None and handle.daemon.pipeline.paused)
            ready = await handle.daemon.readiness()
        assert small.request_count == 1
    assert ready["embedding"] == "paused"
    assert await db.fetchval("select count(*) from vector_sync.dead_letters") == 0


async def test_a_new_row_starts_at_version_one(db: asyncpg.Connection, dsn: str, api: EmbeddingAPI) -> None:
    async with running(make_settings(dsn, api.url)):
        await db.execute("insert into projects (id, name, description, version) values (40, 'x', 'y', 0)")
        await db.execute("insert into projects (id, name, description, version) values (41, 'x', 'z', 99)")
        await wait_until(lambda: all_current(db), what="both rows embedded")
    assert {project: version for project, (version, _) in (await stored(db)).items()} == {40: 1, 41: 1}


async def test_the_hash_embedder_skips_unchanged_text_too(db: asyncpg.Connection, dsn: str) -> None:
    project = await insert(db, "Brewlog", "fermentation")
    async with running(make_settings(dsn)) as handle:
        await wait_until(lambda: all_current(db), what="the first embedding")
        inputs = handle.daemon.embed_stats.inputs
        await db.execute("update projects set stars = 5 where id = $1", project)
        await wait_until(lambda: all_current(db), what="the version move")
        assert handle.daemon.embed_stats.inputs == inputs
    assert await db.fetchval("select model from vector_sync.project_embeddings") == f"hash-{DIMENSIONS}"
