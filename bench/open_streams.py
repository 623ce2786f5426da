"""Open streams: 1,000 concurrent slow streams through one gateway process; peak RSS and CPU.

    .venv/bin/python -m bench.open_streams [--streams 1000] [--tokens 50] [--delay-ms 200]
        [--accounts 10]

One uvicorn worker process (production settings, uvloop, httptools, no access log) in front
of the shipped mock upstream, on a freshly migrated bench database. The load generator opens
--streams streaming chat completions at once (each `[mock:tokens=50] [mock:delay_ms=200]`,
about 10 s long), spread over --accounts accounts, and reads them to the end.

Reported for the gateway process (from /proc): RSS before, peak RSS while the streams were
open (sampled every 50 ms, and the kernel's VmHWM), peak thread count, CPU seconds used and
the average CPU share of one core; plus how many streams ended properly, their p50/p99
duration and time to first byte, and the billing check (one usage posting per completed
stream, no active hold, ledger audit clean).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--delay-ms", type=int, default=200)
    parser.add_argument("--accounts", type=int, default=10)
    args = parser.parse_args()

    print("resetting the bench database ...", flush=True)
    common.database_reset()
    common.django_setup()
    mock = common.start_mock()
    keys = common.gateway_seed(mock=mock, accounts=args.accounts)["plain"]
    gateway = common.start_gateway()
    print(f"gateway pid {gateway.pid} (1 uvicorn worker process)", flush=True)
    try:
        # One short request first so imports and the pool are warm, as in production.
        warm = common.run_load(
            {
                "url": f"{gateway.url}/v1/chat/completions",
                "keys": [k[1] for k in keys],
                "stream": True,
                "concurrency": 4,
                "requests": 20,
                "warmup": 0,
                "body": {
                    "model": common.BENCH_MODEL,
                    "stream": True,
                    "max_tokens": 256,
                    "messages": [{"role": "user", "content": "warm up [mock:tokens=4]"}],
                },
            }
        )
        rss_before = common.proc_rss_bytes(gateway.pid)
        cpu_before = common.proc_cpu_seconds(gateway.pid)
        prompt = f"Stream slowly. [mock:tokens={args.tokens}] [mock:delay_ms={args.delay_ms}]"
        with common.RssSampler(gateway.pid) as sampler:
            started = time.perf_counter()
            load = common.run_load(
                {
                    "url": f"{gateway.url}/v1/chat/completions",
                    "keys": [k[1] for k in keys],
                    "stream": True,
                    "concurrency": args.streams,
                    "requests": args.streams,
                    "warmup": 0,
                    "timeout": 300,
                    "body": {
                        "model": common.BENCH_MODEL,
                        "stream": True,
                        "max_tokens": 256,
                        "messages": [{"role": "user", "content": prompt}],
                    },
                }
            )
            wall = time.perf_counter() - started
        cpu = common.proc_cpu_seconds(gateway.pid) - cpu_before
        hwm = common.proc_peak_rss_bytes(gateway.pid)
        time.sleep(1.0)
        check = common.billing_check(expected_usage=load["ok"] + warm["ok"])
    finally:
        gateway.stop()
        mock.stop()

    result: dict[str, Any] = {
        "streams": args.streams,
        "ok": load["ok"],
        "statuses": load["statuses"],
        "wall_seconds": wall,
        "p50_ms": load["p50_ms"],
        "p99_ms": load["p99_ms"],
        "ttfb_p50_ms": load["ttfb_p50_ms"],
        "ttfb_p99_ms": load["ttfb_p99_ms"],
        "rss_before_mb": common.mb(rss_before),
        "rss_peak_mb": common.mb(sampler.peak),
        "vm_hwm_mb": common.mb(hwm),
        "threads_peak": sampler.max_threads,
        "cpu_seconds": cpu,
        "cpu_share_of_one_core": cpu / wall,
    }
    common.print_table(
        f"Open streams: {args.streams} concurrent streams of {args.tokens} tokens, "
        f"{args.delay_ms} ms apart, through 1 gateway process",
        [
            "ok",
            "wall s",
            "p50 s",
            "p99 s",
            "ttfb p99 ms",
            "RSS before MB",
            "RSS peak MB",
            "threads peak",
            "CPU s",
            "CPU % of a core",
        ],
        [
            [
                result["ok"],
                wall,
                result["p50_ms"] / 1000,
                result["p99_ms"] / 1000,
                result["ttfb_p99_ms"],
                result["rss_before_mb"],
                result["rss_peak_mb"],
                result["threads_peak"],
                cpu,
                100 * result["cpu_share_of_one_core"],
            ]
        ],
    )
    print(f"\nbilling check: {check}")
    common.write_results(
        "open_streams",
        {
            "machine": common.machine_info(),
            "args": vars(args),
            "gateway_processes": 1,
            "result": result,
            "billing_check": check,
        },
    )
    if not check["ok"]:
        raise SystemExit("billing check failed: see above")


if __name__ == "__main__":
    main()
