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
from support import DIMENSIONS, create_database, make_template  # noqa: E402
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
