"""Drift pass: how long the daemon's full pass takes to find 1 % stale rows, and the plans it runs.

Target: 100,000 and 1,000,000 rows, 1 % stale: ≤ 1 s and ≤ 5 s to find them; the plan uses indexes.

For each size, `safety_pass.prepare` builds the rows, each with a vector at its current version
(8 dimensions, no HNSW index: no query here reads a vector). Then 1 % of the rows (`--stale`),
picked at random, go stale: half by an update of the row (its version moves past the vector's),
half by deleting their vector (missing). The daemon's own `DriftPass.run_once` (keyset pages of
2,000 through `Store.drift_page`) is timed: the first pass right after the changes (no vacuum in
between), then the median of `--repeats`; every pass must find exactly the stale ids. The recent
pass (`run_recent`, the change log since the last pass's snapshot) is timed too: it sees the
updated rows only, by design (deleting a vector writes no change-log row).

The plans of the first page and of a later page (`after` = the id at the middle of the table) are
shown from EXPLAIN (ANALYZE, BUFFERS), both as a one-off (custom) plan and as the generic plan a
prepared statement switches to after five executions (asyncpg prepares every query it runs).
A later page's query bounds both sides of its join by `after`, so its plan reads the vectors'
primary key from `after` on; `later_page_reads_vectors_from_start` says whether a later page's plan
read the vectors from their first entry instead (each page re-reading every vector before it).

    .venv/bin/python bench/drift_pass.py --rows 100000 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from typing import Any

import asyncpg
from common import embedded_postgres, markdown_table, print_result, progress, verdict
from safety_pass import drift_pass_on, prepare, timed

TARGETS_SECONDS = {100_000: 1.0, 1_000_000: 5.0}
STALE_SHARE = 0.01
DATABASE = "safety"  # the name safety_pass.prepare gives it
SCANS = {"Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Bitmap Index Scan"}


def target_for(rows: int) -> float:
    """The target of the nearest size at or above `rows` (≤ 1 s up to 100,000, ≤ 5 s up to 1,000,000)."""
    return next((seconds for size, seconds in sorted(TARGETS_SECONDS.items()) if rows <= size), 5.0)


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, depth first, with what it read."""
    node = {
        "node": plan["Node Type"] + (f" ({plan['Join Type']})" if "Join Type" in plan else ""),
        "relation": plan.get("Relation Name"),
        "index": plan.get("Index Name"),
        "rows": plan.get("Actual Rows"),
        "loops": plan.get("Actual Loops"),
        "ms": plan.get("Actual Total Time"),
        "buffers": plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0),
        "condition": plan.get("Index Cond") or plan.get("Merge Cond") or plan.get("Hash Cond"),
    }
    nodes = [node]
    for child in plan.get("Plans", []):
        nodes += plan_nodes(child)
    return nodes


def describe(nodes: list[dict[str, Any]]) -> str:
    parts = []
    for node in nodes:
        text = node["node"]
        if node["index"]:
            text += f" {node['index']}"
        elif node["relation"]:
            text += f" {node['relation']}"
        if node["node"] in SCANS or node["index"]:
            text += f" ({node['rows']} rows x {node['loops']} loops, {node['buffers']} buffers)"
        parts.append(text)
    return " → ".join(parts)


def seq_scans_of_large_tables(nodes: list[dict[str, Any]]) -> list[str]:
    # dead_letters is empty here: a sequential scan of it is the right plan.
    return [
        node["relation"]
        for node in nodes
        if node["node"] == "Seq Scan" and node["relation"] in {"projects", "project_embeddings"}
    ]


