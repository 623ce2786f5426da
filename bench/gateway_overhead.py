"""Gateway overhead: the shipped mock upstream hit directly and through the gateway, in one run.

    .venv/bin/python -m bench.gateway_overhead [--requests-c1 500] [--requests-c32 4000]
        [--warmup 200] [--workers 1] [--anthropic] [--keys plain|budgeted|both] [--rounds 1]
        [--only SUBSTRING] [--profile] [--gateway-env NAME=VALUE]

Starts the mock upstream (its own process) and uvicorn (one worker process unless --workers)
serving config.asgi:application (uvloop, httptools, no access log, production settings,
LOG_LEVEL=WARNING) against a freshly migrated PostgreSQL database (BENCH_DATABASE_URL, default
billing_bench). The load generator (bench/loadgen.py, aiohttp) runs in a third process on
loopback.

Scenarios, each a warm-up then a fixed number of measured requests: non-streaming and
streaming OpenAI chat completions at concurrency 1, at concurrency 32 spread over 32 accounts
(one key each), and at concurrency 32 on one hot account; the mock directly at concurrency 1
and 32 for comparison. --anthropic adds /v1/messages at c=32 spread. --only keeps the
scenarios whose name contains one of its comma-separated substrings (e.g. --only "json c=32
spread"; the direct run of the same shape is kept for the ratios).

--keys: plain (default) keys have no budget; budgeted keys each have a budget of 1,000,000 USD
a month (never reached: every request still pays for the budget's bookkeeping in the hold and
the settle); both runs every gateway scenario with each, back to back, and prints the
budgeted/plain ratios. --rounds N repeats each gateway scenario N times per set of keys, the
order alternating (plain first, then budgeted first, ...); the tables show medians, the ratios
are medians of the per-round ratios.

Reports requests/s, p50/p99 latency, p50 time to first byte, gateway/direct ratios, and CPU ms
per request of the gateway (its processes, from /proc) and of PostgreSQL (the backends connected
to the bench database), then checks that every successful gateway request was billed exactly
once (usage postings == successes, no active hold, ledger audit clean, budgets back to nothing
held); the exit status is 1 otherwise.

--profile samples the gateway with py-spy during an extra c=32 non-streaming run (streaming
with --profile-stream) and writes an SVG flame graph plus a top-frames table
(bench/results/profile-*).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
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


def _keys_label(name: str, key_set: str, key_sets: list[str]) -> str:
    return name if key_sets == ["plain"] else f"{name} [{key_set}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests-c1", type=int, default=500)
    parser.add_argument("--requests-c32", type=int, default=4000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--anthropic", action="store_true")
    parser.add_argument(
        "--keys",
        choices=("plain", "budgeted", "both"),
        default="plain",
        help="unbudgeted keys, budgeted keys, or each in turn (default plain)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of each gateway scenario per set of keys"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated substrings of the scenario names to run"
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--profile-stream", action="store_true", help="--profile samples streaming requests"
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the gateway (repeatable), e.g. DB_POOL_MAX_SIZE=16",
    )
    parser.add_argument("--profile-seconds", type=int, default=20)
    args = parser.parse_args()
    if args.profile and args.workers != 1:
        parser.error("--profile samples one process: use it with --workers 1")
    key_sets = ["plain", "budgeted"] if args.keys == "both" else [args.keys]
    plan = scenarios(args)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        gateway_rows = [
            sc for sc in plan if sc["target"] == "gateway" and any(w in sc["name"] for w in wanted)
        ]
        shapes = {
            (sc["stream"], sc["concurrency"], sc.get("anthropic", False)) for sc in gateway_rows
        }
        plan = [
            sc
            for sc in plan
            if sc in gateway_rows
            or (
                sc["target"] == "direct"
                and (sc["stream"], sc["concurrency"], sc.get("anthropic", False)) in shapes
            )
        ]
        if not gateway_rows:
            parser.error(f"--only {args.only!r} matches no gateway scenario")

    print("resetting the bench database ...", flush=True)
    common.database_reset()
    common.django_setup()
    mock = common.start_mock()
    seeded = common.gateway_seed(
        mock=mock,
        accounts=33 if "plain" in key_sets else 0,
        budgeted_accounts=33 if "budgeted" in key_sets else 0,
    )
    keys = {
        key_set: {
            "spread": [k[1] for k in seeded[key_set][:32]],
            "hot": [seeded[key_set][32][1]],
        }
        for key_set in key_sets
    }
    gateway_env = dict(item.split("=", 1) for item in args.gateway_env)
    gateway = common.start_gateway(workers=args.workers, **gateway_env)
    print(
        f"mock {mock.url} (pid {mock.process.pid}); gateway {gateway.url} "
        f"({args.workers} uvicorn worker process(es), pid {gateway.pid}); keys: {args.keys}",
        flush=True,
    )

    results: list[dict[str, Any]] = []
    billed_expected = 0
    profile: dict[str, Any] = {}
    try:
        # Not measured: the gateway's first requests (imports, pools, caches) with each set of
        # keys, so the first scenario measured does not pay for them.
        for key_set in key_sets:
            warm = common.run_load(
                {
                    "url": f"{gateway.url}/v1/chat/completions",
                    "keys": keys[key_set]["spread"],
                    "stream": False,
                    "body": body(model=common.BENCH_MODEL, stream=False),
                    "concurrency": 32,
                    "requests": max(32, args.warmup),
                    "warmup": 0,
                }
            )
            billed_expected += warm["ok"] + warm["warmup_ok"]
        for sc in plan:
            if sc["target"] == "direct":
                runs = [("", 0)]
            else:
                runs = [
                    (key_set, rnd)
                    for rnd in range(args.rounds)
                    for key_set in (key_sets if rnd % 2 == 0 else key_sets[::-1])
                ]
            for key_set, rnd in runs:
                out = run_one(args, sc, mock, gateway, keys.get(key_set))
                if sc["target"] == "gateway":
                    billed_expected += out["ok"] + out["warmup_ok"]
                row = {**sc, **out, "keys": key_set, "round": rnd}
                results.append(row)
                label = _keys_label(sc["name"], key_set, key_sets) if key_set else sc["name"]
                if args.rounds > 1 and key_set:
                    label += f" r{rnd}"
                print(
                    f"  {label:<48} {out['rps']:8.0f} req/s  p50 {out['p50_ms']:7.2f} ms  "
                    f"p99 {out['p99_ms']:7.2f} ms  ok {out['ok']}/{sc['requests']} "
                    f"{out['statuses'] if out['ok'] != sc['requests'] else ''}",
                    flush=True,
                )

        time.sleep(1.0)  # let the last settles commit (they are awaited, but be safe)
        check = common.billing_check(expected_usage=billed_expected)
        if args.profile:
            # After the check: the profiled client is killed mid-run, so its count is unknown.
            profile = run_profile(args, gateway, keys[key_sets[0]]["spread"])
    finally:
        gateway.stop()
        mock.stop()

    summary = summarize(results)
    direct = {
        (r["stream"], r["concurrency"], r.get("anthropic", False)): r
        for r in summary
        if r["target"] == "direct"
    }
    rows = []
    for r in summary:
        d = direct.get((r["stream"], r["concurrency"], r.get("anthropic", False)))
        if r["target"] == "gateway" and d:
            r["rps_ratio"] = r["rps"] / d["rps"] if d["rps"] else 0.0
            r["p50_ratio"] = r["p50_ms"] / d["p50_ms"] if d["p50_ms"] else 0.0
            r["p50_added_ms"] = r["p50_ms"] - d["p50_ms"]
        rows.append(
            [
                _keys_label(r["name"], r["keys"], key_sets) if r["keys"] else r["name"],
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
        "generator in their own processes; gw cpu summed over the gateway's processes, pg cpu "
        "over the bench database's backends"
        + (f"; medians of {args.rounds} rounds" if args.rounds > 1 else "")
        + ")",
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
    comparison = budget_comparison(results) if args.keys == "both" else []
    if comparison:
        common.print_table(
            "Budgeted keys against plain keys, same gateway, same run (medians of the per-round "
            "ratios budgeted/plain; the target: c=32 spread req/s ratio >= 0.90)",
            [
                "scenario",
                "plain req/s",
                "budgeted req/s",
                "req/s ratio",
                "gw cpu ratio",
                "pg cpu ratio",
                "p50 ratio",
            ],
            [
                [
                    c["name"],
                    c["plain_rps"],
                    c["budgeted_rps"],
                    f"{c['rps_ratio']:.3f}",
                    f"{c['gateway_cpu_ratio']:.3f}",
                    f"{c['postgres_cpu_ratio']:.3f}",
                    f"{c['p50_ratio']:.3f}",
                ]
                for c in comparison
            ],
        )
    print(f"\nbilling check: {check}")
    if profile:
        common.print_table(
            "py-spy: top frames by inclusive share (c=32 "
            + ("streaming" if args.profile_stream else "non-streaming")
            + ")",
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
            "gateway_processes": args.workers,
            "args": vars(args),
            "results": results,
            "summary": summary,
            "budget_comparison": comparison,
            "billing_check": check,
            "profile": profile,
        },
    )
    if not check["ok"]:
        raise SystemExit("billing check failed: see above")


def run_one(
    args: argparse.Namespace,
    sc: dict[str, Any],
    mock: Any,
    gateway: common.Gateway,
    keys: dict[str, list[str]] | None,
) -> dict[str, Any]:
    """One scenario's load, with the CPU the gateway and PostgreSQL spent on it."""
    anthropic = sc.get("anthropic", False)
    if sc["target"] == "direct":
        url = f"{mock.url}/v1/messages" if anthropic else f"{mock.url}/v1/chat/completions"
        run_keys = ["direct"] if anthropic else []
        model = "mock-model"
    else:
        assert keys is not None
        url = f"{gateway.url}/v1/messages" if anthropic else f"{gateway.url}/v1/chat/completions"
        run_keys = keys["hot"] if sc.get("hot") else keys["spread"][: max(1, sc["accounts"])]
        model = common.BENCH_ANTHROPIC_MODEL if anthropic else common.BENCH_MODEL
    cpu_before = common.proc_tree_cpu_seconds(gateway.pid)
    postgres_before = common.postgres_backends_cpu()
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
    postgres_cpu = common.postgres_cpu_since(postgres_before)
    if sc["target"] == "gateway":
        served = max(1, out["ok"] + out["warmup_ok"])
        out["gateway_cpu_ms_per_request"] = 1000 * gateway_cpu / served
        out["postgres_cpu_ms_per_request"] = 1000 * postgres_cpu / served
    return out


