"""Gateway overhead: the shipped mock upstream hit directly and through the gateway, in one run.

    .venv/bin/python -m bench.gateway_overhead [--requests-c1 500] [--requests-c32 4000]
        [--warmup 200] [--workers 1] [--anthropic] [--profile]

Starts the mock upstream (its own process) and uvicorn (one worker process unless --workers)
serving
config.asgi:application (uvloop, httptools, no access log, production settings, LOG_LEVEL=WARNING)
against a freshly migrated PostgreSQL database (BENCH_DATABASE_URL, default billing_bench).
The load generator (bench/loadgen.py, aiohttp) runs in a third process on loopback.

Scenarios, each a warm-up then a fixed number of measured requests:
non-streaming and streaming OpenAI chat completions at concurrency 1, at concurrency 32 spread
over 32 accounts (one key each), and at concurrency 32 on one hot account; the mock directly at
concurrency 1 and 32 for comparison. --anthropic adds /v1/messages at c=32 spread.
Reports requests/s, p50/p99 latency, p50 time to first byte and gateway/direct ratios, then
checks that every successful gateway request was billed exactly once (usage postings ==
successes, no active hold left, ledger audit clean).

--profile samples the gateway with py-spy during an extra c=32 non-streaming run and writes
an SVG flame graph plus a top-frames table (bench/results/profile-*).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import common

PROMPT = "Say something short for the benchmark. [mock:tokens=16]"


def body(*, model: str, stream: bool, anthropic: bool = False) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 256,
    }
    if stream:
        payload["stream"] = True
    return payload


def scenarios(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for stream in (False, True):
        mode = "stream" if stream else "json"
        for conc, n in ((1, args.requests_c1), (32, args.requests_c32)):
            rows.append(
                {
                    "name": f"direct {mode} c={conc}",
                    "target": "direct",
                    "stream": stream,
                    "concurrency": conc,
                    "requests": n,
                    "accounts": 0,
                }
            )
            if conc == 1:
                rows.append(
                    {
                        "name": f"gateway {mode} c=1",
                        "target": "gateway",
                        "stream": stream,
                        "concurrency": 1,
                        "requests": n,
                        "accounts": 1,
                    }
                )
            else:
                rows.append(
                    {
                        "name": f"gateway {mode} c=32 spread",
                        "target": "gateway",
                        "stream": stream,
                        "concurrency": 32,
                        "requests": n,
                        "accounts": 32,
                    }
                )
                rows.append(
                    {
                        "name": f"gateway {mode} c=32 hot",
                        "target": "gateway",
                        "stream": stream,
                        "concurrency": 32,
                        "requests": n,
                        "accounts": 1,
                        "hot": True,
                    }
                )
    if args.anthropic:
        for stream in (False, True):
            mode = "stream" if stream else "json"
            rows.append(
                {
                    "name": f"direct anthropic {mode} c=32",
                    "target": "direct",
                    "stream": stream,
                    "concurrency": 32,
                    "requests": args.requests_c32,
                    "accounts": 0,
                    "anthropic": True,
                }
            )
            rows.append(
                {
                    "name": f"gateway anthropic {mode} c=32 spread",
                    "target": "gateway",
                    "stream": stream,
                    "concurrency": 32,
                    "requests": args.requests_c32,
                    "accounts": 32,
                    "anthropic": True,
                }
            )
    return rows


def profile_top(raw_path: Path, limit: int = 25) -> dict[str, list[tuple[str, float]]]:
    """Inclusive and self share of samples per frame, from py-spy's collapsed-stack output."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if f]
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    if not total:
        return {"inclusive": [], "self": []}
    return {
        "samples": [("total", float(total))],
        "inclusive": [(f, 100 * c / total) for f, c in inclusive.most_common(limit)],
        "self": [(f, 100 * c / total) for f, c in own.most_common(limit)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests-c1", type=int, default=500)
    parser.add_argument("--requests-c32", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--anthropic", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the gateway (repeatable), e.g. GATEWAY_SETTLE_THREADS=8",
    )
    parser.add_argument("--profile-seconds", type=int, default=20)
    args = parser.parse_args()
    if args.profile and args.workers != 1:
        parser.error("--profile samples one process: use it with --workers 1")

    print("resetting the bench database ...", flush=True)
    common.database_reset()
    common.django_setup()
    mock = common.start_mock()
    keys = common.gateway_seed(mock=mock, accounts=33)
    spread_keys = [k[1] for k in keys[:32]]
    hot_key = keys[32][1]
    gateway_env = dict(item.split("=", 1) for item in args.gateway_env)
    gateway = common.start_gateway(workers=args.workers, **gateway_env)
    print(
        f"mock {mock.url} (pid {mock.process.pid}); gateway {gateway.url} "
        f"({args.workers} uvicorn worker process(es), pid {gateway.pid})",
        flush=True,
    )

    results: list[dict[str, Any]] = []
    billed_expected = 0
    profile: dict[str, Any] = {}
    try:
        for sc in scenarios(args):
            anthropic = sc.get("anthropic", False)
            if sc["target"] == "direct":
                base = mock.url
                url = f"{base}/v1/messages" if anthropic else f"{base}/v1/chat/completions"
                run_keys = ["direct"] if anthropic else []
                model = "mock-model"
            else:
                url = (
                    f"{gateway.url}/v1/messages"
                    if anthropic
                    else f"{gateway.url}/v1/chat/completions"
                )
                run_keys = [hot_key] if sc.get("hot") else spread_keys[: max(1, sc["accounts"])]
                model = common.BENCH_ANTHROPIC_MODEL if anthropic else common.BENCH_MODEL
            cpu_before = common.proc_tree_cpu_seconds(gateway.pid)
            postgres_before = common.postgres_cpu_seconds()
            out = common.run_load(
                {
                    "url": url,
                    "keys": run_keys,
                    "stream": sc["stream"],
                    "anthropic": anthropic,
                    "body": body(model=model, stream=sc["stream"], anthropic=anthropic),
                    "concurrency": sc["concurrency"],
                    "requests": sc["requests"],
                    "warmup": args.warmup if sc["concurrency"] > 1 else args.warmup // 4,
                }
            )
            gateway_cpu = common.proc_tree_cpu_seconds(gateway.pid) - cpu_before
            postgres_cpu = common.postgres_cpu_seconds() - postgres_before
            if sc["target"] == "gateway":
                billed_expected += out["ok"] + out["warmup_ok"]
                served = max(1, out["ok"] + out["warmup_ok"])
                out["gateway_cpu_ms_per_request"] = 1000 * gateway_cpu / served
                out["postgres_cpu_ms_per_request"] = 1000 * postgres_cpu / served
            results.append({**sc, **out})
            print(
                f"  {sc['name']:<34} {out['rps']:8.0f} req/s  p50 {out['p50_ms']:7.2f} ms  "
                f"p99 {out['p99_ms']:7.2f} ms  ok {out['ok']}/{sc['requests']} "
                f"{out['statuses'] if out['ok'] != sc['requests'] else ''}",
                flush=True,
            )

        time.sleep(1.0)  # let the last settles commit (they are awaited, but be safe)
        check = common.billing_check(expected_usage=billed_expected)
        if args.profile:
            # After the check: the profiled client is killed mid-run, so its count is unknown.
            profile = run_profile(args, gateway, spread_keys)
    finally:
        gateway.stop()
        mock.stop()

    direct = {
        (r["stream"], r["concurrency"], r.get("anthropic", False)): r
        for r in results
        if r["target"] == "direct"
    }
    rows = []
    for r in results:
        d = direct.get((r["stream"], r["concurrency"], r.get("anthropic", False)))
        if r["target"] == "gateway" and d:
            r["rps_ratio"] = r["rps"] / d["rps"] if d["rps"] else 0.0
            r["p50_ratio"] = r["p50_ms"] / d["p50_ms"] if d["p50_ms"] else 0.0
            r["p50_added_ms"] = r["p50_ms"] - d["p50_ms"]
        rows.append(
            [
                r["name"],
                r["ok"],
                r["rps"],
                r["p50_ms"],
                r["p99_ms"],
                r["ttfb_p50_ms"] if r["stream"] else "-",
                f"{r['rps_ratio']:.2f}" if "rps_ratio" in r else "-",
                f"{r['p50_ratio']:.2f}" if "p50_ratio" in r else "-",
                f"{r['p50_added_ms']:+.2f}" if "p50_added_ms" in r else "-",
                f"{r['gateway_cpu_ms_per_request']:.2f}"
                if "gateway_cpu_ms_per_request" in r
                else "-",
                f"{r['postgres_cpu_ms_per_request']:.2f}"
                if "postgres_cpu_ms_per_request" in r
                else "-",
            ]
        )
    common.print_table(
        f"Gateway overhead ({args.workers} uvicorn worker process(es); mock upstream and load "
        "generator in their own processes; gw cpu summed over the gateway's processes)",
        [
            "scenario",
            "ok",
            "req/s",
            "p50 ms",
            "p99 ms",
            "ttfb p50",
            "rps g/d",
            "p50 g/d",
            "p50 +ms",
            "gw cpu ms/req",
            "pg cpu ms/req",
        ],
        rows,
    )
    print(f"\nbilling check: {check}")
    if profile:
        common.print_table(
            "py-spy: top frames by inclusive share (c=32 non-streaming)",
            ["frame", "%"],
            profile["top"]["inclusive"][:20],
        )
        common.print_table(
            "py-spy: top frames by self share", ["frame", "%"], profile["top"]["self"][:20]
        )
    common.write_results(
        "gateway_overhead",
        {
            "machine": common.machine_info(),
            "gateway_processes": 1,
            "args": vars(args),
            "results": results,
            "billing_check": check,
            "profile": profile,
        },
    )
    if not check["ok"]:
        raise SystemExit("billing check failed: see above")


def run_profile(
    args: argparse.Namespace, gateway: common.Gateway, keys: list[str]
) -> dict[str, Any]:
    py_spy = shutil.which("py-spy") or str(Path(common.PYTHON).with_name("py-spy"))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    svg = common.RESULTS_DIR / f"profile-{stamp}.svg"
    raw = common.RESULTS_DIR / f"profile-{stamp}.txt"
    # A run long enough to outlast the sampling window.
    requests = 100_000
    config = {
        "url": f"{gateway.url}/v1/chat/completions",
        "keys": keys,
        "stream": False,
        "body": body(model=common.BENCH_MODEL, stream=False),
        "concurrency": 32,
        "requests": requests,
        "warmup": 0,
        "timeout": 120,
    }
    import json

    load = subprocess.Popen(
        [common.PYTHON, "-m", "bench.loadgen"],
        cwd=common.ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert load.stdin is not None
    load.stdin.write(json.dumps(config).encode())
    load.stdin.close()
    time.sleep(2)
    # The table comes from --gil samples (only the thread holding the GIL: where the one
    # Python core goes); the flame graph is wall-clock over all threads, waits included.
    for out, fmt, extra in ((raw, "raw", ["--gil"]), (svg, "flamegraph", [])):
        subprocess.run(
            [
                py_spy,
                "record",
                "--pid",
                str(gateway.pid),
                "--rate",
                "200",
                "--duration",
                str(args.profile_seconds // 2),
                "--format",
                fmt,
                "--output",
                str(out),
                "--nonblocking",
                *extra,
            ],
            check=True,
            capture_output=True,
        )
    load.kill()
    load.wait()
    return {"svg": str(svg), "raw": str(raw), "top": profile_top(raw)}


if __name__ == "__main__":
    main()
