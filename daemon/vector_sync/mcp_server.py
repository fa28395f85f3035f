"""`vector-sync mcp`: a read-only Model Context Protocol server for semantic search over the projects.

Three tools over the official `mcp` SDK (FastMCP): `search_projects`, `get_project`, `sync_status`.
Queries are embedded with the configured embedder and searched through `public.match_projects`, so
row level security decides what a restricted role sees. The pool opens every session with
`default_transaction_read_only`: the server cannot write, whatever a tool attempts.

Transports: stdio (the default, for desktop clients; stdout is the protocol channel, so every log
line goes to stderr) and streamable HTTP (`--http`), which refuses to start without
`VECTOR_SYNC_MCP_TOKEN` and answers 401 to any request without that bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from loguru import logger
from mcp.server.fastmcp import FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field, SecretStr, StringConstraints
from pydantic_settings import BaseSettings
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from vector_sync import __version__, logs
from vector_sync.app import FatalError, load_catalog
from vector_sync.config import ConfigError, Settings
from vector_sync.embedder import Embedder, EmbeddingError, build_embedder
from vector_sync.events import MalformedEvent, normalize_id
from vector_sync.migrations import Catalog
from vector_sync.store import DATABASE_ERRORS, ProjectRow, Store

TOKEN_VARIABLE = "VECTOR_SYNC_MCP_TOKEN"
MIN_TOKEN_LENGTH = 16
HTTP_PATH = "/mcp"
MAX_LIMIT = 100
MAX_QUERY_CHARACTERS = 8000

INSTRUCTIONS = """\
Semantic search over the projects table. search_projects finds projects by meaning (embedding
similarity); get_project reads one project by id; sync_status says how complete and current the
embeddings are. Each result says whether its vector is current, or stale (the row changed after it
was embedded, so the match reflects older text). Read-only."""

READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False)


# --- results ---------------------------------------------------------------------------------


class Embedding(BaseModel):
    """How a row's stored vector compares with the row."""

    status: Literal["current", "stale", "missing"] = Field(
        description="current: the vector was made from the row as it is now, by the configured model; "
        "stale: the row changed since (or another model made it), a re-embed is due; missing: no vector yet"
    )
    row_version: int = Field(description="the row's version, bumped on every change")
    vector_version: int | None = Field(description="the row version the vector was made from")
    model: str | None = Field(description="the model that made the vector")
    embedded_at: datetime | None = Field(description="when the vector was stored")
    age_seconds: float | None = Field(description="seconds since the vector was stored")


class ProjectMatch(BaseModel):
    id: str = Field(description="the project's id, as text")
    similarity: float = Field(description="cosine similarity to the query, -1 to 1 (higher is closer)")
    content: dict[str, str | None] = Field(description="the embedded content columns, by column name")
    embedding: Embedding


class SearchResults(BaseModel):
    query: str
    model: str = Field(description="the model that embedded the query (and, for these results, the rows)")
    results: list[ProjectMatch] = Field(description="nearest first")


class Project(BaseModel):
    id: str
    content: dict[str, str | None] = Field(description="the embedded content columns, by column name")
    embedding: Embedding


class SyncStatus(BaseModel):
    """The counts `vector-sync status` prints (rows this connection's role may read)."""

    rows: int
    embedded: int = Field(description="rows with a vector")
    current: int = Field(description="rows whose vector matches the row and the configured model")
    stale: int = Field(description="rows whose vector is behind the row or from another model")
    missing: int = Field(description="rows without a vector")
    pending_webhooks: int = Field(description="changes whose webhook failed every attempt, not yet settled")
    dead_letters: int = Field(description="rows the embedding API refused")
    oldest_stale_seconds: float | None = Field(description="age of the oldest stale vector")
    webhooks: dict[str, int] = Field(
        description="changes by webhook delivery: delivered, retrying, exhausted (moved to pending_webhooks), "
        "not_sent (no sender configured)"
    )


