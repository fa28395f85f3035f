"""The hardware limit for storing vectors: a raw asyncpg bulk upsert of the same vectors into the same table.

No daemon, no API, no version guard: the vectors the test API returns for the rows of
`common.texts` are computed and encoded first, then upserted `--batch` rows a statement into
vector_sync.project_embeddings (twice: inserts into an empty table, then updates of every row, as the
end-to-end benchmark's two phases). The daemon's rows/s can then be read as a share of what the
database itself allows on this machine. `--hnsw` keeps the vector index (the default drops it, as
the end-to-end benchmarks do).

    .venv/bin/python bench/raw_upsert_limit.py --rows 20000
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import sys
import time

import asyncpg
from common import DIMENSIONS, ROOT, embedded_postgres, fresh_database, texts
from vector_sync.store import content_text, vector_binary

sys.path.insert(0, str(ROOT / "tests"))
from embedding_api import _embed  # the test API's own function: the very same vectors

UPSERT = """
insert into vector_sync.project_embeddings (project_id, version, content_sha256, model, embedding)
select u.id, u.version, 'sha', 'model', u.e from unnest($1::bigint[], $2::bigint[], $3::vector[]) u(id, version, e)
on conflict (project_id) do update set version = excluded.version, embedding = excluded.embedding
"""


def encoded_vectors(rows: int, round_: int) -> list[bytes]:
    """The wire form of the vectors the test API returns for the rows' texts, computed before timing."""
    return [
        vector_binary(array.array("f", _embed(content_text([name, description]), DIMENSIONS).tobytes()))
        for name, description in texts(rows, round_)
    ]


async def run(admin: str, rows: int = 20000, batch: int = 1000, hnsw: bool = False) -> dict[str, float]:
    dsn = await fresh_database(admin, "bench_raw", hnsw=hnsw)
    conn = await asyncpg.connect(dsn)
    await conn.set_type_codec("vector", encoder=vector_binary, decoder=bytes, format="binary")
    await conn.copy_records_to_table("projects", records=texts(rows, 0), columns=["name", "description"])
    result: dict[str, float] = {"rows": rows, "batch": batch}
    for phase, round_ in (("insert", 0), ("update", 1)):
        vectors = encoded_vectors(rows, round_)
        started = time.monotonic()
        for start in range(0, rows, batch):
            ids = list(range(start + 1, min(rows, start + batch) + 1))
            await conn.execute(UPSERT, ids, [round_ + 1] * len(ids), vectors[start : start + batch])
        seconds = time.monotonic() - started
        result[f"{phase}_rows_per_s"] = round(rows / seconds)
    result["rows_per_s"] = round(2 * rows / (rows / result["insert_rows_per_s"] + rows / result["update_rows_per_s"]))
    await conn.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--hnsw", action="store_true", help="keep the HNSW index on the vectors")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with embedded_postgres("vs-bench-raw-") as admin:
        result = asyncio.run(run(admin, args.rows, args.batch, args.hnsw))
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"raw upsert, {args.batch} rows a statement{' with HNSW' if args.hnsw else ''}: "
        f"inserts {result['insert_rows_per_s']:.0f} rows/s, updates {result['update_rows_per_s']:.0f} rows/s, "
        f"both {result['rows_per_s']:.0f} rows/s"
    )


if __name__ == "__main__":
    main()
