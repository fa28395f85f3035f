"""Running under systemd: the sd_notify protocol against real datagram sockets, the unit file as
systemd-analyze judges it, journald priority prefixes, and the daemon's own notifications."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from embedding_api import EmbeddingAPI
from loguru import logger
from support import wait_until
from test_cli import free_port, served_env, serving
from vector_sync import logs
from vector_sync.config import Settings
from vector_sync.sdnotify import Notifier

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "vector-sync.service"
INSTALLED_EXEC = "/opt/vector-sync/venv/bin/vector-sync"
MAX_EXPOSURE = 2.0


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's; records each datagram on arrival."""

    def __init__(self, address: str) -> None:
        self.address = address  # as it goes in NOTIFY_SOCKET
        self.messages: list[tuple[float, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.setblocking(False)

    async def __aenter__(self) -> NotifySocket:
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._read)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    @property
    def texts(self) -> list[str]:
        return [text for _, text in self.messages]

    def with_line(self, line: str) -> list[int]:
        """Indexes of the datagrams holding `line` ("READY=1") as one of their assignments."""
        return [index for index, text in enumerate(self.texts) if line in text.split("\n")]

    def times(self, line: str) -> list[float]:
        return [self.messages[index][0] for index in self.with_line(line)]


@pytest.fixture(params=["path", "abstract"])
async def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[NotifySocket]:
    if request.param == "path":
        address = str(tmp_path / "notify")
    else:
        address = f"@vector-sync-test/{os.getpid()}/{secrets.token_hex(6)}"
    async with NotifySocket(address) as bound:
        yield bound


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(message.record["message"]), level="DEBUG")
    yield lines
    logger.remove(sink)


# ----------------------------------------------------------------------------------- the protocol


async def test_each_message_arrives_as_one_datagram(notify_socket: NotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address})
    assert notifier.enabled
    assert notifier.ready("live: listen, webhook")
    assert notifier.status("embedding 3 rows\nof 10")  # a status is one line
    assert notifier.watchdog()
    assert notifier.stopping("draining for up to 10s")
    await wait_until(lambda: len(notify_socket.messages) == 4, timeout=5, what="four datagrams")
    assert notify_socket.texts == [
        "READY=1\nSTATUS=live: listen, webhook",
        "STATUS=embedding 3 rows of 10",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=draining for up to 10s",
    ]


async def test_without_notify_socket_nothing_is_sent_and_nothing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    for notifier in (Notifier(), Notifier({}), Notifier({"NOTIFY_SOCKET": "relative/path"})):
        assert not notifier.enabled
        assert not notifier.ready("ready")
        assert not notifier.status("status")
        assert not notifier.stopping("stopping")
        assert not notifier.watchdog()
        assert notifier.watchdog_interval is None


