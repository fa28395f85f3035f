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
# Everything the suite outputs is checked for the secrets the tests use: every loguru line of the
# in-process daemons (a sink of our own), each test's captured stdout, stderr and log records (from its
# report), the HTTP answers tests hand to the `secret_scan` fixture, and files registered with
# `secret_scan.watch` (read at the end; tests/reliability.py's `world.log_paths` of the subprocess daemons
# are registered by themselves). Only output is scanned, never test code. The secrets are the
# string constants of the test modules named like one (WEBHOOK_SECRET, API_KEY, ..._TOKEN, ...PASSWORD),
# the key inside a `whsec_` secret, and the password of any DSN constant. A hit fails the session.

import base64  # noqa: E402
import contextlib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterable, Mapping  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

from loguru import logger  # noqa: E402

_SECRET_NAME = re.compile(r"SECRET|TOKEN|API_KEY|SERVICE_KEY|PASSWORD")
_DSN_PASSWORD = re.compile(r"^postgres(?:ql)?://[^:/@]*:([^@]+)@")
_TESTS_DIR = Path(__file__).resolve().parent


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
    unique = {value: name for name, value in reversed(found.items()) if len(value) >= 8}
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
        self._watched: list[tuple[Path, str]] = []

    def check(self, source: str, text: str) -> None:
        self.texts += 1
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
        self.check("loguru output", str(message))

    def watch(self, path: Path, source: str) -> None:
        """Scan this file (a subprocess's log) at the end of the session."""
        self._watched.append((path, f"{source} ({self.where})"))

    def scan_watched(self) -> None:
        for path, source in self._watched:
            with contextlib.suppress(OSError):
                self.check(source, path.read_text(errors="replace"))


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


def pytest_collection_finish(session: pytest.Session) -> None:
    _secret_scan.secrets.update(known_secrets(_test_modules()))
    _watch_world_logs()


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _secret_scan.where = nodeid
    _attach_secret_sink()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for title, content in report.sections:
        if title.endswith(f" {report.when}"):  # a later phase's report repeats the earlier sections
            _secret_scan.check(title, content)


@pytest.fixture(scope="session")
def secret_scan() -> SecretScan:
    """The session's scan: `secret_scan.check(source, text)` adds output of your own (HTTP answers)."""
    return _secret_scan


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _secret_scan.scan_watched()
    if _secret_scan.findings and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    scan = _secret_scan
    if scan.findings:
        terminalreporter.section("secrets in the output", red=True)
        for finding in scan.findings[:50]:
            terminalreporter.write_line(finding)
        terminalreporter.write_line(f"{len(scan.findings)} finding(s): the session fails")
    else:
        terminalreporter.write_line(
            f"secrets scan: {len(scan.secrets)} secrets, {scan.texts} outputs scanned "
            f"({len(scan._watched)} subprocess log files), none found"
        )
