"""Two-phase holds: place, settle, release, expire; budgets; refusals that leave no trace."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from billing.errors import (
    AccountInactive,
    ApiKeyInactive,
    BudgetExceeded,
    HoldAlreadyResolved,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
)
from billing.models import Account, ApiKey, Hold, LedgerLeg, LedgerTransaction
from billing.selectors import ledger_audit
from billing.services.accounts import account_status_set
from billing.services.holds import hold_place, hold_release, hold_settle
from reconciliation.models import ReconciliationItem
from tests.factories import expire_holds, make_account, make_key, request_key

pytestmark = pytest.mark.django_db

D = Decimal
TTL = 900


def place(key: ApiKey, request_id: str, amount: str, now: datetime) -> Hold:
    return hold_place(
        api_key=key, request_id=request_id, amount=D(amount), now=now, ttl_seconds=TTL
    )


def balances(account: Account) -> tuple[Decimal, Decimal]:
    account.refresh_from_db()
    return account.balance, account.held


def usage_postings(request_id: str) -> list[LedgerTransaction]:
    return list(
        LedgerTransaction.objects.filter(idempotency_key=request_key(request_id))
    )


@pytest.fixture
def key(issued_key) -> ApiKey:  # type: ignore[no-untyped-def]
    return issued_key.api_key


# --- settle ---------------------------------------------------------------------------------


def test_settle_charges_cost_and_releases_the_rest(
    account: Account, key: ApiKey, now: datetime
) -> None:
    place(key, "r1", "2", now)
    result = hold_settle(request_id="r1", cost=D("0.75"), now=now + timedelta(seconds=5))
    assert balances(account) == (D("9.25"), D(0))
    assert result.hold.state == Hold.State.SETTLED
    assert not result.is_late and not result.is_overrun
    assert ledger_audit().clean


def test_settle_after_sweeper_expiry_posts_usage_once_and_flags_it_late(
    account: Account, key: ApiKey, now: datetime
) -> None:
    place(key, "r1", "2", now)
    assert expire_holds(now=now + timedelta(seconds=TTL)) == 1
    assert balances(account) == (D(10), D(0))

    later = now + timedelta(seconds=TTL + 60)
    first = hold_settle(request_id="r1", cost=D("1.5"), now=later)
    again = hold_settle(request_id="r1", cost=D("1.5"), now=later + timedelta(seconds=1))

    assert first.is_late and first.transaction_id is not None
    assert again.replayed and again.transaction_id == first.transaction_id
    [posting] = usage_postings("r1")
    assert posting.is_late and not posting.is_overrun
    assert balances(account) == (D("8.5"), D(0))  # charged once, nothing released twice
    hold = Hold.objects.get(request_id="r1")
    assert (hold.state, hold.settled_amount, hold.is_late) == (Hold.State.EXPIRED, D("1.5"), True)
    assert hold.transaction_id == first.transaction_id
    # The sweep queued the expired hold for finance once; the late settle adds no second item.
    [item] = ReconciliationItem.objects.filter(request_id="r1")
    assert (item.kind, item.held_amount) == (ReconciliationItem.Kind.EXPIRED_HOLD, D(2))
    assert ledger_audit().clean


@pytest.mark.parametrize(
    ("settle_after", "late"),
    [
        pytest.param(
            timedelta(seconds=TTL) - timedelta(microseconds=1), False, id="just-before-expiry"
        ),
        pytest.param(timedelta(seconds=TTL), True, id="at-expiry"),
        pytest.param(timedelta(seconds=TTL + 3600), True, id="long-after-expiry-not-yet-swept"),
    ],
)
def test_settle_of_active_hold_is_flagged_late_from_its_expiry(
    account: Account, key: ApiKey, now: datetime, settle_after: timedelta, late: bool
) -> None:
    place(key, "r1", "2", now)
    result = hold_settle(request_id="r1", cost=D("1"), now=now + settle_after)
    assert result.hold.state == Hold.State.SETTLED
    assert result.is_late is late
    assert usage_postings("r1")[0].is_late is late
    assert balances(account) == (D(9), D(0))


def test_overrun_is_posted_in_full_and_flagged(
    account: Account, key: ApiKey, now: datetime
) -> None:
    place(key, "r1", "2", now)
    result = hold_settle(request_id="r1", cost=D("3.25"), now=now)
    assert result.is_overrun
    [posting] = usage_postings("r1")
    assert posting.is_overrun
    assert sorted(posting.legs.values_list("amount", flat=True)) == [D("-3.25"), D("3.25")]
    assert balances(account) == (D("6.75"), D(0))
    assert ledger_audit().clean


def test_overrun_may_take_balance_below_overdraft_but_is_flagged(now: datetime) -> None:
    account = make_account(credits=D("1"), now=now)
    key = make_key(account=account, now=now).api_key
    place(key, "r1", "1", now)
    result = hold_settle(request_id="r1", cost=D("4"), now=now)
    assert result.is_overrun
    assert balances(account) == (D(-3), D(0))


def test_zero_cost_settle_posts_nothing_and_releases_hold(
    account: Account, key: ApiKey, now: datetime
) -> None:
    place(key, "r1", "2", now)
    result = hold_settle(request_id="r1", cost=D(0), now=now)
    assert result.transaction_id is None
    assert usage_postings("r1") == []
    assert balances(account) == (D(10), D(0))


def test_settle_replay_with_other_cost_is_a_conflict(
    account: Account, key: ApiKey, now: datetime
) -> None:
    place(key, "r1", "2", now)
    hold_settle(request_id="r1", cost=D("1"), now=now)
    with pytest.raises(IdempotencyConflict):
        hold_settle(request_id="r1", cost=D("1.01"), now=now)
    assert balances(account) == (D(9), D(0))


def test_late_zero_cost_settle_then_other_cost_is_a_conflict(
    account: Account, key: ApiKey, now: datetime
) -> None:
    # An expired hold settled at 0 has no posting; a second settle must not charge it again.
    place(key, "r1", "2", now)
    expire_holds(now=now + timedelta(seconds=TTL))
    hold_settle(request_id="r1", cost=D(0), now=now + timedelta(seconds=TTL + 1))
    with pytest.raises(IdempotencyConflict):
        hold_settle(request_id="r1", cost=D("1"), now=now + timedelta(seconds=TTL + 2))
    assert usage_postings("r1") == []
    assert balances(account) == (D(10), D(0))


def test_settle_of_released_hold_is_refused(account: Account, key: ApiKey, now: datetime) -> None:
    place(key, "r1", "2", now)
    hold_release(request_id="r1", now=now)
    with pytest.raises(HoldAlreadyResolved):
        hold_settle(request_id="r1", cost=D("1"), now=now)
    assert balances(account) == (D(10), D(0))


def test_settle_unknown_request_raises_hold_not_found(db: None, now: datetime) -> None:
    with pytest.raises(HoldNotFound):
        hold_settle(request_id="nobody", cost=D("1"), now=now)


# --- release and expire ---------------------------------------------------------------------


def test_release_returns_everything(account: Account, key: ApiKey, now: datetime) -> None:
    place(key, "r1", "2", now)
    assert balances(account) == (D(10), D(2))
    hold = hold_release(request_id="r1", now=now)
    assert hold.state == Hold.State.RELEASED
    assert balances(account) == (D(10), D(0))
    assert LedgerTransaction.objects.filter(request_id="r1").count() == 0
    assert hold_release(request_id="r1", now=now).state == Hold.State.RELEASED  # replay: no-op
    assert balances(account) == (D(10), D(0))


def test_release_of_settled_hold_is_refused(account: Account, key: ApiKey, now: datetime) -> None:
    place(key, "r1", "2", now)
    hold_settle(request_id="r1", cost=D("1"), now=now)
    with pytest.raises(HoldAlreadyResolved):
        hold_release(request_id="r1", now=now)
    assert balances(account) == (D(9), D(0))


@pytest.mark.parametrize(
    ("sweep_at", "expired"),
    [
        pytest.param(timedelta(seconds=TTL) - timedelta(microseconds=1), False, id="before-expiry"),
        pytest.param(timedelta(seconds=TTL), True, id="exactly-at-expiry"),
        pytest.param(timedelta(seconds=TTL + 1), True, id="after-expiry"),
    ],
)
def test_expire_never_expires_a_hold_before_its_expiry(
    account: Account, key: ApiKey, now: datetime, sweep_at: timedelta, expired: bool
) -> None:
    place(key, "r1", "2", now)
    assert expire_holds(now=now + sweep_at) == int(expired)
    hold = Hold.objects.get(request_id="r1")
    assert hold.state == (Hold.State.EXPIRED if expired else Hold.State.ACTIVE)
    assert balances(account) == (D(10), D(0) if expired else D(2))
    assert ledger_audit().clean


def test_expire_twice_resolves_once(account: Account, key: ApiKey, now: datetime) -> None:
    place(key, "r1", "2", now)
    later = now + timedelta(seconds=TTL)
    assert expire_holds(now=later) == 1
    assert expire_holds(now=later) == 0
    assert balances(account) == (D(10), D(0))


# --- budgets --------------------------------------------------------------------------------


@pytest.fixture
def budget_key(account: Account, now: datetime) -> ApiKey:
    return make_key(account=account, now=now, budget_limit=D("5"), budget_period="day").api_key


def test_place_beyond_key_budget_is_refused(
    account: Account, budget_key: ApiKey, now: datetime
) -> None:
    with pytest.raises(BudgetExceeded):
        place(budget_key, "r1", "5.0000000001", now)
    assert balances(account) == (D(10), D(0))
    assert not Hold.objects.filter(request_id="r1").exists()


def test_active_holds_count_against_budget(
    account: Account, budget_key: ApiKey, now: datetime
) -> None:
    place(budget_key, "r1", "3", now)
    place(budget_key, "r2", "2", now)  # exactly at the limit
    with pytest.raises(BudgetExceeded):
        place(budget_key, "r3", "0.01", now)
    budget_key.refresh_from_db()
    assert (budget_key.budget_held, budget_key.budget_spent) == (D(5), D(0))


def test_settled_spend_counts_against_budget(
    account: Account, budget_key: ApiKey, now: datetime
) -> None:
    place(budget_key, "r1", "3", now)
    hold_settle(request_id="r1", cost=D("2.5"), now=now)
    budget_key.refresh_from_db()
    assert (budget_key.budget_held, budget_key.budget_spent) == (D(0), D("2.5"))
    place(budget_key, "r2", "2.5", now)
    with pytest.raises(BudgetExceeded):
        place(budget_key, "r3", "0.0000000001", now)


def test_budget_rollover_resets_spent_but_keeps_active_holds(
    account: Account, budget_key: ApiKey, now: datetime
) -> None:
    place(budget_key, "spent", "2", now)
    hold_settle(request_id="spent", cost=D("2"), now=now)
    place(budget_key, "carried", "1", now)  # still active at midnight

    tomorrow = now + timedelta(days=1)
    # New day: 2 spent yesterday no longer count, the carried 1 does: 4 more fit, not 4.01.
    with pytest.raises(BudgetExceeded):
        place(budget_key, "too-much", "4.01", tomorrow)
    place(budget_key, "fits", "4", tomorrow)
    budget_key.refresh_from_db()
    assert budget_key.budget_spent == D(0)
    assert budget_key.budget_held == D(5)
    assert budget_key.budget_period_start == tomorrow.replace(hour=0, minute=0)


def test_release_gives_budget_back(account: Account, budget_key: ApiKey, now: datetime) -> None:
    place(budget_key, "r1", "5", now)
    hold_release(request_id="r1", now=now)
    place(budget_key, "r2", "5", now)
    budget_key.refresh_from_db()
    assert budget_key.budget_held == D(5)


# --- refusals and idempotency ----------------------------------------------------------------


def test_place_on_suspended_account_raises_account_inactive(
    account: Account, key: ApiKey, now: datetime
) -> None:
    account_status_set(account_id=account.pk, status=Account.Status.SUSPENDED)
    with pytest.raises(AccountInactive):
        place(key, "r1", "1", now)


def test_place_within_overdraft_is_allowed_and_beyond_is_refused(now: datetime) -> None:
    account = make_account(credits=D("1"), overdraft=D("2"), now=now)
    key = make_key(account=account, now=now).api_key
    place(key, "r1", "3", now)
    with pytest.raises(InsufficientFunds):
        place(key, "r2", "0.0000000001", now)
    assert balances(account) == (D(1), D(3))


@pytest.mark.parametrize(
    ("setup", "amount", "error"),
    [
        pytest.param("none", "0", InvalidAmount, id="zero-amount"),
        pytest.param("none", "-1", InvalidAmount, id="negative-amount"),
        pytest.param("none", "10.0000000001", InsufficientFunds, id="insufficient-funds"),
        pytest.param("budget", "5.5", BudgetExceeded, id="over-budget"),
        pytest.param("suspended", "1", AccountInactive, id="suspended-account"),
    ],
)
def test_refused_place_leaves_no_trace(
    account: Account, now: datetime, setup: str, amount: str, error: type[Exception]
) -> None:
    options = {"budget_limit": D("5"), "budget_period": "day"} if setup == "budget" else {}
    key = make_key(account=account, now=now, **options).api_key
    if setup == "suspended":
        account_status_set(account_id=account.pk, status=Account.Status.SUSPENDED)
    legs_before = LedgerLeg.objects.count()
    with pytest.raises(error):
        place(key, "r1", amount, now)
    assert not Hold.objects.filter(request_id="r1").exists()
    assert LedgerLeg.objects.count() == legs_before
    assert balances(account) == (D(10), D(0))
    key.refresh_from_db()
    assert (key.budget_held, key.budget_spent) == (D(0), D(0))


def test_negative_settle_cost_is_refused_and_leaves_hold_active(
    account: Account, key: ApiKey, now: datetime
) -> None:
    place(key, "r1", "2", now)
    with pytest.raises(InvalidAmount):
        hold_settle(request_id="r1", cost=D("-1"), now=now)
    assert Hold.objects.get(request_id="r1").state == Hold.State.ACTIVE
    assert balances(account) == (D(10), D(2))


def test_place_replay_returns_the_original_hold(
    account: Account, key: ApiKey, now: datetime
) -> None:
    first = place(key, "r1", "2", now)
    again = place(key, "r1", "2", now + timedelta(seconds=1))
    assert again.pk == first.pk
    assert balances(account) == (D(10), D(2))


def test_place_replay_on_exhausted_account_returns_the_original_hold(now: datetime) -> None:
    # The retry must not be refused for lack of room for a second hold: it is the same hold.
    account = make_account(credits=D("2"), now=now)
    key = make_key(account=account, now=now).api_key
    first = place(key, "r1", "2", now)
    assert place(key, "r1", "2", now).pk == first.pk
    assert balances(account) == (D(2), D(2))


def test_place_replay_at_budget_limit_returns_the_original_hold(
    account: Account, budget_key: ApiKey, now: datetime
) -> None:
    first = place(budget_key, "r1", "5", now)
    assert place(budget_key, "r1", "5", now).pk == first.pk


def test_place_replay_with_other_amount_is_a_conflict(
    account: Account, key: ApiKey, now: datetime
) -> None:
    place(key, "r1", "2", now)
    with pytest.raises(IdempotencyConflict):
        place(key, "r1", "3", now)
    assert balances(account) == (D(10), D(2))


# --- the key, re-checked by the hold (callers such as the gateway cache keys) ----------------


@pytest.mark.parametrize("budgeted", [False, True], ids=["one_statement", "orm_path"])
@pytest.mark.parametrize("change", ["revoked", "expired"])
def test_hold_with_a_stale_copy_of_a_revoked_or_expired_key_is_refused_without_trace(
    account: Account, now: datetime, budgeted: bool, change: str
) -> None:
    options = {"budget_limit": D("5"), "budget_period": "day"} if budgeted else {}
    stale = make_key(account=account, now=now, **options).api_key  # the caller's cached copy
    if change == "revoked":
        ApiKey.objects.filter(pk=stale.pk).update(status=ApiKey.Status.REVOKED)
    else:
        ApiKey.objects.filter(pk=stale.pk).update(expires_at=now)

    with pytest.raises(ApiKeyInactive):
        place(stale, "r1", "1", now)

    assert balances(account) == (D(10), D(0))
    assert not Hold.objects.exists()
    stale.refresh_from_db()
    assert stale.budget_held == 0


def test_hold_with_a_stale_copy_of_a_key_that_gained_a_budget_counts_against_it(
    account: Account, key: ApiKey, now: datetime
) -> None:
    ApiKey.objects.filter(pk=key.pk).update(budget_limit=D("1.5"), budget_period="day")

    hold = place(key, "r1", "1", now)  # `key` still says: no budget
    with pytest.raises(BudgetExceeded):
        place(key, "r2", "1", now)

    assert hold.budgeted
    fresh = ApiKey.objects.get(pk=key.pk)
    assert fresh.budget_held == D("1")
    assert balances(account) == (D(10), D(1))
    hold_settle(request_id="r1", cost=D("0.4"), now=now)
    fresh.refresh_from_db()
    assert (fresh.budget_held, fresh.budget_spent) == (D(0), D("0.4"))