async def test_reads_the_process_environment(notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier()
    assert notifier.watchdog_interval == 30.0
    assert notifier.ready("ready")
    await wait_until(lambda: notify_socket.with_line("READY=1") == [0], timeout=5, what="READY=1")


async def test_a_missing_socket_does_not_raise_and_warns_once(tmp_path: Path, log_lines: list[str]) -> None:
    for address in (str(tmp_path / "absent"), f"@vector-sync-test/absent/{secrets.token_hex(6)}"):
        log_lines.clear()
        notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"})
        assert notifier.enabled
        assert not notifier.ready("ready")
        for _ in range(3):
            assert not notifier.watchdog()
        assert not notifier.stopping("stopping")
        assert len([line for line in log_lines if "cannot notify systemd" in line]) == 1, log_lines


async def test_sending_resumes_after_the_socket_comes_back(tmp_path: Path, log_lines: list[str]) -> None:
    address = str(tmp_path / "notify")
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert not notifier.status("nobody listens yet")
    async with NotifySocket(address) as bound:
        assert notifier.status("now someone does")
        await wait_until(lambda: bound.texts == ["STATUS=now someone does"], timeout=5, what="the status")
    assert "notifying systemd again" in log_lines


def test_watchdog_interval_comes_from_watchdog_usec_for_this_process_only() -> None:
    socket_env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    assert Notifier(socket_env).watchdog_interval is None
    assert Notifier({**socket_env, "WATCHDOG_USEC": "30000000"}).watchdog_interval == 30.0
    mine = {**socket_env, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 30.0
    # Variables inherited from a parent that systemd watches: not ours to ping for.
    parents = {**socket_env, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getppid())}
    assert Notifier(parents).watchdog_interval is None
    for usec in ("0", "-5", "soon", ""):
        assert Notifier({**socket_env, "WATCHDOG_USEC": usec}).watchdog_interval is None
    assert Notifier({**socket_env, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None  # nobody to ping


async def test_no_watchdog_returns_at_once(notify_socket: NotifySocket) -> None:
    stop = asyncio.Event()
    others = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getppid())}
    for environ in ({"NOTIFY_SOCKET": notify_socket.address}, others, {}):
        await asyncio.wait_for(Notifier(environ).run_watchdog(lambda: True, stop), timeout=5)
    assert notify_socket.messages == []


async def test_watchdog_pings_at_half_the_interval_only_while_healthy(notify_socket: NotifySocket) -> None:
    usec = 400_000  # pings every 0.2 s
    period = usec / 1_000_000 / 2
    notifier = Notifier(
        {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": str(usec), "WATCHDOG_PID": str(os.getpid())}
    )
    assert notifier.watchdog_interval == 0.4
    answers: list[bool] = []
    health = {"ok": True}

    def healthy() -> bool:
        answers.append(health["ok"])
        return health["ok"]

    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(notifier.run_watchdog(healthy, stop))
    try:
        await wait_until(lambda: len(notify_socket.times("WATCHDOG=1")) >= 6, timeout=20, what="six pings")
        pings = notify_socket.times("WATCHDOG=1")
        assert pings[0] - started < period  # the first at once
        gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
        assert min(gaps) > period * 0.9, gaps  # never faster than half the interval
        assert statistics.median(gaps) < period * 2, gaps  # and about that (a busy machine is late)

        # Unhealthy: each check now withholds its ping.
        health["ok"] = False
        checks = len(answers)
        await wait_until(lambda: len(answers) >= checks + 3, timeout=20, what="three unhealthy checks")
        # Every healthy answer sent exactly one ping, and no unhealthy one sent any.
        await wait_until(
            lambda: len(notify_socket.times("WATCHDOG=1")) == answers.count(True), timeout=5, what="pings to arrive"
        )
        assert answers[checks:] == [False] * len(answers[checks:])
        withheld_from = len(notify_socket.times("WATCHDOG=1"))

        health["ok"] = True
        await wait_until(lambda: len(notify_socket.times("WATCHDOG=1")) > withheld_from, timeout=5, what="pings again")
        pings = notify_socket.times("WATCHDOG=1")
        assert pings[withheld_from] - pings[withheld_from - 1] > 3 * period * 0.9  # the silence lasted
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)  # returns promptly once stopped


async def test_a_failing_health_check_withholds_pings_without_ending_the_watchdog(
    notify_socket: NotifySocket, log_lines: list[str]
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000"})
    calls = {"n": 0}

    def broken() -> bool:
        calls["n"] += 1
        raise RuntimeError("pool closed")

    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run_watchdog(broken, stop))
    await wait_until(lambda: calls["n"] >= 3, timeout=20, what="three health checks")
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert notify_socket.with_line("WATCHDOG=1") == []
    assert len([line for line in log_lines if line.startswith("unhealthy (RuntimeError: pool closed)")]) == 1


# ------------------------------------------------------------------------------ the unit file


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing in CI (.ci/run installs Debian's systemd package)")
        pytest.skip("systemd-analyze is not installed")
    return path


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run([_systemd_analyze(), *args], capture_output=True, text=True, timeout=60, env=env, check=False)


def _unit_settings() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_the_unit_is_a_watched_notify_service_with_room_to_start_and_stop() -> None:
    unit = _unit_settings()
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == [f"{INSTALLED_EXEC} run"]
    assert unit["WatchdogSec"] == ["30s"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["KillSignal"] == ["SIGTERM"]
    grace = Settings.model_fields["shutdown_grace"].default
    ready_timeout = Settings.model_fields["realtime_ready_timeout"].default
    assert float(unit["TimeoutStopSec"][0]) >= grace * 2  # the drain, then closing the pool and HTTP
    assert float(unit["TimeoutStartSec"][0]) >= ready_timeout * 2  # a Realtime join may be retried once


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify also checks that ExecStart= is executable, and /opt/vector-sync is not installed here:
    # check a copy that runs this venv's own console script, the one a real install has under /opt.
    executable = Path(sys.executable).parent / "vector-sync"
    assert os.access(executable, os.X_OK), f"{executable}: the venv has no vector-sync console script"
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED_EXEC} ") == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_EXEC} ", f"ExecStart={executable} "))
    result = _analyze("verify", str(copy))
    # verify exits 0 on mere warnings (an unknown key is "ignoring"): any word about our unit fails.
    about_us = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0 and about_us == [], result.stdout + result.stderr


def test_systemd_analyze_security_rates_the_unit_ok() -> None:
    result = _analyze("security", "--offline=yes", "--no-pager", str(UNIT))
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"Overall exposure level for vector-sync\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    exposure = float(found.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


# ------------------------------------------------------------------------------------- journald


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    logger.remove()
    logger.configure(patcher=None)
    logger.add(sys.stderr)  # loguru's own default, as the other tests found it


