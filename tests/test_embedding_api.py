"""Tests for the fake embeddings server, driven through the real openai client.

The daemon's own tests trust this server to behave like OpenAI; these tests
are what earns that trust, so they go through `AsyncOpenAI` rather than raw
HTTP wherever the client can express the request.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import itertools
import math
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

if TYPE_CHECKING:
    from embedding_api import MAX_INPUTS, EmbeddingAPI, Fault, expected_embedding
else:
    # Importable as tests.embedding_api when tests/ is a package or the repo
    # root is on sys.path, else as embedding_api (pytest's rootdir-less
    # "prepend" mode puts tests/ itself on sys.path).
    try:
        from tests.embedding_api import MAX_INPUTS, EmbeddingAPI, Fault, expected_embedding
    except ModuleNotFoundError:
        from embedding_api import MAX_INPUTS, EmbeddingAPI, Fault, expected_embedding

MODEL = "text-embedding-3-small"
SERVER_SCRIPT = Path(__file__).with_name("embedding_api.py")
# Generous: these bound waits for things that normally take milliseconds, and
# must not fire on a loaded 2-core CI machine.
DEADLINE = 30.0


async def wait_until(api: EmbeddingAPI, predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE):
        await api.wait_until(predicate)


def make_client(url: str, timeout: float = DEADLINE) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="test", base_url=url, max_retries=0, timeout=timeout)


@pytest_asyncio.fixture
async def api() -> AsyncIterator[EmbeddingAPI]:
    async with EmbeddingAPI() as server:
        yield server


@pytest_asyncio.fixture
async def client(api: EmbeddingAPI) -> AsyncIterator[AsyncOpenAI]:
    async with make_client(api.url) as c:
        yield c


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def norm(vector: list[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in vector))


# -- vectors ---------------------------------------------------------------


async def test_float_and_base64_give_the_same_vector(client: AsyncOpenAI) -> None:
    as_float = await client.embeddings.create(model=MODEL, input="hello", encoding_format="float")
    as_b64 = await client.embeddings.create(model=MODEL, input="hello", encoding_format="base64")
    # Without a format the client asks for base64 and decodes it itself.
    as_default = await client.embeddings.create(model=MODEL, input="hello")

    raw = as_b64.data[0].embedding
    assert isinstance(raw, str)  # an explicit format is passed through undecoded
    decoded = array.array("f", base64.b64decode(raw)).tolist()
    floats = as_float.data[0].embedding
    assert len(floats) == len(decoded) == len(as_default.data[0].embedding) == 1536
    assert floats == pytest.approx(decoded, abs=1e-7)
    assert as_default.data[0].embedding == pytest.approx(decoded, abs=1e-7)
    assert floats == pytest.approx(expected_embedding("hello"), abs=1e-7)


async def test_vectors_are_deterministic_distinct_and_unit_norm(client: AsyncOpenAI) -> None:
    first = await client.embeddings.create(model=MODEL, input=["alpha", "beta"])
    again = await client.embeddings.create(model=MODEL, input="alpha")
    alpha, beta = (d.embedding for d in first.data)

    assert again.data[0].embedding == alpha
    assert alpha != beta
    assert norm(alpha) == pytest.approx(1.0, abs=1e-5)
    assert norm(beta) == pytest.approx(1.0, abs=1e-5)
    # Unrelated texts should look unrelated, as real embeddings of noise do.
    assert abs(sum(a * b for a, b in zip(alpha, beta, strict=True))) < 0.2


async def test_dimensions_are_respected(client: AsyncOpenAI) -> None:
    short = await client.embeddings.create(model=MODEL, input="text", dimensions=256)
    full = await client.embeddings.create(model=MODEL, input="text")
    assert len(short.data[0].embedding) == 256
    assert len(full.data[0].embedding) == 1536
    assert norm(short.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    assert short.data[0].embedding == pytest.approx(expected_embedding("text", 256), abs=1e-7)


async def test_server_default_dimensions() -> None:
    async with EmbeddingAPI(dimensions=8) as api, make_client(api.url) as client:
        response = await client.embeddings.create(model=MODEL, input="x")
    assert len(response.data[0].embedding) == 8


async def test_response_is_openai_shaped(api: EmbeddingAPI, http: aiohttp.ClientSession) -> None:
    texts = ["a" * 40, "bb", "c" * 9]
    async with http.post(
        f"{api.url}/embeddings",
        json={"model": MODEL, "input": texts, "dimensions": 3},
        headers={"Authorization": "Bearer test"},
    ) as response:
        assert response.status == 200
        body = await response.json()

    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list"
    assert body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 3 for d in body["data"])
    assert body["usage"] == {"prompt_tokens": 10 + 1 + 2, "total_tokens": 13}


# -- scripted faults -------------------------------------------------------


async def test_rate_limit_carries_retry_after_and_is_one_shot(api: EmbeddingAPI, client: AsyncOpenAI) -> None:
    api.script(Fault.rate_limit(retry_after=2), Fault.rate_limit(retry_after=None, retry_after_ms=250))

    with pytest.raises(openai.RateLimitError) as seconds:
        await client.embeddings.create(model=MODEL, input="x")
    assert seconds.value.code == "rate_limit_exceeded"
    assert seconds.value.type == "requests"
    assert seconds.value.response.headers["retry-after"] == "2"

    with pytest.raises(openai.RateLimitError) as millis:
        await client.embeddings.create(model=MODEL, input="x")
    assert millis.value.response.headers["retry-after-ms"] == "250"
    assert "retry-after" not in millis.value.response.headers

    ok = await client.embeddings.create(model=MODEL, input="x")
    assert len(ok.data) == 1


async def test_quota_is_a_rate_limit_error_with_its_own_code(api: EmbeddingAPI, client: AsyncOpenAI) -> None:
    api.script(Fault.quota())
    with pytest.raises(openai.RateLimitError) as caught:
        await client.embeddings.create(model=MODEL, input="x")
    assert caught.value.code == "insufficient_quota"
    assert caught.value.type == "insufficient_quota"
    assert "retry-after" not in caught.value.response.headers


@pytest.mark.parametrize("status", [500, 503])
async def test_server_error(api: EmbeddingAPI, client: AsyncOpenAI, status: int) -> None:
    api.script(Fault.server_error(status))
    with pytest.raises(openai.InternalServerError) as caught:
        await client.embeddings.create(model=MODEL, input="x")
    assert caught.value.status_code == status


async def test_unauthorized_fault(api: EmbeddingAPI, client: AsyncOpenAI) -> None:
    api.script(Fault.unauthorized())
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.embeddings.create(model=MODEL, input="x")
    assert caught.value.code == "invalid_api_key"


async def test_bad_json_fails_to_parse(api: EmbeddingAPI, client: AsyncOpenAI) -> None:
    api.script(Fault.bad_json())
    # httpx2 surfaces the broken body as json.JSONDecodeError, a ValueError.
    with pytest.raises(ValueError):
        await client.embeddings.create(model=MODEL, input="x")
    assert api.requests[0].status == 200
    assert not api.requests[0].succeeded
    assert api.input_count == 0


async def test_wrong_count_drops_one_embedding(api: EmbeddingAPI, client: AsyncOpenAI) -> None:
    api.script(Fault.wrong_count())
    response = await client.embeddings.create(model=MODEL, input=["a", "b", "c"])
    assert [d.index for d in response.data] == [0, 1]
    assert not api.requests[0].succeeded
    assert api.input_count == 0


async def test_hang_trips_the_client_timeout_and_ends_with_it(api: EmbeddingAPI) -> None:
    api.script(Fault.hang(seconds=120))
    async with make_client(api.url, timeout=1.0) as client:
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            await client.embeddings.create(model=MODEL, input="x")
        assert time.monotonic() - started < 60

    # The client hung up, so the handler must have been cancelled rather
    # than left sleeping; it is recorded as never answered.
    await wait_until(api, lambda: not api.requests[0].in_flight)
    assert api.requests[0].status is None
    assert api.requests[0].fault == "hang"


async def test_close_does_not_wait_for_hanging_requests() -> None:
    api = EmbeddingAPI()
    await api.start()
    api.script(Fault.hang(seconds=600))
    async with make_client(api.url, timeout=600) as client:
        pending = asyncio.create_task(client.embeddings.create(model=MODEL, input="x"))
        await wait_until(api, lambda: api.in_flight == 1)

        started = time.monotonic()
        await asyncio.wait_for(api.close(), DEADLINE)
        assert time.monotonic() - started < DEADLINE

        # A 503 if the answer got out before the socket closed, else a
        # connection error; either way the client is not left waiting.
        with pytest.raises((openai.InternalServerError, openai.APIConnectionError)):
            await asyncio.wait_for(pending, DEADLINE)


async def test_latency_is_added_to_every_request(api: EmbeddingAPI, client: AsyncOpenAI) -> None:
    api.latency = 0.3
    started = time.monotonic()
    await client.embeddings.create(model=MODEL, input="x")
    assert time.monotonic() - started >= 0.3
    record = api.requests[0]
    assert record.finished_at is not None
    assert record.finished_at - record.started_at >= 0.3


async def test_script_applies_in_order_then_runs_dry(api: EmbeddingAPI, client: AsyncOpenAI) -> None:
    api.script(Fault.server_error(502), Fault.quota())
    assert api.pending_faults == 2
    with pytest.raises(openai.InternalServerError):
        await client.embeddings.create(model=MODEL, input="x")
    with pytest.raises(openai.RateLimitError):
        await client.embeddings.create(model=MODEL, input="x")
    await client.embeddings.create(model=MODEL, input="x")
    assert [r.status for r in api.requests] == [502, 429, 200]
    assert api.pending_faults == 0


async def test_concurrent_requests_overlap(api: EmbeddingAPI, client: AsyncOpenAI) -> None:
    api.latency = 0.5
    texts = [f"row {i}" for i in range(8)]
    waiter = asyncio.create_task(api.wait_until(lambda: api.input_count == len(texts)))
    responses = await asyncio.gather(*(client.embeddings.create(model=MODEL, input=t) for t in texts))
    async with asyncio.timeout(DEADLINE):
        await waiter

    for text, response in zip(texts, responses, strict=True):
        assert response.data[0].embedding == pytest.approx(expected_embedding(text), abs=1e-7)
    assert sorted(api.all_inputs) == sorted(texts)
    # Latency is per request, not a queue: requests must have overlapped.
    # Only "some overlap" is asserted, since a loaded machine may stagger them.
    by_start = sorted(api.requests, key=lambda r: r.started_at)
    assert any(b.started_at < (a.finished_at or math.inf) for a, b in itertools.pairwise(by_start))


# -- random faults ---------------------------------------------------------


async def test_chaos_fails_requests_until_calm(api: EmbeddingAPI, client: AsyncOpenAI) -> None:
    api.chaos(rate_5xx=1.0)
    with pytest.raises(openai.InternalServerError):
        await client.embeddings.create(model=MODEL, input="x")

    api.chaos(rate_429=1.0, retry_after=0.5)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.embeddings.create(model=MODEL, input="x")
    assert caught.value.response.headers["retry-after"] == "0.5"

    api.calm()
    await client.embeddings.create(model=MODEL, input="x")


async def test_chaos_with_a_seed_is_repeatable() -> None:
    async def outcomes() -> list[int | None]:
        async with EmbeddingAPI() as api, make_client(api.url) as client:
            api.chaos(rate_5xx=0.3, rate_429=0.3, seed=7)
            for _ in range(20):
                with contextlib.suppress(openai.APIStatusError):
                    await client.embeddings.create(model=MODEL, input="x")
            return [r.status for r in api.requests]

    first = await outcomes()
    assert first == await outcomes()
    assert {200, 429, 500} == set(first)


# -- validation ------------------------------------------------------------


async def test_poison_fails_the_whole_batch(api: EmbeddingAPI, client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.embeddings.create(model=MODEL, input=["fine", "has POISON in it", "fine"])
    assert caught.value.param == "input"
    assert caught.value.type == "invalid_request_error"
    assert "index 1" in caught.value.message
    assert api.input_count == 0


async def test_custom_poison_marker() -> None:
    async with EmbeddingAPI(poison="<<bad>>") as api, make_client(api.url) as client:
        await client.embeddings.create(model=MODEL, input="POISON is fine here")
        with pytest.raises(openai.BadRequestError):
            await client.embeddings.create(model=MODEL, input="x<<bad>>")


async def test_empty_input_is_rejected(client: AsyncOpenAI) -> None:
    for bad in ("", ["ok", ""], []):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model=MODEL, input=bad)
        assert "'$.input' is invalid" in caught.value.message
        assert caught.value.param == "input"


async def test_too_many_inputs(client: AsyncOpenAI) -> None:
    await client.embeddings.create(model=MODEL, input=["x"] * MAX_INPUTS, dimensions=1)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.embeddings.create(model=MODEL, input=["x"] * (MAX_INPUTS + 1), dimensions=1)
    assert caught.value.param == "input"


async def test_input_longer_than_the_limit() -> None:
    async with EmbeddingAPI(max_input_chars=100) as api, make_client(api.url) as client:
        await client.embeddings.create(model=MODEL, input="y" * 100)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model=MODEL, input=["ok", "y" * 101])
    assert "maximum context length" in caught.value.message
    assert "index 1" in caught.value.message


async def test_missing_api_key_is_401(api: EmbeddingAPI, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{api.url}/embeddings", json={"model": MODEL, "input": "x"}) as response:
        assert response.status == 401
        body = await response.json()
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"


async def test_required_api_key() -> None:
    async with EmbeddingAPI(api_key="sekrit") as api, make_client(api.url) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.embeddings.create(model=MODEL, input="x")


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'{"input": "x"}', b'{"model": "m", "input": "x", "bogus": 1}'],
)
async def test_malformed_bodies_are_400(api: EmbeddingAPI, http: aiohttp.ClientSession, body: bytes) -> None:
    async with http.post(
        f"{api.url}/embeddings",
        data=body,
        headers={"Authorization": "Bearer test", "Content-Type": "application/json"},
    ) as response:
        assert response.status == 400
        payload = await response.json()
    assert payload["error"]["type"] == "invalid_request_error"
    assert api.requests[0].status == 400


# -- recording -------------------------------------------------------------


async def test_recording(api: EmbeddingAPI, client: AsyncOpenAI) -> None:
    await client.embeddings.create(model=MODEL, input=["a", "b", "c"], dimensions=64)
    api.script(Fault.server_error())
    with pytest.raises(openai.InternalServerError):
        await client.embeddings.create(model=MODEL, input=["d"])
    await client.embeddings.create(model="other-model", input="e", encoding_format="float")

    assert api.request_count == 3
    assert api.input_count == 4
    assert api.all_inputs == ["a", "b", "c", "e"]
    first, failed, last = api.requests
    assert first.inputs == ("a", "b", "c")
    assert first.model == MODEL
    assert first.dimensions == 64
    assert first.encoding_format == "base64"  # the openai client's default
    assert (failed.inputs, failed.status, failed.fault) == (("d",), 500, "server_error")
    assert (last.model, last.dimensions, last.encoding_format) == ("other-model", None, "float")
    assert all(r.finished_at is not None and r.finished_at >= r.started_at for r in api.requests)
    assert api.failures_by_status() == {500: 1}

    api.reset()
    assert (api.request_count, api.input_count, api.all_inputs) == (0, 0, [])


# -- HTTP control ----------------------------------------------------------


async def test_control_and_stats(api: EmbeddingAPI, client: AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    control = f"{api.root_url}/control"
    stats = f"{api.root_url}/stats"
    script = [{"kind": "rate_limit", "retry_after": 1}, {"kind": "server_error", "status": 502}]
    async with http.post(control, json={"latency_ms": 50, "script": script}) as response:
        assert response.status == 200
        assert (await response.json())["pending_faults"] == 2
    assert api.latency == pytest.approx(0.05)

    with pytest.raises(openai.RateLimitError) as caught:
        await client.embeddings.create(model=MODEL, input="x")
    assert caught.value.response.headers["retry-after"] == "1"
    with pytest.raises(openai.InternalServerError):
        await client.embeddings.create(model=MODEL, input="x")
    await client.embeddings.create(model=MODEL, input=["y", "z"])

    async with http.get(stats) as response:
        body = await response.json()
    assert body["requests"] == 3
    assert body["inputs"] == 2
    assert body["failures_by_status"] == {"429": 1, "502": 1}

    async with http.post(control, json={"reset": True, "latency_ms": 0, "chaos": {"rate_5xx": 1.0}}) as r:
        assert r.status == 200
    assert api.request_count == 0
    with pytest.raises(openai.InternalServerError):
        await client.embeddings.create(model=MODEL, input="x")
    async with http.post(control, json={"chaos": None}) as r:
        assert r.status == 200
    await client.embeddings.create(model=MODEL, input="x")


@pytest.mark.parametrize(
    "body",
    [
        {"script": [{"kind": "meteor"}]},
        {"script": [{"kind": "hang", "status": 500}]},
        {"chaos": {"rate_5xx": 0.8, "rate_429": 0.8}},
        {"latency_ms": -1},
        {"frobnicate": True},
    ],
)
async def test_bad_control_is_400_and_changes_nothing(
    api: EmbeddingAPI, http: aiohttp.ClientSession, body: dict[str, object]
) -> None:
    async with http.post(f"{api.root_url}/control", json={**body, "reset": True}) as response:
        assert response.status == 400
    assert api.pending_faults == 0
    assert api.latency == 0.0


# -- subprocess mode -------------------------------------------------------


async def test_runs_as_a_subprocess() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SERVER_SCRIPT),
        "--port",
        "0",
        "--dimensions",
        "16",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), DEADLINE)).decode()
        assert line.startswith("READY http://127.0.0.1:")
        url = line.split()[1]
        assert url.endswith("/v1")

        async with make_client(url) as client:
            response = await client.embeddings.create(model=MODEL, input="over the wire")
        assert response.data[0].embedding == pytest.approx(expected_embedding("over the wire", 16), abs=1e-7)

        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), DEADLINE) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