# --- tools -----------------------------------------------------------------------------------

Query = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_QUERY_CHARACTERS),
    Field(description="what to look for, in words: a description, a topic, a question"),
]
Limit = Annotated[int, Field(ge=1, le=MAX_LIMIT, description=f"how many projects to return, 1 to {MAX_LIMIT}")]
MinSimilarity = Annotated[
    float,
    Field(ge=-1.0, le=1.0, description="leave out projects less similar than this (cosine similarity, -1 to 1)"),
]
ProjectKey = Annotated[int | str, Field(description="the project's id (a number, or a uuid or text id as a string)")]


def _database_error(exc: BaseException) -> ToolError:
    message = f"the database failed: {type(exc).__name__}: {exc}"
    logger.warning("tool call failed: {error}", error=message)
    return ToolError(message)


@dataclass
class ProjectTools:
    """The tools' behaviour, on one read-only store and one embedder."""

    settings: Settings
    catalog: Catalog
    store: Store
    embedder: Embedder
    stored_dimensions: int | None

    def _embedding(self, row: ProjectRow) -> Embedding:
        return Embedding(
            status=row.embedding_status(self.store.model),
            row_version=row.version,
            vector_version=row.vector_version,
            model=row.vector_model,
            embedded_at=row.embedded_at,
            age_seconds=None if row.vector_age_seconds is None else round(row.vector_age_seconds, 3),
        )

    def _content(self, row: ProjectRow) -> dict[str, str | None]:
        return dict(zip(self.settings.content_columns, row.content, strict=True))

    async def search_projects(
        self, query: Query, limit: Limit = 10, min_similarity: MinSimilarity = 0.0
    ) -> SearchResults:
        """Find projects by meaning: the projects whose embedded text is most similar to `query`.

        Returns each project's id, its content columns, the similarity (higher is closer) and how
        fresh its vector is: `stale` means the project changed after it was embedded, so it was
        matched on older text. Fails with an explanation when this server's embedding model or
        vector size differs from the stored vectors' (their similarities would mean nothing).
        """
        model = self.store.model
        if self.stored_dimensions is not None and self.stored_dimensions != self.embedder.dimensions:
            raise ToolError(
                f"the stored vectors have {self.stored_dimensions} dimensions but this server's embedder "
                f"({model}) makes {self.embedder.dimensions}: configure VECTOR_SYNC_EMBEDDER, "
                "VECTOR_SYNC_EMBEDDING_MODEL and VECTOR_SYNC_EMBEDDING_DIMENSIONS as for the daemon"
            )
        try:
            vector = (await self.embedder.embed([query]))[0]
        except EmbeddingError as exc:
            logger.warning("tool call failed: embedding the query: {error}", error=str(exc))
            raise ToolError(f"embedding the query failed: {exc}") from exc
        try:
            hits = await self.store.search(vector, limit, min_similarity)
        except DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc
        others = sorted({hit.row.vector_model for hit in hits if hit.row.vector_model != model}, key=str)
        if others:
            raise ToolError(
                f"some matching vectors were made by {', '.join(map(str, others))}, but this server embeds "
                f"queries with {model}: similarities across models mean nothing. Configure the daemon's "
                "VECTOR_SYNC_EMBEDDER and VECTOR_SYNC_EMBEDDING_MODEL here, or, after a model change, wait "
                "until the daemon has re-embedded every row (`vector-sync status` shows 0 stale)"
            )
        return SearchResults(
            query=query,
            model=model,
            results=[
                ProjectMatch(
                    id=hit.project_id,
                    similarity=round(hit.similarity, 6),
                    content=self._content(hit.row),
                    embedding=self._embedding(hit.row),
                )
                for hit in hits
            ],
        )

    async def get_project(self, id: ProjectKey) -> Project:
        """Read one project by id: its content columns and whether its vector is current, stale
        (the project changed after it was embedded) or missing (not embedded yet)."""
        try:
            key = normalize_id(id, self.catalog.id_kind)
        except MalformedEvent as exc:
            raise ToolError(f"{id!r} is not a valid id here: the ids are {self.catalog.id_kind.value}") from exc
        try:
            row = await self.store.read_project(key)
        except DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc
        if row is None:
            raise ToolError(f"no project with id {key}")
        return Project(id=row.project_id, content=self._content(row), embedding=self._embedding(row))

    async def sync_status(self) -> SyncStatus:
        """How complete and current the embeddings are: rows, embedded, current, stale and missing
        vectors, webhook changes waiting, rows the embedding API refused, and the oldest stale age."""
        try:
            status = await self.store.status()
        except DATABASE_ERRORS as exc:
            raise _database_error(exc) from exc
        return SyncStatus(
            rows=status.rows,
            embedded=status.embedded,
            current=status.current,
            stale=status.stale,
            missing=status.missing,
            pending_webhooks=status.pending_webhooks,
            dead_letters=status.dead_letters,
            oldest_stale_seconds=status.oldest_stale_seconds,
            webhooks=status.webhook_summary(),
        )


