"""Issue 14, item 9: finance permissions. A staff refund is bounded by what the account was
charged or paid (checked by the engine under the account's lock), a larger correction is an
adjustment with its own permission, and revoking keys is confirmed, explained and recorded."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.db import connection
from django.test import Client
from django.urls import reverse

from billing.errors import InvalidAmount, RefundExceedsPaid
from billing.models import SYSTEM_ACCOUNT_IDS, Account, ApiKey, LedgerTransaction
from billing.services.accounts import account_refundable, credit_post
from billing.services.holds import hold_place, hold_settle
from billing.services.ledger import transaction_reverse
from reconciliation.models import StaffAction
from reconciliation.services.finance import (
    FINANCE_GROUP,
    api_keys_revoke_by_staff,
    credit_post_by_staff,
    finance_group_ensure,
)
from tests.factories import make_account, make_key

D = Decimal
REVENUE = SYSTEM_ACCOUNT_IDS[Account.Kind.REVENUE]


def charge(api_key: ApiKey, request_id: str, cost: Decimal, now: Any) -> int:
    """Usage charged to the key's account through the production hold and settle."""
    hold_place(api_key=api_key, request_id=request_id, amount=cost, now=now)
    settled = hold_settle(request_id=request_id, cost=cost, now=now)
    assert settled.transaction_id is not None
    return settled.transaction_id


def purchase(account: Account, amount: Decimal, key: str, now: Any) -> int:
    return credit_post(
        kind="purchase",
        account_id=account.pk,
        amount=amount,
        memo="card",
        idempotency_key=key,
        now=now,
    ).transaction_id


def refund(account: Account, amount: Decimal, key: str, user: User, now: Any) -> Any:
    return credit_post_by_staff(
        kind="refund",
        account_id=account.pk,
        amount=amount,
        memo="ticket 7",
        idempotency_key=key,
        user=user,
        now=now,
    )


