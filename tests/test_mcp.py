"""`vector-sync mcp` driven by the `mcp` SDK's own client: over stdio (a subprocess) and over
streamable HTTP (a subprocess on a free port), against embedded Postgres with the hash embedder."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from embedding_api import EmbeddingAPI
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent
from support import API_KEY, DIMENSIONS, all_current, make_settings, running, wait_until
from test_cli import base_env, free_port, serving, vector_sync
from vector_sync import __version__
from vector_sync.mcp_server import close_tools, open_tools

TOKEN = "mcp-test-token-0123456789abcdef"
PROJECTS = [
    ("Tidal energy forecaster", "predicts tidal power output for coastal turbines"),
    ("Sourdough starter tracker", "logs feeding times and hydration of bread starters"),
    ("Bird song classifier", "identifies bird species from audio recordings"),
    ("Solar panel inventory", "tracks photovoltaic modules in warehouses"),
    ("Chess opening trainer", "drills chess openings with spaced repetition"),
]
CALL_TIMEOUT = timedelta(seconds=30)


def mcp_env(dsn: str, **values: str) -> dict[str, str]:
    defaults = {"VECTOR_SYNC_EMBEDDER": "hash", "VECTOR_SYNC_EMBEDDING_DIMENSIONS": str(DIMENSIONS)}
    return base_env(DATABASE_URL=dsn, **(defaults | values))


async def seed(db: asyncpg.Connection, dsn: str) -> dict[str, str]:
    """The sample projects, embedded by the daemon itself (then stopped): name → id."""
    rows = await db.fetch(
        "insert into projects (name, description) select * from unnest($1::text[], $2::text[]) returning id, name",
        [name for name, _ in PROJECTS],
        [description for _, description in PROJECTS],
    )
    async with running(make_settings(dsn)):
        await wait_until(lambda: all_current(db), what="the sample projects to be embedded")
    return {row["name"]: str(row["id"]) for row in rows}


@contextlib.asynccontextmanager
async def stdio_session(env: dict[str, str], errlog: Path) -> AsyncIterator[ClientSession]:
    """`python -m vector_sync mcp` as the SDK's stdio client starts a server; its stderr goes to `errlog`."""
    server = StdioServerParameters(command=sys.executable, args=["-m", "vector_sync", "mcp"], env=env)
    with errlog.open("a") as log:
        async with (
            stdio_client(server, errlog=log) as (read, write),
            ClientSession(read, write, read_timeout_seconds=CALL_TIMEOUT) as session,
        ):
            await session.initialize()
            yield session


@contextlib.asynccontextmanager
async def http_session(port: int, token: str | None) -> AsyncIterator[ClientSession]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(headers=headers, timeout=30) as client,
        streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=client) as (read, write, _),
        ClientSession(read, write, read_timeout_seconds=CALL_TIMEOUT) as session,
    ):
        await session.initialize()
        yield session


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.isError, result.content
    assert result.structuredContent is not None
    return result.structuredContent


def error_text(result: CallToolResult) -> str:
    assert result.isError, result.structuredContent
    return " ".join(block.text for block in result.content if isinstance(block, TextContent))


