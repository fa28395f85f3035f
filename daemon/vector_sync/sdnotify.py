"""The sd_notify protocol, without libsystemd: readiness, status, stopping and watchdog pings.

systemd hands a Type=notify service the address of a datagram socket in $NOTIFY_SOCKET (a path, or
a name in the abstract namespace when it starts with '@') and, with WatchdogSec=, the deadline in
$WATCHDOG_USEC (for the process in $WATCHDOG_PID, when set). Outside systemd none of them is set and
every call here does nothing, so the daemon runs the same in a terminal, a container or the tests.

Notifying is best effort: a lost datagram must never take the daemon down, so sending never raises.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

from loguru import logger

from vector_sync.aio import wait_or_stop

__all__ = ["Notifier"]


def _address(value: str | None) -> bytes | None:
    """The socket address in $NOTIFY_SOCKET, or None when unset or of a kind we do not speak."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])  # Linux abstract namespace
    if value.startswith("/"):
        return os.fsencode(value)
    # systemd 254+ may also hand out vsock:CID:PORT (for VMs); a daemon on a host never sees it.
    logger.debug("NOTIFY_SOCKET={value!r} is not a unix socket address: not notifying", value=value)
    return None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    try:
        timeout = int(usec)
        # The watchdog is for the process systemd named; a child that inherited the variables must
        # not keep a dead parent looking alive.
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return timeout / 1_000_000 if timeout > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))


class Notifier:
    """Tells systemd how the daemon is doing. Reads the environment once, when made."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self._address = _address(environ.get("NOTIFY_SOCKET"))
        self._watchdog_interval = _watchdog_interval(environ)
        self._failing = False

    @property
    def enabled(self) -> bool:
        """True when started by systemd with a notify socket."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds systemd waits for a ping before it kills the service (WatchdogSec=), or None
        without a watchdog for this process. `run_watchdog` pings at half of it."""
        return self._watchdog_interval if self._address is not None else None

    def notify(self, *assignments: str) -> bool:
        """Send `assignments` ("READY=1", ...) as one datagram; True when it was sent. Never raises."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never wait on systemd: a full queue loses this message rather than stall the loop.
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            if not self._failing:  # once per outage, not on every watchdog ping
                self._failing = True
                logger.warning(
                    "cannot notify systemd at {address}: {error}; it may restart the service",
                    address=os.fsdecode(self._address).replace("\0", "@", 1),
                    error=f"{type(exc).__name__}: {exc}",
                )
            return False
        if self._failing:
            self._failing = False
            logger.info("notifying systemd again")
        return True

    def ready(self, status: str) -> bool:
        """Start-up is done: a Type=notify unit becomes active, and units ordered after it start."""
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """A one-line state shown by `systemctl status`."""
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str) -> bool:
        """A graceful stop has begun (so systemd does not take a slow drain for a hang)."""
        return self.notify("STOPPING=1", f"STATUS={_one_line(status)}")

    def watchdog(self) -> bool:
        """One watchdog ping."""
        return self.notify("WATCHDOG=1")

    async def run_watchdog(self, healthy: Callable[[], bool], stop: asyncio.Event) -> None:
        """Ping at half the watchdog interval until `stop` is set, only while `healthy()` is True.

        The pings come from the event loop itself, so a blocked loop stops them as surely as an
        unhealthy daemon does, and systemd restarts it (Restart=on-failure). Returns at once
        without a watchdog.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        period = interval / 2
        was_healthy = True
        while not stop.is_set():
            error: Exception | None = None
            try:
                is_healthy = bool(healthy())
            except Exception as exc:  # a broken check is an unhealthy daemon, not a dead watchdog loop
                error, is_healthy = exc, False
            if is_healthy:
                self.watchdog()
            if is_healthy != was_healthy:
                if is_healthy:
                    logger.info("healthy again: systemd watchdog pings resume")
                else:
                    logger.opt(exception=error).warning(
                        "unhealthy{why}: systemd watchdog pings withheld; the service is restarted after {timeout:g}s",
                        why=f" ({type(error).__name__}: {error})" if error else "",
                        timeout=interval,
                    )
                was_healthy = is_healthy
            if await wait_or_stop(stop, period):
                return