def build_server(tools: ProjectTools, *, host: str, port: int) -> FastMCP[Any]:
    """The FastMCP server with the three tools (host and port matter only for HTTP)."""
    server: FastMCP[Any] = FastMCP(
        name="vector-sync",
        instructions=INSTRUCTIONS,
        host=host,
        port=port,
        streamable_http_path=HTTP_PATH,
        # No session state to keep: every request stands alone (and any replica can answer it).
        stateless_http=True,
        json_response=True,
        log_level="WARNING",
    )
    # FastMCP has no version argument; without this, clients see the SDK's version as the server's.
    server._mcp_server.version = __version__
    for tool in (tools.search_projects, tools.get_project, tools.sync_status):
        description = inspect.cleandoc(tool.__doc__ or "")  # FastMCP would keep the docstring's indentation
        server.add_tool(tool, description=description, annotations=READ_ONLY, structured_output=True)
    return server


# --- HTTP authentication ---------------------------------------------------------------------


class _TokenSettings(BaseSettings):
    """The token alone, read like every other setting (environment, then `.env`)."""

    model_config = Settings.model_config
    token: SecretStr | None = Field(None, validation_alias=TOKEN_VARIABLE)


def http_token() -> str:
    """`VECTOR_SYNC_MCP_TOKEN`, or `ConfigError` (exit 2) when it is missing or too short."""
    token = _TokenSettings().token
    value = "" if token is None else token.get_secret_value().strip()
    if not value:
        raise ConfigError(
            [
                f"{TOKEN_VARIABLE}: missing: `mcp --http` needs a bearer token for its clients "
                "(for example: openssl rand -hex 32)"
            ]
        )
    if len(value) < MIN_TOKEN_LENGTH:
        raise ConfigError([f"{TOKEN_VARIABLE}: got '***': expected at least {MIN_TOKEN_LENGTH} characters"])
    return value


class BearerAuth:
    """ASGI middleware: HTTP requests need `Authorization: Bearer <token>`, else 401.

    The tokens are compared as SHA-256 digests in constant time, so neither their content nor their
    length shows in the timing."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self._app = app
        self._expected = hashlib.sha256(token.encode()).digest()

    def authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                digest = hashlib.sha256(given.strip().encode("latin-1")).digest()
                return scheme.lower() == "bearer" and hmac.compare_digest(digest, self._expected)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.authorized(scope):
            response = JSONResponse(
                {"error": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="vector-sync"'},
            )
            await response(scope, receive, send)
            return
        await self._app(scope, receive, send)


# --- running it ------------------------------------------------------------------------------


class _ToLoguru(logging.Handler):
    """The SDK's and uvicorn's stdlib logging, through our loguru set-up: stderr, secrets scrubbed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).log(
            level, "{source}: {text}", source=record.name, text=record.getMessage()
        )