async def test_stdio_search_finds_the_nearest_project_and_reports_stale_rows(
    db: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    ids = await seed(db, dsn)
    async with stdio_session(mcp_env(dsn), tmp_path / "stderr.log") as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        assert set(tools) == {"search_projects", "get_project", "sync_status"}
        for tool in tools.values():
            assert tool.description and "\n    " not in tool.description
            assert tool.annotations is not None and tool.annotations.readOnlyHint
        limit = tools["search_projects"].inputSchema["properties"]["limit"]
        assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 100, 10)

        found = structured(await session.call_tool("search_projects", {"query": "sourdough bread starter feeding"}))
        assert found["model"] == f"hash-{DIMENSIONS}"
        best = found["results"][0]
        assert best["id"] == ids["Sourdough starter tracker"]
        assert best["content"] == {"name": PROJECTS[1][0], "description": PROJECTS[1][1]}
        assert best["embedding"]["status"] == "current"
        assert best["embedding"]["row_version"] == best["embedding"]["vector_version"] == 1
        assert 0 <= best["embedding"]["age_seconds"] < 600
        similarities = [hit["similarity"] for hit in found["results"]]
        assert similarities == sorted(similarities, reverse=True) and similarities[0] > similarities[-1]

        # The row changes while no daemon runs: its vector is now behind it.
        await db.execute(
            "update projects set description = 'logs feeding of rye starters' where id = $1",
            int(ids["Sourdough starter tracker"]),
        )
        again = structured(await session.call_tool("search_projects", {"query": "sourdough bread starter", "limit": 2}))
        assert len(again["results"]) == 2
        stale = again["results"][0]
        assert stale["id"] == ids["Sourdough starter tracker"]
        assert stale["content"]["description"] == "logs feeding of rye starters"  # the row as it is now
        assert stale["embedding"] | {"embedded_at": None, "age_seconds": None} == {
            "status": "stale",
            "row_version": 2,
            "vector_version": 1,
            "model": f"hash-{DIMENSIONS}",
            "embedded_at": None,
            "age_seconds": None,
        }
        project = structured(await session.call_tool("get_project", {"id": int(ids["Sourdough starter tracker"])}))
        assert project["embedding"]["status"] == "stale"
        assert (
            structured(await session.call_tool("get_project", {"id": ids["Chess opening trainer"]}))["embedding"][
                "status"
            ]
            == "current"
        )

        new_id = await db.fetchval("insert into projects (name) values ('Kite weather alerts') returning id")
        missing = structured(await session.call_tool("get_project", {"id": new_id}))
        assert missing["content"] == {"name": "Kite weather alerts", "description": None}
        assert missing["embedding"] == {
            "status": "missing",
            "row_version": 1,
            "vector_version": None,
            "model": None,
            "embedded_at": None,
            "age_seconds": None,
        }
        counts = structured(await session.call_tool("sync_status", {}))
        assert {key: counts[key] for key in ("rows", "embedded", "current", "stale", "missing", "dead_letters")} == {
            "rows": 6,
            "embedded": 5,
            "current": 4,
            "stale": 1,
            "missing": 1,
            "dead_letters": 0,
        }
        assert counts["oldest_stale_seconds"] is not None
        # A high threshold leaves everything out.
        assert (
            structured(
                await session.call_tool(
                    "search_projects", {"query": "unrelated words entirely", "min_similarity": 0.99}
                )
            )["results"]
            == []
        )
    log = (tmp_path / "stderr.log").read_text()
    assert "MCP server" in log and "on stdio" in log  # logs go to stderr: stdout carried only the protocol


