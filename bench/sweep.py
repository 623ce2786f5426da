"""Sweep: expire 100,000 and 1,000,000 stale holds into the reconciliation queue; time, peak
memory, and how time grows.

    .venv/bin/python -m bench.sweep [--sizes 100000,1000000] [--accounts 10000]
        [--batch-size 10000] [--tracemalloc]

What is measured is the production sweep, reconciliation.services.sweeps
.holds_expire_and_queue(now=, batch_size=): one call of the engine's
reconciliation_engine.holds_expire_and_queue per batch, each its own transaction, which
expires the batch's holds (releasing what each held on its account) and queues one
expired-hold reconciliation item per hold. (billing's own holds_expire is gone: the sweep is
the only way a hold expires.)

For each size N, on a freshly migrated bench database: N active holds whose expiry has passed
are bulk-inserted with one INSERT ... SELECT generate_series (spread over --accounts accounts,
each with the account's API key, and each account's `held` set to exactly the sum of its
holds, so the audit stays clean), the tables are ANALYZEd, then the sweep runs in this process.

Reported: wall time, holds/s, the growth factor of time between sizes (10x holds should cost
about 10x time), peak RSS growth of this process during the sweep (sampled from /proc every
50 ms; the memory claim is that it does not grow with N) and, with --tracemalloc, the peak of
Python allocations (slower). Afterwards it checks that no hold is left active, every account's
`held` is back to zero and every hold was queued once (exit status 1 otherwise).

--queue-sizes, from when two sweeps were measured, is still accepted: its sizes are added to
--sizes.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from datetime import timedelta
from typing import Any

from bench import common


def holds_bulk_insert(conn: Any, *, count: int, accounts: list[tuple[int, int]], tag: str) -> None:
    with conn.transaction():
        conn.execute(
            """
            INSERT INTO billing_hold (request_id, account_id, api_key_id, model_alias, amount,
                budgeted, state, created_at, expires_at, is_overrun, is_late)
            SELECT %(tag)s || '-' || g, (%(accounts)s::bigint[])[1 + g %% %(n_accounts)s],
                   (%(keys)s::bigint[])[1 + g %% %(n_accounts)s],
                   'bench-model', 1000000 + (g %% 997) * 1000, false, 'active',
                   now() - interval '2 hours',
                   now() - interval '1 hour' + (g %% 3600) * interval '1 ms',
                   false, false
            FROM generate_series(1, %(count)s::integer) g
            """,
            {
                "tag": tag,
                "accounts": [a for a, _ in accounts],
                "keys": [k for _, k in accounts],
                "n_accounts": len(accounts),
                "count": count,
            },
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
    conn.execute("ANALYZE reconciliation_reconciliationitem")


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
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated hold counts")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument(
        "--batch-size", type=int, default=10_000, help="holds per batch (the sweep's default)"
    )
    parser.add_argument(
        "--queue-sizes", default="", help="old name: these sizes are added to --sizes"
    )
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in f"{args.sizes},{args.queue_sizes}".split(",") if s.strip()})
    if not sizes:
        parser.error("no sizes")

    print("resetting the bench database ...", flush=True)
    common.database_reset()
    common.django_setup()
    from django.db import connection
    from django.utils import timezone

    from reconciliation.services.sweeps import holds_expire_and_queue

    with common.raw_connect() as conn:
        accounts = common.accounts_bulk_create(conn, count=args.accounts, credits_usd=100)
    results: list[dict[str, Any]] = []
    for size in sizes:
        tag = f"sweep-{size}"
        with common.raw_connect() as conn:
            t = time.perf_counter()
            holds_bulk_insert(conn, count=size, accounts=accounts, tag=tag)
            insert_seconds = time.perf_counter() - t
        now = timezone.now() + timedelta(seconds=1)
        out = measure(
            lambda: holds_expire_and_queue(now=now, batch_size=args.batch_size),  # noqa: B023
            use_tracemalloc=args.tracemalloc,
        )
        connection.close()
        with common.raw_connect() as conn:
            active = conn.execute(
                "SELECT count(*) FROM billing_hold WHERE state = 'active'"
            ).fetchone()[0]
            held = conn.execute("SELECT coalesce(sum(held), 0) FROM billing_account").fetchone()[0]
            items = conn.execute(
                "SELECT count(*) FROM reconciliation_reconciliationitem "
                "WHERE kind = 'expired_hold' AND request_id LIKE %s",
                (f"{tag}-%",),
            ).fetchone()[0]
        row = {
            "sweep": "holds_expire_and_queue",
            "holds": size,
            "insert_seconds": insert_seconds,
            **out,
            "holds_per_second": size / out["seconds"],
            "active_left": active,
            "held_left_units": int(held),
            "items_queued": items,
            "ok": active == 0
            and held == 0
            and items == size
            and out["result"] == {"expired": size, "queued": size},
        }
        results.append(row)
        print(
            f"  {size:>9,} holds  {out['seconds']:7.2f} s  "
            f"{row['holds_per_second']:9,.0f} holds/s  rss +{out['rss_peak_growth_mb']} MB  "
            f"result {out['result']}  active left {active}, items {items}",
            flush=True,
        )

    rows = []
    for r in results:
        smaller = [p for p in results if p["holds"] < r["holds"]]
        growth = "-"
        if smaller:
            base = max(smaller, key=lambda p: p["holds"])
            growth = f"{r['seconds'] / base['seconds']:.1f}x for {r['holds'] / base['holds']:g}x"
            r["time_growth"] = r["seconds"] / base["seconds"]
        rows.append(
            [
                r["holds"],
                r["seconds"],
                r["holds_per_second"],
                growth,
                r["rss_peak_growth_mb"],
                r.get("tracemalloc_peak_mb", "-"),
                "yes" if r["ok"] else "NO",
            ]
        )
    common.print_table(
        f"Sweep: holds_expire_and_queue (batches of {args.batch_size:,}, one transaction each)",
        [
            "holds",
            "seconds",
            "holds/s",
            "time growth",
            "RSS growth MB",
            "tracemalloc MB",
            "all expired and queued",
        ],
        rows,
    )
    common.write_results(
        "sweep", {"machine": common.machine_info(), "args": vars(args), "results": results}
    )
    if not all(r["ok"] for r in results):
        raise SystemExit("a hold was left active, a held amount left, or an item missing")


if __name__ == "__main__":
    main()
