"""Fixtures: one embedded PostgreSQL per session, a fresh database per test (copied from a migrated
template), and the OpenAI-compatible test API."""

from __future__ import annotations

import asyncio
import os
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

# The daemon must see only what a test gives it: no developer environment, no .env file.
for _name in list(os.environ):
    if _name.startswith(("VECTOR_SYNC_", "OPENAI_", "SUPABASE_")) or _name in {"DATABASE_URL", "PORT"}:
        del os.environ[_name]
os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())

from embedding_api import EmbeddingAPI  # noqa: E402
from realtime_server import LogicalPostgres, RealtimeServer  # noqa: E402
from support import AUDIT_SQL, DIMENSIONS, create_database, make_template  # noqa: E402
from vector_sync.embedded import EmbeddedPostgres  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so no stray .env is read


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The server's admin DSN; the template database is created and migrated once."""
    workdir = Path(tempfile.mkdtemp(prefix="vs-tests-"))
    server = EmbeddedPostgres(workdir / "pgdata", delete=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dsn = server.start()
    asyncio.run(make_template(dsn))
    yield dsn
    server.stop()


@pytest.fixture(scope="session")
def logical_pg() -> Iterator[str]:
    """Admin DSN of a second embedded PostgreSQL, with wal_level = logical (for the Realtime test
    server's logical decoding), and the migrated template. Started only by tests that need it."""
    postgres = LogicalPostgres(Path(tempfile.mkdtemp(prefix="vs-realtime-")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dsn = postgres.start()
    asyncio.run(make_template(dsn))
    yield dsn
    postgres.stop()


@pytest.fixture
async def live_dsn(logical_pg: str) -> str:
    """A fresh database on the logical-decoding server, with every vector write audited."""
    dsn = await create_database(logical_pg)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(AUDIT_SQL)
    finally:
        await conn.close()
    return dsn


@pytest.fixture
async def live_db(live_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(live_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def live_server(live_dsn: str) -> AsyncIterator[RealtimeServer]:
    """A Realtime test server whose events are live_dsn's committed changes to public.projects."""
    async with RealtimeServer(live_dsn, publish_tables=["public.projects"]) as server:
        yield server


@pytest.fixture
async def dsn(pg_server: str) -> str:
    """A fresh database with `public.projects` (bigint ids) and the migrations applied."""
    return await create_database(pg_server)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def api() -> AsyncIterator[EmbeddingAPI]:
    server = EmbeddingAPI(dimensions=DIMENSIONS)
    await server.start()
    yield server
    await server.close()
