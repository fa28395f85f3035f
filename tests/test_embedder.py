"""The embedders and the retry policy, with the real openai client against the test API."""

from __future__ import annotations

import array
import base64
import email.utils
import json
import math
import struct
import time
from collections.abc import AsyncIterator

import pytest
from embedding_api import EmbeddingAPI, Fault, expected_embedding
from pgvector import Vector
from support import API_KEY, DIMENSIONS
from vector_sync.config import Settings, load_settings
from vector_sync.embedder import (
    TOKEN_BUDGET_BYTES,
    BadInput,
    EmbeddingUnavailable,
    HashEmbedder,
    OpenAIEmbedder,
    Refused,
    TransientEmbeddingError,
    chunk_for_requests,
    embed_isolating,
    parse_embeddings,
    retry_after_seconds,
)
from vector_sync.store import vector_binary


def settings_for(api: EmbeddingAPI, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "DATABASE_URL": "postgresql://localhost/unused",
        "OPENAI_API_KEY": API_KEY,
        "OPENAI_BASE_URL": api.url,
        "VECTOR_SYNC_EMBEDDING_DIMENSIONS": DIMENSIONS,
        "VECTOR_SYNC_REQUEST_TIMEOUT": "2s",
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
async def embedder(api: EmbeddingAPI) -> AsyncIterator[OpenAIEmbedder]:
    client = OpenAIEmbedder(settings_for(api))
    yield client
    await client.close()


def close(a: list[float], b: list[float]) -> bool:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6


async def test_vectors_come_back_in_input_order(embedder: OpenAIEmbedder, api: EmbeddingAPI) -> None:
    texts = [f"text number {i}" for i in range(7)]
    vectors = await embedder.embed(texts)
    assert all(close(vector, expected_embedding(text, DIMENSIONS)) for vector, text in zip(vectors, texts, strict=True))
    assert api.requests[0].encoding_format == "float"
    assert api.requests[0].dimensions == DIMENSIONS
    assert embedder.stats.requests == 1 and embedder.stats.inputs == 7 and embedder.stats.tokens > 0


async def test_base64_gives_the_same_vectors(api: EmbeddingAPI) -> None:
    client = OpenAIEmbedder(settings_for(api, VECTOR_SYNC_ENCODING_FORMAT="base64"))
    try:
        vectors = await client.embed(["alpha", "beta"])
    finally:
        await client.close()
    assert api.requests[0].encoding_format == "base64"
    assert close(vectors[1], expected_embedding("beta", DIMENSIONS))


async def test_transient_failures_are_retried_honouring_retry_after(
    embedder: OpenAIEmbedder, api: EmbeddingAPI
) -> None:
    api.script(
        Fault.rate_limit(retry_after=None, retry_after_ms=300),
        Fault.server_error(502),
        Fault.bad_json(),
        Fault.wrong_count(),
    )
    vectors = await embedder.embed(["one", "two"])
    assert len(vectors) == 2
    assert api.request_count == 5
    assert embedder.stats.retries == 4
    assert api.requests[1].started_at - api.requests[0].started_at >= 0.3


async def test_a_hang_times_out_and_is_retried(embedder: OpenAIEmbedder, api: EmbeddingAPI) -> None:
    api.script(Fault.hang(seconds=60))
    started = time.monotonic()
    assert len(await embedder.embed(["slow"])) == 1
    assert time.monotonic() - started < 30
    assert api.request_count == 2


async def test_retries_are_bounded(api: EmbeddingAPI) -> None:
    client = OpenAIEmbedder(settings_for(api, VECTOR_SYNC_MAX_RETRIES=2))
    api.script(*[Fault.server_error(500) for _ in range(5)])
    try:
        with pytest.raises(TransientEmbeddingError):
            await client.embed(["never"])
    finally:
        await client.close()
    assert api.request_count == 3


@pytest.mark.parametrize("fault", [Fault.quota(), Fault.unauthorized()], ids=["insufficient_quota", "401"])
async def test_quota_and_credentials_are_not_retried(embedder: OpenAIEmbedder, api: EmbeddingAPI, fault: Fault) -> None:
    api.script(fault)
    with pytest.raises(EmbeddingUnavailable):
        await embedder.embed(["paid"])
    assert api.request_count == 1


async def test_a_refused_input_is_isolated_by_bisection(embedder: OpenAIEmbedder, api: EmbeddingAPI) -> None:
    texts = [f"fine {i}" for i in range(8)]
    texts[5] = "a POISON input"
    with pytest.raises(BadInput):
        await embedder.embed(texts)
    api.reset()
    isolated = await embed_isolating(embedder, texts)
    refused = [index for index, result in enumerate(isolated.results) if isinstance(result, Refused)]
    assert refused == [5]
    assert close(isolated.results[4], expected_embedding("fine 4", DIMENSIONS))  # type: ignore[arg-type]
    # One refused input among 8 costs at most 1 + 2 * log2(8) requests, and reports them.
    assert isolated.requests == api.request_count <= 7


async def test_requests_start_at_the_configured_rate(api: EmbeddingAPI) -> None:
    client = OpenAIEmbedder(settings_for(api, VECTOR_SYNC_MAX_REQUESTS_PER_SECOND=2))
    try:
        for index in range(5):
            await client.embed([f"t{index}"])
    finally:
        await client.close()
    starts = [request.started_at for request in api.requests]
    assert starts[4] - starts[0] >= 1.0  # 5 starts at 2 a second need at least two windows


async def test_concurrency_is_capped(api: EmbeddingAPI) -> None:
    import asyncio

    api.latency = 0.3
    client = OpenAIEmbedder(settings_for(api, VECTOR_SYNC_MAX_CONCURRENT_REQUESTS=2))
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, api.in_flight)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(client.embed([f"c{i}"]) for i in range(6)))
    finally:
        watcher.cancel()
        await client.close()
    assert peak == 2


