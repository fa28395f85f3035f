"""Webhook listener under load: signed requests from a second process on loopback.

Target: ≥ 2,000 requests/s with p99 ≤ 20 ms.

The daemon runs as a real subprocess (LISTEN + webhook sources, `VECTOR_SYNC_WEBHOOK_RATE_LIMIT`
raised to 1,000,000 a second: the default of 1,000 per client address would answer most of this
load with 429). `--rows` rows are inserted and embedded first (the start-up drift pass). The load
generator is this script again in a separate process (`--generate`, hidden): an aiohttp client on
keep-alive connections, every request Standard-Webhooks signed (tests/support.py `signed_headers`,
`webhook_body`; bodies and signatures built before the clock starts, so the client's time goes to
HTTP). Two kinds of body:

- dedup: every request names a real row at the version already embedded: the daemon answers 202
  and its scheduler drops the event as a duplicate (the common case: the same change by two
  sources).
- new version: every request names a real row at a version higher than any before (the row itself
  is not changed): each event is accepted, and the pipeline reads the rows in batches, finds the
  text unchanged and the vector current, and settles them without an API call. So the listener
  shares the daemon's event loop with scheduling and database reads.

Each kind runs `--repeats` times (the machine is shared: single runs vary) for `--seconds`, at
capacity (closed loop: `--connections` connections, each sending its next request as soon as the
previous answer arrives) and at a fixed `--rate` (open loop: requests are due on a fixed schedule
and latency counts from the due time, so a stall is not hidden by the client waiting; "client lag"
is how late the client itself started a request, the part of the latency that is the generator's
own). The verdict is the median run's. The daemon's CPU over each run comes from /proc/<pid>/stat,
the client's from getrusage: a process near 100 % of one core is the bottleneck. `--py-spy FILE`
records the daemon with py-spy during the first dedup capacity run and lists the hot functions.

    .venv/bin/python bench/webhook_load.py --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import itertools
import json
import os
import re
import resource
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from common import (
    daemon_metrics,
    embedded_postgres,
    fresh_database,
    markdown_table,
    percentile,
    print_result,
    process_cpu_seconds,
    progress,
    tests_import,
    texts,
    verdict,
    wait_all_current,
    webhook_daemon,
)

TARGET_RPS = 2000
TARGET_P99_MS = 20.0
DATABASE = "bench_webhook"
RATE_LIMIT = "1000000"  # VECTOR_SYNC_WEBHOOK_RATE_LIMIT's maximum
MAX_CLIENT_RPS = 8000  # requests built in advance for a capacity run: seconds times this
Request = tuple[bytes, dict[str, str]]  # a signed body and its headers
SCRIPT = str(Path(__file__).resolve())


# ----------------------------------------------------------------------------------- the load generator


def build_requests(config: dict[str, Any], count: int) -> list[Request]:
    """`count` signed (body, headers): dedup bodies repeat the embedded version, new-version bodies
    give each row a higher version each time round."""
    support = tests_import("support")
    ids: list[int] = config["ids"]
    built = []
    for index in range(count):
        row = ids[index % len(ids)]
        version = 1 if config["kind"] == "dedup" else config["first_version"] + index // len(ids)
        body = support.webhook_body("UPDATE", row, version)
        built.append((body, support.signed_headers(body)))
    return built


def runqueue_wait_seconds(pid: int | str) -> float:
    """Time the process's main thread (the event loop) was runnable but waited for a CPU
    (/proc/<pid>/schedstat, second field): the machine's contention, as this process felt it."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9


class Recorder:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.lags: list[float] = []  # how late the client itself started a request (open loop)
        self.service: list[float] = []  # from the actual start: the latency without the client's lag
        self.statuses: collections.Counter[str] = collections.Counter()

    async def send(self, session: aiohttp.ClientSession, url: str, request: Request, since: float) -> None:
        began = time.perf_counter()
        self.lags.append((began - since) * 1000)
        try:
            async with session.post(url, data=request[0], headers=request[1]) as response:
                await response.read()
                self.statuses[str(response.status)] += 1
        except (aiohttp.ClientError, OSError) as exc:
            self.statuses[type(exc).__name__] += 1
        ended = time.perf_counter()
        self.latencies.append((ended - since) * 1000)
        self.service.append((ended - began) * 1000)


