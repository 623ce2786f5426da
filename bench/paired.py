"""Paired gateway runs: this checkout against another commit, side by side, loads alternating.

    .venv/bin/python -m bench.paired --base <git ref> [--rounds 6] [--requests 3000]
        [--warmup 300] [--c1-requests 500] [--keys plain|budgeted]

On a machine whose speed drifts (a shared VM), two runs of bench/gateway_overhead.py minutes
apart differ by more than most changes do. This starts two gateways at once: one serving this
checkout ("head"), one a temporary git worktree of `--base` (removed afterwards; it runs with
this checkout's virtualenv), in front of the same mock upstream. Each side has a PostgreSQL
database of its own, migrated by its own code (the two schemas differ when the money engine
or a migration changed): head BENCH_DATABASE_URL (default billing_bench), base the same URL
with `_base` appended (billing_bench_base). Each side seeds its own routes, prices and 32
accounts with its own services (bench/side.py run in that checkout), and its billing is
checked by its own code afterwards.

Each round runs the same load on both, in alternating order: OpenAI chat completions,
non-streaming, at concurrency 32 spread over the 32 accounts (`--requests` after `--warmup`),
then at concurrency 1 (`--c1-requests`, default a sixth of --requests; 0 skips it). --keys
budgeted gives every key of both sides a budget (1,000,000 USD a month, never reached).

Measured per run: requests/s, p50 latency, and CPU ms per request served of the gateway (its
processes, from /proc) and of PostgreSQL (the backends connected to that side's database),
and their sum. Reports each round and, per measure, the median of both sides and the median of
the per-round ratios head/base: a code change shows as a ratio, whatever the machine did in
between. Then each side's billing check (every successful request billed once, no active
hold, ledger audit clean); the exit status is 1 if either fails.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from bench import common
from bench.gateway_overhead import body

MEASURES = (
    "c32_rps",
    "c32_p50_ms",
    "c32_gw_cpu_ms",
    "c32_pg_cpu_ms",
    "c32_total_cpu_ms",
    "c1_p50_ms",
    "c1_gw_cpu_ms",
    "c1_pg_cpu_ms",
)
SIDES = ("base", "head")


class Side:
    """One commit's gateway, database and keys."""

    def __init__(self, name: str, source: Path, database_url: str) -> None:
        self.name = name
        self.source = source
        self.database_url = database_url
        self.keys: list[str] = []
        self.gateway: common.Gateway | None = None
        self.billed = 0


def _load(
    side: Side, *, concurrency: int, requests: int, warmup: int, stream: bool = False
) -> dict[str, float]:
    """One loadgen run on one side: its result and the CPU ms per request served."""
    assert side.gateway is not None
    gateway = side.gateway
    cpu_before = common.proc_tree_cpu_seconds(gateway.pid)
    postgres_before = common.postgres_backends_cpu(side.database_url)
    out = common.run_load(
        {
            "url": f"{gateway.url}/v1/chat/completions",
            "keys": side.keys[:concurrency],
            "stream": stream,
            "anthropic": False,
            "body": body(model=common.BENCH_MODEL, stream=stream),
            "concurrency": concurrency,
            "requests": requests,
            "warmup": warmup,
        }
    )
    gateway_cpu = common.proc_tree_cpu_seconds(gateway.pid) - cpu_before
    postgres_cpu = common.postgres_cpu_since(postgres_before, side.database_url)
    served = out["ok"] + out["warmup_ok"]
    side.billed += served
    if out["ok"] != requests:
        print(f"  {side.name}: {requests - out['ok']} of {requests} failed: {out['statuses']}")
    return {
        "rps": out["rps"],
        "p50_ms": out["p50_ms"],
        "gw_cpu_ms": 1000 * gateway_cpu / max(1, served),
        "pg_cpu_ms": 1000 * postgres_cpu / max(1, served),
    }