async def test_bad_arguments_are_tool_errors_and_the_server_keeps_serving(
    db: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    ids = await seed(db, dsn)
    bad_calls: list[tuple[str, dict[str, Any], str]] = [
        ("search_projects", {"query": "bread", "limit": 0}, "limit"),
        ("search_projects", {"query": "bread", "limit": -3}, "limit"),
        ("search_projects", {"query": "bread", "limit": 101}, "limit"),
        ("search_projects", {"query": "bread", "limit": "many"}, "limit"),
        ("search_projects", {"query": "bread", "min_similarity": 1.5}, "min_similarity"),
        ("search_projects", {"query": "bread", "min_similarity": -2}, "min_similarity"),
        ("search_projects", {"query": ""}, "query"),
        ("search_projects", {"query": "   \n"}, "query"),
        ("search_projects", {"query": "x" * 8001}, "query"),
        ("search_projects", {}, "query"),
        ("get_project", {"id": "abc"}, "not a valid id here: the ids are bigint"),
        ("get_project", {"id": 1.5}, "id"),
        ("get_project", {"id": 2**70}, "not a valid id here"),
        ("get_project", {"id": 987654}, "no project with id 987654"),
        ("get_project", {}, "id"),
        ("no_such_tool", {}, "Unknown tool"),
    ]
    async with stdio_session(mcp_env(dsn), tmp_path / "stderr.log") as session:
        for name, arguments, expected in bad_calls:
            message = error_text(await session.call_tool(name, arguments))
            assert expected in message, (name, arguments, message)
        # Still serving, and ids given as text work as well as numbers.
        project = structured(await session.call_tool("get_project", {"id": ids["Bird song classifier"]}))
        assert project["content"]["name"] == "Bird song classifier"
        found = structured(await session.call_tool("search_projects", {"query": "bird species audio", "limit": 1}))
        assert [hit["id"] for hit in found["results"]] == [ids["Bird song classifier"]]


async def test_a_model_or_size_other_than_the_stored_vectors_is_refused(
    db: asyncpg.Connection, dsn: str, api: EmbeddingAPI, tmp_path: Path
) -> None:
    ids = await seed(db, dsn)
    log = tmp_path / "stderr.log"
    async with stdio_session(mcp_env(dsn, VECTOR_SYNC_EMBEDDING_DIMENSIONS="32"), log) as session:
        message = error_text(await session.call_tool("search_projects", {"query": "bread"}))
        assert "stored vectors have 64 dimensions" in message and "makes 32" in message
        # What needs no query vector still works.
        assert structured(await session.call_tool("get_project", {"id": ids["Tidal energy forecaster"]}))
    # Same size, another model (the OpenAI-compatible test API): the stored hash vectors do not compare.
    other_model = mcp_env(dsn, OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=api.url, VECTOR_SYNC_EMBEDDER="openai")
    async with stdio_session(other_model, log) as session:
        message = error_text(await session.call_tool("search_projects", {"query": "bread"}))
        assert f"made by hash-{DIMENSIONS}" in message and "text-embedding-3-small" in message
        assert API_KEY not in message
    assert API_KEY not in log.read_text()


async def test_the_server_cannot_write(dsn: str) -> None:
    tools = await open_tools(make_settings(dsn))
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await tools.store.pool.execute("insert into projects (name) values ('written by the MCP server')")
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await tools.store.pool.execute("delete from vector_sync.project_embeddings")
        assert await tools.store.pool.fetchval("show default_transaction_read_only") == "on"
    finally:
        await close_tools(tools)


async def test_a_restricted_role_sees_what_row_level_security_allows(
    db: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    ids = await seed(db, dsn)
    role = f"mcp_reader_{await db.fetchval('select current_database()')}"  # roles are per server: one per test database
    # The README's grants (pgvector is in schema public here), and a policy that hides the chess project.
    await db.execute(
        f"""
        create role {role} login;
        alter role {role} set default_transaction_read_only = on;
        grant usage on schema vector_sync to {role};
        grant select on public.projects to {role};
        grant select on vector_sync.project_embeddings, vector_sync.schema_migrations to {role};
        grant execute on function public.match_projects to {role};
        grant select on vector_sync.dead_letters, vector_sync.pending_webhooks, vector_sync.webhook_logs to {role};
        alter table public.projects enable row level security;
        create policy no_chess on public.projects for select to {role} using (name not like 'Chess%');
        """
    )
    try:
        role_dsn = dsn.replace("postgresql://postgres:", f"postgresql://{role}:", 1)
        assert role_dsn != dsn
        async with stdio_session(mcp_env(role_dsn), tmp_path / "stderr.log") as session:
            found = structured(
                await session.call_tool("search_projects", {"query": "chess openings repetition", "limit": 100})
            )
            assert {hit["id"] for hit in found["results"]} <= set(ids.values()) - {ids["Chess opening trainer"]}
            assert found["results"]
            hidden = error_text(await session.call_tool("get_project", {"id": ids["Chess opening trainer"]}))
            assert "no project with id" in hidden
            counts = structured(await session.call_tool("sync_status", {}))
            assert (counts["rows"], counts["current"]) == (4, 4)
            # Without the grants for sync_status only that tool fails, and says why.
            await db.execute(f"revoke select on vector_sync.dead_letters from {role}")
            denied = error_text(await session.call_tool("sync_status", {}))
            assert "permission denied for table dead_letters" in denied
            assert structured(await session.call_tool("get_project", {"id": ids["Bird song classifier"]}))
    finally:
        await db.execute(f"drop owned by {role}; drop role {role}")


async def test_http_needs_the_bearer_token(db: asyncpg.Connection, dsn: str) -> None:
    ids = await seed(db, dsn)
    port = free_port()
    env = mcp_env(dsn, VECTOR_SYNC_MCP_TOKEN=TOKEN)
    async with serving("mcp", "--http", "--port", str(port), env=env) as process:

        async def answering() -> bool:
            if process.returncode is not None:
                assert process.stderr is not None
                error = (await process.stderr.read()).decode()
                raise AssertionError(f"the server exited with {process.returncode}: {error}")
            try:
                async with httpx.AsyncClient() as client:
                    await client.get(f"http://127.0.0.1:{port}/mcp")
                return True
            except httpx.TransportError:
                return False

        await wait_until(answering, what="the MCP HTTP listener")
        async with httpx.AsyncClient() as client:
            request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN}):
                response = await client.post(f"http://127.0.0.1:{port}/mcp", json=request, headers=headers)
                assert response.status_code == 401, response.text
                assert response.headers["www-authenticate"].startswith("Bearer")
        for token in (None, "wrong-token-0123456789"):
            with pytest.raises(Exception) as refused:  # the SDK raises it wrapped in an exception group
                async with http_session(port, token):
                    pass
            leaves = _leaves(refused.value)
            statuses = {exc.response.status_code for exc in leaves if isinstance(exc, httpx.HTTPStatusError)}
            assert statuses == {401}, leaves
        async with http_session(port, TOKEN) as session:
            found = structured(await session.call_tool("search_projects", {"query": "photovoltaic solar modules"}))
            assert found["results"][0]["id"] == ids["Solar panel inventory"]
            assert error_text(await session.call_tool("search_projects", {"query": "solar", "limit": 0}))
            assert structured(await session.call_tool("sync_status", {}))["current"] == len(PROJECTS)
        process.send_signal(signal.SIGTERM)
        assert await process.wait() == 0
        assert process.stderr is not None
        log = (await process.stderr.read()).decode()
    assert f"127.0.0.1:{port}/mcp" in log
    assert TOKEN not in log


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


