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


# --- secrets scan (issue #6) ---------------------------------------------------------------------------
# Everything the suite outputs is checked for the secrets the tests use:
# - every loguru line of the in-process daemons (a sink of our own);
# - each test's captured stdout, stderr and log records (from its report). Under `pytest -s` nothing is
#   captured: the summary says so, and what was scanned instead;
# - the body of every HTTP answer a client in this process receives (`_scan_http_answers`): the tests'
#   own requests, tests/support.py's and the reliability harness's helpers (/metrics, /readyz, /healthz
#   and /webhook answers, status checks included), the pg_net stand-in's, and the daemon's calls to the
#   test API;
# - files registered with `secret_scan.watch` (read at the end; tests/reliability.py's `world.log_paths`
#   of the subprocess daemons are registered by themselves).
# Only output is scanned, never test code. The secrets are the string constants of the test modules
# named like one (WEBHOOK_SECRET, API_KEY, ..._TOKEN, ...PASSWORD: a module constant of that kind in any
# tests/*.py module is registered by itself), the key inside a `whsec_` secret, the password of any DSN
# constant, and values made at run time, registered with `secret_scan.add(name, value)`. A hit fails
# the session.

import base64  # noqa: E402
import contextlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterable, Mapping  # noqa: E402
from types import ModuleType, TracebackType  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import httpx2  # noqa: E402
from loguru import logger  # noqa: E402

_SECRET_NAME = re.compile(r"SECRET|TOKEN|API_KEY|SERVICE_KEY|PASSWORD")
_DSN_PASSWORD = re.compile(r"^postgres(?:ql)?://[^:/@]*:([^@]+)@")
_TESTS_DIR = Path(__file__).resolve().parent
_MIN_SECRET_LENGTH = 8  # shorter values would match by chance
# An answer nobody read (a status check) is read when its `async with` block ends, if the server said
# how long it is and that is no more than this; a stalled server costs at most _UNREAD_BODY_TIMEOUT.
_UNREAD_BODY_LIMIT = 1024 * 1024
_UNREAD_BODY_TIMEOUT = 2.0


def known_secrets(modules: Iterable[ModuleType]) -> dict[str, str]:
    """name -> value of every secret the given modules define (see above); values under 8 characters
    are left out, they would match by chance."""
    found: dict[str, str] = {}
    for module in modules:
        for name, value in vars(module).items():
            if not (isinstance(value, str) and name.isupper()):
                continue
            where = f"{module.__name__}.{name}"
            if _SECRET_NAME.search(name):
                found[where] = value
                if value.startswith("whsec_"):
                    found[f"{where} (base64 part)"] = value.removeprefix("whsec_")
                    with contextlib.suppress(ValueError):
                        found[f"{where} (key)"] = base64.b64decode(found[f"{where} (base64 part)"]).decode("ascii")
            password = _DSN_PASSWORD.match(value)
            if password:
                found[f"{where} (password)"] = password.group(1)
    # One name per value (an imported constant shows up in every module that imports it).
    unique = {value: name for name, value in reversed(found.items()) if len(value) >= _MIN_SECRET_LENGTH}
    return {name: value for value, name in unique.items()}


def _test_modules() -> list[ModuleType]:
    modules = []
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve().parent == _TESTS_DIR:
            modules.append(module)
    return modules


class SecretScan:
    """Collects where a known secret showed up in output; `check` is cheap, call it with anything."""

    def __init__(self, secrets: Mapping[str, str] | None = None) -> None:
        self.secrets: dict[str, str] = dict(secrets or {})
        self.findings: list[str] = []
        self.where = "session start"
        self.texts = 0
        self.kinds: Counter[str] = Counter()  # texts scanned, by kind (the summary's breakdown)
        self.captured = True  # False under `pytest -s`: the test reports carry no output
        self._watched: list[tuple[Path, str]] = []

    def add(self, name: str, value: str) -> None:
        """Look for `value` too (a secret made at run time); `name` is what a finding calls it."""
        if len(value) < _MIN_SECRET_LENGTH:
            raise ValueError(f"{name}: a secret under {_MIN_SECRET_LENGTH} characters would match by chance")
        self.secrets[name] = value

    def check(self, source: str, text: str, kind: str = "other output") -> None:
        self.texts += 1
        self.kinds[kind] += 1
        matched: list[str] = []
        for name, value in sorted(self.secrets.items(), key=lambda item: -len(item[1])):
            # A secret inside a longer one already found (the base64 part of a whsec_ secret) is the same leak.
            if value in text and not any(value in longer for longer in matched):
                matched.append(value)
                at = text.index(value)
                excerpt = text[max(0, at - 60) : at] + "<" + name + ">" + text[at + len(value) : at + len(value) + 60]
                self.findings.append(f"{name} in {source} ({self.where}): ...{excerpt!r}...")

    def sink(self, message: Any) -> None:
        """A loguru sink."""
        self.check("loguru output", str(message), "loguru lines")

    def watch(self, path: Path, source: str) -> None:
        """Scan this file (a subprocess's log) at the end of the session."""
        self._watched.append((path, f"{source} ({self.where})"))

    def scan_watched(self) -> None:
        for path, source in self._watched:
            with contextlib.suppress(OSError):
                self.check(source, path.read_text(errors="replace"), "log files")

    def summary(self) -> list[str]:
        """The lines of the terminal summary: the findings, or the totals; then what was scanned."""
        if self.findings:
            lines = [*self.findings[:50], f"{len(self.findings)} finding(s): the session fails"]
        else:
            lines = [
                f"secrets scan: {len(self.secrets)} secrets, {self.texts} outputs scanned "
                f"({len(self._watched)} subprocess log files), none found"
            ]
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.kinds.items())) or "nothing"
        lines.append(f"secrets scan: scanned {kinds}")
        if not self.captured:
            lines.append(
                "secrets scan: the tests' stdout and stderr were NOT scanned: output capture is off "
                "(-s, --capture=no); only loguru lines, HTTP answers and log files were"
            )
        return lines