async def explain(conn: asyncpg.Connection, query: str, args: list[str], generic: bool) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the daemon's query text, prepared as the daemon's driver prepares it."""
    await conn.execute(f"set plan_cache_mode = {'force_generic_plan' if generic else 'force_custom_plan'}")
    await conn.execute(f"prepare drift_query as {query}")
    literals = ", ".join(f"'{arg}'" for arg in args)
    raw = await conn.fetchval(f"explain (analyze, buffers, format json) execute drift_query({literals})")
    await conn.execute("deallocate drift_query")
    await conn.execute("reset plan_cache_mode")
    plan = json.loads(raw)[0]
    nodes = plan_nodes(plan["Plan"])
    return {
        "ms": round(plan["Execution Time"], 1),
        "plan": describe(nodes),
        "nodes": nodes,
        "seq_scans": seq_scans_of_large_tables(nodes),
        "rows_read": rows_read(nodes),
    }


def rows_read(nodes: list[dict[str, Any]]) -> dict[str, float]:
    """Rows each index scan returned (times loops): a keyset page should read about as many vectors
    as rows, from its `after` id on."""
    read: dict[str, float] = {}
    for node in nodes:
        if node["index"]:
            read[node["index"]] = read.get(node["index"], 0) + (node["rows"] or 0) * (node["loops"] or 1)
    return read


async def explain_all(dsn: str, store: Any, middle: str) -> dict[str, dict[str, Any]]:
    """The first and a later page (ids after the middle of the table), custom and generic plans."""
    conn = await asyncpg.connect(dsn, statement_cache_size=0)  # plain statements only: PREPARE is ours
    model = store.model
    try:
        return {
            "first page, custom plan": await explain(conn, store._drift_first, [model, "2000"], generic=False),
            "first page, generic plan": await explain(conn, store._drift_first, [model, "2000"], generic=True),
            "later page, custom plan": await explain(conn, store._drift_next, [model, "2000", middle], generic=False),
            "later page, generic plan": await explain(conn, store._drift_next, [model, "2000", middle], generic=True),
        }
    finally:
        await conn.close()


def page_durations(ends: list[float]) -> list[float]:
    """Milliseconds of each page from the times (seconds since the start) each one ended."""
    return [round(1000 * (b - a), 1) for a, b in zip([0.0, *ends], ends, strict=False)]


async def make_stale(conn: asyncpg.Connection, rows: int, share: float) -> tuple[set[str], set[str]]:
    """`share` of the rows (1 %): half updated (version moves), half with their vector deleted."""
    picked = [
        r["id"] for r in await conn.fetch("select id from projects order by random() limit $1", int(rows * share))
    ]
    half = len(picked) // 2
    updated, missing = picked[:half], picked[half:]
    await conn.execute("update projects set stars = stars + 1 where id = any($1::bigint[])", updated)
    await conn.execute("delete from vector_sync.project_embeddings where project_id = any($1::bigint[])", missing)
    return {str(i) for i in updated}, {str(i) for i in missing}


async def measure(admin: str, rows: int, repeats: int, stale_share: float) -> dict[str, Any]:
    await drop_database(admin)
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # prepare prints; stdout is for the result
        dsn = await prepare(admin, rows)
    prepared_seconds = time.monotonic() - started
    found: list[Any] = []
    async with drift_pass_on(dsn, found, max_pending=10_000_000) as (conn, store, passes):
        clean_ms = await timed(passes.run_once, repeats=3)  # nothing behind; also sets the watermark
        updated, missing = await make_stale(conn, rows, stale_share)
        expected = updated | missing

        found.clear()
        began = time.perf_counter()
        await passes.run_recent("bench")
        recent_ms = (time.perf_counter() - began) * 1000
        recent_found = {event.project_id for event in found}

        found.clear()
        page_times: list[float] = []
        began = time.perf_counter()
        await passes.run_once(progress=lambda _count: page_times.append(time.perf_counter() - began))
        first_ms = (time.perf_counter() - began) * 1000
        first_found = {event.project_id for event in found}

        daemon_ms: list[float] = []
        exact = first_found == expected
        for _ in range(repeats):
            found.clear()
            began = time.perf_counter()
            await passes.run_once()
            daemon_ms.append((time.perf_counter() - began) * 1000)
            exact = exact and {event.project_id for event in found} == expected
        middle = await conn.fetchval("select id from projects order by id offset $1 limit 1", rows // 2)
        plans = await explain_all(dsn, store, str(middle))
    await drop_database(admin)
    return {
        "rows": rows,
        "stale": len(expected),
        "stale_updated": len(updated),
        "stale_missing": len(missing),
        "prepare_seconds": round(prepared_seconds, 1),
        "clean_pass_ms": round(clean_ms, 1),
        "first_pass_ms": round(first_ms, 1),
        "median_pass_ms": round(statistics.median(daemon_ms), 1),
        "pages": len(page_times),
        "page_ms": page_durations(page_times),
        "found_exactly_the_stale_ids": exact,
        "found_first_pass": len(first_found),
        "recent_pass_ms": round(recent_ms, 1),
        "recent_pass_found": len(recent_found),
        "recent_pass_found_exactly_the_updated": recent_found == updated,
        "plans": plans,
        "repeats": repeats,
        "target_seconds": target_for(rows),
        "target_met": max(first_ms, statistics.median(daemon_ms)) <= 1000 * target_for(rows),
        "indexes_used": not any(plan["seq_scans"] for plan in plans.values()),
        "later_page_reads_vectors_from_start": any(
            unbounded_vector_scan(plan) for name, plan in plans.items() if name.startswith("later")
        ),
    }


async def drop_database(admin: str) -> None:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f"drop database if exists {DATABASE} with (force)")
    finally:
        await conn.close()


async def run(
    admin_dsn: str, *, rows: tuple[int, ...] = (100_000, 1_000_000), repeats: int = 5, stale_share: float = STALE_SHARE
) -> dict[str, Any]:
    """One measurement per size, each on a fresh database `safety` (dropped afterwards)."""
    results = []
    for count in rows:
        progress(f"drift_pass: {count} rows")
        results.append(await measure(admin_dsn, count, repeats, stale_share))
    return {"stale_share": stale_share, "sizes": results}


def unbounded_vector_scan(plan: dict[str, Any]) -> bool:
    read = plan["rows_read"]
    return read.get("project_embeddings_pkey", 0) > 1.5 * max(1.0, read.get("projects_pkey", 0))


def render(result: dict[str, Any]) -> str:
    rows: list[list[object]] = []
    for size in result["sizes"]:
        rows.append(
            [
                f"{size['rows']:,}",
                f"{size['stale']:,} ({size['stale_updated']:,} updated, {size['stale_missing']:,} missing)",
                f"{size['first_pass_ms']:.0f} ms",
                f"{size['median_pass_ms']:.0f} ms (of {size['repeats']})",
                f"{size['pages']}",
                "yes" if size["found_exactly_the_stale_ids"] else "NO",
                f"≤ {size['target_seconds']:.0f} s: {verdict(size['target_met'])}",
                f"{verdict(size['indexes_used'])}",
            ]
        )
    lines = [
        f"Drift pass (DriftPass.run_once, pages of 2,000), {result['stale_share']:.0%} stale",
        "",
        markdown_table(
            ["rows", "stale", "first pass", "median", "pages", "exact ids", "time target", "plan uses indexes"],
            rows,
        ),
    ]
    if result["stale_share"] != STALE_SHARE:
        lines.append(
            f"(the time targets are set for {STALE_SHARE:.0%} stale; this run made {result['stale_share']:.0%})"
        )
    for size in result["sizes"]:
        lines += [
            "",
            f"{size['rows']:,} rows: clean pass (nothing behind) {size['clean_pass_ms']:.0f} ms; page times of the "
            f"first pass {size['page_ms']} ms; recent pass {size['recent_pass_ms']:.0f} ms found "
            f"{size['recent_pass_found']:,} (= the updated: {size['recent_pass_found_exactly_the_updated']})",
        ]
        for name, plan in size["plans"].items():
            lines.append(f"- {name} ({plan['ms']} ms): {plan['plan']}")
            if plan["seq_scans"]:
                lines.append(f"  SEQ SCAN of {', '.join(plan['seq_scans'])}")
            if name.startswith("later") and unbounded_vector_scan(plan):
                read = plan["rows_read"]
                lines.append(
                    f"  the vectors' index is read from the first id, not from `after`: "
                    f"{read.get('project_embeddings_pkey', 0):,.0f} vectors read for "
                    f"{read.get('projects_pkey', 0):,.0f} rows (each later page re-reads all vectors before it)"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stale", type=float, default=STALE_SHARE, help="share of rows made stale (0.01)")
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    args = parser.parse_args()
    started = time.monotonic()
    with embedded_postgres("vs-bench-drift-") as admin:
        result = asyncio.run(run(admin, rows=tuple(args.rows), repeats=args.repeats, stale_share=args.stale))
    print_result(result, started, args.json, render)


if __name__ == "__main__":
    main()
