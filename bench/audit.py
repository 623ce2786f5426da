"""Audit: billing.selectors.ledger_audit against 1,000,000 ledger legs; time and peak memory.

    .venv/bin/python -m bench.audit [--legs 1000000] [--accounts 10000] [--tracemalloc]

On a freshly migrated bench database: --accounts customer accounts with a balanced opening
grant each, then usage transactions generated in SQL (INSERT ... SELECT generate_series) in
chunks of 100,000 transactions, each with exactly two legs (customer -x, revenue +x) and the
key and content hash the engine would give it, written in the same statement as its
transaction: the deferred triggers (balanced legs, at least two legs per transaction) stay on
and check every one of them at commit. Each account's cached
balance is then set to the sum of its legs. The opening grants' legs count towards --legs.

Then ledger_audit() runs in this process: wall time, peak RSS growth (sampled from /proc every
50 ms) and, with --tracemalloc, the peak of Python allocations. The audit must come out clean;
a second run with one account's cached balance nudged must report exactly that account.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from typing import Any

from bench import common

CHUNK = 100_000


def usage_legs_generate(conn: Any, *, transactions: int, account_ids: list[int]) -> float:
    started = time.perf_counter()
    done = 0
    while done < transactions:
        n = min(CHUNK, transactions - done)
        with conn.transaction():
            conn.execute(
                """
                WITH src AS MATERIALIZED (
                    SELECT 'bench-' || g AS request_id,
                           (%(ids)s::bigint[])[1 + g %% %(n_accounts)s] AS account_id,
                           1000 + g %% 9973 AS amount
                    FROM generate_series(%(first)s::bigint, %(last)s::bigint) g
                ), txn AS (
                    INSERT INTO billing_ledgertransaction (kind, idempotency_key, content_hash,
                        request_id, memo, occurred_at, posted_at, model_alias, is_overrun, is_late)
                    SELECT 'usage', billing_engine.request_key(request_id),
                           billing_engine.posting_hash('usage', ARRAY[account_id, -1],
                               ARRAY[-amount, amount], request_id, NULL),
                           request_id, '', now(), now(), 'bench-model', false, false
                    FROM src
                    RETURNING id, request_id
                )
                INSERT INTO billing_ledgerleg (transaction_id, account_id, amount)
                SELECT txn.id, src.account_id, -src.amount FROM txn JOIN src USING (request_id)
                UNION ALL
                SELECT txn.id, -1, src.amount FROM txn JOIN src USING (request_id)
                """,
                {
                    "first": done + 1,
                    "last": done + n,
                    "ids": account_ids,
                    "n_accounts": len(account_ids),
                },
            )
        done += n
        print(f"  {2 * done:,} usage legs", flush=True)
    conn.execute(
        """
        UPDATE billing_account a SET balance = s.total
        FROM (SELECT account_id, sum(amount) AS total FROM billing_ledgerleg GROUP BY account_id) s
        WHERE a.id = s.account_id AND a.kind = 'customer'
        """
    )
    conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def audit_measure(*, use_tracemalloc: bool) -> dict[str, Any]:
    from billing.selectors import ledger_audit

    if use_tracemalloc:
        tracemalloc.start()
    with common.RssSampler() as sampler:
        started = time.perf_counter()
        report = ledger_audit()
        seconds = time.perf_counter() - started
    out = {
        "seconds": seconds,
        "accounts_checked": report.accounts_checked,
        "mismatches": len(report.mismatches),
        "unbalanced_transactions": len(report.unbalanced_transactions),
        "clean": report.clean,
        "rss_start_mb": common.mb(sampler.start_rss),
        "rss_peak_growth_mb": common.mb(sampler.peak - sampler.start_rss),
    }
    if use_tracemalloc:
        out["tracemalloc_peak_mb"] = common.mb(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--legs", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--tracemalloc", action="store_true")
    args = parser.parse_args()

    print("resetting the bench database ...", flush=True)
    common.database_reset()
    with common.raw_connect() as conn:
        account_ids = [
            account_id
            for account_id, _ in common.accounts_bulk_create(
                conn, count=args.accounts, credits_usd=1000
            )
        ]
        usage_transactions = max(0, (args.legs - 2 * args.accounts) // 2)
        generate_seconds = usage_legs_generate(
            conn, transactions=usage_transactions, account_ids=account_ids
        )
        legs = conn.execute("SELECT count(*) FROM billing_ledgerleg").fetchone()[0]
    print(f"{legs:,} legs in place ({generate_seconds:.1f} s to generate, trigger on)", flush=True)

    common.django_setup()
    clean = audit_measure(use_tracemalloc=args.tracemalloc)
    with common.raw_connect() as conn:
        conn.execute(
            "UPDATE billing_account SET balance = balance + 1 WHERE id = %s",
            (account_ids[len(account_ids) // 2],),
        )
    nudged = audit_measure(use_tracemalloc=False)

    rows = [
        [
            "clean ledger",
            legs,
            clean["accounts_checked"],
            clean["seconds"],
            clean["rss_peak_growth_mb"],
            clean.get("tracemalloc_peak_mb", "-"),
            clean["mismatches"],
            clean["unbalanced_transactions"],
        ],
        [
            "one balance nudged",
            legs,
            nudged["accounts_checked"],
            nudged["seconds"],
            nudged["rss_peak_growth_mb"],
            "-",
            nudged["mismatches"],
            nudged["unbalanced_transactions"],
        ],
    ]
    common.print_table(
        "Audit: ledger_audit() (cached balances and holds vs legs, unbalanced transactions)",
        [
            "run",
            "legs",
            "accounts",
            "seconds",
            "RSS growth MB",
            "tracemalloc MB",
            "mismatches",
            "unbalanced",
        ],
        rows,
    )
    ok = clean["clean"] and nudged["mismatches"] == 1
    common.write_results(
        "audit",
        {
            "machine": common.machine_info(),
            "args": vars(args),
            "legs": legs,
            "generate_seconds": generate_seconds,
            "clean_run": clean,
            "nudged_run": nudged,
            "ok": ok,
        },
    )
    if not ok:
        raise SystemExit("the audit did not find exactly the one nudged account")


if __name__ == "__main__":
    main()