async def warm(session: aiohttp.ClientSession, url: str, requests: list[Request]) -> None:
    """One request per connection, at once: the connections are open before the clock starts."""
    recorder = Recorder()
    await asyncio.gather(*(recorder.send(session, url, request, time.perf_counter()) for request in requests))
    print("GO", flush=True)  # the parent starts its measurements of the daemon here


async def closed_loop(
    config: dict[str, Any], warm_up: list[Request], requests: list[Request]
) -> tuple[Recorder, float]:
    recorder = Recorder()
    url = f"{config['url']}/webhook"
    position = 0
    connector = aiohttp.TCPConnector(limit=config["connections"])
    async with aiohttp.ClientSession(connector=connector) as session:
        await warm(session, url, warm_up)
        started = time.perf_counter()
        end = started + config["seconds"]

        async def worker() -> None:
            nonlocal position
            while time.perf_counter() < end and position < len(requests):
                request = requests[position]
                position += 1
                await recorder.send(session, url, request, time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(config["connections"])))
        return recorder, time.perf_counter() - started


async def open_loop(config: dict[str, Any], warm_up: list[Request], requests: list[Request]) -> tuple[Recorder, float]:
    recorder = Recorder()
    url = f"{config['url']}/webhook"
    rate: float = config["rate"]
    connector = aiohttp.TCPConnector(limit=config["connections"])
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=connector) as session:
        await warm(session, url, warm_up)
        started = time.perf_counter()
        sent = 0
        while sent < len(requests):
            due = min(len(requests), int((time.perf_counter() - started) * rate) + 1)
            for index in range(sent, due):
                # Latency counts from when the request was due, not from when the client got to it.
                task = asyncio.create_task(recorder.send(session, url, requests[index], started + index / rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent = due
            await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        return recorder, time.perf_counter() - started


def request_count(config: dict[str, Any]) -> int:
    """Requests a run builds: the warm-up's one per connection, then the run's."""
    per_second = config["rate"] if config["mode"] == "rate" else MAX_CLIENT_RPS
    return config["connections"] + int(config["seconds"] * per_second)


async def generate(config: dict[str, Any]) -> dict[str, Any]:
    requests = build_requests(config, request_count(config))
    # The prebuilt requests are never freed: out of the collector's way, so its passes over them do
    # not show up as latency.
    gc.freeze()
    count = len(requests) - config["connections"]
    warm_up, requests = requests[: config["connections"]], requests[config["connections"] :]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before, waited = usage.ru_utime + usage.ru_stime, runqueue_wait_seconds("self")
    loop = open_loop if config["mode"] == "rate" else closed_loop
    recorder, seconds = await loop(config, warm_up, requests)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    latencies = sorted(recorder.latencies)
    lags = sorted(recorder.lags)
    service = sorted(recorder.service)
    return {
        "requests": len(latencies),
        "seconds": round(seconds, 2),
        "requests_per_s": round(len(latencies) / seconds),
        "p50_ms": round(percentile(latencies, 0.5), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "client_lag_p99_ms": round(percentile(lags, 0.99), 2),
        "client_lag_max_ms": round(lags[-1], 2) if lags else None,
        "service_p99_ms": round(percentile(service, 0.99), 2),
        "client_runqueue_ms_per_s": round((runqueue_wait_seconds("self") - waited) * 1000 / seconds, 1),
        "statuses": dict(recorder.statuses),
        "client_cpu_percent": round(100 * (usage.ru_utime + usage.ru_stime - cpu_before) / seconds),
        "ran_out_of_requests": config["mode"] == "max" and len(latencies) >= count,
    }


# ----------------------------------------------------------------------------------- the benchmark


async def load(config: dict[str, Any], pid: int, spy: Path | None = None) -> dict[str, Any]:
    """One run of the generator in its own process, with the daemon's CPU over it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, SCRIPT, "--generate", json.dumps(config), stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    go = await asyncio.wait_for(process.stdout.readline(), timeout=120)  # requests built, connections open
    if go.strip() != b"GO":
        await process.wait()
        raise RuntimeError(f"load generator did not start: {go!r}")
    cpu_before, waited, started = process_cpu_seconds(pid), runqueue_wait_seconds(pid), time.monotonic()
    spy_task = asyncio.create_task(record_py_spy(pid, config["seconds"], spy)) if spy else None
    output = await process.stdout.read()
    cpu, elapsed = process_cpu_seconds(pid) - cpu_before, time.monotonic() - started
    waited = runqueue_wait_seconds(pid) - waited
    if await process.wait() != 0:
        raise RuntimeError(f"load generator exited with {process.returncode}")
    result: dict[str, Any] = json.loads(output)
    result["daemon_cpu_percent"] = round(100 * cpu / elapsed)
    result["daemon_runqueue_ms_per_s"] = round(waited * 1000 / elapsed, 1)
    if spy_task is not None:
        result["py_spy"] = await spy_task
    return result


async def record_py_spy(pid: int, seconds: float, output: Path) -> dict[str, Any]:
    """py-spy record (raw collapsed stacks) of the daemon for the run; the hottest functions."""
    executable = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    spy = await asyncio.create_subprocess_exec(
        executable,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(seconds) - 1)),
        "--format",
        "raw",
        "--nonblocking",
        "-o",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await spy.communicate()
    if spy.returncode != 0:
        return {"error": errors.decode(errors="replace").strip()[-300:]}
    return hot_spots(read_text(output))


def read_text(path: Path) -> str:
    return path.read_text()


FRAME = re.compile(r"^(?P<name>.*) \((?P<where>[^()]*)\)$")
OWN_CODE = ("vector_sync/", "aiohttp/", "multidict/", "yarl/", "prometheus_client/", "loguru/", "asyncpg/")
WRAPPERS = ("vector_sync/cli.py", "vector_sync/__main__.py")  # under every sample: not informative


def hot_spots(collapsed: str, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output; the
    inclusive list keeps the daemon's and its libraries' frames (the event loop's own wrap everything)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = []
        for frame in stack.split(";"):
            match = FRAME.match(frame)
            name, where = (match["name"], match["where"]) if match else (frame, "")
            frames.append((f"{name} ({where.split('/')[-1]})", where))
        total += count
        own[frames[-1][0]] += count
        for label in {
            label for label, where in frames if where.startswith(OWN_CODE) and not where.startswith(WRAPPERS)
        }:
            inclusive[label] += count

    def shares(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(frame, round(100 * count / max(1, total), 1)) for frame, count in counter.most_common(top)]

    return {"samples": total, "self": shares(own), "inclusive": shares(inclusive)}


async def prepare(admin_dsn: str, rows: int) -> str:
    dsn = await fresh_database(admin_dsn, DATABASE, hnsw=False)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table("projects", records=texts(rows, 0), columns=["name", "description"])
    finally:
        await conn.close()
    return dsn


def kept_up(requests_per_s: float, mode: str) -> bool:
    """≥ 2,000/s. A fixed-rate run offers exactly `--rate` (2,000) and its clock runs until the last
    answer is in, so a run that kept up measures a hair under it: 1 % of slack there."""
    return requests_per_s >= TARGET_RPS * (0.99 if mode == "rate" else 1.0)


async def measured(url: str, pid: int, config: dict[str, Any], spy: Path | None) -> dict[str, Any]:
    """One generator run with the daemon's scheduler counts and the machine's load beside it."""
    before = await daemon_metrics(url)
    result = await load(config, pid, spy)
    after = await daemon_metrics(url)
    result.update(
        kind=config["kind"],
        mode=config["mode"],
        offers=offer_counts(before, after),
        load_average=round(os.getloadavg()[0], 2),
    )
    result["target_met"] = (
        kept_up(result["requests_per_s"], config["mode"])
        and result["p99_ms"] <= TARGET_P99_MS
        and set(result["statuses"]) == {"202"}
    )
    return result


async def run(
    admin_dsn: str,
    *,
    seconds: float = 10.0,
    rows: int = 1000,
    connections: int = 16,
    rate: float = TARGET_RPS,
    repeats: int = 3,
    api_url: str | None = None,
    py_spy: Path | None = None,
) -> dict[str, Any]:
    """Capacity and fixed-rate runs, dedup and new-version bodies, `repeats` times each, one daemon."""
    dsn = await prepare(admin_dsn, rows)
    conn = await asyncpg.connect(dsn)
    runs: list[dict[str, Any]] = []
    try:
        async with webhook_daemon(dsn, api_url, 100, VECTOR_SYNC_WEBHOOK_RATE_LIMIT=RATE_LIMIT) as (url, _, process):
            await wait_all_current(conn, timeout=600)
            ids = [row["id"] for row in await conn.fetch("select id from projects order by id")]
            first_version = 2
            for kind, mode, repeat in itertools.product(("dedup", "new version"), ("max", "rate"), range(repeats)):
                config = {
                    "url": url,
                    "kind": kind,
                    "mode": mode,
                    "seconds": seconds,
                    "connections": connections,
                    "rate": rate,
                    "ids": ids,
                    "first_version": first_version,
                }
                first_version += request_count(config) // len(ids) + 1  # past every version this run sends
                spy = py_spy if (py_spy and kind == "dedup" and mode == "max" and repeat == 0) else None
                progress(f"webhook_load: {kind}, {'capacity' if mode == 'max' else f'{rate:.0f}/s'}, #{repeat + 1}")
                runs.append(await measured(url, process.pid, config, spy))
                progress(f"webhook_load: {runs[-1]}")
            await asyncio.sleep(1)
            await wait_all_current(conn, timeout=120)
    finally:
        await conn.close()
    return {
        "rows": rows,
        "connections": connections,
        "rate": rate,
        "seconds": seconds,
        "repeats": repeats,
        "webhook_rate_limit": int(RATE_LIMIT),
        "runs": runs,
        "summary": summarize(runs),
    }


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kind and load: the median run's numbers (the machine is shared: single runs vary)."""
    summary = []
    for kind, mode in itertools.product(("dedup", "new version"), ("max", "rate")):
        group = [r for r in runs if r["kind"] == kind and r["mode"] == mode]
        if not group:
            continue
        summary.append(
            {
                "kind": kind,
                "mode": mode,
                "median_requests_per_s": statistics.median(r["requests_per_s"] for r in group),
                "median_p99_ms": statistics.median(r["p99_ms"] for r in group),
                "best_p99_ms": min(r["p99_ms"] for r in group),
                "runs_meeting_target": sum(r["target_met"] for r in group),
                "runs": len(group),
            }
        )
    for item in summary:
        item["target_met"] = (
            kept_up(item["median_requests_per_s"], item["mode"]) and item["median_p99_ms"] <= TARGET_P99_MS
        )
    return summary


def offer_counts(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    prefix = "vector_sync_offers_total{result="
    return {
        key[len(prefix) + 1 : -2]: round(value - before.get(key, 0))
        for key, value in after.items()
        if key.startswith(prefix) and value - before.get(key, 0)
    }


def render(result: dict[str, Any]) -> str:
    rows: list[list[object]] = []
    for run_ in result["runs"]:
        load_text = f"capacity, {result['connections']} conns" if run_["mode"] == "max" else f"{result['rate']:.0f}/s"
        statuses = ", ".join(f"{status}: {count:,}" for status, count in sorted(run_["statuses"].items()))
        rows.append(
            [
                run_["kind"],
                load_text,
                f"{run_['requests']:,}",
                f"{run_['requests_per_s']:,}",
                f"{run_['p50_ms']:.1f} / {run_['p99_ms']:.1f} / {run_['max_ms']:.1f}",
                f"{run_['service_p99_ms']:.1f}",
                f"{run_['client_lag_p99_ms']:.1f} / {run_['client_lag_max_ms']:.1f}" if run_["mode"] == "rate" else "",
                statuses,
                ", ".join(f"{k} {v:,}" for k, v in run_["offers"].items()),
                f"{run_['daemon_cpu_percent']} % / {run_['client_cpu_percent']} %",
                f"{run_['daemon_runqueue_ms_per_s']:.0f} / {run_['client_runqueue_ms_per_s']:.0f}",
                f"{run_['load_average']:.1f}",
                verdict(run_["target_met"]),
            ]
        )
    lines = [
        f"Webhook listener: signed requests from a second process on loopback, {result['seconds']:.0f} s a run, "
        f"{result['rows']:,} rows, VECTOR_SYNC_WEBHOOK_RATE_LIMIT={result['webhook_rate_limit']:,}",
        "",
        markdown_table(
            [
                "bodies",
                "load",
                "requests",
                "req/s",
                "latency p50 / p99 / max ms",
                "p99 from actual send ms",
                "client lag p99 / max ms",
                "statuses",
                "scheduler",
                "CPU daemon / client",
                "waiting for a CPU, ms/s daemon / client",
                "load avg",
                "≥ 2,000/s, p99 ≤ 20 ms",
            ],
            rows,
        ),
    ]
    lines += [
        "",
        f"Median of {result['repeats']} runs each:",
        "",
        markdown_table(
            ["bodies", "load", "req/s", "p99 ms (best)", "runs meeting the target", "≥ 2,000/s, p99 ≤ 20 ms"],
            [
                [
                    item["kind"],
                    "capacity" if item["mode"] == "max" else f"{result['rate']:.0f}/s",
                    f"{item['median_requests_per_s']:,.0f}",
                    f"{item['median_p99_ms']:.1f} ({item['best_p99_ms']:.1f})",
                    f"{item['runs_meeting_target']} of {item['runs']}",
                    verdict(item["target_met"]),
                ]
                for item in result["summary"]
            ],
        ),
    ]
    for run_ in result["runs"]:
        spy = run_.get("py_spy")
        if spy:
            lines += ["", f"py-spy, daemon during the {run_['kind']} capacity run: {spy.get('samples', 0)} samples"]
            if "error" in spy:
                lines.append(f"py-spy failed: {spy['error']}")
            else:
                lines += ["self time:"] + [f"  {share:5.1f} %  {frame}" for frame, share in spy["self"]]
                lines += ["inclusive:"] + [f"  {share:5.1f} %  {frame}" for frame, share in spy["inclusive"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--rows", type=int, default=1000, help="rows the requests name")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=float, default=TARGET_RPS, help="requests a second of the fixed-rate runs")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind and load")
    parser.add_argument("--py-spy", type=Path, metavar="FILE", help="py-spy raw output of the dedup capacity run")
    parser.add_argument("--json", action="store_true", help="print only a JSON object")
    parser.add_argument("--generate", help=argparse.SUPPRESS)  # the load generator's own process
    args = parser.parse_args()
    if args.generate:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        print(json.dumps(asyncio.run(generate(json.loads(args.generate)))))
        return
    started = time.monotonic()
    with embedded_postgres("vs-bench-webhook-") as admin:
        result = asyncio.run(
            run(
                admin,
                seconds=args.seconds,
                rows=args.rows,
                connections=args.connections,
                rate=args.rate,
                repeats=args.repeats,
                py_spy=args.py_spy,
            )
        )
    print_result(result, started, args.json, render)


if __name__ == "__main__":
    main()
