"""Sweep: expire 100,000 and 1,000,000 stale holds; time, peak memory, and how time grows.

    .venv/bin/python -m bench.sweep [--sizes 100000,1000000] [--accounts 10000]
        [--queue-sizes 100000] [--tracemalloc]

For each size N, on a freshly migrated bench database: N active holds whose expiry has passed
are bulk-inserted with one INSERT ... SELECT generate_series (spread over --accounts accounts,
with each account's `held` set to exactly the sum of its holds, so the audit stays clean), the
table is ANALYZEd, then the sweep under test runs in this process:

- billing.services.holds.holds_expire(now=...), and
- reconciliation.services.sweeps.holds_expire_and_queue(now=...) (also queues one
  reconciliation item per expired hold) on fresh holds, at --queue-sizes (default 100,000:
  it is several times slower; '' skips it).

Reported: wall time, holds/s, the growth factor of time between sizes (10x holds should cost
about 10x time), peak RSS growth of this process during the sweep (sampled from /proc every
50 ms; the memory claim is that it does not grow with N) and, with --tracemalloc, the peak of
Python allocations (slower). Afterwards it checks no hold is left active and every account's
`held` is back to zero.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from datetime import timedelta
from typing import Any

from bench import common


def holds_bulk_insert(conn: Any, *, count: int, account_ids: list[int], tag: str) -> None:
    with conn.transaction():
        conn.execute(
            """
            INSERT INTO billing_hold (request_id, account_id, model_alias, amount, budgeted,
                state, created_at, expires_at, is_overrun, is_late)
            SELECT %(tag)s || '-' || g, (%(ids)s::bigint[])[1 + g %% %(n_accounts)s],
                   'bench-model', 1000000 + (g %% 997) * 1000, false, 'active',
                   now() - interval '2 hours',
                   now() - interval '1 hour' + (g %% 3600) * interval '1 ms',
                   false, false
            FROM generate_series(1, %(count)s) g
            """,
            {"tag": tag, "ids": account_ids, "n_accounts": len(account_ids), "count": count},
        )
        conn.execute(
            """
            UPDATE billing_account a SET held = s.total
            FROM (SELECT account_id, sum(amount) AS total FROM billing_hold
                  WHERE state = 'active' GROUP BY account_id) s
            WHERE a.id = s.account_id
            """
        )
    conn.execute("ANALYZE billing_hold")
    conn.execute("ANALYZE billing_account")


def measure(fn: Any, *, use_tracemalloc: bool) -> dict[str, Any]:
    if use_tracemalloc:
        tracemalloc.start()
    with common.RssSampler() as sampler:
        started = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - started
    out = {
        "seconds": seconds,
        "result": result,
        "rss_start_mb": common.mb(sampler.start_rss),
        "rss_peak_growth_mb": common.mb(sampler.peak - sampler.start_rss),
    }
    if use_tracemalloc:
        out["tracemalloc_peak_mb"] = common.mb(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument(
        "--queue-sizes", default="100000", help="sizes for holds_expire_and_queue ('' to skip it)"
    )
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    print("resetting the bench database ...", flush=True)
    common.database_reset()
    common.django_setup()
    from django.db import connection
    from django.utils import timezone

    from billing.services.holds import holds_expire

    try:
        from reconciliation.services.sweeps import holds_expire_and_queue
    except ImportError:  # pragma: no cover - reconciliation not installed
        holds_expire_and_queue = None  # type: ignore[assignment]

    sweeps: list[tuple[str, Any]] = [("holds_expire", lambda now: holds_expire(now=now))]
    queue_sizes = [int(s) for s in args.queue_sizes.split(",") if s]
    if holds_expire_and_queue is not None and queue_sizes:
        sweeps.append(("holds_expire_and_queue", lambda now: holds_expire_and_queue(now=now)))

    with common.raw_connect() as conn:
        account_ids = common.accounts_bulk_create(conn, count=args.accounts, credits_usd=100)
    results: list[dict[str, Any]] = []
    for name, sweep in sweeps:
        for size in sizes if name == "holds_expire" else queue_sizes:
            with common.raw_connect() as conn:
                t = time.perf_counter()
                holds_bulk_insert(conn, count=size, account_ids=account_ids, tag=f"{name}-{size}")
                insert_seconds = time.perf_counter() - t
            now = timezone.now() + timedelta(seconds=1)
            out = measure(lambda: sweep(now), use_tracemalloc=args.tracemalloc)  # noqa: B023
            connection.close()
            with common.raw_connect() as conn:
                active = conn.execute(
                    "SELECT count(*) FROM billing_hold WHERE state = 'active'"
                ).fetchone()[0]
                held = conn.execute(
                    "SELECT coalesce(sum(held), 0) FROM billing_account"
                ).fetchone()[0]
            row = {
                "sweep": name,
                "holds": size,
                "insert_seconds": insert_seconds,
                **out,
                "holds_per_second": size / out["seconds"],
                "active_left": active,
                "held_left_units": int(held),
            }
            results.append(row)
            print(
                f"  {name:<24} {size:>9,} holds  {out['seconds']:7.2f} s  "
                f"{row['holds_per_second']:9,.0f} holds/s  rss +{out['rss_peak_growth_mb']} MB  "
                f"result {out['result']}  active left {active}",
                flush=True,
            )

    rows = []
    for r in results:
        smaller = [p for p in results if p["sweep"] == r["sweep"] and p["holds"] < r["holds"]]
        growth = "-"
        if smaller:
            base = max(smaller, key=lambda p: p["holds"])
            growth = f"{r['seconds'] / base['seconds']:.1f}x for {r['holds'] // base['holds']}x"
            r["time_growth"] = r["seconds"] / base["seconds"]
        rows.append(
            [
                r["sweep"],
                r["holds"],
                r["seconds"],
                r["holds_per_second"],
                growth,
                r["rss_peak_growth_mb"],
                r.get("tracemalloc_peak_mb", "-"),
                "yes" if r["active_left"] == 0 and r["held_left_units"] == 0 else "NO",
            ]
        )
    common.print_table(
        "Sweep: expiring stale holds (batches of 10,000, one short transaction each)",
        [
            "sweep",
            "holds",
            "seconds",
            "holds/s",
            "time growth",
            "RSS growth MB",
            "tracemalloc MB",
            "all expired",
        ],
        rows,
    )
    common.write_results(
        "sweep", {"machine": common.machine_info(), "args": vars(args), "results": results}
    )


if __name__ == "__main__":
    main()
