"""Real threads, each with its own database connection, racing on one account or one key, or
with the expiry sweep."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum

from billing.errors import BudgetExceeded, InsufficientFunds
from billing.models import ApiKey, Hold, LedgerLeg, LedgerTransaction
from billing.selectors import ledger_audit
from billing.services.accounts import credit_post
from billing.services.holds import hold_place, hold_settle
from reconciliation.models import ReconciliationItem
from reconciliation.services.sweeps import holds_expire_and_queue
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


@contextmanager
def sampling(read: Callable[[], Any]) -> Iterator[list[Any]]:
    """Call `read()` over and over in a thread of its own (its own connection) while the
    block runs, and once more after it; the samples are in the yielded list when it ends."""
    samples: list[Any] = []
    errors: list[BaseException] = []
    started, stop = threading.Event(), threading.Event()

    def run() -> None:
        try:
            while True:
                last = stop.is_set()
                samples.append(read())
                started.set()
                if last:
                    return
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)
            started.set()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    started.wait(timeout=30)  # the first sample is taken before the block starts
    try:
        yield samples
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the sampler hung"
    assert not errors, errors


@pytest.mark.parametrize(
    "history",
    [
        pytest.param("fresh", id="fresh-key"),
        # Yesterday's period is spent to the limit: every worker must roll it over lazily.
        pytest.param("spent-yesterday", id="rolled-lazily"),
    ],
)
@pytest.mark.parametrize(
    ("settle", "amount", "affordable"),
    [
        pytest.param(True, D("1"), 10, id="place-and-settle"),
        pytest.param(False, D("0.5"), 20, id="holds-stay-open"),
    ],
)
def test_32_workers_on_one_budgeted_key_never_pass_its_limit(
    now: datetime, history: str, settle: bool, amount: Decimal, affordable: int
) -> None:
    # The account could pay for everything: only the key's budget of 10 a day refuses.
    account = make_account(credits=D("100"), now=now)
    key = make_key(account=account, now=now, budget_limit=D("10"), budget_period="day").api_key
    run_id = uuid.uuid4().hex[:8]
    spent_before = D(0)
    if history == "spent-yesterday":
        yesterday = now - timedelta(days=1)
        hold_place(api_key=key, request_id=f"{run_id}-yesterday", amount=D(10), now=yesterday)
        hold_settle(request_id=f"{run_id}-yesterday", cost=D(10), now=yesterday)
        spent_before = D(10)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)

    def in_period() -> Decimal:
        spent, held, start = ApiKey.objects.filter(pk=key.pk).values_list(
            "budget_spent", "budget_held", "budget_period_start"
        )[0]
        return (spent if start == today else D(0)) + held  # a past period's spend is not counted

    def place_and_maybe_settle(index: int) -> int | None:
        request_id = f"{run_id}-{index}"
        hold = hold_place(api_key=key, request_id=request_id, amount=amount, now=now)
        if not settle:
            return hold.pk
        # Settling at the full hold keeps each success's budget spent: exactly `affordable` fit.
        return hold_settle(request_id=request_id, cost=amount, now=now).transaction_id

    with sampling(in_period) as samples:
        outcomes = race(32, place_and_maybe_settle)

    refusals = [value for status, value in outcomes if status == "error"]
    assert all(isinstance(exc, BudgetExceeded) for exc in refusals), refusals
    succeeded = [value for status, value in outcomes if status == "ok"]
    assert len(succeeded) == len(set(succeeded)) == affordable
    assert len(samples) >= 2
    assert max(samples) <= D(10), samples  # spent + held never passed the limit
    key.refresh_from_db()
    assert key.budget_period_start == today
    if settle:
        assert (key.budget_spent, key.budget_held) == (D(10), D(0))
    else:
        assert (key.budget_spent, key.budget_held) == (D(0), D(10))
    account.refresh_from_db()
    assert account.balance == D(100) - spent_before - (D(10) if settle else D(0))
    assert account.held == (D(0) if settle else D(10))
    report = ledger_audit()
    assert report.clean, report.as_json()


# Each hold is settled by two workers at once (the gateway's settle and its retry), at a cost
# under, at or over its amount of 1, or zero.
SWEEP_RACE_COSTS = [D("0"), D("0.25"), D("1"), D("1.5")]


@pytest.mark.parametrize("budgeted", [False, True], ids=["plain-key", "budgeted-key"])
def test_sweep_racing_settles_of_expired_holds_ends_and_charges_each_once(
    now: datetime, budgeted: bool
) -> None:
    holds = 16
    account = make_account(credits=D("100"), now=now)
    budget = {"budget_limit": D("100"), "budget_period": "day"} if budgeted else {}
    key = make_key(account=account, now=now, **budget).api_key
    run_id = uuid.uuid4().hex[:8]
    request_ids = [f"{run_id}-{index}" for index in range(holds)]
    for index, request_id in enumerate(request_ids):
        # Expiring one second apart: the sweep takes them in this order, one per batch.
        hold_place(
            api_key=key, request_id=request_id, amount=D("1"), now=now, ttl_seconds=60 + index
        )
    cost = {rid: SWEEP_RACE_COSTS[i % len(SWEEP_RACE_COSTS)] for i, rid in enumerate(request_ids)}
    later = now + timedelta(seconds=120)  # every hold is past its expiry
    settlers = 2 * holds
    settled = threading.Semaphore(0)
    sweeps: list[int] = []

    def work(index: int) -> Any:
        if index == 0:
            # The sweeper (started first): one hold per batch, each its own transaction,
            # again and again until every settle has returned, and once more after.
            finished = 0
            while True:
                last = finished == settlers
                sweeps.append(holds_expire_and_queue(now=later, batch_size=1)["expired"])
                while settled.acquire(blocking=False):
                    finished += 1
                if last:
                    return sum(sweeps)
        # Two settlers per hold, the first started for the last hold the sweep comes to: the
        # sweep and the settles meet somewhere in the middle.
        request_id = request_ids[-1 - (index - 1) % holds]
        try:
            return request_id, hold_settle(request_id=request_id, cost=cost[request_id], now=later)
        finally:
            settled.release()

    outcomes = race(settlers + 1, work)

    errors = [(index, value) for index, (status, value) in enumerate(outcomes) if status != "ok"]
    assert not errors, errors
    swept = outcomes[0][1]
    results: dict[str, list[Any]] = {rid: [] for rid in request_ids}
    for request_id, result in (value for _, value in outcomes[1:]):
        results[request_id].append(result)
    rows = {hold.request_id: hold for hold in Hold.objects.filter(request_id__in=request_ids)}
    postings = {
        txn.request_id: txn for txn in LedgerTransaction.objects.filter(request_id__in=request_ids)
    }
    assert LedgerTransaction.objects.filter(request_id__in=request_ids).count() == len(postings)
    for request_id in request_ids:
        row, charged = rows[request_id], cost[request_id]
        first, second = sorted(results[request_id], key=lambda result: result.replayed)
        # One settle posted, the other replayed it; both were told the same.
        assert (first.replayed, second.replayed) == (False, True), request_id
        assert first.transaction_id == second.transaction_id == row.transaction_id
        assert first.cost == second.cost == charged
        # The hold ended once: settled if its settle won, expired (and charged late) if the
        # sweep did. Either way it is late, flagged if over, and resolved at the race's time.
        assert row.state in (Hold.State.SETTLED, Hold.State.EXPIRED), request_id
        assert (row.settled_amount, row.is_late, row.is_overrun, row.resolved_at) == (
            charged,
            True,
            charged > row.amount,
            later,
        ), request_id
        # Its usage is posted once, in full; a zero cost posts nothing.
        if charged:
            txn = postings[request_id]
            assert (txn.pk, txn.idempotency_key, txn.is_late) == (
                row.transaction_id,
                request_key(request_id),
                True,
            )
            assert LedgerLeg.objects.get(transaction=txn, account=account).amount == -charged
        else:
            assert request_id not in postings and row.transaction_id is None
    expired = {rid for rid, row in rows.items() if row.state == Hold.State.EXPIRED}
    assert swept == len(expired)
    queued = list(
        ReconciliationItem.objects.filter(
            kind=ReconciliationItem.Kind.EXPIRED_HOLD, request_id__in=request_ids
        ).values_list("request_id", flat=True)
    )
    assert sorted(queued) == sorted(expired)  # one item per hold the sweep expired
    account.refresh_from_db()
    assert account.held == 0
    assert account.balance == D("100") - sum(cost.values(), D(0))
    key.refresh_from_db()
    assert key.budget_held == 0
    assert key.budget_spent == (sum(cost.values(), D(0)) if budgeted else 0)
    report = ledger_audit()
    assert report.clean, report.as_json()


def test_32_workers_replaying_a_hold_place_on_an_account_it_exhausts_all_get_the_hold(
    now: datetime,
) -> None:
    # The first place commits between a replay's look-up of the request and its funds check:
    # that replay must still get the hold, not InsufficientFunds. A narrow window, so several
    # rounds of 32.
    for _ in range(8):
        account = make_account(credits=D("2"), now=now)
        key = make_key(account=account, now=now).api_key
        request_id = f"req-{uuid.uuid4()}"

        def replay(_: int, key: ApiKey = key, request_id: str = request_id) -> int:
            return hold_place(api_key=key, request_id=request_id, amount=D("2"), now=now).pk

        outcomes = race(32, replay)

        refusals = [value for status, value in outcomes if status != "ok"]
        assert not refusals, refusals
        assert len({value for _, value in outcomes}) == 1
        account.refresh_from_db()
        assert (account.balance, account.held) == (D(2), D(2))
    report = ledger_audit()
    assert report.clean, report.as_json()
