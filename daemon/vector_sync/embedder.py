"""Embedders: the OpenAI-compatible API client with its retry policy, and the offline hash embedder.

The retry policy lives here alone: the `openai` client's own retries are off (`max_retries=0`), so
two loops never stack. Failures are sorted once into three kinds (design.md, "Failures of the
embedding API"): transient (retry, then give back to the scheduler), quota (pause everything) and bad
input (bisect the batch so only the offending row is dead-lettered).
"""

from __future__ import annotations

import array
import asyncio
import base64
import binascii
import email.utils
import hashlib
import math
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import httpx
import openai
import orjson
from asyncio_throttle.throttler import Throttler
from loguru import logger

from vector_sync.config import EmbedderName, Settings

# A vector as float32 components ('f'), as the API sends them in base64: 4 bytes a component instead of
# a Python float's 32, and it reaches the database without a per-component conversion.
Embedding: TypeAlias = "array.array[float]"

# The API allows 2048 inputs and 300,000 tokens per request (OpenAI embeddings docstring); the batch
# size setting caps the inputs. No tokenizer (tiktoken downloads its tables at first use, which fails
# offline): a UTF-8 byte count over-estimates tokens for every byte-level BPE, so a byte budget is safe.
TOKEN_BUDGET_BYTES = 250_000


class EmbeddingError(Exception):
    """Base of every failure the embedder reports."""


class TransientEmbeddingError(EmbeddingError):
    """The API failed in a way that may pass (5xx, 429, timeout); retries are used up."""


class EmbeddingUnavailable(EmbeddingError):
    """Quota, credentials, an unknown model or vectors of the wrong size: no input is at fault, so
    nothing is dead-lettered; embedding pauses until a probe succeeds."""


class WrongDimensions(ValueError):
    """The model answers with another vector size than configured: retrying only pays again."""


class BadInput(EmbeddingError):
    """The API refused the request because of its inputs (400)."""


class Embedder(Protocol):
    model: str
    dimensions: int

    async def embed(self, texts: Sequence[str]) -> list[Embedding]: ...

    async def close(self) -> None: ...


@dataclass
class EmbedStats:
    requests: int = 0
    inputs: int = 0
    tokens: int = 0
    retries: int = 0


def estimated_tokens(text: str) -> int:
    return len(text.encode()) + 1


def chunk_for_requests(texts: Sequence[str], max_inputs: int) -> list[list[int]]:
    """Indexes of `texts` grouped so each group fits one request (input count and token budget)."""
    groups: list[list[int]] = []
    current: list[int] = []
    budget = 0
    for index, text in enumerate(texts):
        cost = estimated_tokens(text)
        if current and (len(current) >= max_inputs or budget + cost > TOKEN_BUDGET_BYTES):
            groups.append(current)
            current, budget = [], 0
        current.append(index)
        budget += cost
    if current:
        groups.append(current)
    return groups


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """`retry-after-ms`, else `retry-after` (seconds or an HTTP date), as the API sends them."""
    if headers is None:
        return None
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        if re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
            return max(0.0, float(value))
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (ValueError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int
    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 120.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter; an explicit Retry-After wins (capped)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


def classify(exc: BaseException) -> type[EmbeddingError]:
    if isinstance(exc, WrongDimensions):
        return EmbeddingUnavailable
    if isinstance(exc, openai.RateLimitError):
        code = getattr(exc, "code", None)
        return EmbeddingUnavailable if code == "insufficient_quota" else TransientEmbeddingError
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError | openai.NotFoundError):
        return EmbeddingUnavailable
    if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
        return BadInput
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        return TransientEmbeddingError if status in (408, 409) or status >= 500 else BadInput
    return TransientEmbeddingError  # connection errors, timeouts, malformed answers


class OpenAIEmbedder:
    """`AsyncOpenAI` embeddings with start-rate throttling, a concurrency cap and our retry policy."""

    def __init__(self, settings: Settings, stats: EmbedStats | None = None) -> None:
        assert settings.openai_api_key is not None
        self.model = settings.vector_model
        self.dimensions = settings.embedding_dimensions
        self._client = openai.AsyncOpenAI(
            api_key=settings.openai_api_key.get_secret_value(),
            base_url=settings.openai_base_url,
            max_retries=0,
            timeout=settings.request_timeout,
        )
        # asyncio-throttle bounds request *starts* per second; the semaphore bounds concurrency.
        throttle = Throttler(rate_limit=settings.max_requests_per_second, period=1.0)
        self._throttle: Callable[[], Awaitable[None]] = throttle.acquire
        self._concurrency = asyncio.Semaphore(settings.max_concurrent_requests)
        self._policy = RetryPolicy(attempts=settings.max_retries + 1)
        # Models before text-embedding-3 reject `dimensions`; send it only where it is understood.
        self._send_dimensions = "text-embedding-3" in self.model
        # float by default: some OpenAI-compatible servers (vLLM, Ollama) mishandle base64.
        self._format = settings.encoding_format
        self.stats = stats or EmbedStats()

    async def close(self) -> None:
        await self._client.close()

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        last: BaseException | None = None
        for attempt in range(self._policy.attempts):
            try:
                return await self._request(texts)
            except (openai.OpenAIError, ValueError) as exc:
                kind = classify(exc)
                if kind is not TransientEmbeddingError:
                    raise kind(_describe(exc)) from exc
                last = exc
                if attempt + 1 < self._policy.attempts:
                    response = getattr(exc, "response", None)
                    headers = getattr(response, "headers", None)
                    delay = self._policy.delay(attempt, retry_after_seconds(headers))
                    self.stats.retries += 1
                    logger.warning(
                        "embedding request failed ({error}); retry {attempt} in {delay:.2f}s",
                        error=_describe(exc),
                        attempt=attempt + 1,
                        delay=delay,
                    )
                    await asyncio.sleep(delay)
        raise TransientEmbeddingError(_describe(last) if last else "no attempt made")

    async def _request(self, texts: Sequence[str]) -> list[Embedding]:
        options: dict[str, object] = {"model": self.model, "input": list(texts), "encoding_format": self._format}
        if self._send_dimensions:
            options["dimensions"] = self.dimensions
        async with self._concurrency:
            await self._throttle()
            self.stats.requests += 1
            # The client's transport, auth and error types, but neither its request nor its response
            # models: building the request walks every input through typed-dict transforms (a third of
            # the daemon's CPU at 500 inputs a request), and parsing a float list into models costs about
            # 1 s per 100 inputs of 1536 floats. The body is parsed here instead.
            response = await self._client.post("/embeddings", body=options, cast_to=httpx.Response)
            body = response.content
        vectors, tokens = parse_embeddings(body, len(texts), self.dimensions)
        self.stats.inputs += len(texts)
        self.stats.tokens += tokens
        return vectors


