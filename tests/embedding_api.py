"""A local stand-in for the OpenAI embeddings API, with fault injection.

Tests use it in-process (same event loop)::

    async with EmbeddingAPI() as api:
        client = AsyncOpenAI(api_key="test", base_url=api.url, max_retries=0)
        api.script(Fault.rate_limit(retry_after=0.1), Fault.server_error())
        ...
        assert api.input_count == 3

Benchmarks run it as a subprocess and steer it over HTTP (``POST /control``,
``GET /stats``)::

    python tests/embedding_api.py --port 0 --latency-ms 150 --dimensions 1536
    READY http://127.0.0.1:PORT/v1

Vectors are a pure function of (text, dimensions) -- see `expected_embedding`
-- so a test can check what the daemon stored without talking to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import math
import random
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self, cast, get_args

import numpy as np
import numpy.typing as npt
import orjson
from aiohttp import web

__all__ = [
    "MAX_INPUTS",
    "EmbeddingAPI",
    "Fault",
    "FaultKind",
    "RecordedRequest",
    "estimate_tokens",
    "expected_embedding",
]

FaultKind = Literal[
    "rate_limit",
    "quota",
    "server_error",
    "hang",
    "unauthorized",
    "bad_json",
    "wrong_count",
]
_FAULT_KINDS: Final[frozenset[str]] = frozenset(get_args(FaultKind))

# OpenAI's documented per-request limit on the number of inputs.
MAX_INPUTS: Final = 2048
# Large enough for any model OpenAI offers; anything above is a client bug.
_MAX_DIMENSIONS: Final = 8192
_REFERENCE_URL: Final = "https://platform.openai.com/docs/api-reference"
_INVALID_INPUT: Final = f"'$.input' is invalid. Please check the API reference: {_REFERENCE_URL}."
_KNOWN_FIELDS: Final = frozenset({"model", "input", "dimensions", "encoding_format", "user"})


def expected_embedding(text: str, dimensions: int = 1536) -> list[float]:
    """The vector the server returns for `text`, as float32 values.

    Derived from sha256(text) through an extendable-output hash, so a shorter
    `dimensions` yields a prefix of the longer vector (re-normalised), which is
    also how OpenAI's shortened text-embedding-3 vectors relate.
    """
    return _embed(text, dimensions).tolist()


def estimate_tokens(text: str) -> int:
    """Rough token count (~4 characters per token), good enough for `usage`."""
    return max(1, len(text) // 4)


def _embed(text: str, dimensions: int) -> npt.NDArray[np.float32]:
    # surrogatepass: JSON may carry lone surrogates ("\ud800"); they must hash,
    # not crash the handler.
    seed = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    # Random int16 components scaled to unit length, in numpy: benchmarks send
    # thousands of texts a second and the server must not be what they measure.
    raw = np.frombuffer(hashlib.shake_256(seed).digest(2 * dimensions), dtype="<i2").astype(np.float64)
    norm = math.sqrt(float(np.dot(raw, raw)))
    # Rounding to float32 here makes the float and base64 encodings carry
    # bit-identical values, as they do at OpenAI.
    return (raw * (1.0 / norm if norm else 0.0)).astype(np.float32)


def _encode_base64(vector: npt.NDArray[np.float32]) -> str:
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")


def _error_body(
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _format_seconds(seconds: float) -> str:
    # HTTP specifies Retry-After in whole seconds, so integral values go out
    # in that form; fractions are still sent because the openai client parses
    # the header as a float, and sub-second waits keep tests fast.
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected failure. Build with the class methods, not directly."""

    kind: FaultKind
    status: int | None = None
    retry_after: float | None = None
    retry_after_ms: float | None = None
    seconds: float | None = None

    @classmethod
    def rate_limit(cls, retry_after: float | None = 1.0, retry_after_ms: float | None = None) -> Fault:
        """429 rate_limit_exceeded with `retry-after` and/or `retry-after-ms`."""
        return cls("rate_limit", status=429, retry_after=retry_after, retry_after_ms=retry_after_ms)

    @classmethod
    def quota(cls) -> Fault:
        """429 insufficient_quota: looks like a rate limit but must not be retried."""
        return cls("quota", status=429)

    @classmethod
    def server_error(cls, status: int = 500) -> Fault:
        if not 500 <= status <= 599:
            raise ValueError(f"server_error status must be 5xx, got {status}")
        return cls("server_error", status=status)

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Fault:
        """Stall `seconds`, then answer normally; meant to trip client timeouts."""
        if seconds < 0:
            raise ValueError("hang seconds must be >= 0")
        return cls("hang", seconds=seconds)

    @classmethod
    def unauthorized(cls) -> Fault:
        return cls("unauthorized", status=401)

    @classmethod
    def bad_json(cls) -> Fault:
        """200 with a truncated JSON body."""
        return cls("bad_json", status=200)

    @classmethod
    def wrong_count(cls) -> Fault:
        """200 with one embedding fewer than there were inputs."""
        return cls("wrong_count", status=200)

    @classmethod
    def from_dict(cls, spec: Mapping[str, object]) -> Fault:
        """Parse the JSON form used by ``POST /control``: ``{"kind": ..., **args}``."""
        kind = spec.get("kind")
        if not isinstance(kind, str) or kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(_FAULT_KINDS)}")
        args = {k: v for k, v in spec.items() if k != "kind"}
        allowed: dict[str, frozenset[str]] = {
            "rate_limit": frozenset({"retry_after", "retry_after_ms"}),
            "server_error": frozenset({"status"}),
            "hang": frozenset({"seconds"}),
        }
        unknown = set(args) - allowed.get(kind, frozenset())
        if unknown:
            raise ValueError(f"unexpected arguments for fault {kind!r}: {sorted(unknown)}")
        if kind == "rate_limit":
            return cls.rate_limit(
                retry_after=_opt_number(args, "retry_after", 1.0),
                retry_after_ms=_opt_number(args, "retry_after_ms", None),
            )
        if kind == "server_error":
            status = args.get("status", 500)
            if not isinstance(status, int) or isinstance(status, bool):
                raise ValueError("server_error status must be an integer")
            return cls.server_error(status)
        if kind == "hang":
            seconds = _opt_number(args, "seconds", 30.0)
            return cls.hang(30.0 if seconds is None else seconds)
        factory = {
            "quota": cls.quota,
            "unauthorized": cls.unauthorized,
            "bad_json": cls.bad_json,
            "wrong_count": cls.wrong_count,
        }[kind]
        return factory()


