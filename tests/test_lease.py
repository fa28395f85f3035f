"""Two daemons, one database: one leader embeds, the other stands by and takes over.

The kill -9 test runs real `vector-sync run` processes; the others run daemons in this process.
Every write to project_embeddings is audited (support.AUDIT_SQL), so "nothing embedded twice"
is checked in the database, not inferred.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from embedding_api import EmbeddingAPI
from support import (
    AUDIT_SQL,
    all_current,
    make_settings,
    post_webhook,
    running,
    signed_headers,
    twice_written,
    wait_until,
    webhook_body,
)
from test_cli import free_port, served_env
from vector_sync.lease import lease_key

TAKEOVER_LIMIT = 10.0


async def readyz(url: str) -> tuple[int, dict[str, object]]:
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as response:
            return response.status, await response.json()
    except aiohttp.ClientError:
        return 0, {}


async def is_ready(url: str) -> bool:
    return (await readyz(url))[0] == 200


@pytest.fixture
async def audited(db: asyncpg.Connection) -> asyncpg.Connection:
    await db.execute(AUDIT_SQL)
    return db


async def insert(db: asyncpg.Connection, count: int, prefix: str) -> None:
    await db.execute(
        "insert into projects (name, description) select $2 || n, 'about ' || n from generate_series(1, $1) n",
        count,
        prefix,
    )


def test_each_table_has_its_own_stable_lease_key() -> None:
    from vector_sync.config import TableName

    assert lease_key(TableName("public", "projects")) == lease_key(TableName("public", "projects"))
    assert lease_key(TableName("public", "projects")) != lease_key(TableName("public", "other"))
    assert -(2**63) <= lease_key(TableName("public", "projects")) < 2**63


async def test_the_standby_refuses_work_and_takes_over_when_the_leader_stops(
    audited: asyncpg.Connection, dsn: str
) -> None:
    db = audited
    async with running(make_settings(dsn)) as leader:
        await wait_until(lambda: is_ready(leader.url), what="the first daemon to lead")
        async with running(make_settings(dsn)) as standby:
            status, body = await readyz(standby.url)
            assert (status, body["role"], body["ready"]) == (503, "standby", False)
            assert (await readyz(leader.url))[1]["role"] == "leader"
            # Webhooks to the standby are refused with a retry hint, so the sender tries again.
            code, answer = await post_webhook(
                standby.url, webhook_body("INSERT", 1, 1), signed_headers(webhook_body("INSERT", 1, 1))
            )
            assert code == 503 and "standby" in str(answer["error"])
            await insert(db, 20, "before ")
            await wait_until(lambda: all_current(db), what="the leader to embed")
            assert standby.daemon.metrics.render().count(b"vector_sync_vectors_stored_total 0.0") == 1
            stopped = time.monotonic()
            assert await leader.shutdown() == 0
            await insert(db, 10, "after ")
            await wait_until(lambda: is_ready(standby.url), timeout=TAKEOVER_LIMIT, what="the standby to take over")
            took = time.monotonic() - stopped
            await wait_until(lambda: all_current(db), what="the new leader to embed what came after")
    print(f"TAKEOVER after a clean stop: {took:.2f}s")
    assert await twice_written(db) == []


async def test_a_leader_that_loses_its_lease_connection_stops_at_once_and_stands_by(
    audited: asyncpg.Connection, dsn: str
) -> None:
    db = audited
    async with running(make_settings(dsn)) as handle:
        await wait_until(lambda: is_ready(handle.url), what="leading")
        first_intake = handle.daemon.intake
        await db.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'vector-sync-lease'"
        )
        # Alone, it wins the lease back at its next poll and starts over with a drift pass.
        await wait_until(lambda: handle.daemon.intake is not first_intake, what="a new term")
        await insert(db, 5, "x")
        await wait_until(lambda: is_ready(handle.url), what="leading again")
        await wait_until(lambda: all_current(db), what="embedding in the new term")
        assert handle.daemon.drift is not None
        await wait_until(lambda: handle.daemon.drift is not None and handle.daemon.drift.passes >= 1)
    assert await twice_written(db) == []


@contextlib.asynccontextmanager
async def daemon_process(env: dict[str, str], log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vector_sync", "run", env=env, stdout=sink, stderr=sink
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.timeout(180)
async def test_kill_9_of_the_leader_mid_stream_hands_over_within_10_seconds(
    audited: asyncpg.Connection, dsn: str, api: EmbeddingAPI, tmp_path: Path
) -> None:
    db = audited
    api.latency = 0.05  # batches are in flight when the leader dies
    ports = [free_port(), free_port()]
    envs = [served_env(dsn, api, port, VECTOR_SYNC_BATCH_SIZE="10") for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    async with (
        daemon_process(envs[0], tmp_path / "first.log") as first,
        daemon_process(envs[1], tmp_path / "second.log") as second,
    ):
        await wait_until(lambda: any_ready(urls), timeout=60, what="one of the two to lead")
        leader_index = 0 if await is_ready(urls[0]) else 1
        leader, standby = (first, second) if leader_index == 0 else (second, first)
        standby_url = urls[1 - leader_index]

        async def standing_by() -> bool:
            return (await readyz(standby_url))[1].get("role") == "standby"

        await wait_until(standing_by, what="the other to stand by")

        stop_writing = asyncio.Event()

        async def write_steadily() -> None:
            writer_db = await asyncpg.connect(dsn)
            try:
                batch = 0
                while not stop_writing.is_set():
                    await insert(writer_db, 5, f"burst {batch} ")
                    await writer_db.execute(
                        "update projects set description = description || '!' where id % 7 = $1", batch % 7
                    )
                    batch += 1
                    await asyncio.sleep(0.05)
            finally:
                await writer_db.close()

        writer = asyncio.create_task(write_steadily())
        try:
            await wait_until(
                lambda: db.fetchval("select count(*) > 30 from vector_sync.project_embeddings"),
                what="the leader to be embedding",
            )
            os.kill(leader.pid, signal.SIGKILL)
            killed = time.monotonic()
            await leader.wait()
            await wait_until(lambda: is_ready(standby_url), timeout=TAKEOVER_LIMIT, what="the standby to take over")
            took = time.monotonic() - killed
            await asyncio.sleep(0.5)  # a little more writing after the takeover (not a wait for a condition)
        finally:
            stop_writing.set()
            await writer
        await wait_until(lambda: all_current(db), timeout=90, what="every row current after the takeover")
        standby.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(standby.wait(), timeout=30) == 0
    print(f"TAKEOVER after kill -9: {took:.2f}s")
    assert took < TAKEOVER_LIMIT
    assert await twice_written(db) == []
    log = (tmp_path / ("second.log" if leader_index == 0 else "first.log")).read_text()
    assert "leader: this instance holds the lease" in log
    assert "drift pass found" in log


async def any_ready(urls: list[str]) -> bool:
    return any([await is_ready(url) for url in urls])