def parse_embeddings(body: bytes, count: int, dimensions: int) -> tuple[list[Embedding], int]:
    """An embeddings response → vectors in input order and the tokens used; ValueError if malformed.

    Servers that ignore `encoding_format` and answer base64 (little-endian float32) are read too.
    """
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the API answered with a body that is not JSON: {exc}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError("the API answered without a data list")
    vectors: list[Embedding | None] = [None] * count
    for item in payload["data"]:
        index = item.get("index") if isinstance(item, dict) else None
        if type(index) is not int or not 0 <= index < count or vectors[index] is not None:
            raise ValueError("the API answered with a bad or repeated index")
        embedding = _as_embedding(item.get("embedding"))
        if len(embedding) != dimensions:
            raise WrongDimensions(
                f"the API returns {len(embedding)}-dimensional vectors; "
                f"VECTOR_SYNC_EMBEDDING_DIMENSIONS is {dimensions}"
            )
        # One pass: a NaN or an infinity anywhere (a number too large for float32 becomes one) spoils the sum.
        if not math.isfinite(sum(embedding)):
            raise ValueError("the API answered with a value that is not a finite number")
        vectors[index] = embedding
    if any(vector is None for vector in vectors):
        raise ValueError(f"the API returned fewer embeddings than the {count} inputs")
    usage = payload.get("usage")
    tokens = usage.get("total_tokens", 0) if isinstance(usage, dict) else 0
    return [vector for vector in vectors if vector is not None], tokens if isinstance(tokens, int) else 0


def _as_embedding(value: object) -> Embedding:
    """A vector from the wire: base64 of little-endian float32, or a JSON list of numbers."""
    vector: Embedding = array.array("f")
    try:
        if isinstance(value, str):
            vector.frombytes(base64.b64decode(value, validate=True))
            if sys.byteorder != "little":
                vector.byteswap()
        elif isinstance(value, list):
            vector.fromlist(value)
        else:
            raise ValueError("the API answered without a vector")
    except (TypeError, OverflowError, binascii.Error):
        raise ValueError("the API answered with a vector that is not a list of numbers") from None
    return vector


def _describe(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {exc.message}"[:500]
    return f"{type(exc).__name__}: {exc}"[:500]


class HashEmbedder:
    """Offline and deterministic: feature hashing of words into a unit vector.

    Lexical only: texts that share words are close, synonyms are not. For demos and tests.
    """

    def __init__(self, settings: Settings, stats: EmbedStats | None = None) -> None:
        self.model = settings.vector_model
        self.dimensions = settings.embedding_dimensions
        self.stats = stats or EmbedStats()

    async def close(self) -> None:
        return None

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        self.stats.requests += 1
        self.stats.inputs += len(texts)
        return [self.vector(text) for text in texts]

    def vector(self, text: str) -> Embedding:
        values = [0.0] * self.dimensions
        words = re.findall(r"\w+", text.lower()) or [""]
        for word in words:
            digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
            bucket = int.from_bytes(digest[:4], "little") % self.dimensions
            values[bucket] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(value * value for value in values)) or 1.0
        return array.array("f", [value / norm for value in values])


def build_embedder(settings: Settings, stats: EmbedStats | None = None) -> Embedder:
    if settings.active_embedder is EmbedderName.HASH:
        return HashEmbedder(settings, stats)
    return OpenAIEmbedder(settings, stats)


@dataclass(frozen=True, slots=True)
class Refused:
    """An input the API refused for good, with its reason."""

    error: str


@dataclass
class Isolated:
    """What `embed_isolating` got back, one entry per text, and how many requests it took."""

    results: list[Embedding | Refused]
    requests: int


async def embed_isolating(
    embedder: Embedder, texts: Sequence[str], on_vector: Callable[[int, Embedding], None] | None = None
) -> Isolated:
    """Embed `texts`; when the API refuses the request, bisect to find the inputs it refuses.

    `on_vector(index, vector)` hears of each vector as soon as its part succeeds, so a later part's
    transient or quota error (which propagate untouched: they say nothing about an input) does not
    throw away vectors already paid for.
    """
    try:
        vectors = list(await embedder.embed(texts))
    except BadInput as exc:
        if len(texts) == 1:
            return Isolated([Refused(str(exc))], 1)
    else:
        if on_vector is not None:
            for index, vector in enumerate(vectors):
                on_vector(index, vector)
        return Isolated(list(vectors), 1)
    middle = len(texts) // 2
    left = await embed_isolating(embedder, texts[:middle], on_vector)
    shifted = None if on_vector is None else (lambda index, vector: on_vector(middle + index, vector))
    right = await embed_isolating(embedder, texts[middle:], shifted)
    return Isolated(left.results + right.results, 1 + left.requests + right.requests)