def body(*items: object, usage: object = None) -> bytes:
    return json.dumps({"data": list(items), "usage": usage or {"total_tokens": 3}}).encode()


def test_parse_embeddings_accepts_any_order_and_base64() -> None:
    packed = base64.b64encode(struct.pack("<2f", 0.5, -0.25)).decode()
    vectors, tokens = parse_embeddings(
        body({"index": 1, "embedding": packed}, {"index": 0, "embedding": [1, 0.5]}), 2, 2
    )
    assert [vector.tolist() for vector in vectors] == [[1, 0.5], [0.5, -0.25]]
    assert {vector.typecode for vector in vectors} == {"f"}  # float32, as pgvector stores them
    assert tokens == 3


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        json.dumps({"data": "x"}).encode(),
        body({"index": 0, "embedding": [1.0, 2.0]}),  # one vector for two inputs
        body({"index": 0, "embedding": [1.0, 2.0]}, {"index": 0, "embedding": [1.0, 2.0]}),
        body({"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [1.0, 2.0]}),
        body({"index": 0, "embedding": [1.0, "x"]}, {"index": 1, "embedding": [1.0, 2.0]}),
        body({"index": 0, "embedding": [1.0, math.inf]}, {"index": 1, "embedding": [1.0, 2.0]}),
        body({"index": 0, "embedding": [1.0, 1e300]}, {"index": 1, "embedding": [1.0, 2.0]}),  # not a float32
        body({"index": 0, "embedding": "AAAA!AAA"}, {"index": 1, "embedding": [1.0, 2.0]}),  # not base64
        body({"index": 0, "embedding": "AAAAAAA="}, {"index": 1, "embedding": [1.0, 2.0]}),  # 5 bytes
        body({"index": 0, "embedding": {"x": 1}}, {"index": 1, "embedding": [1.0, 2.0]}),
        b'{"data": [{"index": 0, "embedding": [NaN, 1.0]}, {"index": 1, "embedding": [1.0, 2.0]}]}',
        body({"index": 2, "embedding": [1.0, 2.0]}, {"index": 1, "embedding": [1.0, 2.0]}),
        body({"index": True, "embedding": [1.0, 2.0]}, {"index": 0, "embedding": [1.0, 2.0]}),
    ],
)
def test_parse_embeddings_refuses_malformed_answers(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_embeddings(payload, 2, 2)


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8 <= (retry_after_seconds({"retry-after": in_ten}) or 0) <= 10
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
    assert retry_after_seconds(None) is None


def test_chunks_respect_the_input_count_and_the_token_budget() -> None:
    texts = ["x" * 1000] * 10 + ["y" * (TOKEN_BUDGET_BYTES - 1)] + ["z"] * 5
    groups = chunk_for_requests(texts, 4)
    assert [index for group in groups for index in group] == list(range(16))
    assert all(len(group) <= 4 for group in groups)
    assert all(sum(len(texts[index].encode()) + 1 for index in group) <= TOKEN_BUDGET_BYTES for group in groups)
    assert [10] in groups


async def test_the_hash_embedder_is_deterministic_unit_and_lexical() -> None:
    embedder = HashEmbedder(load_settings(DATABASE_URL="postgresql://x/y", VECTOR_SYNC_EMBEDDER="hash"))
    birds, birds_again, boats = await embedder.embed(["bird songs at dawn", "bird songs at dawn", "fishing boats"])
    assert birds == birds_again
    assert math.isclose(math.fsum(value * value for value in birds), 1.0)
    near = sum(a * b for a, b in zip(birds, embedder.vector("songs of a bird"), strict=True))
    far = sum(a * b for a, b in zip(birds, boats, strict=True))
    assert near > 0.3 > far
    assert embedder.model == "hash-1536"


class _HalfFailing:
    """Refuses any request holding "bad"; fails transiently on any holding "later"."""

    model = "fake"
    dimensions = 2

    def __init__(self) -> None:
        self.requests = 0

    async def embed(self, texts: list[str]) -> list[list[float]]:
        self.requests += 1
        if "bad" in texts:
            raise BadInput("HTTP 400: bad input")
        if "later" in texts:
            raise TransientEmbeddingError("HTTP 503")
        return [[float(len(text)), 1.0] for text in texts]

    async def close(self) -> None:
        return None


async def test_bisection_keeps_the_vectors_it_paid_for_when_a_later_part_fails() -> None:
    heard: dict[int, list[float]] = {}
    with pytest.raises(TransientEmbeddingError):
        await embed_isolating(
            _HalfFailing(), ["aa", "bbb", "later", "bad"], lambda index, vector: heard.update({index: vector})
        )
    assert heard == {0: [2.0, 1.0], 1: [3.0, 1.0]}


def test_float32_vectors_go_to_the_database_as_pgvector_encodes_them() -> None:
    components = [0.5, -0.25, 1e-3, 3.0]
    expected = Vector(components).to_binary()
    assert vector_binary(array.array("f", components)) == expected
    assert vector_binary(Vector(components)) == expected
    assert vector_binary(expected) == expected  # already encoded: handed through