_secret_scan = SecretScan()
_secret_sink: int | None = None


def _attach_secret_sink() -> None:
    """(Re)add the loguru sink: a test that calls `logs.setup` removes every handler."""
    global _secret_sink
    if _secret_sink is not None:
        with contextlib.suppress(ValueError):
            logger.remove(_secret_sink)
    _secret_sink = logger.add(_secret_scan.sink, level=0, format="{message}", backtrace=False, diagnose=False)


def _watch_world_logs() -> None:
    """tests/reliability.py runs the daemon as a subprocess writing to `world.log_paths`: scan those."""
    world = getattr(sys.modules.get("reliability"), "World", None)
    if world is None or not hasattr(world, "log_paths") or getattr(world, "_secret_scan_watched", False):
        return
    original = world.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        for path in self.log_paths:
            _secret_scan.watch(path, f"daemon log {path}")

    world.__init__ = init
    world._secret_scan_watched = True


def _httpx_source(response: httpx.Response | httpx2.Response) -> str:
    try:
        return f"HTTP answer to {response.request.method} {response.request.url}"
    except RuntimeError:  # a response made by hand, never sent
        return "HTTP answer (httpx)"


def _scanned_aiter_bytes(
    aiter_bytes: Callable[[Any, int | None], AsyncIterator[bytes]],
) -> Callable[[Any, int | None], AsyncIterator[bytes]]:
    """httpx's (or httpx2's) `Response.aiter_bytes`, scanning what the reader received once it is done."""

    async def scanned(self: httpx.Response | httpx2.Response, chunk_size: int | None = None) -> AsyncIterator[bytes]:
        chunks: list[bytes] = []
        try:
            async for chunk in aiter_bytes(self, chunk_size):
                chunks.append(chunk)
                yield chunk
        finally:  # also when the reader stops early: what it received is scanned
            _secret_scan.check(_httpx_source(self), b"".join(chunks).decode(errors="replace"), "HTTP answers")

    return scanned


@pytest.fixture(scope="session", autouse=True)
def _scan_http_answers() -> Iterator[None]:
    """Every HTTP answer body a client in this process receives goes through the scan. aiohttp: `read`,
    which `text` and `json` call, and, when the `async with` block of an answer nobody read ends, its
    body (bounded, see _UNREAD_BODY_LIMIT). httpx, and httpx2 (the fork the openai SDK uses, so the
    daemon's and the tests' OpenAI clients): `aiter_bytes`, which `aread`, `aiter_text` and `aiter_lines`
    use, so streamed answers are scanned as well. Patched on the classes, so no client has to be made in
    a special way."""
    read = aiohttp.ClientResponse.read
    aexit = aiohttp.ClientResponse.__aexit__

    async def scanned_read(self: aiohttp.ClientResponse) -> bytes:
        first = self._body is None  # `text` and `json` call `read` each time; the body is read once
        body = await read(self)
        if first:
            source = f"HTTP answer to {self.method} {self.url}"
            _secret_scan.check(source, body.decode(errors="replace"), "HTTP answers")
        return body

    async def scanned_aexit(
        self: aiohttp.ClientResponse,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        length = self.content_length
        try:
            if exc_type is None and self._body is None and length is not None and length <= _UNREAD_BODY_LIMIT:
                # The connection may be gone (a daemon killed mid-answer): then there is nothing to scan.
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with asyncio.timeout(_UNREAD_BODY_TIMEOUT):
                        await scanned_read(self)
        finally:
            await aexit(self, exc_type, exc, tb)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aiohttp.ClientResponse, "read", scanned_read)
        patch.setattr(aiohttp.ClientResponse, "__aexit__", scanned_aexit)
        for response in (httpx.Response, httpx2.Response):
            patch.setattr(response, "aiter_bytes", _scanned_aiter_bytes(response.aiter_bytes))
        yield


def pytest_configure(config: pytest.Config) -> None:
    # "no" for -s; a disabled capture plugin has no such option and captures nothing either.
    _secret_scan.captured = config.getoption("capture", default="no") != "no"


def pytest_collection_finish(session: pytest.Session) -> None:
    _secret_scan.secrets.update(known_secrets(_test_modules()))
    _watch_world_logs()


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _secret_scan.where = nodeid
    _attach_secret_sink()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for title, content in report.sections:
        if title.endswith(f" {report.when}"):  # a later phase's report repeats the earlier sections
            _secret_scan.check(title, content, "captured output sections")


@pytest.fixture(scope="session")
def secret_scan() -> SecretScan:
    """The session's scan: `secret_scan.add(name, value)` looks for a secret made at run time,
    `secret_scan.check(source, text)` scans output of your own, `secret_scan.watch(path, source)` a file."""
    return _secret_scan


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _secret_scan.scan_watched()
    if _secret_scan.findings and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _secret_scan.findings:
        terminalreporter.section("secrets in the output", red=True)
    for line in _secret_scan.summary():
        terminalreporter.write_line(line)