def _round(side: Side, args: argparse.Namespace) -> dict[str, float]:
    spread = _load(
        side, concurrency=32, requests=args.requests, warmup=args.warmup, stream=args.stream
    )
    measures = {
        "c32_rps": spread["rps"],
        "c32_p50_ms": spread["p50_ms"],
        "c32_gw_cpu_ms": spread["gw_cpu_ms"],
        "c32_pg_cpu_ms": spread["pg_cpu_ms"],
        "c32_total_cpu_ms": spread["gw_cpu_ms"] + spread["pg_cpu_ms"],
    }
    if args.c1_requests:
        single = _load(
            side,
            concurrency=1,
            requests=args.c1_requests,
            warmup=max(1, args.warmup // 4),
            stream=args.stream,
        )
        measures.update(
            c1_p50_ms=single["p50_ms"],
            c1_gw_cpu_ms=single["gw_cpu_ms"],
            c1_pg_cpu_ms=single["pg_cpu_ms"],
        )
    return measures


# Where a sampled frame's code lives, by the first of these its file path contains ("other"
# if none): the packages a request's CPU goes to.
PROFILE_PACKAGES = (
    "django/",
    "rest_framework/",
    "adrf/",
    "asgiref/",
    "uvicorn/",
    "httptools",
    "aiohttp/",
    "psycopg_pool/",
    "psycopg/",
    "concurrent/",
    "threading",
    "asyncio/",
    "prometheus_client",
    "tiktoken",
    "gateway/",
    "billing/",
    "reconciliation/",
    "config/",
)


def _package(frame: str) -> str:
    found = re.search(r"\((.*?):\d+\)", frame)
    path = found.group(1) if found else frame
    return next((package.strip("/") for package in PROFILE_PACKAGES if package in path), "other")


def _profile(side: Side, args: argparse.Namespace, gw_cpu_ms: float) -> dict[str, float]:
    """CPU ms per request by package on one side: py-spy's GIL samples (the thread that runs
    Python) of a c=32 run, each package's share of its innermost frames times the side's
    median gateway CPU per request."""
    assert side.gateway is not None
    py_spy = shutil.which("py-spy") or str(Path(common.PYTHON).with_name("py-spy"))
    raw = common.RESULTS_DIR / f"paired-profile-{side.name}.txt"
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            _load(side, concurrency=32, requests=500, warmup=0, stream=args.stream)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        subprocess.run(
            [
                py_spy,
                "record",
                "--pid",
                str(side.gateway.pid),
                "--rate",
                "200",
                "--duration",
                str(args.profile_seconds),
                "--format",
                "raw",
                "--output",
                str(raw),
                "--nonblocking",
                "--gil",
            ],
            check=True,
            capture_output=True,
        )
    finally:
        stop.set()
        loader.join()
    samples: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            samples[_package(stack.split(";")[-1])] += int(count)
    total = sum(samples.values()) or 1
    return {package: gw_cpu_ms * count / total for package, count in samples.items()}


# Modules Django and Celery import by name from every installed app.
AUTODISCOVERED = ("admin.py", "tasks.py")


def _autodiscovered_modules_stub(worktree: Path) -> None:
    """An empty module in the base's worktree for each autodiscovered one only this checkout
    has: the virtualenv's editable install maps the project's packages to this checkout, so
    the base would otherwise import this checkout's (gateway/admin.py, say) beside its own
    code, and fail."""
    for app in ("billing", "gateway", "reconciliation"):
        for name in AUTODISCOVERED:
            if (common.ROOT / app / name).exists() and not (worktree / app / name).exists():
                (worktree / app / name).write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git ref to compare against")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--stream", action="store_true", help="streaming completions instead of JSON ones"
    )
    parser.add_argument("--requests", type=int, default=3000, help="per c=32 run")
    parser.add_argument("--warmup", type=int, default=300, help="per c=32 run (c=1: a quarter)")
    parser.add_argument(
        "--c1-requests",
        type=int,
        default=None,
        help="per c=1 run (default --requests / 6; 0: none)",
    )
    parser.add_argument(
        "--keys", choices=("plain", "budgeted"), default="plain", help="keys of both sides"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, sample both gateways with py-spy: CPU ms per request by package",
    )
    parser.add_argument("--profile-seconds", type=int, default=30)
    args = parser.parse_args()
    if args.c1_requests is None:
        args.c1_requests = args.requests // 6

    base_commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{args.base}^{{commit}}"],
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # A terminated run still stops its gateways and removes its worktree (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-base-") as scratch:
        worktree = Path(scratch) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(worktree), base_commit],
            cwd=common.ROOT,
            check=True,
            capture_output=True,
        )
        _autodiscovered_modules_stub(worktree)
        sides = {
            "base": Side("base", worktree, f"{common.BENCH_DATABASE_URL}_base"),
            "head": Side("head", common.ROOT, common.BENCH_DATABASE_URL),
        }
        try:
            results, checks, profiles = _compare(args, sides)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(worktree)],
                cwd=common.ROOT,
                check=False,
                capture_output=True,
            )

    measures = [m for m in MEASURES if m in results[0]["head"]]
    medians = {
        side: {m: statistics.median(r[side][m] for r in results) for m in measures}
        for side in SIDES
    }
    ratios = {
        m: statistics.median(r["head"][m] / r["base"][m] if r["base"][m] else 0.0 for r in results)
        for m in measures
    }
    common.print_table(
        f"Paired: this checkout (head) against {args.base} ({base_commit[:7]}), "
        f"{len(results)} rounds, {args.keys} keys, {'streaming' if args.stream else 'JSON'}, "
        "medians (CPU: ms per request served)",
        ["measure", "base", "head", "median ratio head/base"],
        [[m, medians["base"][m], medians["head"][m], f"{ratios[m]:.3f}"] for m in measures],
    )
    if profiles:
        packages = sorted(
            set(profiles["base"]) | set(profiles["head"]),
            key=lambda p: -profiles["head"].get(p, 0.0),
        )
        common.print_table(
            "Gateway CPU ms per request by package (py-spy GIL samples x the median gateway CPU)",
            ["package", "base", "head", "head - base"],
            [
                [package, f"{base_ms:.3f}", f"{head_ms:.3f}", f"{head_ms - base_ms:+.3f}"]
                for package in packages
                for base_ms, head_ms in [
                    (profiles["base"].get(package, 0.0), profiles["head"].get(package, 0.0))
                ]
            ],
        )
    for name, check in checks.items():
        print(f"\nbilling check, {name}: {check}")
    common.write_results(
        "paired",
        {
            "machine": common.machine_info(),
            "base": {"ref": args.base, "commit": base_commit},
            "databases": {
                name: common.database_name(side.database_url) for name, side in sides.items()
            },
            "args": vars(args),
            "rounds": results,
            "medians": medians,
            "median_ratios": ratios,
            "billing_checks": checks,
            "profile_cpu_ms_by_package": profiles,
        },
    )
    if not all(check["ok"] for check in checks.values()):
        raise SystemExit("billing check failed")


