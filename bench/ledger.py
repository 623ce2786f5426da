"""Ledger throughput: hold place + settle pairs per second, the services against raw SQL.

    .venv/bin/python -m bench.ledger [--workers 32] [--ops 150] [--accounts 10000] [--repeat 1]
        [--placements hot,spread] [--keys plain,budgeted]

32 worker processes (forked; each with its own PostgreSQL connection) each run `--ops`
place+settle pairs after a short warm-up, all released together by a barrier, in up to eight
scenarios in one run (placement x keys x services/raw):

- services: billing.services.holds.hold_place then hold_settle (with a usage record, as the
  gateway calls them): each one call of the money engine (billing/sql/engine_0002.sql);
- raw SQL: the minimal equivalent on tables of the same shape (bench_raw_account /
  bench_raw_key / bench_raw_hold / bench_raw_entry): place = one conditional
  `UPDATE account SET held = held + x WHERE available >= x` and one INSERT; settle = one
  conditional `UPDATE account SET balance = balance - cost, held = held - x WHERE held >= x`
  and one INSERT; each operation its own BEGIN ... COMMIT;
- hot: every worker on the same account (and key); spread: a random one of `--accounts`
  accounts (10,000) per pair;
- plain keys have no budget; budgeted keys (a second set of `--accounts` accounts) have a
  budget of 1,000,000 USD a month, never reached. The engine reads the key's row itself (the
  ApiKey the workers pass is a stub with pk and account_id) and moves budget_held and
  budget_spent on it; the raw baseline adds one conditional
  `UPDATE key SET budget_held = budget_held + x WHERE limit >= spent + held + x` to the place
  and one `UPDATE key SET budget_held = budget_held - x, budget_spent = budget_spent + cost`
  to the settle.

Pairs/s = all pairs / (last worker's end - first worker's start); also CPU ms per pair of the
workers and of their PostgreSQL backends. The ratio services/raw (same placement, same keys)
is what the issue's 70% target is about. `--repeat N` runs every scenario N times, raw and
services alternating; the table shows the best of N. Afterwards: no active hold, every
budget_held back to 0, and the ledger audit clean (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import random
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from bench import common

HOLD_USD = Decimal("0.05")
COST_USD = Decimal("0.01")
CREDITS_USD = 1_000_000
BUDGET_LIMIT_USD = 1_000_000  # a month: never reached, so no budgeted pair is refused


def _services_worker(
    index: int,
    run: str,
    keys: list[tuple[int, int]],
    budgeted: bool,
    ops: int,
    barrier: Any,
    out: Any,
) -> None:
    # One connection per worker: with room to grow, the pool opens a second one when the
    # first statement comes before its background connect is done (PostgreSQL's 100
    # connections are shared with whatever else runs on this server).
    os.environ["DB_POOL_MIN_SIZE"] = os.environ["DB_POOL_MAX_SIZE"] = "1"
    common.django_setup()
    from django.db import connection
    from django.utils import timezone

    from billing.models import ApiKey
    from billing.pricing import Usage
    from billing.services.holds import RequestDetails, hold_place, hold_settle

    rng = random.Random(index)
    usage = Usage(input_tokens=120, output_tokens=40)
    # Stubs, made before the clock starts as the gateway's come from its key cache: the engine
    # reads the key's status and budget from its row.
    stubs = {key_id: ApiKey(pk=key_id, account_id=account_id) for account_id, key_id in keys}

    def pair(i: int) -> None:
        _, key_id = keys[0] if len(keys) == 1 else rng.choice(keys)
        api_key = stubs[key_id]
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
    index: int,
    run: str,
    keys: list[tuple[int, int]],
    budgeted: bool,
    ops: int,
    barrier: Any,
    out: Any,
) -> None:
    conn = common.raw_connect()
    rng = random.Random(index)
    hold = int(HOLD_USD * common.UNITS_PER_USD)
    cost = int(COST_USD * common.UNITS_PER_USD)

    def pair(i: int) -> None:
        account_id, key_id = keys[0] if len(keys) == 1 else rng.choice(keys)
        request_id = f"{run}-{index}-{i}"
        with conn.transaction():
            placed = conn.execute(
                "UPDATE bench_raw_account SET held = held + %s "
                "WHERE id = %s AND status = 'active' AND balance - held + overdraft >= %s",
                (hold, account_id, hold),
            ).rowcount
            if not placed:
                raise RuntimeError("raw place refused")
            if (
                budgeted
                and not conn.execute(
                    "UPDATE bench_raw_key SET budget_held = budget_held + %s "
                    "WHERE id = %s AND budget_limit >= budget_spent + budget_held + %s",
                    (hold, key_id, hold),
                ).rowcount
            ):
                raise RuntimeError("raw budget refused")
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
            if budgeted:
                conn.execute(
                    "UPDATE bench_raw_key SET budget_held = budget_held - %s, "
                    "budget_spent = budget_spent + %s WHERE id = %s",
                    (hold, cost, key_id),
                )
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
    *, kind: str, run: str, keys: list[tuple[int, int]], budgeted: bool, workers: int, ops: int
) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(workers)
    out = ctx.Queue()
    target = _services_worker if kind == "services" else _raw_worker
    procs = [
        ctx.Process(target=target, args=(i, run, keys, budgeted, ops, barrier, out))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    results: list[tuple[Any, ...]] = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            # A worker that died (a refused connection: PostgreSQL's max_connections is shared
            # with whatever else runs on the server) would leave the others at the barrier.
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                barrier.abort()
                for p in procs:
                    p.terminate()
                raise SystemExit(
                    f"{len(dead)} {kind} worker(s) died (exit {dead[0].exitcode}): see above"
                ) from None
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


def raw_tables_create(
    conn: Any, plain: list[tuple[int, int]], budgeted: list[tuple[int, int]]
) -> None:
    conn.execute("""
        DROP TABLE IF EXISTS bench_raw_key, bench_raw_hold, bench_raw_entry, bench_raw_account;
        CREATE TABLE bench_raw_account (
            id bigint PRIMARY KEY, status varchar(16) NOT NULL, balance bigint NOT NULL,
            held bigint NOT NULL CHECK (held >= 0), overdraft bigint NOT NULL);
        CREATE TABLE bench_raw_key (
            id bigint PRIMARY KEY, account_id bigint NOT NULL REFERENCES bench_raw_account (id),
            budget_limit bigint NOT NULL, budget_spent bigint NOT NULL,
            budget_held bigint NOT NULL CHECK (budget_held >= 0));
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
        (CREDITS_USD * common.UNITS_PER_USD, [a for a, _ in plain + budgeted]),
    )
    conn.execute(
        "INSERT INTO bench_raw_key SELECT k, a, %s, 0, 0 FROM unnest(%s::bigint[], %s::bigint[]) "
        "AS t(a, k)",
        (
            BUDGET_LIMIT_USD * common.UNITS_PER_USD,
            [a for a, _ in budgeted],
            [k for _, k in budgeted],
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--ops", type=int, default=150, help="place+settle pairs per worker")
    parser.add_argument("--accounts", type=int, default=10_000, help="per set of keys")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--placements", default="hot,spread", help="comma-separated: hot, spread (default both)"
    )
    parser.add_argument(
        "--keys", default="plain,budgeted", help="comma-separated: plain, budgeted (default both)"
    )
    args = parser.parse_args()
    placements = [p for p in ("hot", "spread") if p in args.placements.split(",")]
    key_sets = [k for k in ("plain", "budgeted") if k in args.keys.split(",")]
    if not placements or not key_sets:
        parser.error("--placements and --keys each need at least one known value")

    print("resetting the bench database ...", flush=True)
    common.database_reset()
    with common.raw_connect() as conn:
        keys = {
            key_set: common.accounts_bulk_create(
                conn,
                count=args.accounts,
                credits_usd=CREDITS_USD,
                tag=f"bench-{key_set}",
                budget_limit_usd=BUDGET_LIMIT_USD if key_set == "budgeted" else None,
            )
            for key_set in key_sets
        }
        raw_tables_create(conn, keys.get("plain", []), keys.get("budgeted", []))
        conn.execute("VACUUM ANALYZE")
    print(
        f"{args.accounts} accounts per set of keys ({', '.join(key_sets)}); "
        f"{args.workers} worker processes x {args.ops} pairs",
        flush=True,
    )

    results: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for key_set in key_sets:
            for placement in placements:
                scenario_keys = keys[key_set][:1] if placement == "hot" else keys[key_set]
                for kind in ("raw", "services") if rep % 2 == 0 else ("services", "raw"):
                    run = f"{kind[0]}{key_set[0]}{placement[0]}{rep}"
                    r = run_scenario(
                        kind=kind,
                        run=run,
                        keys=scenario_keys,
                        budgeted=key_set == "budgeted",
                        workers=args.workers,
                        ops=args.ops,
                    )
                    r.update(kind=kind, placement=placement, keys=key_set, repeat=rep)
                    results.append(r)
                    print(
                        f"  {kind:<9} {placement:<7} {key_set:<9} "
                        f"{r['pairs_per_second']:8.0f} pairs/s "
                        f"({r['pairs']} pairs in {r['seconds']:.2f} s, {r['errors']} errors; "
                        f"CPU ms/pair: client {r['client_cpu_ms_per_pair']:.2f}, "
                        f"postgres {r['postgres_cpu_ms_per_pair']:.2f})",
                        flush=True,
                    )

    def best(kind: str, placement: str, key_set: str) -> float:
        return max(
            r["pairs_per_second"]
            for r in results
            if (r["kind"], r["placement"], r["keys"]) == (kind, placement, key_set)
        )

    summary: list[dict[str, Any]] = []
    for key_set in key_sets:
        for placement in placements:
            raw_best = best("raw", placement, key_set)
            svc_best = best("services", placement, key_set)
            summary.append(
                {
                    "placement": placement,
                    "keys": key_set,
                    "raw_pairs_per_second": raw_best,
                    "services_pairs_per_second": svc_best,
                    "ratio": svc_best / raw_best,
                }
            )
    common.print_table(
        f"Ledger: place+settle pairs/s, {args.workers} worker processes (best of {args.repeat})",
        ["placement", "keys", "raw SQL pairs/s", "services pairs/s", "services/raw"],
        [
            [
                s["placement"],
                s["keys"],
                s["raw_pairs_per_second"],
                s["services_pairs_per_second"],
                f"{100 * s['ratio']:.0f}%",
            ]
            for s in summary
        ],
    )

    # Every worker has exited: this process may open its own connection now.
    common.django_setup()
    from billing.selectors import ledger_audit

    with common.raw_connect() as conn:
        active = conn.execute(
            "SELECT count(*) FROM billing_hold WHERE state = 'active'"
        ).fetchone()[0]
        budget_held = conn.execute(
            "SELECT coalesce(sum(budget_held), 0) FROM billing_apikey"
        ).fetchone()[0]
    audit_clean = ledger_audit().clean
    errors = sum(r["errors"] for r in results)
    check = {
        "active_holds_left": active,
        "budget_held_left_units": int(budget_held),
        "audit_clean": audit_clean,
        "errors": errors,
        "ok": active == 0 and budget_held == 0 and audit_clean and errors == 0,
    }
    print(f"\ncheck: {check}")
    common.write_results(
        "ledger",
        {
            "machine": common.machine_info(),
            "args": vars(args),
            "results": results,
            "summary": summary,
            "check": check,
        },
    )
    if not check["ok"]:
        raise SystemExit("check failed: see above")


if __name__ == "__main__":
    main()