def raw_ledger(account_id: int) -> tuple[int, int, int]:
    """(transactions, legs, cached balance in units) straight from the tables, past the ORM."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT (SELECT count(*) FROM billing_ledgertransaction),"
            " (SELECT count(*) FROM billing_ledgerleg),"
            " (SELECT balance FROM billing_account WHERE id = %s)",
            [account_id],
        )
        row = cursor.fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


@pytest.fixture
def staff(db: None) -> User:
    return User.objects.create_user("fin", password="pw", is_staff=True)


# --- The refund bound, in the engine -----------------------------------------------------------


@pytest.mark.django_db
def test_refund_within_what_was_charged_and_paid_posts(account, issued_key, now, staff):
    charge(issued_key.api_key, "req-1", D("3"), now)
    purchase(account, D("2"), "card-1", now)
    assert account_refundable(account_id=account.pk) == D("5")  # the grant of 10 is not paid

    posted = refund(account, D("5"), "form-1", staff, now)

    txn = LedgerTransaction.objects.get(pk=posted.transaction_id)
    assert {leg.account_id: leg.amount for leg in txn.legs.all()} == {
        account.pk: D("5"),
        REVENUE: D("-5"),
    }
    account.refresh_from_db()
    assert account.balance == D("14")  # 10 granted - 3 used + 2 bought + 5 refunded
    assert account_refundable(account_id=account.pk) == D("0")
    assert StaffAction.objects.get().transaction_id == txn.pk


@pytest.mark.django_db
def test_refund_beyond_what_was_paid_is_refused_and_writes_nothing(account, issued_key, now, staff):
    charge(issued_key.api_key, "req-1", D("0.77"), now)
    before = raw_ledger(account.pk)

    with pytest.raises(RefundExceedsPaid) as refused:
        refund(account, D("100000"), "form-1", staff, now)

    assert refused.value.refundable == D("0.77")
    assert "at most 0.7700000000 USD" in str(refused.value)
    assert raw_ledger(account.pk) == before
    assert not LedgerTransaction.objects.filter(idempotency_key="staff:form-1").exists()
    assert not StaffAction.objects.exists()


@pytest.mark.django_db
def test_one_unit_beyond_the_bound_is_refused(account, issued_key, now, staff):
    charge(issued_key.api_key, "req-1", D("0.77"), now)

    with pytest.raises(RefundExceedsPaid):
        refund(account, D("0.7700000001"), "form-1", staff, now)
    refund(account, D("0.77"), "form-2", staff, now)


@pytest.mark.django_db
def test_grants_and_adjustments_are_not_refundable(account, now, staff):
    credit_post(
        kind="adjustment",
        account_id=account.pk,
        amount=D("4"),
        memo="fix",
        idempotency_key="adj-1",
        now=now,
    )

    assert account_refundable(account_id=account.pk) == D("0")
    with pytest.raises(RefundExceedsPaid):
        refund(account, D("0.0000000001"), "form-1", staff, now)


@pytest.mark.django_db
def test_earlier_refunds_and_reversals_count_against_the_bound(account, issued_key, now, staff):
    charge(issued_key.api_key, "req-1", D("2"), now)
    reversed_usage = charge(issued_key.api_key, "req-2", D("1"), now)
    first = refund(account, D("1"), "form-1", staff, now)
    assert account_refundable(account_id=account.pk) == D("2")

    # A reversed usage was not charged after all; a reversed refund returned nothing.
    transaction_reverse(
        transaction_id=reversed_usage, memo="not ours", idempotency_key="rev-1", now=now
    )
    assert account_refundable(account_id=account.pk) == D("1")
    with pytest.raises(RefundExceedsPaid):
        refund(account, D("1.0000000001"), "form-2", staff, now)
    transaction_reverse(
        transaction_id=first.transaction_id, memo="sent twice", idempotency_key="rev-2", now=now
    )
    assert account_refundable(account_id=account.pk) == D("2")
    refund(account, D("2"), "form-3", staff, now)
    assert account_refundable(account_id=account.pk) == D("0")


@pytest.mark.django_db
def test_refund_to_the_bound_replayed_is_a_replay_not_a_refusal(account, issued_key, now, staff):
    charge(issued_key.api_key, "req-1", D("1"), now)
    first = refund(account, D("1"), "form-1", staff, now)

    again = refund(account, D("1"), "form-1", staff, now)

    assert (again.transaction_id, again.replayed) == (first.transaction_id, True)
    account.refresh_from_db()
    assert account.balance == D("10")  # 10 - 1 used + 1 refunded, once
    assert StaffAction.objects.count() == 1


@pytest.mark.django_db
def test_a_refund_by_any_door_is_bounded(account, now):
    """credit_post (what the services and commands call) goes through the same engine check;
    grant_credits does not even offer refunds (tests/billing/test_commands.py)."""
    with pytest.raises(RefundExceedsPaid):
        credit_post(
            kind="refund",
            account_id=account.pk,
            amount=D("1"),
            memo="m",
            idempotency_key="cmd-1",
            now=now,
        )


def race(workers: int, work: Callable[[int], Any]) -> list[tuple[str, Any]]:
    """Run `work(i)` in `workers` threads released together (tests/billing/test_concurrency.py);
    return ("ok", value) or ("error", exception) per worker."""
    barrier = threading.Barrier(workers)
    outcomes: list[tuple[str, Any]] = [("missing", None)] * workers

    def run(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            outcomes[index] = ("ok", work(index))
        except Exception as exc:
            outcomes[index] = ("error", exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a worker hung"
    return outcomes


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_refunds_within_the_bound_but_beyond_it_together_post_one(now, row_locker):
    account = make_account(credits=D("10"), now=now)
    key = make_key(account=account, now=now).api_key
    charge(key, "req-1", D("3"), now)
    user = User.objects.create_user("fin-race", password="pw", is_staff=True)
    # Another transaction holds the account row, so both refunds are in flight at once when it
    # lets go: without the engine's lock both would read 3 refundable and post.
    row_locker.lock_account(account.pk)
    released = threading.Event()

    def release_when_both_wait() -> None:
        deadline = time.monotonic() + 30
        while row_locker.waiting_backends() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        row_locker.release()
        released.set()

    releaser = threading.Thread(target=release_when_both_wait)
    releaser.start()
    outcomes = race(2, lambda i: refund(account, D("2"), f"race-{i}", user, now))
    releaser.join(timeout=60)
    assert released.is_set()

    posted = [value for status, value in outcomes if status == "ok"]
    refused = [value for status, value in outcomes if status == "error"]
    assert len(posted) == 1, outcomes
    assert len(refused) == 1 and isinstance(refused[0], RefundExceedsPaid), outcomes
    assert refused[0].refundable == D("1")
    account.refresh_from_db()
    assert account.balance == D("9")  # 10 - 3 used + 2 refunded once
    assert LedgerTransaction.objects.filter(kind="refund").count() == 1
    assert StaffAction.objects.count() == 1


# --- Revoking keys, in the finance service -----------------------------------------------------


@pytest.mark.django_db
def test_revoking_keys_writes_one_staff_action_per_key(account, now, staff):
    keys = [make_key(account=account, now=now).api_key for _ in range(2)]

    results = api_keys_revoke_by_staff(
        key_ids=[key.pk for key in reversed(keys)], user=staff, memo="leaked", now=now
    )

    assert [result.changed for result in results] == [True, True]
    for key in keys:
        key.refresh_from_db()
        assert (key.status, key.revoked_at) == (ApiKey.Status.REVOKED, now)
    actions = StaffAction.objects.order_by("pk")
    assert [(a.action, a.memo, a.user) for a in actions] == [
        ("api_key_revoke", "leaked", staff)
    ] * 2
    assert [a.details["api_key_id"] for a in actions] == [key.pk for key in keys]
    assert [a.target for a in actions] == [f"API key #{k.pk} ({k.prefix})" for k in keys]


@pytest.mark.django_db
def test_revoking_a_revoked_key_changes_and_records_nothing(issued_key, now, staff):
    api_keys_revoke_by_staff(key_ids=[issued_key.api_key.pk], user=staff, memo="x", now=now)

    [again] = api_keys_revoke_by_staff(
        key_ids=[issued_key.api_key.pk], user=staff, memo="again", now=now
    )

    assert again.changed is False
    assert StaffAction.objects.count() == 1


@pytest.mark.django_db
def test_revoking_keys_needs_a_memo(issued_key, now, staff):
    with pytest.raises(InvalidAmount):
        api_keys_revoke_by_staff(key_ids=[issued_key.api_key.pk], user=staff, memo=" ", now=now)

    issued_key.api_key.refresh_from_db()
    assert issued_key.api_key.status == ApiKey.Status.ACTIVE
    assert not StaffAction.objects.exists()


@pytest.mark.django_db
def test_a_failed_revoke_revokes_none_of_the_keys(issued_key, now, staff):
    with pytest.raises(Exception, match="no API key"):
        api_keys_revoke_by_staff(
            key_ids=[issued_key.api_key.pk, 999_999], user=staff, memo="m", now=now
        )

    issued_key.api_key.refresh_from_db()
    assert issued_key.api_key.status == ApiKey.Status.ACTIVE
    assert not StaffAction.objects.exists()


# --- The admin ------------------------------------------------------------------------------


@pytest.fixture
def finance_user(db: None) -> User:
    user = User.objects.create_user("finance", password="pw", is_staff=True)
    user.groups.add(Group.objects.get(name=FINANCE_GROUP))
    return user


@pytest.fixture
def finance(finance_user: User) -> Client:
    client = Client()
    client.force_login(finance_user)
    return client


@pytest.fixture
def reader(db: None) -> Client:
    """Staff who may read keys and accounts but is not in Finance."""
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_account", "view_apikey"])
    )
    client = Client()
    client.force_login(user)
    return client


def credit_url(account: Account, kind: str) -> str:
    return reverse("admin:billing_account_credit", args=[account.pk, kind])


def form_key(page: str) -> str:
    match = re.search(r'name="idempotency_key" value="([0-9a-f]+)"', page)
    assert match
    return match.group(1)


def action_choices(client: Client, changelist: str) -> set[str]:
    page = client.get(changelist).content.decode()
    select = re.search(r'<select name="action".*?</select>', page, re.S)
    return set(re.findall(r'<option value="(\w+)"', select.group(0))) - {""} if select else set()


def test_admin_revoke_confirms_with_the_prefixes_and_records_each_key(
    finance, finance_user, account, now
):
    keys = [make_key(account=account, now=now).api_key for _ in range(2)]

    response = finance.post(
        reverse("admin:billing_apikey_changelist"),
        {"action": "revoke", "_selected_action": [key.pk for key in keys]},
    )
    assert response.status_code == 302
    page = finance.get(response["Location"]).content.decode()
    assert all(key.prefix in page for key in keys)
    assert all(key.secret_hash not in page for key in keys)
    assert ApiKey.objects.filter(status=ApiKey.Status.ACTIVE).count() == 2  # nothing yet

    ids = ",".join(str(key.pk) for key in keys)
    done = finance.post(response["Location"], {"ids": ids, "memo": "customer asked"})

    assert done.status_code == 302
    assert ApiKey.objects.filter(status=ApiKey.Status.REVOKED).count() == 2
    actions = StaffAction.objects.order_by("pk")
    assert [(a.user, a.action, a.memo) for a in actions] == [
        (finance_user, "api_key_revoke", "customer asked")
    ] * 2
    assert {a.details["prefix"] for a in actions} == {key.prefix for key in keys}


def test_admin_revoke_without_a_memo_revokes_nothing(finance, issued_key):
    url = reverse("admin:billing_apikey_revoke") + f"?ids={issued_key.api_key.pk}"

    response = finance.post(url, {"ids": issued_key.api_key.pk, "memo": "  "})

    assert response.status_code == 200
    assert "This field is required." in response.content.decode()
    issued_key.api_key.refresh_from_db()
    assert issued_key.api_key.status == ApiKey.Status.ACTIVE
    assert not StaffAction.objects.exists()


def test_admin_revoke_refused_to_staff_outside_finance(reader, issued_key):
    url = reverse("admin:billing_apikey_revoke") + f"?ids={issued_key.api_key.pk}"

    assert reader.get(url).status_code == 403
    assert reader.post(url, {"ids": issued_key.api_key.pk, "memo": "x"}).status_code == 403
    issued_key.api_key.refresh_from_db()
    assert issued_key.api_key.status == ApiKey.Status.ACTIVE
    assert "revoke" not in action_choices(reader, reverse("admin:billing_apikey_changelist"))


def test_admin_refund_confirmation_shows_the_refundable_amount(finance, account, issued_key, now):
    charge(issued_key.api_key, "req-1", D("0.77"), now)
    url = credit_url(account, "refund")
    key = form_key(finance.get(url).content.decode())
    assert 'id="refundable">0.7700000000<' in finance.get(url).content.decode()

    page = finance.post(url, {"amount": "0.5", "memo": "m", "idempotency_key": key}).content

    assert re.search(r'id="refundable">0\.7700000000<', page.decode())
    assert re.search(r'id="balance-after">9\.7300000000<', page.decode())


def test_admin_refund_beyond_the_bound_is_a_form_error(finance, account, issued_key, now):
    charge(issued_key.api_key, "req-1", D("0.77"), now)
    url = credit_url(account, "refund")
    key = form_key(finance.get(url).content.decode())
    before = raw_ledger(account.pk)

    preview = finance.post(url, {"amount": "100000", "memo": "m", "idempotency_key": key})
    confirm = finance.post(
        url, {"amount": "100000", "memo": "m", "idempotency_key": key, "confirm": "1"}
    )

    for response in (preview, confirm):
        assert response.status_code == 200
        assert "a refund can return at most 0.7700000000 USD" in response.content.decode()
    assert 'id="balance-after"' not in preview.content.decode()  # never reaches the confirmation
    assert raw_ledger(account.pk) == before
    assert not StaffAction.objects.exists()


def test_adjustment_needs_its_own_permission(finance, finance_user, account):
    url = credit_url(account, "adjustment")
    form = {"amount": "-5", "memo": "m", "idempotency_key": "k1", "confirm": "1"}

    assert finance.get(url).status_code == 403
    assert finance.post(url, form).status_code == 403
    account.refresh_from_db()
    assert account.balance == D("10")
    change = finance.get(reverse("admin:billing_account_change", args=[account.pk]))
    statement = finance.get(reverse("admin:billing_account_statement", args=[account.pk]))
    for page in (change, statement):
        assert credit_url(account, "adjustment") not in page.content.decode()
        assert credit_url(account, "grant") in page.content.decode()
    changelist = reverse("admin:billing_account_changelist")
    assert "credit_adjustment" not in action_choices(finance, changelist)

    finance_user.user_permissions.add(Permission.objects.get(codename="post_balance_adjustment"))

    assert finance.post(url, form).status_code == 302
    account.refresh_from_db()
    assert account.balance == D("5")
    assert "credit_adjustment" in action_choices(finance, changelist)
    assert StaffAction.objects.get().action == "credit_adjustment"


def test_finance_group_does_not_get_balance_adjustments(db):
    finance_group_ensure()

    group = Group.objects.get(name=FINANCE_GROUP)
    codenames = set(group.permissions.values_list("codename", flat=True))
    assert "post_adjustment" in codenames
    assert "post_balance_adjustment" not in codenames
    assert Permission.objects.filter(
        codename="post_balance_adjustment", content_type__app_label="billing"
    ).exists()
