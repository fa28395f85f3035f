"""`POST /webhook`: verify, parse, offer, answer 202 at once. Every other outcome is a clear 4xx.

Checks run cheapest first, and the body is never read before the sender is known to be within its
rate and size limits. Statuses follow interface.md's table exactly.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from loguru import logger

from vector_sync.config import TableName
from vector_sync.events import IdKind, MalformedEvent, Source, parse_webhook
from vector_sync.ports import EventSink

MAX_BODY_BYTES = 1024 * 1024
# Bodies being read at once: with the 1 MiB cap this bounds the listener's buffers to 64 MiB. A body
# must arrive within the read timeout, so slow senders cannot hold the slots.
MAX_CONCURRENT_BODIES = 64
BODY_READ_TIMEOUT_SECONDS = 10.0
TIMESTAMP_TOLERANCE_SECONDS = 300
MAX_TRACKED_ADDRESSES = 10_000
MAX_WEBHOOK_ID_LENGTH = 256
# Unix seconds as ASCII digits; a bound on the length keeps the arithmetic in range.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks v1 signature: base64 HMAC-SHA256 of `id.timestamp.body`."""
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def verify_signature(
    key: bytes, webhook_id: str | None, timestamp: str | None, signatures: str | None, body: bytes, now: float
) -> str | None:
    """None when the Standard Webhooks headers are valid for `body`, else the reason they are not."""
    if not webhook_id or not timestamp or not signatures:
        return "missing webhook signature headers"
    if len(webhook_id) > MAX_WEBHOOK_ID_LENGTH or not webhook_id.isascii():
        return "bad webhook-id"
    if not _TIMESTAMP.fullmatch(timestamp):
        return "bad webhook-timestamp"
    sent_at = int(timestamp)
    if abs(now - sent_at) > TIMESTAMP_TOLERANCE_SECONDS:
        return "webhook-timestamp outside tolerance"
    expected = sign(key, webhook_id, sent_at, body).encode()
    for candidate in signatures.split(" "):
        version, _, value = candidate.partition(",")
        if version == "v1" and value.isascii() and hmac.compare_digest(value.encode(), expected):
            return None
    return "bad signature"


def verify_bearer(token: str, authorization: str | None) -> bool:
    if not authorization:
        return False
    scheme, _, value = authorization.partition(" ")
    # Header text may carry undecodable bytes as surrogates; compare bytes without raising.
    offered = value.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(offered, token.encode("utf-8", "surrogateescape"))


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per client address; the table of addresses is bounded (least recent dropped)."""

    def __init__(self, per_second: float, burst: float | None = None) -> None:
        self._rate = per_second
        self._burst = burst if burst is not None else per_second
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def retry_after(self, address: str, now: float) -> float | None:
        """None if a request from `address` may pass now (and take a token), else seconds to wait."""
        bucket = self._buckets.get(address)
        if bucket is None:
            bucket = _Bucket(self._burst, now)
            self._buckets[address] = bucket
            if len(self._buckets) > MAX_TRACKED_ADDRESSES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(address)
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return (1 - bucket.tokens) / self._rate


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": reason}, status=status, headers=headers)


class WebhookReceiver:
    def __init__(
        self,
        *,
        sink: EventSink | None,
        id_kind: IdKind,
        table: TableName,
        id_column: str,
        key: bytes | None,
        token: str | None,
        rate_limit: float,
    ) -> None:
        # None while this instance is a standby: the sender is told to retry, and reaches the leader.
        self.sink = sink
        self._id_kind = id_kind
        self._table = table
        self._id_column = id_column
        self._key = key
        self._token = token
        self._limiter = RateLimiter(rate_limit)
        self._reading = 0
        self.stopping = False

    async def handle(self, request: web.Request) -> web.Response:
        response = await self._handle(request)
        if response.status >= 400:
            logger.debug(
                "webhook answered {status} to {remote}: {body}",
                status=response.status,
                remote=request.remote,
                body=response.text,
            )
        return response

    def _refusal(self, request: web.Request) -> web.Response | None:
        """The answers that need no body, cheapest first."""
        if self.stopping:
            return _error(503, "shutting down", {"Retry-After": "5"})
        if self.sink is None:
            return _error(503, "standby: another instance is embedding", {"Retry-After": "5"})
        wait = self._limiter.retry_after(request.remote or "unknown", time.monotonic())
        if wait is not None:
            return _error(429, "too many requests", {"Retry-After": str(max(1, math.ceil(wait)))})
        if request.content_type != "application/json":
            return _error(415, "content type must be application/json")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return _error(413, "body larger than 1 MiB")
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        if self._reading >= MAX_CONCURRENT_BODIES:
            return _error(429, "too many requests in progress", {"Retry-After": "1"})
        self._reading += 1
        try:
            async with asyncio.timeout(BODY_READ_TIMEOUT_SECONDS):
                body = await _read_limited(request, MAX_BODY_BYTES)
        except TimeoutError:
            return _error(408, "body not received in time")
        except (RequestPayloadError, HttpProcessingError, ValueError):
            return _error(400, "body could not be read (bad transfer or content encoding)")
        finally:
            self._reading -= 1
        if body is None:
            return _error(413, "body larger than 1 MiB")
        if not self._authenticated(request, body):
            return _error(401, "missing or invalid signature or token")
        sink = self.sink
        if sink is None:  # the lease was lost while the body was read
            return _error(503, "standby: another instance is embedding", {"Retry-After": "5"})
        try:
            event = parse_webhook(
                body,
                kind=self._id_kind,
                table=self._table.name,
                schema=self._table.schema,
                id_column=self._id_column,
            )
        except MalformedEvent as exc:
            sink.malformed(Source.WEBHOOK, exc.reason)
            return _error(exc.status, exc.reason)
        sink.offer(event)
        return web.json_response({"webhook_id": request.headers.get("webhook-id")}, status=202)

    def _authenticated(self, request: web.Request, body: bytes) -> bool:
        headers = request.headers
        if self._token is not None and verify_bearer(self._token, headers.get("Authorization")):
            return True
        if self._key is None:
            return False
        problem = verify_signature(
            self._key,
            headers.get("webhook-id"),
            headers.get("webhook-timestamp"),
            headers.get("webhook-signature"),
            body,
            time.time(),
        )
        return problem is None


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None once it grows past `limit` (chunked bodies carry no length up front)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
