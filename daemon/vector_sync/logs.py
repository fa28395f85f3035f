"""loguru set-up: text for people, one JSON object a line for machines, secrets scrubbed from both.

Log calls pass their fields as keyword arguments (`logger.info("... {rows}", rows=3)`), so in JSON
every field also stands on its own under its stable name.
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


def default_format(stream: TextIO) -> str:
    """JSON when not on a terminal and on Railway (whose log view parses it), else text."""
    if not stream.isatty() and os.environ.get("RAILWAY_ENVIRONMENT"):
        return "json"
    return "text"


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


def _json_sink(stream: TextIO, scrubber: _Scrubber) -> Any:
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
        stream.write(json.dumps(entry, default=str) + "\n")
        stream.flush()

    return write


def _text_sink(stream: TextIO, scrubber: _Scrubber) -> Any:
    def write(message: Message) -> None:
        stream.write(scrubber.scrub(str(message)))
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
    if chosen == "json":
        logger.add(_json_sink(target, scrubber), level=level, format="{message}", backtrace=False, diagnose=False)
    else:
        logger.add(
            _text_sink(target, scrubber),
            level=level,
            format=TEXT_FORMAT,
            backtrace=False,
            diagnose=False,
        )
