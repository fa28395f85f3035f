"""The hardware limit for storing vectors: a raw asyncpg bulk upsert into the same table and index.

No daemon, no API: random unit vectors of 1536 dimensions are upserted 100 at a time into
vector_sync.project_embeddings, first with its HNSW index and then without, so the daemon's
throughput (bench/throughput.py) can be read as a share of what the database itself allows.

    .venv/bin/python bench/raw_upsert_limit.py --rows 3000
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time

import asyncpg
from common import DIMENSIONS, embedded_postgres, fresh_database, texts
from pgvector import Vector
from pgvector.asyncpg import register_vector

UPSERT = """
insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding)
select u.id, 1, 'sha', 'model', u.e from unnest($1::bigint[], $2::vector[]) u(id, e)
on conflict (project_id) do update set embedding = excluded.embedding
"""


def unit_vector() -> Vector:
    values = [random.gauss(0, 1) for _ in range(DIMENSIONS)]
    norm = math.sqrt(sum(value * value for value in values))
    return Vector([value / norm for value in values])


async def measure(admin: str, rows: int) -> None:
    dsn = await fresh_database(admin, "bench_raw")
    conn = await asyncpg.connect(dsn)
    await register_vector(conn)
    await conn.copy_records_to_table("projects", records=texts(rows, 0), columns=["name", "description"])
    vectors = [unit_vector() for _ in range(rows)]
    for label, keep_index in (("with the HNSW index", True), ("without an index", False)):
        await conn.execute("delete from vector_sync.project_embeddings")
        if not keep_index:
            await conn.execute("drop index vector_sync.project_embeddings_embedding_idx")
        started = time.monotonic()
        for start in range(0, rows, 100):
            ids = list(range(start + 1, min(rows, start + 100) + 1))
            await conn.execute(UPSERT, ids, vectors[start : start + 100])
        seconds = time.monotonic() - started
        print(f"raw upsert {label}: {rows} rows in {seconds:.1f}s = {rows / seconds:.0f} rows/s")
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    args = parser.parse_args()
    with embedded_postgres("vs-bench-raw-") as admin:
        asyncio.run(measure(admin, args.rows))


if __name__ == "__main__":
    main()