def _route_stdlib_logging(level: str) -> None:
    quiet = level not in {"TRACE", "DEBUG"}  # the SDK logs every request at INFO
    logging.basicConfig(handlers=[_ToLoguru()], level=logging.WARNING if quiet else logging.DEBUG, force=True)


async def open_tools(settings: Settings) -> ProjectTools:
    """Catalog, read-only store and embedder; `FatalError` when the database is not ready."""
    catalog = await load_catalog(settings, embeds=False)
    store = await Store.connect(settings, catalog, read_only=True, application_name="vector-sync-mcp")
    try:
        dimensions = await store.vector_dimensions()
    except BaseException:
        await store.close()
        raise
    return ProjectTools(settings, catalog, store, build_embedder(settings), dimensions)


async def close_tools(tools: ProjectTools) -> None:
    await tools.embedder.close()
    await tools.store.close()


async def _serve(settings: Settings, token: str | None, host: str, port: int) -> int:
    try:
        tools = await open_tools(settings)
    except FatalError as exc:
        logger.error("{error}", error=str(exc))
        return 1
    except DATABASE_ERRORS as exc:
        logger.error("cannot read the database: {error}: {detail}", error=type(exc).__name__, detail=str(exc))
        return 1
    server = build_server(tools, host=host, port=port)
    try:
        if token is None:
            logger.info(
                "MCP server {version} on stdio: {table}, queries embedded with {model}",
                version=__version__,
                table=str(settings.table),
                model=tools.store.model,
            )
            await _serve_stdio(server, tools)
        else:
            await _serve_http(server, token, host, port, tools.store.model)
    finally:
        await close_tools(tools)
    return 0


async def _serve_stdio(server: FastMCP[Any], tools: ProjectTools) -> None:
    """Until the client closes stdin, or SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    serving = asyncio.create_task(server.run_stdio_async())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        stopping.cancel()
        serving.result()  # stdin closed: the client is gone
        return
    # A signal. The SDK reads stdin in a worker thread that nothing interrupts, so a cancelled
    # server would wait for the client's next line: close the connections and leave now.
    await asyncio.wait_for(close_tools(tools), timeout=5)
    logger.info("MCP server stopped by a signal")
    os._exit(0)


class _Listener:
    """uvicorn on this event loop, stopped by SIGTERM or SIGINT with a clean exit.

    uvicorn's own signal handling raises the signal again after its graceful stop, which would end
    the process by SIGTERM (no clean exit code, nothing closed); ours only asks it to stop."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        # log_config=None: uvicorn's records go through the root logger to loguru (stderr), not stdout.
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, server_header=False)
        self._server = Server(config)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        try:
            await self._server.serve()
        except SystemExit as exc:  # uvicorn's way of saying it could not start (it logged why)
            raise FatalError(
                f"the HTTP listener could not start on {self._server.config.host}:{self._server.config.port}"
            ) from exc
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    def stop(self) -> None:
        self._server.should_exit = True


async def _serve_http(server: FastMCP[Any], token: str, host: str, port: int, model: str) -> None:
    listener = _Listener(BearerAuth(server.streamable_http_app(), token), host, port)
    logger.info(
        "MCP server {version} on http://{host}:{port}{path} (bearer token required), queries embedded with {model}",
        version=__version__,
        host=host,
        port=port,
        path=HTTP_PATH,
        model=model,
    )
    await listener.serve()


def serve(settings: Settings, *, http: bool, host: str, port: int) -> int:
    """`vector-sync mcp`: 0 after a clean stop, 1 when the database or the listener fails, 2 (via
    `ConfigError`) without a token for HTTP."""
    token = http_token() if http else None
    logs.setup(
        level=settings.log_level,
        fmt=settings.log_format,
        secrets=[*settings.secrets(), *([token] if token else [])],
    )
    _route_stdlib_logging(settings.log_level)
    try:
        return asyncio.run(_serve(settings, token, host, port))
    except FatalError as exc:
        logger.error("{error}", error=str(exc))
        return 1
