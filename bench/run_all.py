"""Run every benchmark, one after the other, with modest defaults (a few minutes) or --full.

    .venv/bin/python -m bench.run_all            # quick: smaller counts, same code paths
    .venv/bin/python -m bench.run_all --full     # the sizes the issue asks for
    .venv/bin/python -m bench.run_all --only ledger,sweep

Each benchmark prints its table and writes bench/results/<name>-<stamp>.json (and
<name>-latest.json). They share one bench database (BENCH_DATABASE_URL, default
billing_bench), which each drops and recreates, so they must not run at the same time.
bench/paired.py, which needs a commit to compare against, is not among them.
Benchmarks are scripts, not tests: nothing here runs under pytest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench import common

QUICK = {
    "gateway_overhead": ["--requests-c1", "300", "--requests-c32", "2000", "--warmup", "100"],
    "ledger": ["--ops", "60", "--accounts", "10000"],
    "sweep": ["--sizes", "10000,100000"],
    "audit": ["--legs", "200000"],
    "open_streams": ["--streams", "300"],
}
FULL = {
    "gateway_overhead": [
        "--requests-c1",
        "1000",
        "--requests-c32",
        "10000",
        "--warmup",
        "500",
        "--anthropic",
        "--keys",
        "both",
    ],
    "ledger": ["--ops", "200", "--accounts", "10000", "--repeat", "2"],
    "sweep": ["--sizes", "100000,1000000"],
    "audit": ["--legs", "1000000", "--tracemalloc"],
    "open_streams": ["--streams", "1000"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    args = parser.parse_args()
    plan = FULL if args.full else QUICK
    names = [n for n in plan if not args.only or n in args.only.split(",")]
    failed = []
    for name in names:
        print(f"\n===== {name} {' '.join(plan[name])}", flush=True)
        started = time.perf_counter()
        code = subprocess.call(
            [sys.executable, "-m", f"bench.{name}", *plan[name]], cwd=common.ROOT
        )
        print(f"===== {name}: exit {code} in {time.perf_counter() - started:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