def _log_through_setup(stream_path: Path, journal_stream: str | None, fmt: str, monkeypatch: Any) -> list[str]:
    with stream_path.open("w") as stream:
        status = os.fstat(stream.fileno())
        if journal_stream == "this file":
            monkeypatch.setenv("JOURNAL_STREAM", f"{status.st_dev}:{status.st_ino}")
        elif journal_stream is None:
            monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        else:
            monkeypatch.setenv("JOURNAL_STREAM", journal_stream)
        logs.setup(level="TRACE", fmt=fmt, secrets=["hunter2-secret"], stream=stream)
        logger.warning("disk nearly full, key {key}", key="hunter2-secret")
        logger.info("all fine")
        logger.success("drained")
        logger.debug("details")
        logger.trace("more details")
        logger.critical("gone")
        try:
            raise ValueError("bad row hunter2-secret")
        except ValueError:
            logger.exception("batch failed")
    return stream_path.read_text().splitlines()


def test_text_lines_carry_syslog_priorities_on_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    lines = _log_through_setup(tmp_path / "journal", "this file", "text", monkeypatch)
    assert lines[0].startswith("<4>") and "disk nearly full" in lines[0]
    assert lines[1].startswith("<6>") and "all fine" in lines[1]
    assert lines[2].startswith("<5>") and "drained" in lines[2]
    assert lines[3].startswith("<7>") and lines[4].startswith("<7>")
    assert lines[5].startswith("<2>") and "gone" in lines[5]
    assert "batch failed" in lines[6]
    # journald reads one entry a line: every line of the traceback keeps the error's priority.
    assert len(lines) > 7 and all(line.startswith("<3>") for line in lines[6:]), lines[6:]
    assert any("ValueError" in line for line in lines[6:])
    assert all("hunter2" not in line for line in lines)


def test_json_lines_carry_syslog_priorities_on_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    lines = _log_through_setup(tmp_path / "journal", "this file", "json", monkeypatch)
    assert [line[:3] for line in lines] == ["<4>", "<6>", "<5>", "<7>", "<7>", "<2>", "<3>"]
    entries = [json.loads(line[3:]) for line in lines]  # what journald stores: plain JSON
    assert [entry["level"] for entry in entries] == [
        "WARNING",
        "INFO",
        "SUCCESS",
        "DEBUG",
        "TRACE",
        "CRITICAL",
        "ERROR",
    ]
    assert entries[0]["key"] == "***"
    assert "ValueError" in entries[-1]["exception"]
    assert all("hunter2" not in line for line in lines)


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("journal_stream", [None, "0:0", "garbage", "1:2:3"])
def test_no_prefix_off_the_journal(
    fmt: str, journal_stream: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    # Unset, or naming another stream (inherited from a parent whose stderr was the journal).
    lines = _log_through_setup(tmp_path / "log", journal_stream, fmt, monkeypatch)
    assert not any(re.match(r"<\d>", line) for line in lines), lines
    assert "disk nearly full" in lines[0]
    assert all("hunter2" not in line for line in lines)


# ------------------------------------------------------------------------------- the daemon itself
# `vector-sync run` end to end, with a notify socket standing in for systemd.


async def test_run_notifies_ready_then_stopping_on_sigterm(dsn: str, api: EmbeddingAPI, tmp_path: Path) -> None:
    port = free_port()
    async with NotifySocket(str(tmp_path / "notify")) as notify:
        env = served_env(dsn, api, port, NOTIFY_SOCKET=notify.address)
        async with serving("run", env=env) as process:
            await wait_until(
                lambda: notify.with_line("READY=1") or process.returncode is not None, what="READY=1 from the daemon"
            )
            assert process.returncode is None, "the daemon exited before it was ready"
            assert notify.with_line("STOPPING=1") == []
            process.send_signal(signal.SIGTERM)
            await wait_until(lambda: notify.with_line("STOPPING=1"), what="STOPPING=1 after SIGTERM")
            assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        [ready_index] = notify.with_line("READY=1")  # once
        assert ready_index < notify.with_line("STOPPING=1")[0]
        assert any(line.startswith("STATUS=") for line in notify.texts[ready_index].split("\n"))


async def test_run_pings_the_watchdog_while_running(dsn: str, api: EmbeddingAPI, tmp_path: Path) -> None:
    port = free_port()
    async with NotifySocket(str(tmp_path / "notify")) as notify:
        env = served_env(dsn, api, port, NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="1000000")
        async with serving("run", env=env) as process:
            await wait_until(lambda: notify.with_line("READY=1") or process.returncode is not None, what="READY=1")
            ready_at = len(notify.texts)
            await wait_until(
                lambda: len([text for text in notify.texts[ready_at:] if text == "WATCHDOG=1"]) >= 2,
                what="two watchdog pings after READY=1",
            )
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=30) == 0
