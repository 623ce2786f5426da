"""Paired gateway runs: this checkout against another commit, side by side, loads alternating.

    .venv/bin/python -m bench.paired --base <git ref> [--rounds 6] [--requests 3000]
        [--warmup 300]

On a machine whose speed drifts (a shared VM), two runs of bench/gateway_overhead.py minutes
apart differ by more than most changes do. This starts two gateways at once, one serving this
checkout and one a temporary git worktree of `--base` (removed afterwards; it runs with this
checkout's virtualenv), against the same mock upstream and database. Each round runs the same
load on both, in alternating order: OpenAI chat completions, non-streaming, at concurrency 32
spread over 32 accounts, then at concurrency 1. Reports each round and, per measure, the
median of both sides and the median of the per-round ratios (this checkout / base): a code
change shows as a ratio, whatever the machine did in between. Then the billing check of
gateway_overhead (every successful request billed once, no active hold, audit clean).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench import common
from bench.gateway_overhead import body

MEASURES = ("c32_rps", "c32_gw_cpu_ms", "c1_p50_ms", "c1_gw_cpu_ms")


def _load(
    gateway: common.Gateway, keys: list[str], *, concurrency: int, requests: int, warmup: int
) -> tuple[dict[str, Any], float]:
    """One loadgen run; its result and the gateway's CPU ms per request served."""
    cpu_before = common.proc_tree_cpu_seconds(gateway.pid)
    out = common.run_load(
        {
            "url": f"{gateway.url}/v1/chat/completions",
            "keys": keys[:concurrency],
            "stream": False,
            "anthropic": False,
            "body": body(model=common.BENCH_MODEL, stream=False),
            "concurrency": concurrency,
            "requests": requests,
            "warmup": warmup,
        }
    )
    served = max(1, out["ok"] + out["warmup_ok"])
    return out, 1000 * (common.proc_tree_cpu_seconds(gateway.pid) - cpu_before) / served


def _round(
    gateway: common.Gateway, keys: list[str], args: argparse.Namespace
) -> tuple[dict[str, float], int]:
    spread, spread_cpu = _load(
        gateway, keys, concurrency=32, requests=args.requests, warmup=args.warmup
    )
    single, single_cpu = _load(
        gateway, keys, concurrency=1, requests=args.requests // 6, warmup=args.warmup // 4
    )
    measures = {
        "c32_rps": spread["rps"],
        "c32_gw_cpu_ms": spread_cpu,
        "c1_p50_ms": single["p50_ms"],
        "c1_gw_cpu_ms": single_cpu,
    }
    billed = sum(out["ok"] + out["warmup_ok"] for out in (spread, single))
    return measures, billed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git ref to compare against")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=3000, help="per c=32 run (c=1: a sixth)")
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()

    base_commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{args.base}^{{commit}}"],
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print("resetting the bench database ...", flush=True)
    common.database_reset()
    common.django_setup()
    with tempfile.TemporaryDirectory(prefix="bench-base-") as scratch:
        worktree = Path(scratch) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(worktree), base_commit],
            cwd=common.ROOT,
            check=True,
            capture_output=True,
        )
        try:
            results, check = _compare(args, worktree)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(worktree)],
                cwd=common.ROOT,
                check=False,
                capture_output=True,
            )

    medians = {
        side: {m: statistics.median(r[side][m] for r in results) for m in MEASURES}
        for side in ("base", "head")
    }
    ratios = {m: statistics.median(r["head"][m] / r["base"][m] for r in results) for m in MEASURES}
    common.print_table(
        f"Paired: this checkout (head) against {args.base} ({base_commit[:7]}), "
        f"{len(results)} rounds, medians",
        ["measure", "base", "head", "median ratio head/base"],
        [[m, medians["base"][m], medians["head"][m], f"{ratios[m]:.3f}"] for m in MEASURES],
    )
    print(f"\nbilling check: {check}")
    common.write_results(
        "paired",
        {
            "machine": common.machine_info(),
            "base": {"ref": args.base, "commit": base_commit},
            "args": vars(args),
            "rounds": results,
            "medians": medians,
            "median_ratios": ratios,
            "billing_check": check,
        },
    )
    if not check["ok"]:
        raise SystemExit("billing check failed")


def _compare(
    args: argparse.Namespace, worktree: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    mock = common.start_mock()
    keys = [key for _, key in common.gateway_seed(mock=mock, accounts=32)]
    gateways = {
        "base": common.start_gateway(source=worktree),
        "head": common.start_gateway(),
    }
    results: list[dict[str, Any]] = []
    billed = 0
    try:
        for number in range(args.rounds):
            order = ("base", "head") if number % 2 == 0 else ("head", "base")
            row: dict[str, Any] = {}
            for side in order:
                row[side], served = _round(gateways[side], keys, args)
                billed += served
                print(
                    f"round {number} {side}: c=32 {row[side]['c32_rps']:.0f} req/s, "
                    f"{row[side]['c32_gw_cpu_ms']:.3f} ms gateway CPU; c=1 p50 "
                    f"{row[side]['c1_p50_ms']:.2f} ms, {row[side]['c1_gw_cpu_ms']:.3f} ms CPU",
                    flush=True,
                )
            results.append(row)
        check = common.billing_check(expected_usage=billed)
    finally:
        for gateway in gateways.values():
            gateway.stop()
        mock.stop()
    return results, check


if __name__ == "__main__":
    main()