def _compare(
    args: argparse.Namespace, sides: dict[str, Side]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    for side in sides.values():
        print(
            f"{side.name}: migrating {common.database_name(side.database_url)} "
            f"with {side.source} ...",
            flush=True,
        )
        common.database_reset(side.database_url, source=side.source)
    mock = common.start_mock()
    results: list[dict[str, Any]] = []
    try:
        for side in sides.values():
            seeded = common.side_run(
                "seed",
                source=side.source,
                database_url=side.database_url,
                openai_base_url=mock.openai_base_url,
                anthropic_base_url=mock.anthropic_base_url,
                accounts=32 if args.keys == "plain" else 0,
                budgeted_accounts=32 if args.keys == "budgeted" else 0,
            )
            side.keys = [key for _, key in seeded[args.keys]]
            side.gateway = common.start_gateway(database_url=side.database_url, source=side.source)
        for number in range(args.rounds):
            order = SIDES if number % 2 == 0 else SIDES[::-1]
            row: dict[str, Any] = {}
            for name in order:
                row[name] = _round(sides[name], args)
                m = row[name]
                print(
                    f"round {number} {name}: c=32 {m['c32_rps']:.0f} req/s, CPU ms/request "
                    f"gateway {m['c32_gw_cpu_ms']:.3f} + postgres {m['c32_pg_cpu_ms']:.3f}"
                    + (
                        f"; c=1 p50 {m['c1_p50_ms']:.2f} ms, CPU {m['c1_gw_cpu_ms']:.3f} + "
                        f"{m['c1_pg_cpu_ms']:.3f}"
                        if "c1_p50_ms" in m
                        else ""
                    ),
                    flush=True,
                )
            results.append(row)
        profiles: dict[str, dict[str, float]] = {}
        if args.profile:
            for name, side in sides.items():
                median_cpu = statistics.median(r[name]["c32_gw_cpu_ms"] for r in results)
                profiles[name] = _profile(side, args, median_cpu)
    finally:
        for side in sides.values():
            if side.gateway is not None:
                side.gateway.stop()
        mock.stop()
    checks = {
        name: common.side_run(
            "check",
            source=side.source,
            database_url=side.database_url,
            expected_usage=side.billed,
        )
        for name, side in sides.items()
    }
    return results, checks, profiles


if __name__ == "__main__":
    main()
