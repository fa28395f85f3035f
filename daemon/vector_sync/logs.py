"""loguru set-up: text for people, one JSON object a line for machines, secrets scrubbed from both.

Log calls pass their fields as keyword arguments (`logger.info("... {rows}", rows=3)`), so in JSON
every field also stands on its own under its stable name.

Under systemd, when stderr is the journal's stream (JOURNAL_STREAM names it), every line starts with
its syslog priority, "<4>" for a warning: journald strips that prefix and files the line under the
priority, so `journalctl -p warning` works. JSON lines get it too: the journal stores the message
without the prefix, so each entry is still exactly one JSON object, and `-p` filters them as well.
The prefix is never written anywhere else (a terminal, a file, Railway's log view).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

if TYPE_CHECKING:
    from loguru import Message, Record

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}"
MASK = "***"
# syslog priorities by loguru level number: CRITICAL 2, ERROR 3, WARNING 4, SUCCESS 5 (notice),
# INFO 6, DEBUG and TRACE 7; a custom level takes the priority of the level below it.
PRIORITIES = ((50, 2), (40, 3), (30, 4), (25, 5), (20, 6))
DEBUG_PRIORITY = 7


def default_format(stream: TextIO) -> str:
    """JSON when not on a terminal and on Railway (whose log view parses it), else text."""
    if not stream.isatty() and os.environ.get("RAILWAY_ENVIRONMENT"):
        return "json"
    return "text"


def on_journal(stream: TextIO) -> bool:
    """True when `stream` is the journald stream systemd connected (JOURNAL_STREAM="<dev>:<inode>").

    The variable alone is not enough: children inherit it, and a redirected stderr is no journal."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        status = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # unset or malformed, or a stream without a file
        return False
    return (status.st_dev, status.st_ino) == (device, inode)


def syslog_priority(level_no: int) -> int:
    for threshold, priority in PRIORITIES:
        if level_no >= threshold:
            return priority
    return DEBUG_PRIORITY


def _prefixed(text: str, level_no: int) -> str:
    """Every line prefixed: journald reads one entry a line, so a traceback's lines need it too."""
    prefix = f"<{syslog_priority(level_no)}>"
    return "".join(prefix + line for line in text.splitlines(keepends=True))


class _Scrubber:
    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({secret for secret in secrets if secret}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def __call__(self, record: Record) -> None:
        record["message"] = self.scrub(record["message"])
        for key, value in list(record["extra"].items()):
            if isinstance(value, str):
                record["extra"][key] = self.scrub(value)


def _json_sink(stream: TextIO, scrubber: _Scrubber, journal: bool) -> Any:
    def write(message: Message) -> None:
        record = message.record
        entry: dict[str, Any] = {
            "time": record["time"].isoformat(),
            "level": record["level"].name,
            "message": record["message"],
            "logger": record["name"],
        }
        for key, value in record["extra"].items():
            entry[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record["exception"] is not None:
            entry["exception"] = scrubber.scrub(str(message).rstrip().split("\n", 1)[-1])
        line = json.dumps(entry, default=str) + "\n"
        stream.write(_prefixed(line, record["level"].no) if journal else line)
        stream.flush()

    return write


def _text_sink(stream: TextIO, scrubber: _Scrubber, journal: bool) -> Any:
    def write(message: Message) -> None:
        text = scrubber.scrub(str(message))
        stream.write(_prefixed(text, message.record["level"].no) if journal else text)
        stream.flush()

    return write


def setup(
    *, level: str = "INFO", fmt: str | None = None, secrets: Iterable[str] = (), stream: TextIO | None = None
) -> None:
    """Replace loguru's handlers with ours. Safe to call again (tests, the CLI after config loads)."""
    target = stream or sys.stderr
    scrubber = _Scrubber(secrets)
    logger.remove()
    logger.configure(patcher=scrubber)
    chosen = fmt or default_format(target)
    journal = on_journal(target)
    if chosen == "json":
        logger.add(
            _json_sink(target, scrubber, journal), level=level, format="{message}", backtrace=False, diagnose=False
        )
    else:
        logger.add(
            _text_sink(target, scrubber, journal),
            level=level,
            format=TEXT_FORMAT,
            backtrace=False,
            diagnose=False,
        )
