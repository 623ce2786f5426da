"""Ledger throughput: hold place + settle pairs per second, the services against raw SQL.

    .venv/bin/python -m bench.ledger [--workers 32] [--ops 150] [--accounts 10000] [--repeat 1]

32 worker processes (forked; each with its own PostgreSQL connection) each run `--ops`
place+settle pairs after a short warm-up, all released together by a barrier, in four
scenarios in one run:

- services, hot: billing.services.holds.hold_place then hold_settle (with a usage record and
  the hold's account, as the gateway calls it), every worker on the same account;
- services, spread: the same over `--accounts` accounts (10,000), a random account per pair;
- raw SQL, hot / spread: the minimal equivalent on tables of the same shape
  (bench_raw_account / bench_raw_hold / bench_raw_entry): place = one conditional
  `UPDATE ... SET held = held + x WHERE available >= x` and one INSERT; settle = one conditional
  `UPDATE ... SET balance = balance - cost, held = held - x WHERE held >= x` and one INSERT;
  each operation its own BEGIN ... COMMIT, like the services' durable atomic blocks.

Pairs/s = all pairs / (last worker's end - first worker's start). The ratio services/raw is
what the issue's 70% target is about. `--repeat N` alternates raw and services N times.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from bench import common

HOLD_USD = Decimal("0.05")
COST_USD = Decimal("0.01")
CREDITS_USD = 1_000_000


def _services_worker(
    index: int, run: str, keys: list[tuple[int, int]], ops: int, barrier: Any, out: Any
) -> None:
    common.django_setup()
    from django.db import connection
    from django.utils import timezone

    from billing.models import ApiKey
    from billing.pricing import Usage
    from billing.services.holds import RequestDetails, hold_place, hold_settle

    rng = random.Random(index)
    usage = Usage(input_tokens=120, output_tokens=40)

    def pair(i: int) -> None:
        key_id, account_id = keys[0] if len(keys) == 1 else rng.choice(keys)
        api_key = ApiKey(pk=key_id, account_id=account_id, budget_limit=None, budget_period="")
        request_id = f"{run}-{index}-{i}"
        now = timezone.now()
        hold_place(
            api_key=api_key,
            request_id=request_id,
            amount=HOLD_USD,
            now=now,
            model_alias="bench-model",
        )
        hold_settle(
            request_id=request_id,
            account_id=account_id,
            cost=COST_USD,
            now=timezone.now(),
            usage=usage,
            details=RequestDetails(
                endpoint="chat.completions", started_at=now, outcome="completed"
            ),
        )

    def backend_pid() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return int(cursor.fetchone()[0])

    _timed(index, pair, ops, barrier, out, backend_pid)


def _raw_worker(
    index: int, run: str, keys: list[tuple[int, int]], ops: int, barrier: Any, out: Any
) -> None:
    conn = common.raw_connect()
    rng = random.Random(index)
    hold = int(HOLD_USD * common.UNITS_PER_USD)
    cost = int(COST_USD * common.UNITS_PER_USD)

    def pair(i: int) -> None:
        _, account_id = keys[0] if len(keys) == 1 else rng.choice(keys)
        request_id = f"{run}-{index}-{i}"
        with conn.transaction():
            placed = conn.execute(
                "UPDATE bench_raw_account SET held = held + %s "
                "WHERE id = %s AND status = 'active' AND balance - held + overdraft >= %s",
                (hold, account_id, hold),
            ).rowcount
            if not placed:
                raise RuntimeError("raw place refused")
            conn.execute(
                "INSERT INTO bench_raw_hold (request_id, account_id, amount, created_at) "
                "VALUES (%s, %s, %s, now())",
                (request_id, account_id, hold),
            )
        with conn.transaction():
            settled = conn.execute(
                "UPDATE bench_raw_account SET balance = balance - %s, held = held - %s "
                "WHERE id = %s AND held >= %s",
                (cost, hold, account_id, hold),
            ).rowcount
            if not settled:
                raise RuntimeError("raw settle refused")
            conn.execute(
                "INSERT INTO bench_raw_entry (request_id, account_id, amount, created_at) "
                "VALUES (%s, %s, %s, now())",
                (request_id, account_id, -cost),
            )

    def backend_pid() -> int:
        return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])

    _timed(index, pair, ops, barrier, out, backend_pid)


def _timed(
    index: int, pair: Any, ops: int, barrier: Any, out: Any, backend_pid: Callable[[], int]
) -> None:
    for i in range(3):  # warm-up: connection, prepared statements, imports
        pair(-1 - i)
    backend = backend_pid()
    barrier.wait()
    client_cpu = time.process_time()
    backend_cpu = common.proc_cpu_seconds(backend)
    started = time.perf_counter()
    errors = 0
    for i in range(ops):
        try:
            pair(i)
        except Exception as exc:
            errors += 1
            if errors == 1:
                print(f"worker {index}: {type(exc).__name__}: {exc}", flush=True)
    ended = time.perf_counter()
    out.put(
        (
            started,
            ended,
            ops - errors,
            errors,
            time.process_time() - client_cpu,
            common.proc_cpu_seconds(backend) - backend_cpu,
        )
    )


def run_scenario(
    *, kind: str, run: str, keys: list[tuple[int, int]], workers: int, ops: int
) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(workers)
    out = ctx.Queue()
    target = _services_worker if kind == "services" else _raw_worker
    procs = [
        ctx.Process(target=target, args=(i, run, keys, ops, barrier, out)) for i in range(workers)
    ]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    done = sum(r[2] for r in results)
    return {
        "pairs": done,
        "errors": sum(r[3] for r in results),
        "seconds": end - start,
        "pairs_per_second": done / (end - start),
        # CPU per pair: the worker processes' own, and their PostgreSQL backends'.
        "client_cpu_ms_per_pair": 1000 * sum(r[4] for r in results) / max(done, 1),
        "postgres_cpu_ms_per_pair": 1000 * sum(r[5] for r in results) / max(done, 1),
    }


def raw_tables_create(conn: Any, account_ids: list[int]) -> None:
    conn.execute("""
        DROP TABLE IF EXISTS bench_raw_account, bench_raw_hold, bench_raw_entry;
        CREATE TABLE bench_raw_account (
            id bigint PRIMARY KEY, status varchar(16) NOT NULL, balance bigint NOT NULL,
            held bigint NOT NULL CHECK (held >= 0), overdraft bigint NOT NULL);
        CREATE TABLE bench_raw_hold (
            id bigserial PRIMARY KEY, request_id varchar(64) NOT NULL UNIQUE,
            account_id bigint NOT NULL REFERENCES bench_raw_account (id),
            amount bigint NOT NULL, created_at timestamptz NOT NULL);
        CREATE TABLE bench_raw_entry (
            id bigserial PRIMARY KEY, request_id varchar(64) NOT NULL UNIQUE,
            account_id bigint NOT NULL REFERENCES bench_raw_account (id),
            amount bigint NOT NULL, created_at timestamptz NOT NULL);
    """)
    conn.execute(
        "INSERT INTO bench_raw_account SELECT id, 'active', %s, 0, 0 FROM unnest(%s::bigint[]) id",
        (CREDITS_USD * common.UNITS_PER_USD, account_ids),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--ops", type=int, default=150, help="place+settle pairs per worker")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--placements", default="hot,spread", help="comma-separated: hot, spread (default both)"
    )
    args = parser.parse_args()
    placements = [p for p in ("hot", "spread") if p in args.placements.split(",")]

    print("resetting the bench database ...", flush=True)
    common.database_reset()
    with common.raw_connect() as conn:
        account_ids = common.accounts_bulk_create(
            conn, count=args.accounts, credits_usd=CREDITS_USD
        )
        key_rows = conn.execute(
            "SELECT id, account_id FROM billing_apikey ORDER BY account_id"
        ).fetchall()
        raw_tables_create(conn, account_ids)
        conn.execute("VACUUM ANALYZE")
    keys = [(int(k), int(a)) for k, a in key_rows]
    hot = [keys[0]]
    print(
        f"{len(account_ids)} accounts seeded; {args.workers} worker processes x {args.ops} pairs",
        flush=True,
    )

    results: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for placement, scenario_keys in (("hot", hot), ("spread", keys)):
            if placement not in placements:
                continue
            for kind in ("raw", "services"):
                run = f"{kind[0]}{placement[0]}{rep}"
                r = run_scenario(
                    kind=kind, run=run, keys=scenario_keys, workers=args.workers, ops=args.ops
                )
                r.update(kind=kind, placement=placement, repeat=rep)
                results.append(r)
                print(
                    f"  {kind:<9} {placement:<7} {r['pairs_per_second']:8.0f} pairs/s "
                    f"({r['pairs']} pairs in {r['seconds']:.2f} s, {r['errors']} errors; "
                    f"CPU ms/pair: client {r['client_cpu_ms_per_pair']:.2f}, "
                    f"postgres {r['postgres_cpu_ms_per_pair']:.2f})",
                    flush=True,
                )

    summary = []
    for placement in placements:
        raw = [
            r["pairs_per_second"]
            for r in results
            if r["kind"] == "raw" and r["placement"] == placement
        ]
        svc = [
            r["pairs_per_second"]
            for r in results
            if r["kind"] == "services" and r["placement"] == placement
        ]
        raw_best, svc_best = max(raw), max(svc)
        summary.append(
            {
                "placement": placement,
                "raw_pairs_per_second": raw_best,
                "services_pairs_per_second": svc_best,
                "ratio": svc_best / raw_best,
            }
        )
    common.print_table(
        f"Ledger: place+settle pairs/s, {args.workers} worker processes (best of {args.repeat})",
        ["placement", "raw SQL pairs/s", "services pairs/s", "services/raw"],
        [
            [
                s["placement"],
                s["raw_pairs_per_second"],
                s["services_pairs_per_second"],
                f"{100 * s['ratio']:.0f}%",
            ]
            for s in summary
        ],
    )
    with common.raw_connect() as conn:
        active = conn.execute(
            "SELECT count(*) FROM billing_hold WHERE state = 'active'"
        ).fetchone()[0]
    common.write_results(
        "ledger",
        {
            "machine": common.machine_info(),
            "args": vars(args),
            "results": results,
            "summary": summary,
            "active_holds_left": active,
        },
    )


if __name__ == "__main__":
    main()
