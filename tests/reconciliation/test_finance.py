"""Finance services: charge, write off, resolve, retry, staff credits. Effects on the ledger to
the last digit, and the StaffAction written with each."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group, User
from django.db import transaction

from billing.errors import HoldAlreadyResolved, IdempotencyConflict, InvalidAmount
from billing.models import SYSTEM_ACCOUNT_IDS, Account, Hold, LedgerLeg, LedgerTransaction
from billing.services.holds import hold_place, hold_settle, request_charge_post
from reconciliation.models import ReconciliationItem, StaffAction
from reconciliation.services.finance import (
    FINANCE_GROUP,
    FINANCE_PERMISSIONS,
    ItemNotActionable,
    credit_post_by_staff,
    item_charge,
    item_resolve,
    item_retry,
    item_write_off,
)
from tests.factories import expire_holds, request_key

pytestmark = pytest.mark.django_db

REVENUE = SYSTEM_ACCOUNT_IDS[Account.Kind.REVENUE]
WRITE_OFFS = SYSTEM_ACCOUNT_IDS[Account.Kind.WRITE_OFFS]
HELD = Decimal("1.5000000000")
COST = Decimal("0.1234567891")


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("fin", password="pw", is_staff=True)


def make_failure(*, issued_key, now, request_id="req-1", cost=COST, held=HELD, kind=None):
    """A pending item for a request whose hold is still active (the settle never landed)."""
    hold = hold_place(
        api_key=issued_key.api_key,
        request_id=request_id,
        amount=held,
        now=now,
        model_alias="gpt-test",
    )
    return ReconciliationItem.objects.create(
        kind=kind or ReconciliationItem.Kind.DEDUCTION_FAILURE,
        request_id=request_id,
        account_id=hold.account_id,
        key_prefix=issued_key.api_key.prefix,
        model_alias="gpt-test",
        usage={"input_tokens": 1000, "output_tokens": 200},
        details={"endpoint": "chat.completions", "started_at": now.isoformat()},
        cost=cost,
        held_amount=held,
        error="OperationalError: the database is down",
        attempts=21,
        created_at=now,
    )


def legs_of(txn: LedgerTransaction) -> dict[int, Decimal]:
    return {leg.account_id: leg.amount for leg in txn.legs.all()}


def test_finance_group_has_every_money_permission(db):
    group = Group.objects.get(name=FINANCE_GROUP)
    granted = {
        f"{app}.{codename}"
        for app, codename in group.permissions.values_list("content_type__app_label", "codename")
    }
    assert granted == set(FINANCE_PERMISSIONS)


def test_charge_posts_usage_under_request_key_and_records_staff_action(
    account, issued_key, now, staff
):
    item = make_failure(issued_key=issued_key, now=now)

    result = item_charge(item_id=item.pk, user=staff, memo="customer agreed", now=now)

    assert result.transaction_id is not None
    txn = LedgerTransaction.objects.get(pk=result.transaction_id)
    assert txn is not None
    assert result.posted is True
    assert txn.kind == LedgerTransaction.Kind.USAGE
    assert txn.idempotency_key == request_key("req-1")
    assert txn.posted_by == staff
    assert legs_of(txn) == {account.pk: -COST, REVENUE: COST}
    account.refresh_from_db()
    assert account.balance == Decimal("9.8765432109")
    assert account.held == Decimal(0)
    hold = Hold.objects.get(request_id="req-1")
    assert (hold.state, hold.settled_amount, hold.transaction_id) == ("settled", COST, txn.pk)
    item.refresh_from_db()
    assert (item.status, item.resolved_by, item.resolution_memo, item.transaction_id) == (
        "resolved",
        staff,
        "customer agreed",
        txn.pk,
    )
    action = StaffAction.objects.get()
    assert (action.user, action.action, action.memo, action.transaction_id) == (
        staff,
        "item_charge",
        "customer agreed",
        txn.pk,
    )


def test_charge_after_automatic_settle_charges_nothing(account, issued_key, now, staff):
    item = make_failure(issued_key=issued_key, now=now)
    settled = hold_settle(request_id="req-1", cost=COST, now=now)

    result = item_charge(item_id=item.pk, user=staff, memo="late check", now=now)

    assert result.posted is False
    assert result.transaction_id == settled.transaction_id
    assert LedgerTransaction.objects.filter(request_id="req-1").count() == 1
    account.refresh_from_db()
    assert account.balance == Decimal("9.8765432109")
    assert StaffAction.objects.get().details["posted"] is False


def test_settle_after_finance_charge_is_a_replay(account, issued_key, now, staff):
    item = make_failure(issued_key=issued_key, now=now)
    item_charge(item_id=item.pk, user=staff, memo="charged by hand", now=now)

    result = hold_settle(request_id="req-1", cost=COST, now=now)

    assert result.replayed is True
    account.refresh_from_db()
    assert account.balance == Decimal("9.8765432109")


def test_write_off_posts_balanced_revenue_and_write_off_legs_and_releases_hold(
    account, issued_key, now, staff
):
    item = make_failure(issued_key=issued_key, now=now)

    result = item_write_off(item_id=item.pk, user=staff, memo="goodwill", now=now)

    assert result.transaction_id is not None
    txn = LedgerTransaction.objects.get(pk=result.transaction_id)
    assert txn is not None
    assert txn.kind == LedgerTransaction.Kind.WRITE_OFF
    assert txn.idempotency_key == request_key("req-1")
    assert legs_of(txn) == {REVENUE: COST, WRITE_OFFS: -COST}
    account.refresh_from_db()
    assert (account.balance, account.held) == (Decimal("10"), Decimal(0))
    assert Hold.objects.get(request_id="req-1").state == Hold.State.RELEASED
    item.refresh_from_db()
    assert (item.status, item.resolution_memo) == ("written_off", "goodwill")
    assert StaffAction.objects.get().action == "item_write_off"


def test_charge_after_write_off_posts_nothing(account, issued_key, now, staff):
    item = make_failure(issued_key=issued_key, now=now)
    written_off = item_write_off(item_id=item.pk, user=staff, memo="goodwill", now=now)

    with transaction.atomic():
        charge = request_charge_post(
            request_id="req-1", cost=COST, memo="try", now=now, posted_by_id=None
        )

    assert charge.posted is False
    assert written_off.transaction_id is not None
    assert charge.transaction_id == written_off.transaction_id
    assert LedgerLeg.objects.filter(transaction__request_id="req-1").count() == 2
    account.refresh_from_db()
    assert account.balance == Decimal("10")


def test_settle_after_write_off_is_refused(account, issued_key, now, staff):
    item = make_failure(issued_key=issued_key, now=now)
    item_write_off(item_id=item.pk, user=staff, memo="goodwill", now=now)

    with pytest.raises(HoldAlreadyResolved):
        hold_settle(request_id="req-1", cost=COST, now=now)
    account.refresh_from_db()
    assert account.balance == Decimal("10")


def test_write_off_after_settle_is_refused_and_records_nothing(account, issued_key, now, staff):
    item = make_failure(issued_key=issued_key, now=now)
    hold_settle(request_id="req-1", cost=COST, now=now)

    with pytest.raises(HoldAlreadyResolved):
        item_write_off(item_id=item.pk, user=staff, memo="too late", now=now)

    item.refresh_from_db()
    assert item.status == ReconciliationItem.Status.PENDING
    assert not StaffAction.objects.exists()
    assert not LedgerTransaction.objects.filter(kind="write_off").exists()


def test_expired_hold_charge_posts_known_cost_once_flagged_late(account, issued_key, now, staff):
    item = make_failure(issued_key=issued_key, now=now, kind=ReconciliationItem.Kind.EXPIRED_HOLD)
    later = now + timedelta(hours=1)
    expire_holds(now=later)
    account.refresh_from_db()
    assert account.held == Decimal(0)

    result = item_charge(item_id=item.pk, user=staff, memo="usage confirmed", now=later)

    assert result.transaction_id is not None
    assert LedgerTransaction.objects.get(pk=result.transaction_id).is_late is True
    account.refresh_from_db()
    assert (account.balance, account.held) == (Decimal("9.8765432109"), Decimal(0))
    assert Hold.objects.get(request_id="req-1").state == Hold.State.EXPIRED


def test_expired_hold_without_cost_cannot_be_charged(account, issued_key, now, staff):
    item = make_failure(
        issued_key=issued_key, now=now, cost=None, kind=ReconciliationItem.Kind.EXPIRED_HOLD
    )
    expire_holds(now=now + timedelta(hours=1))

    with pytest.raises(ItemNotActionable, match="no known cost"):
        item_charge(item_id=item.pk, user=staff, memo="charge it", now=now)
    assert not LedgerTransaction.objects.filter(request_id="req-1").exists()


def test_expired_hold_without_cost_writes_off_the_held_amount(account, issued_key, now, staff):
    item = make_failure(
        issued_key=issued_key, now=now, cost=None, kind=ReconciliationItem.Kind.EXPIRED_HOLD
    )
    expire_holds(now=now + timedelta(hours=1))

    result = item_write_off(item_id=item.pk, user=staff, memo="unknown usage", now=now)

    assert result.transaction_id is not None
    assert legs_of(LedgerTransaction.objects.get(pk=result.transaction_id)) == {
        REVENUE: HELD,
        WRITE_OFFS: -HELD,
    }
    account.refresh_from_db()
    assert (account.balance, account.held) == (Decimal("10"), Decimal(0))


def test_resolve_closes_item_with_note_and_moves_no_money(account, issued_key, now, staff):
    item = make_failure(issued_key=issued_key, now=now)
    entries_before = LedgerLeg.objects.count()

    item_resolve(item_id=item.pk, user=staff, memo="duplicate of #7", now=now)

    item.refresh_from_db()
    assert (item.status, item.resolution_memo, item.transaction_id) == (
        "resolved",
        "duplicate of #7",
        None,
    )
    assert LedgerLeg.objects.count() == entries_before
    assert StaffAction.objects.get().memo == "duplicate of #7"


@pytest.mark.parametrize(
    "action",
    [item_charge, item_write_off, item_resolve, item_retry],
    ids=["charge", "write_off", "resolve", "retry"],
)
def test_item_action_without_memo_is_refused(action, account, issued_key, now, staff):
    item = make_failure(issued_key=issued_key, now=now)

    with pytest.raises(InvalidAmount, match="memo"):
        action(item_id=item.pk, user=staff, memo="   ", now=now)

    item.refresh_from_db()
    assert item.status == ReconciliationItem.Status.PENDING
    assert not StaffAction.objects.exists()


@pytest.mark.parametrize(
    "action",
    [item_charge, item_write_off, item_resolve, item_retry],
    ids=["charge", "write_off", "resolve", "retry"],
)
def test_item_action_on_closed_item_is_refused(action, account, issued_key, now, staff):
    item = make_failure(issued_key=issued_key, now=now)
    item_resolve(item_id=item.pk, user=staff, memo="first", now=now)

    with pytest.raises(ItemNotActionable, match="already resolved"):
        action(item_id=item.pk, user=staff, memo="second", now=now)
    assert StaffAction.objects.count() == 1


def test_retry_queues_the_settle_after_commit_and_it_charges_once(
    account, issued_key, now, staff, django_capture_on_commit_callbacks, settings
):
    from config.celery import app

    item = make_failure(issued_key=issued_key, now=now)
    app.conf.task_always_eager = True  # run the real task inline when it is sent
    try:
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            item_retry(item_id=item.pk, user=staff, memo="db is back", now=now)
            assert not LedgerTransaction.objects.filter(request_id="req-1").exists()
    finally:
        app.conf.task_always_eager = False

    assert len(callbacks) == 1
    account.refresh_from_db()
    assert account.balance == Decimal("9.8765432109")
    assert StaffAction.objects.get().action == "item_retry"


@pytest.mark.parametrize(
    ("kind", "amount", "source"),
    [
        ("grant", Decimal("5.0000000001"), SYSTEM_ACCOUNT_IDS["promotions"]),
        ("purchase", Decimal("20"), SYSTEM_ACCOUNT_IDS["payments"]),
        ("refund", Decimal("0.25"), REVENUE),
        ("adjustment", Decimal("-0.0000000001"), REVENUE),
    ],
    ids=["grant", "purchase", "refund", "negative-adjustment"],
)
def test_staff_credit_posts_balanced_legs_and_records_action(
    kind, amount, source, account, issued_key, now, staff
):
    if kind == "refund":  # a refund returns at most what was charged: charge 0.25 first
        hold_place(api_key=issued_key.api_key, request_id="req-used", amount=amount, now=now)
        hold_settle(request_id="req-used", cost=amount, now=now)
    account.refresh_from_db()
    before = account.balance
    posted = credit_post_by_staff(
        kind=kind,
        account_id=account.pk,
        amount=amount,
        memo="ticket 42",
        idempotency_key="form-1",
        user=staff,
        now=now,
    )

    assert posted.replayed is False
    txn = LedgerTransaction.objects.get(pk=posted.transaction_id)
    assert legs_of(txn) == {account.pk: amount, source: -amount}
    account.refresh_from_db()
    assert account.balance == before + amount
    action = StaffAction.objects.get()
    assert (action.action, action.memo, action.transaction_id) == (
        f"credit_{kind}",
        "ticket 42",
        txn.pk,
    )


def test_staff_credit_double_submit_posts_once(account, now, staff):
    first = credit_post_by_staff(
        kind="grant",
        account_id=account.pk,
        amount=Decimal("3"),
        memo="promo",
        idempotency_key="form-2",
        user=staff,
        now=now,
    )
    second = credit_post_by_staff(
        kind="grant",
        account_id=account.pk,
        amount=Decimal("3"),
        memo="promo",
        idempotency_key="form-2",
        user=staff,
        now=now,
    )

    assert second.replayed is True
    assert second.transaction_id == first.transaction_id
    account.refresh_from_db()
    assert account.balance == Decimal("13")
    assert StaffAction.objects.count() == 1


def test_staff_credit_same_key_different_amount_is_a_conflict(account, now, staff):
    credit_post_by_staff(
        kind="grant",
        account_id=account.pk,
        amount=Decimal("3"),
        memo="promo",
        idempotency_key="form-3",
        user=staff,
        now=now,
    )

    with pytest.raises(IdempotencyConflict):
        credit_post_by_staff(
            kind="grant",
            account_id=account.pk,
            amount=Decimal("4"),
            memo="promo",
            idempotency_key="form-3",
            user=staff,
            now=now,
        )
    account.refresh_from_db()
    assert account.balance == Decimal("13")