SUMMED = ("ok", "requests", "warmup_ok")
MEDIANS = (
    "rps",
    "p50_ms",
    "p99_ms",
    "ttfb_p50_ms",
    "gateway_cpu_ms_per_request",
    "postgres_cpu_ms_per_request",
)


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario and set of keys: counts summed over the rounds, medians of the
    rest (with one round, the run itself)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["name"], r["keys"]), []).append(r)
    summary = []
    for runs in groups.values():
        row = {k: v for k, v in runs[0].items() if k not in ("round",)}
        row["rounds"] = len(runs)
        for k in SUMMED:
            row[k] = sum(r[k] for r in runs)
        for k in MEDIANS:
            if k in runs[0]:
                row[k] = statistics.median(r[k] for r in runs)
        summary.append(row)
    return summary


def budget_comparison(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per gateway scenario: medians of both sides and of the per-round ratios budgeted/plain."""
    by: dict[tuple[str, int, str], dict[str, Any]] = {
        (r["name"], r["round"], r["keys"]): r for r in results if r["target"] == "gateway"
    }
    names = list(dict.fromkeys(r["name"] for r in results if r["target"] == "gateway"))
    out = []
    for name in names:
        pairs = [
            (by[(name, rnd, "plain")], by[(name, rnd, "budgeted")])
            for (n, rnd, k) in by
            if n == name and k == "plain" and (name, rnd, "budgeted") in by
        ]
        if not pairs:
            continue

        def ratio(key: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]] = pairs) -> float:
            return statistics.median(b[key] / p[key] if p[key] else 0.0 for p, b in pairs)

        out.append(
            {
                "name": name,
                "rounds": len(pairs),
                "plain_rps": statistics.median(p["rps"] for p, _ in pairs),
                "budgeted_rps": statistics.median(b["rps"] for _, b in pairs),
                "rps_ratio": ratio("rps"),
                "gateway_cpu_ratio": ratio("gateway_cpu_ms_per_request"),
                "postgres_cpu_ratio": ratio("postgres_cpu_ms_per_request"),
                "p50_ratio": ratio("p50_ms"),
            }
        )
    return out


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
        "stream": args.profile_stream,
        "body": body(model=common.BENCH_MODEL, stream=args.profile_stream),
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