@pytest.mark.parametrize(("token", "expected"), [(None, "missing"), ("short", "at least 16 characters")])
async def test_http_refuses_to_start_without_a_token(dsn: str, token: str | None, expected: str) -> None:
    env = mcp_env(dsn) if token is None else mcp_env(dsn, VECTOR_SYNC_MCP_TOKEN=token)
    code, out, err = await vector_sync("mcp", "--http", "--port", str(free_port()), env=env, timeout=60)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "VECTOR_SYNC_MCP_TOKEN" in lines[0] and expected in lines[0], err
    assert token is None or token not in err


async def test_stdio_stdout_carries_only_the_protocol_and_sigterm_stops_cleanly(dsn: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vector_sync",
        "mcp",
        env=mcp_env(dsn, VECTOR_SYNC_LOG_LEVEL="DEBUG"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    try:
        initialize = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
        process.stdin.write(json.dumps(initialize).encode() + b"\n")
        await process.stdin.drain()
        answer = json.loads(await asyncio.wait_for(process.stdout.readline(), timeout=60))
        assert answer["id"] == 1
        assert answer["result"]["serverInfo"] == {"name": "vector-sync", "version": __version__}
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        assert await process.stdout.read() == b""  # nothing but protocol messages, even at DEBUG
        assert "stopped by a signal" in (await process.stderr.read()).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
