"""Real threads, each with its own database connection, racing on one account or one key."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum

from billing.errors import InsufficientFunds
from billing.models import Hold, LedgerTransaction
from billing.selectors import ledger_audit
from billing.services.accounts import credit_post
from billing.services.holds import hold_place, hold_settle
from tests.factories import make_account, make_key, request_key

pytestmark = pytest.mark.django_db(transaction=True)

D = Decimal


def race(workers: int, work: Callable[[int], Any]) -> list[tuple[str, Any]]:
    """Run `work(i)` in `workers` threads released together; return ("ok", value) or
    ("error", exception) per worker."""
    barrier = threading.Barrier(workers)
    outcomes: list[tuple[str, Any]] = [("missing", None)] * workers

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            outcomes[index] = ("ok", work(index))
        except Exception as exc:
            outcomes[index] = ("error", exc)
        finally:
            connection.close()  # this thread's connection, back to the pool

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a worker hung"
    return outcomes


@pytest.mark.parametrize(
    ("credits", "overdraft", "affordable"),
    [
        pytest.param("10", "0", 10, id="no-overdraft"),
        pytest.param("10", "5", 15, id="with-overdraft"),
    ],
)
def test_32_workers_never_spend_beyond_the_overdraft(
    now: datetime, credits: str, overdraft: str, affordable: int
) -> None:
    account = make_account(credits=D(credits), overdraft=D(overdraft), now=now)
    key = make_key(account=account, now=now).api_key
    run_id = uuid.uuid4().hex[:8]

    def place_and_settle(index: int) -> int | None:
        request_id = f"{run_id}-{index}"
        hold_place(api_key=key, request_id=request_id, amount=D("1"), now=now)
        # Settling at the full hold keeps each success's dollar spent: exactly `affordable` fit.
        return hold_settle(request_id=request_id, cost=D("1"), now=now).transaction_id

    outcomes = race(32, place_and_settle)

    refusals = [value for status, value in outcomes if status == "error"]
    assert all(isinstance(exc, InsufficientFunds) for exc in refusals), refusals
    settled = [value for status, value in outcomes if status == "ok"]
    assert len(settled) == affordable
    assert len(set(settled)) == affordable  # one posting each

    account.refresh_from_db()
    assert account.balance >= -account.overdraft
    assert account.held == 0
    assert account.balance == D(credits) - affordable
    charged = Hold.objects.filter(account=account, state=Hold.State.SETTLED).aggregate(
        total=Sum("settled_amount")
    )["total"]
    assert charged == D(credits) - account.balance
    report = ledger_audit()
    assert report.clean, report.as_json()


def test_32_workers_holding_concurrently_never_overcommit(now: datetime) -> None:
    # All holds stay open while the others race: held may never exceed balance + overdraft.
    account = make_account(credits=D("7.5"), overdraft=D("0.5"), now=now)
    key = make_key(account=account, now=now).api_key
    run_id = uuid.uuid4().hex[:8]

    outcomes = race(
        32,
        lambda index: (
            hold_place(api_key=key, request_id=f"{run_id}-{index}", amount=D("0.5"), now=now).pk
        ),
    )

    placed = [value for status, value in outcomes if status == "ok"]
    refusals = [value for status, value in outcomes if status == "error"]
    assert len(placed) == 16
    assert all(isinstance(exc, InsufficientFunds) for exc in refusals), refusals
    account.refresh_from_db()
    assert account.held == D(8)
    assert account.balance - account.held == -account.overdraft
    assert ledger_audit().clean


def test_8_workers_replaying_a_credit_post_the_effect_once(now: datetime) -> None:
    account = make_account(credits=D("0"), now=now)
    key = f"grant-{uuid.uuid4()}"

    outcomes = race(
        8,
        lambda _: credit_post(
            kind="grant",
            account_id=account.pk,
            amount=D("3"),
            memo="promo",
            idempotency_key=key,
            now=now,
        ),
    )

    assert [status for status, _ in outcomes] == ["ok"] * 8, outcomes
    transaction_ids = {value.transaction_id for _, value in outcomes}
    assert len(transaction_ids) == 1
    assert sorted(value.replayed for _, value in outcomes) == [False] + [True] * 7  # one post
    assert [t.pk for t in LedgerTransaction.objects.filter(idempotency_key=key)] == list(
        transaction_ids
    )
    account.refresh_from_db()
    assert account.balance == D(3)
    assert ledger_audit().clean


def test_8_workers_replaying_a_hold_place_get_one_hold(now: datetime) -> None:
    # The account affords exactly one hold: every replay must still get it, not a refusal.
    account = make_account(credits=D("2"), now=now)
    key = make_key(account=account, now=now).api_key
    request_id = f"req-{uuid.uuid4()}"

    outcomes = race(
        8, lambda _: hold_place(api_key=key, request_id=request_id, amount=D("2"), now=now).pk
    )

    assert [status for status, _ in outcomes] == ["ok"] * 8, outcomes
    assert len({value for _, value in outcomes}) == 1
    account.refresh_from_db()
    assert (account.balance, account.held) == (D(2), D(2))
    assert ledger_audit().clean


def test_8_workers_replaying_a_settle_charge_once(now: datetime) -> None:
    account = make_account(credits=D("5"), now=now)
    key = make_key(account=account, now=now).api_key
    request_id = f"req-{uuid.uuid4()}"
    hold_place(api_key=key, request_id=request_id, amount=D("2"), now=now)

    outcomes = race(
        8, lambda _: hold_settle(request_id=request_id, cost=D("1.25"), now=now).transaction_id
    )

    assert [status for status, _ in outcomes] == ["ok"] * 8, outcomes
    transaction_ids = {value for _, value in outcomes}
    assert len(transaction_ids) == 1
    assert None not in transaction_ids
    postings = LedgerTransaction.objects.filter(idempotency_key=request_key(request_id))
    assert [txn.pk for txn in postings] == list(transaction_ids)
    account.refresh_from_db()
    assert (account.balance, account.held) == (D("3.75"), D(0))
    assert ledger_audit().clean


def test_two_accounts_raced_at_once_stay_exact(now: datetime) -> None:
    # Interleaved postings on two accounts never deadlock and each account stays exact.
    accounts = [make_account(credits=D("8"), now=now) for _ in range(2)]
    keys = [make_key(account=account, now=now).api_key for account in accounts]
    run_id = uuid.uuid4().hex[:8]

    def work(index: int) -> None:
        request_id = f"{run_id}-{index}"
        hold_place(api_key=keys[index % 2], request_id=request_id, amount=D("1"), now=now)
        hold_settle(request_id=request_id, cost=D("0.5"), now=now)

    outcomes = race(16, work)

    assert [status for status, _ in outcomes] == ["ok"] * 16, outcomes
    for account in accounts:
        account.refresh_from_db()
        assert (account.balance, account.held) == (D(4), D(0))
    assert ledger_audit().clean