def _opt_number(args: Mapping[str, object], key: str, default: float | None) -> float | None:
    value = args.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number or null")
    return float(value)


@dataclass(slots=True)
class RecordedRequest:
    """What one ``POST /v1/embeddings`` asked for and how it was answered.

    Appended when the request arrives, so tests can wait for a request to be
    in flight; `status` and `finished_at` are filled in when it ends.
    """

    inputs: tuple[str, ...]
    model: str | None
    dimensions: int | None
    encoding_format: str | None
    started_at: float
    status: int | None = None
    """None while in flight, and for good if the client went away first."""
    finished_at: float | None = None
    fault: FaultKind | None = None

    @property
    def in_flight(self) -> bool:
        return self.finished_at is None

    @property
    def succeeded(self) -> bool:
        """The client got one usable embedding per input.

        bad_json and wrong_count answer 200 but are failures for the client.
        """
        return self.status == 200 and self.fault not in ("bad_json", "wrong_count")


@dataclass(frozen=True, slots=True)
class _Chaos:
    rate_5xx: float
    rate_429: float
    rate_hang: float
    hang_seconds: float
    retry_after: float | None
    rng: random.Random

    @classmethod
    def create(
        cls,
        *,
        rate_5xx: float,
        rate_429: float,
        rate_hang: float,
        hang_seconds: float,
        retry_after: float | None,
        seed: int | None,
    ) -> _Chaos:
        rates = (rate_5xx, rate_429, rate_hang)
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError("chaos rates must be >= 0 and sum to at most 1")
        if hang_seconds < 0:
            raise ValueError("chaos hang_seconds must be >= 0")
        return cls(rate_5xx, rate_429, rate_hang, hang_seconds, retry_after, random.Random(seed))

    def draw(self) -> Fault | None:
        roll = self.rng.random()
        if roll < self.rate_5xx:
            return Fault.server_error(500)
        roll -= self.rate_5xx
        if roll < self.rate_429:
            return Fault.rate_limit(retry_after=self.retry_after)
        roll -= self.rate_429
        if roll < self.rate_hang:
            return Fault.hang(self.hang_seconds)
        return None


class _Closing(Exception):
    """The server is shutting down while a handler sleeps."""


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = "input") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class _Parsed:
    inputs: tuple[str, ...]
    model: str
    dimensions: int
    encoding_format: Literal["float", "base64"]


def _dumps(obj: object) -> str:
    # orjson: json.dumps of 100 x 1536 floats takes ~250 ms, which would make this server, not the
    # daemon, the bottleneck of every benchmark.
    return orjson.dumps(obj).decode()


class EmbeddingAPI:
    """OpenAI-compatible ``/v1/embeddings`` server on aiohttp.

    `dimensions` is the default vector length when a request omits it,
    `max_input_chars` stands in for the model's token limit, any input
    containing `poison` is refused with a 400 (so one bad row can poison a
    batch), and `api_key`, if given, must match the bearer token exactly
    (otherwise any non-empty token is accepted).
    """

    def __init__(
        self,
        *,
        dimensions: int = 1536,
        max_input_chars: int = 32000,
        poison: str | None = "POISON",
        latency: float = 0.0,
        api_key: str | None = None,
    ) -> None:
        if not 1 <= dimensions <= _MAX_DIMENSIONS:
            raise ValueError(f"dimensions must be in 1..{_MAX_DIMENSIONS}")
        self.dimensions = dimensions
        self.max_input_chars = max_input_chars
        self.poison = poison
        self.api_key = api_key
        self.latency = latency
        """Seconds added to every embeddings request; may be changed at any time."""
        self.requests: list[RecordedRequest] = []
        self._script: deque[Fault] = deque()
        self._chaos: _Chaos | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._closing = asyncio.Event()
        self._changed = asyncio.Event()
        self._request_ids = itertools.count(1)

    # -- lifecycle ---------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 picks a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("EmbeddingAPI is already started")
        # OpenAI takes request bodies far beyond aiohttp's 1 MiB default; a
        # 2048-input batch of long rows must not turn into a 413 here.
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/embeddings", self._handle_embeddings)
        app.router.add_post("/control", self._handle_control)
        app.router.add_get("/stats", self._handle_stats)
        self._closing = asyncio.Event()
        runner = web.AppRunner(
            app,
            access_log=None,
            # Handlers sleep on purpose; when the client gives up (timeout,
            # cancelled task) the sleep must end too, not linger until close.
            handler_cancellation=True,
            # Our own sleeps end on close(); this only bounds aiohttp's wait
            # for anything else still running.
            shutdown_timeout=1.0,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound_host, bound_port = runner.addresses[0][:2]
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self._url = f"http://{shown}:{bound_port}/v1"
        return self._url

    async def close(self) -> None:
        """Stop serving; requests still sleeping (hang, latency) are answered 503 at once."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """Base URL for ``AsyncOpenAI(base_url=...)``, e.g. ``http://127.0.0.1:PORT/v1``."""
        if self._url is None:
            raise RuntimeError("EmbeddingAPI is not started")
        return self._url

    @property
    def root_url(self) -> str:
        """Where /control and /stats live (the base URL without ``/v1``)."""
        return self.url.removesuffix("/v1")

    # -- fault injection ---------------------------------------------------

    def script(self, *faults: Fault) -> None:
        """Queue one-shot faults; each of the next requests takes one, in order.

        Scripted faults win over chaos. Requests refused for a missing API key
        do not consume one.
        """
        self._script.extend(faults)

    def clear_script(self) -> None:
        self._script.clear()

    @property
    def pending_faults(self) -> int:
        return len(self._script)

    def chaos(
        self,
        rate_5xx: float = 0.0,
        rate_429: float = 0.0,
        rate_hang: float = 0.0,
        hang_seconds: float = 30.0,
        seed: int | None = None,
        *,
        retry_after: float | None = 1.0,
    ) -> None:
        """Fail a random share of requests: 500, 429 (with `retry_after`) or a hang.

        Each request rolls once; a `seed` makes the sequence of faults repeatable.
        """
        self._chaos = _Chaos.create(
            rate_5xx=rate_5xx,
            rate_429=rate_429,
            rate_hang=rate_hang,
            hang_seconds=hang_seconds,
            retry_after=retry_after,
            seed=seed,
        )

    def calm(self) -> None:
        """Stop random faults (scripted ones still pending are kept)."""
        self._chaos = None

    # -- recording ---------------------------------------------------------

    @property
    def request_count(self) -> int:
        """All embeddings requests received, including failed and in-flight ones."""
        return len(self.requests)

    @property
    def input_count(self) -> int:
        """Inputs of successful requests only."""
        return sum(len(r.inputs) for r in self.requests if r.succeeded)

    @property
    def all_inputs(self) -> list[str]:
        """Inputs of successful requests, in arrival order."""
        return [text for r in self.requests if r.succeeded for text in r.inputs]

    @property
    def in_flight(self) -> int:
        return sum(1 for r in self.requests if r.in_flight)

    def failures_by_status(self) -> dict[int, int]:
        """Finished, unsuccessful requests by status (bad_json/wrong_count count as 200)."""
        counts: Counter[int] = Counter()
        for r in self.requests:
            if r.status is not None and not r.succeeded:
                counts[r.status] += 1
        return dict(sorted(counts.items()))

    def reset(self) -> None:
        """Forget recorded requests. Latency, script and chaos are left as they are."""
        self.requests.clear()
        self._notify()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds, re-checking whenever a request arrives or ends.

        Lets tests wait for e.g. ``api.input_count >= 10`` without polling;
        bound it with ``asyncio.timeout``.
        """
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        # A fresh event per change: every current waiter wakes exactly once
        # and re-checks, and no one has to clear anything.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.request_count,
            "inputs": self.input_count,
            "failures_by_status": {str(k): v for k, v in self.failures_by_status().items()},
            "in_flight": self.in_flight,
            "pending_faults": self.pending_faults,
            "latency_ms": self.latency * 1000.0,
            "chaos": self._chaos is not None,
        }

    # -- handlers ----------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        # Waiting on the closing event instead of asyncio.sleep lets close()
        # end every hang at once rather than waiting out aiohttp's timeout.
        try:
            await asyncio.wait_for(self._closing.wait(), timeout=seconds)
        except TimeoutError:
            return
        raise _Closing

    def _next_fault(self) -> Fault | None:
        if self._script:
            return self._script.popleft()
        return self._chaos.draw() if self._chaos is not None else None

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        return self.api_key is None or token == self.api_key

    async def _handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        payload: object
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        record = _record_for(payload)
        self.requests.append(record)
        self._notify()
        headers = {"x-request-id": f"req_{next(self._request_ids):06d}"}
        try:
            response = await self._answer(request, payload, record, headers)
        except _Closing:
            response = web.json_response(
                _error_body("The server is shutting down.", "server_error"),
                status=503,
                headers=headers,
                dumps=_dumps,
            )
        except BaseException:
            # Client went away (handler cancelled) or a bug: no answer given.
            record.finished_at = time.monotonic()
            self._notify()
            raise
        record.status = response.status
        record.finished_at = time.monotonic()
        self._notify()
        return response

    async def _answer(
        self,
        request: web.Request,
        payload: object,
        record: RecordedRequest,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        authorized = self._authorized(request)
        # Taken on arrival, before any sleep, so script order is arrival order.
        fault = self._next_fault() if authorized else None
        record.fault = fault.kind if fault is not None else None
        await self._sleep(self.latency)

        if not authorized:
            return _json_error(
                401,
                "You didn't provide a valid API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                code="invalid_api_key",
                headers=headers,
            )
        if fault is not None:
            refusal = _fault_response(fault, headers)
            if refusal is not None:
                return refusal
            if fault.kind == "hang":
                await self._sleep(fault.seconds or 0.0)

        try:
            parsed = self._parse(payload)
        except _BadRequest as exc:
            return _json_error(400, exc.message, "invalid_request_error", param=exc.param, headers=headers)

        vectors = [_embed(text, parsed.dimensions) for text in parsed.inputs]
        data: list[dict[str, Any]] = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _encode_base64(v) if parsed.encoding_format == "base64" else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        if fault is not None and fault.kind == "wrong_count":
            data.pop()
        tokens = sum(estimate_tokens(text) for text in parsed.inputs)
        body = {
            "object": "list",
            "data": data,
            "model": parsed.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return web.json_response(body, headers=headers, dumps=_dumps)

    def _parse(self, payload: object) -> _Parsed:
        if not isinstance(payload, dict):
            raise _BadRequest(
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
                "but what was sent was not valid JSON.)",
                param=None,
            )
        unknown = sorted(set(payload) - _KNOWN_FIELDS)
        if unknown:
            raise _BadRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=None)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("you must provide a model parameter", param=None)

        dimensions = payload.get("dimensions", self.dimensions)
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= _MAX_DIMENSIONS:
            raise _BadRequest(f"Invalid value for 'dimensions' = {dimensions!r}.", param="dimensions")
        encoding_format = payload.get("encoding_format", "float")
        if encoding_format not in ("float", "base64"):
            raise _BadRequest(
                f"Invalid value for 'encoding_format' = {encoding_format!r}. "
                "Supported values are: 'float' and 'base64'.",
                param="encoding_format",
            )

        inputs = _inputs_of(payload.get("input"))
        if not inputs or any(not text for text in inputs):
            raise _BadRequest(_INVALID_INPUT)
        if len(inputs) > MAX_INPUTS:
            raise _BadRequest(
                f"Too many inputs. The max number of inputs is {MAX_INPUTS}, "
                f"but {len(inputs)} were given. {_INVALID_INPUT}"
            )
        for i, text in enumerate(inputs):
            if len(text) > self.max_input_chars:
                raise _BadRequest(
                    f"This model's maximum context length is {self.max_input_chars // 4} tokens, "
                    f"however input at index {i} has {len(text)} characters "
                    f"(the limit on this test server is {self.max_input_chars}). "
                    "Please reduce the length of the input."
                )
            if self.poison and self.poison in text:
                raise _BadRequest(f"Invalid input at index {i}. {_INVALID_INPUT}")
        return _Parsed(
            inputs=inputs,
            model=model,
            dimensions=dimensions,
            encoding_format=cast(Literal["float", "base64"], encoding_format),
        )

    async def _handle_control(self, request: web.Request) -> web.StreamResponse:
        try:
            payload = json.loads(await request.read())
            if not isinstance(payload, dict):
                raise ValueError("the body must be a JSON object")
            self._apply_control(payload)
        except (ValueError, TypeError) as exc:
            return _json_error(400, str(exc), "invalid_request_error")
        return web.json_response(self.stats(), dumps=_dumps)

    def _apply_control(self, payload: Mapping[str, object]) -> None:
        unknown = set(payload) - {"latency_ms", "script", "clear_script", "chaos", "reset"}
        if unknown:
            raise ValueError(f"unknown control fields: {sorted(unknown)}")
        # Validate everything before changing anything, so a bad request has
        # no partial effect.
        faults = _script_of(payload.get("script", []))
        latency = _latency_of(payload)
        chaos = _chaos_of(payload["chaos"]) if "chaos" in payload else None

        if payload.get("reset"):
            self.reset()
        if payload.get("clear_script"):
            self.clear_script()
        if latency is not None:
            self.latency = latency
        if "chaos" in payload:
            self._chaos = chaos
        self.script(*faults)

    async def _handle_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats(), dumps=_dumps)


def _script_of(value: object) -> list[Fault]:
    if not isinstance(value, list) or not all(isinstance(spec, dict) for spec in value):
        raise ValueError("script must be a list of fault objects")
    return [Fault.from_dict(spec) for spec in value]


def _latency_of(payload: Mapping[str, object]) -> float | None:
    if "latency_ms" not in payload:
        return None
    latency_ms = _opt_number(payload, "latency_ms", None)
    if latency_ms is None or latency_ms < 0:
        raise ValueError("latency_ms must be a number >= 0")
    return latency_ms / 1000.0


def _chaos_of(spec: object) -> _Chaos | None:
    """Parse the ``chaos`` control field; null or {} means calm."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ValueError("chaos must be an object, or null to calm down")
    if not spec:
        return None
    unknown = set(spec) - {"rate_5xx", "rate_429", "rate_hang", "hang_seconds", "retry_after", "seed"}
    if unknown:
        raise ValueError(f"unknown chaos fields: {sorted(unknown)}")
    seed = spec.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError("chaos seed must be an integer or null")
    return _Chaos.create(
        rate_5xx=_opt_number(spec, "rate_5xx", 0.0) or 0.0,
        rate_429=_opt_number(spec, "rate_429", 0.0) or 0.0,
        rate_hang=_opt_number(spec, "rate_hang", 0.0) or 0.0,
        hang_seconds=_opt_number(spec, "hang_seconds", 30.0) or 0.0,
        retry_after=_opt_number(spec, "retry_after", 1.0),
        seed=seed,
    )


def _inputs_of(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(cast(list[str], value))
    # Token arrays are valid at OpenAI, but this project never sends them;
    # refusing them catches a client that accidentally does.
    return ()


def _record_for(payload: object) -> RecordedRequest:
    # Best effort: even a request about to be refused is recorded with
    # whatever could be read from it.
    fields = payload if isinstance(payload, dict) else {}
    model = fields.get("model")
    dimensions = fields.get("dimensions")
    encoding_format = fields.get("encoding_format")
    return RecordedRequest(
        inputs=_inputs_of(fields.get("input")),
        model=model if isinstance(model, str) else None,
        dimensions=dimensions if isinstance(dimensions, int) and not isinstance(dimensions, bool) else None,
        encoding_format=encoding_format if isinstance(encoding_format, str) else None,
        started_at=time.monotonic(),
    )


def _json_error(
    status: int,
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.json_response(
        _error_body(message, type_, param=param, code=code),
        status=status,
        headers=headers,
        dumps=_dumps,
    )


def _fault_response(fault: Fault, headers: Mapping[str, str]) -> web.Response | None:
    """The answer for faults that replace the real response; None for the others."""
    if fault.kind == "rate_limit":
        limit_headers = dict(headers)
        if fault.retry_after is not None:
            limit_headers["retry-after"] = _format_seconds(fault.retry_after)
        if fault.retry_after_ms is not None:
            limit_headers["retry-after-ms"] = _format_seconds(fault.retry_after_ms)
        return _json_error(
            429,
            "Rate limit reached for requests on this test server. Please try again later.",
            "requests",
            code="rate_limit_exceeded",
            headers=limit_headers,
        )
    if fault.kind == "quota":
        return _json_error(
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            code="insufficient_quota",
            headers=headers,
        )
    if fault.kind == "server_error":
        return _json_error(
            fault.status or 500,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            headers=headers,
        )
    if fault.kind == "unauthorized":
        return _json_error(
            401,
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            code="invalid_api_key",
            headers=headers,
        )
    if fault.kind == "bad_json":
        return web.Response(
            text='{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,',
            content_type="application/json",
            headers=headers,
        )
    return None


# -- subprocess mode -------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    api = EmbeddingAPI(
        dimensions=args.dimensions,
        max_input_chars=args.max_input_chars,
        poison=args.poison or None,
        latency=args.latency_ms / 1000.0,
        api_key=args.api_key,
    )
    url = await api.start(args.host, args.port)
    try:
        # The parent reads exactly this line to learn the port; flush because
        # stdout is a pipe and would otherwise be block-buffered.
        print(f"READY {url}", flush=True)
        await stop.wait()
    finally:
        await api.close()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--dimensions", type=int, default=1536)
    parser.add_argument("--max-input-chars", type=int, default=32000)
    parser.add_argument("--poison", default="POISON", help="empty string disables it")
    parser.add_argument("--api-key", default=None, help="require exactly this bearer token")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    main()
