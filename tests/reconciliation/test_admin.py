"""The finance admin through the Django test client: every action for a Finance user, every
refusal for staff outside Finance, read-only ledger, streamed CSV export, dashboard."""

from __future__ import annotations

import csv
import io
import re
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.test import Client
from django.urls import reverse

from billing.models import SYSTEM_ACCOUNT_IDS, Account, ApiKey, Hold, LedgerTransaction
from billing.services.accounts import credit_post
from billing.services.holds import hold_place, hold_settle
from reconciliation.models import ReconciliationItem, StaffAction

pytestmark = pytest.mark.django_db

REVENUE = SYSTEM_ACCOUNT_IDS[Account.Kind.REVENUE]
WRITE_OFFS = SYSTEM_ACCOUNT_IDS[Account.Kind.WRITE_OFFS]
COST = Decimal("0.1234567891")
HELD = Decimal("1.5")
VIEW_PERMISSIONS = [
    "view_account",
    "view_apikey",
    "view_ledgertransaction",
    "view_ledgerleg",
    "view_hold",
    "view_tariff",
    "view_reconciliationitem",
    "view_staffaction",
]
ITEM_ACTIONS = ["retry", "charge", "write_off", "resolve"]
BALANCE_ADJUSTMENT = "post_balance_adjustment"
CREDIT_KINDS = ["grant", "purchase", "refund", "adjustment"]


@pytest.fixture
def finance_user(db) -> User:
    user = User.objects.create_user("finance", password="pw", is_staff=True)
    user.groups.add(Group.objects.get(name="Finance"))
    return user


@pytest.fixture
def viewer(db) -> User:
    """Staff who may read everything but is not in Finance."""
    user = User.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=VIEW_PERMISSIONS))
    return user


@pytest.fixture
def finance(finance_user) -> Client:
    client = Client()
    client.force_login(finance_user)
    return client


@pytest.fixture
def reader(viewer) -> Client:
    client = Client()
    client.force_login(viewer)
    return client


@pytest.fixture
def item(issued_key, now) -> ReconciliationItem:
    hold = hold_place(
        api_key=issued_key.api_key, request_id="req-a", amount=HELD, now=now, model_alias="m-1"
    )
    return ReconciliationItem.objects.create(
        kind=ReconciliationItem.Kind.DEDUCTION_FAILURE,
        request_id="req-a",
        account_id=hold.account_id,
        key_prefix=issued_key.api_key.prefix,
        model_alias="m-1",
        usage={"input_tokens": 10, "output_tokens": 5},
        cost=COST,
        held_amount=HELD,
        error="OperationalError",
        attempts=26,
        created_at=now,
    )


def confirm_url(action: str, *items: ReconciliationItem) -> str:
    url = reverse("admin:reconciliation_reconciliationitem_confirm", args=[action])
    return f"{url}?ids={','.join(str(item.pk) for item in items)}"


def credit_url(account: Account, kind: str) -> str:
    return reverse("admin:billing_account_credit", args=[account.pk, kind])


def legs(request_id: str) -> dict[int, Decimal]:
    txn = LedgerTransaction.objects.get(request_id=request_id)
    return {leg.account_id: leg.amount for leg in txn.legs.all()}


def action_choices(client: Client, changelist: str) -> set[str]:
    page = client.get(changelist).content.decode()
    select = re.search(r'<select name="action".*?</select>', page, re.S)
    return set(re.findall(r'<option value="(\w+)"', select.group(0))) - {""} if select else set()


# --- Reconciliation item actions ----------------------------------------------------------------


def test_confirmation_page_shows_the_charge_effect_on_the_balance(finance, item):
    page = finance.get(confirm_url("charge", item)).content.decode()

    assert "charge 0.1234567891 USD" in page
    assert "balance 10.0000000000 -&gt; 9.8765432109" in page
    assert not LedgerTransaction.objects.filter(request_id="req-a").exists()


def test_finance_user_charges_an_item(finance, finance_user, item, account):
    response = finance.post(confirm_url("charge", item), {"ids": item.pk, "memo": "agreed"})

    assert response.status_code == 302
    assert legs("req-a") == {account.pk: -COST, REVENUE: COST}
    account.refresh_from_db()
    assert (account.balance, account.held) == (Decimal("9.8765432109"), Decimal(0))
    action = StaffAction.objects.get()
    assert (action.user, action.action, action.memo) == (finance_user, "item_charge", "agreed")


def test_finance_user_writes_off_an_item(finance, finance_user, item, account):
    finance.post(confirm_url("write_off", item), {"ids": item.pk, "memo": "goodwill"})

    assert legs("req-a") == {REVENUE: COST, WRITE_OFFS: -COST}
    account.refresh_from_db()
    assert (account.balance, account.held) == (Decimal("10"), Decimal(0))
    item.refresh_from_db()
    assert (item.status, item.resolved_by) == ("written_off", finance_user)
    assert StaffAction.objects.get().memo == "goodwill"


def test_finance_user_resolves_an_item_with_a_note(finance, item):
    finance.post(confirm_url("resolve", item), {"ids": item.pk, "memo": "refunded by card"})

    item.refresh_from_db()
    assert (item.status, item.resolution_memo) == ("resolved", "refunded by card")
    assert not LedgerTransaction.objects.filter(request_id="req-a").exists()


def test_finance_user_retries_an_item_and_the_settle_lands(
    finance, item, account, django_capture_on_commit_callbacks
):
    from config.celery import app

    app.conf.task_always_eager = True
    try:
        with django_capture_on_commit_callbacks(execute=True):
            finance.post(confirm_url("retry", item), {"ids": item.pk, "memo": "db back"})
    finally:
        app.conf.task_always_eager = False

    assert legs("req-a") == {account.pk: -COST, REVENUE: COST}
    assert StaffAction.objects.get().action == "item_retry"


def test_item_action_without_memo_posts_nothing(finance, item):
    response = finance.post(confirm_url("write_off", item), {"ids": item.pk, "memo": " "})

    assert response.status_code == 200
    assert "This field is required" in response.content.decode()
    assert not LedgerTransaction.objects.filter(request_id="req-a").exists()
    assert not StaffAction.objects.exists()


def test_double_submitted_write_off_posts_once(finance, item):
    first = finance.post(confirm_url("write_off", item), {"ids": item.pk, "memo": "goodwill"})
    second = finance.post(
        confirm_url("write_off", item), {"ids": item.pk, "memo": "goodwill"}, follow=True
    )

    assert first.status_code == 302
    assert "already written_off" in second.content.decode()
    assert LedgerTransaction.objects.filter(request_id="req-a").count() == 1
    assert StaffAction.objects.count() == 1


def test_charge_after_automatic_settle_charges_nothing(finance, item, account, now):
    hold_settle(request_id="req-a", cost=COST, now=now)

    response = finance.post(
        confirm_url("charge", item), {"ids": item.pk, "memo": "check"}, follow=True
    )

    assert "nothing new charged" in response.content.decode()
    assert LedgerTransaction.objects.filter(request_id="req-a").count() == 1
    account.refresh_from_db()
    assert account.balance == Decimal("9.8765432109")


def test_charge_after_write_off_posts_nothing(finance, item, account, issued_key, now):
    # A second item for the same request (its hold also expired into the queue).
    other = ReconciliationItem.objects.create(
        kind=ReconciliationItem.Kind.EXPIRED_HOLD,
        request_id="req-a",
        account=account,
        cost=COST,
        held_amount=HELD,
        created_at=now,
    )
    finance.post(confirm_url("write_off", item), {"ids": item.pk, "memo": "goodwill"})

    finance.post(confirm_url("charge", other), {"ids": other.pk, "memo": "oops"})

    assert LedgerTransaction.objects.filter(request_id="req-a").get().kind == "write_off"
    account.refresh_from_db()
    assert account.balance == Decimal("10")


def test_bulk_action_handles_each_item(finance, item, issued_key, now, account):
    hold_place(api_key=issued_key.api_key, request_id="req-b", amount=HELD, now=now)
    second = ReconciliationItem.objects.create(
        kind=ReconciliationItem.Kind.DEDUCTION_FAILURE,
        request_id="req-b",
        account=account,
        cost=Decimal("0.0000000009"),
        held_amount=HELD,
        created_at=now,
    )
    changelist = reverse("admin:reconciliation_reconciliationitem_changelist")

    redirect = finance.post(
        changelist, {"action": "charge", "_selected_action": [item.pk, second.pk]}
    )
    finance.post(redirect["Location"], {"ids": f"{item.pk},{second.pk}", "memo": "batch"})

    account.refresh_from_db()
    assert account.balance == Decimal("10") - COST - Decimal("0.0000000009")
    assert StaffAction.objects.count() == 2


def test_item_actions_are_offered_to_finance(finance, item):
    changelist = reverse("admin:reconciliation_reconciliationitem_changelist")

    assert set(ITEM_ACTIONS) <= action_choices(finance, changelist)


def test_item_actions_are_hidden_from_staff_outside_finance(reader, item):
    changelist = reverse("admin:reconciliation_reconciliationitem_changelist")

    assert reader.get(changelist).status_code == 200
    assert not set(ITEM_ACTIONS) & action_choices(reader, changelist)
    assert (
        "Write off"
        not in reader.get(
            reverse("admin:reconciliation_reconciliationitem_change", args=[item.pk])
        ).content.decode()
    )


@pytest.mark.parametrize("action", ITEM_ACTIONS)
def test_item_confirmation_refused_to_staff_outside_finance(reader, item, account, action):
    assert reader.get(confirm_url(action, item)).status_code == 403
    response = reader.post(confirm_url(action, item), {"ids": item.pk, "memo": "sneaky"})

    assert response.status_code == 403
    item.refresh_from_db()
    assert item.status == ReconciliationItem.Status.PENDING
    assert not LedgerTransaction.objects.filter(request_id="req-a").exists()
    assert not StaffAction.objects.exists()


@pytest.mark.parametrize("action", ITEM_ACTIONS)
def test_item_action_posted_to_changelist_by_outsider_does_nothing(reader, item, action):
    changelist = reverse("admin:reconciliation_reconciliationitem_changelist")

    response = reader.post(changelist, {"action": action, "_selected_action": [item.pk]})

    # Django treats an action the user may not run as no action: no redirect to a confirmation.
    assert "confirm" not in response.get("Location", "")
    item.refresh_from_db()
    assert item.status == ReconciliationItem.Status.PENDING


# --- Credits on accounts --------------------------------------------------------------------


def credit_form_key(page: str) -> str:
    match = re.search(r'name="idempotency_key" value="([0-9a-f]+)"', page)
    assert match, "the form carries an idempotency key"
    return match.group(1)


def test_credit_confirmation_shows_the_balance_effect(finance, account):
    key = credit_form_key(finance.get(credit_url(account, "grant")).content.decode())

    page = finance.post(
        credit_url(account, "grant"),
        {"amount": "2.5", "memo": "promo", "idempotency_key": key},
    ).content.decode()

    assert re.search(r'id="balance-now">10\.0000000000<', page)
    assert re.search(r'id="balance-after">12\.5000000000<', page)
    account.refresh_from_db()
    assert account.balance == Decimal("10")


@pytest.mark.parametrize(
    ("kind", "amount", "expected"),
    [
        ("grant", "2.5", Decimal("12.5")),
        ("purchase", "100", Decimal("110")),
        ("refund", "0.0000000001", Decimal("9.0000000001")),
        ("adjustment", "-0.75", Decimal("9.25")),
    ],
    ids=CREDIT_KINDS,
)
def test_finance_user_posts_a_credit(
    finance, finance_user, account, issued_key, now, kind, amount, expected
):
    if kind == "refund":  # a refund returns at most what was charged: charge 1 first
        hold_place(api_key=issued_key.api_key, request_id="req-used", amount=Decimal(1), now=now)
        hold_settle(request_id="req-used", cost=Decimal(1), now=now)
    if kind == "adjustment":  # not a Finance permission: a finance lead grants it
        finance_user.user_permissions.add(Permission.objects.get(codename=BALANCE_ADJUSTMENT))
    key = credit_form_key(finance.get(credit_url(account, kind)).content.decode())

    response = finance.post(
        credit_url(account, kind),
        {"amount": amount, "memo": "ticket 9", "idempotency_key": key, "confirm": "1"},
    )

    assert response.status_code == 302
    account.refresh_from_db()
    assert account.balance == expected
    action = StaffAction.objects.get()
    assert (action.user, action.action, action.memo) == (finance_user, f"credit_{kind}", "ticket 9")
    assert action.transaction_id is not None
    assert LedgerTransaction.objects.filter(pk=action.transaction_id, kind=kind).exists()


def test_double_submitted_credit_posts_once(finance, account):
    key = credit_form_key(finance.get(credit_url(account, "grant")).content.decode())
    form = {"amount": "5", "memo": "promo", "idempotency_key": key, "confirm": "1"}

    finance.post(credit_url(account, "grant"), form)
    second = finance.post(credit_url(account, "grant"), form, follow=True)

    assert "nothing new posted" in second.content.decode()
    account.refresh_from_db()
    assert account.balance == Decimal("15")
    assert LedgerTransaction.objects.filter(kind="grant", memo="promo").count() == 1
    assert StaffAction.objects.count() == 1


def test_each_rendered_credit_form_gets_a_fresh_key(finance, account):
    first = credit_form_key(finance.get(credit_url(account, "grant")).content.decode())
    second = credit_form_key(finance.get(credit_url(account, "grant")).content.decode())

    assert first != second


def test_credit_without_memo_posts_nothing(finance, account):
    response = finance.post(
        credit_url(account, "grant"),
        {"amount": "5", "memo": "", "idempotency_key": "k1", "confirm": "1"},
    )

    assert response.status_code == 200
    account.refresh_from_db()
    assert account.balance == Decimal("10")


def test_negative_grant_is_refused_with_a_message(finance, account):
    response = finance.post(
        credit_url(account, "grant"),
        {"amount": "-5", "memo": "x", "idempotency_key": "k2", "confirm": "1"},
    )

    assert "needs a positive amount" in response.content.decode()
    account.refresh_from_db()
    assert account.balance == Decimal("10")


@pytest.mark.parametrize("kind", CREDIT_KINDS)
def test_credit_refused_to_staff_outside_finance(reader, account, kind):
    assert reader.get(credit_url(account, kind)).status_code == 403
    response = reader.post(
        credit_url(account, kind),
        {"amount": "5", "memo": "sneaky", "idempotency_key": "k3", "confirm": "1"},
    )

    assert response.status_code == 403
    account.refresh_from_db()
    assert account.balance == Decimal("10")


def test_credit_actions_offered_to_finance_only(finance, reader):
    changelist = reverse("admin:billing_account_changelist")
    expected = {f"credit_{kind}" for kind in CREDIT_KINDS if kind != "adjustment"}

    assert expected <= action_choices(finance, changelist)
    assert "credit_adjustment" not in action_choices(finance, changelist)
    assert not (expected | {"credit_adjustment"}) & action_choices(reader, changelist)


def test_credit_action_redirects_to_the_confirmation_page(finance, account):
    response = finance.post(
        reverse("admin:billing_account_changelist"),
        {"action": "credit_refund", "_selected_action": [account.pk]},
    )

    assert response["Location"] == credit_url(account, "refund")


# --- Accounts, statement ----------------------------------------------------------------------


def test_account_list_shows_balance_held_available(reader, account, issued_key, now):
    hold_place(api_key=issued_key.api_key, request_id="req-h", amount=Decimal("0.4"), now=now)

    page = reader.get(reverse("admin:billing_account_changelist")).content.decode()

    for figure in ("10.0000000000", "0.4000000000", "9.6000000000"):
        assert figure in page


def test_account_search_by_id(reader, account):
    other = Account.objects.create(name="zzz-other")

    page = reader.get(
        reverse("admin:billing_account_changelist") + f"?q={account.pk}"
    ).content.decode()

    assert account.name in page
    assert other.name not in page


def test_statement_lists_entries_newest_first(reader, account, now):
    for n in (1, 2, 3):
        credit_post(
            kind="grant",
            account_id=account.pk,
            amount=Decimal(n),
            memo=f"grant-{n}",
            idempotency_key=f"g{n}",
            now=now,
        )

    page = reader.get(reverse("admin:billing_account_statement", args=[account.pk]))
    text = page.content.decode()

    assert page.status_code == 200
    assert text.index("grant-3") < text.index("grant-2") < text.index("grant-1")
    assert text.index("grant-1") < text.index("opening credits")
    assert 'id="statement-balance">16.0000000000<' in text


def test_statement_is_paginated(reader, account, now):
    for n in range(55):
        credit_post(
            kind="grant",
            account_id=account.pk,
            amount=Decimal("0.01"),
            memo=f"p{n}",
            idempotency_key=f"p{n}",
            now=now,
        )
    url = reverse("admin:billing_account_statement", args=[account.pk])

    first = reader.get(url).content.decode()
    second = reader.get(url + "?page=2").content.decode()

    assert "page 1 of 2 (56 entries)" in first
    assert "opening credits" in second
    assert "opening credits" not in first


# --- Ledger ---------------------------------------------------------------------------------


@pytest.fixture
def superuser_client(db) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", password="pw"))
    return client


def test_ledger_has_no_add_change_or_delete_even_for_a_superuser(superuser_client, account):
    txn = LedgerTransaction.objects.get(memo="opening credits")
    change = reverse("admin:billing_ledgertransaction_change", args=[txn.pk])

    assert superuser_client.get(reverse("admin:billing_ledgertransaction_add")).status_code == 403
    assert superuser_client.post(change, {"memo": "edited"}).status_code == 403
    delete = reverse("admin:billing_ledgertransaction_delete", args=[txn.pk])
    assert superuser_client.post(delete, {"post": "yes"}).status_code == 403
    txn.refresh_from_db()
    assert txn.memo == "opening credits"
    assert "delete_selected" not in action_choices(
        superuser_client, reverse("admin:billing_ledgertransaction_changelist")
    )


def test_ledger_detail_shows_both_legs(reader, account):
    txn = LedgerTransaction.objects.get(memo="opening credits")

    page = reader.get(reverse("admin:billing_ledgertransaction_change", args=[txn.pk]))

    text = page.content.decode()
    assert "10.0000000000" in text
    assert "-10.0000000000" in text


def test_ledger_search_by_request_id(reader, item, now):
    hold_settle(request_id="req-a", cost=COST, now=now)

    page = reader.get(reverse("admin:billing_ledgertransaction_changelist") + "?q=req-a")

    text = page.content.decode()
    assert "req-a" in text
    assert "opening credits" not in text


def test_ledger_filter_by_account(reader, account, now):
    other = Account.objects.create(name="other")
    credit_post(
        kind="grant",
        account_id=other.pk,
        amount=Decimal(1),
        memo="for-other",
        idempotency_key="o1",
        now=now,
    )

    page = reader.get(
        reverse("admin:billing_ledgertransaction_changelist") + f"?account={other.pk}"
    ).content.decode()

    assert "for-other" in page
    assert "opening credits" not in page


def export_rows(client: Client, query: str = "") -> list[dict[str, str]]:
    response = client.get(reverse("admin:billing_ledgertransaction_export") + query)
    assert response.status_code == 200
    assert response.streaming
    body = b"".join(response.streaming_content).decode()  # type: ignore[attr-defined]
    return list(csv.DictReader(io.StringIO(body)))


def test_csv_export_has_every_leg_to_the_last_digit(reader, account, item, now):
    hold_settle(request_id="req-a", cost=COST, now=now)

    rows = export_rows(reader, "?kind__exact=usage")

    assert [(row["request_id"], row["account_id"], row["amount"]) for row in rows] == [
        ("req-a", str(account.pk), "-0.1234567891"),
        ("req-a", str(REVENUE), "0.1234567891"),
    ]


def test_csv_export_honours_the_search(reader, account, now):
    for n in range(3):
        credit_post(
            kind="grant",
            account_id=account.pk,
            amount=Decimal(1),
            memo="x",
            idempotency_key=f"bulk-{n}",
            now=now,
        )

    rows = export_rows(reader, "?q=bulk-1")

    assert {row["idempotency_key"] for row in rows} == {"bulk-1"}
    assert len(rows) == 2


def test_csv_export_streams_across_batches(reader, account, now, monkeypatch):
    import billing.admin

    monkeypatch.setattr(billing.admin, "CSV_BATCH_SIZE", 2)  # force several keyset batches
    for n in range(5):
        credit_post(
            kind="grant",
            account_id=account.pk,
            amount=Decimal(n + 1),
            memo="x",
            idempotency_key=f"batch-{n}",
            now=now,
        )

    rows = export_rows(reader, "?kind__exact=grant")

    assert len(rows) == 12  # opening credits + 5 grants, two legs each
    assert sum(Decimal(row["amount"]) for row in rows) == 0
    assert len({row["transaction_id"] for row in rows}) == 6


# --- Holds, keys, dashboard, staff actions --------------------------------------------------------


def test_hold_list_shows_state_and_expiry(reader, issued_key, now):
    hold_place(api_key=issued_key.api_key, request_id="req-x", amount=Decimal("0.3"), now=now)

    page = reader.get(
        reverse("admin:billing_hold_changelist") + "?state__exact=active"
    ).content.decode()

    assert "req-x" in page
    assert "overdue by" in page or "in " in page
    assert Hold.objects.get(request_id="req-x").state == "active"


def test_api_key_pages_never_show_the_secret_hash(reader, issued_key):
    key = issued_key.api_key

    detail = reader.get(reverse("admin:billing_apikey_change", args=[key.pk])).content.decode()
    listing = reader.get(reverse("admin:billing_apikey_changelist")).content.decode()

    assert key.prefix in detail
    assert key.secret_hash not in detail
    assert key.secret_hash not in listing


def test_finance_user_revokes_a_key(finance, finance_user, issued_key):
    key = issued_key.api_key
    response = finance.post(
        reverse("admin:billing_apikey_changelist"),
        {"action": "revoke", "_selected_action": [key.pk]},
    )
    finance.post(response["Location"], {"ids": key.pk, "memo": "leaked in a repo"})

    key.refresh_from_db()
    assert key.status == ApiKey.Status.REVOKED
    action = StaffAction.objects.get()
    assert (action.user, action.action, action.memo) == (
        finance_user,
        "api_key_revoke",
        "leaked in a repo",
    )


def test_staff_outside_finance_cannot_revoke_a_key(reader, issued_key):
    reader.post(
        reverse("admin:billing_apikey_changelist"),
        {"action": "revoke", "_selected_action": [issued_key.api_key.pk]},
    )

    issued_key.api_key.refresh_from_db()
    assert issued_key.api_key.status == ApiKey.Status.ACTIVE


def test_dashboard_shows_pending_queues_and_revenue_chart(reader, item, account, issued_key):
    from django.utils import timezone

    today = timezone.now()
    hold_place(api_key=issued_key.api_key, request_id="req-d", amount=HELD, now=today)
    hold_settle(request_id="req-d", cost=Decimal("0.5"), now=today)

    page = reader.get(reverse("admin:reconciliation_reconciliationitem_dashboard"))

    text = page.content.decode()
    assert page.status_code == 200
    assert re.search(r'id="pending-failures">.*?class="count">1<.*?worth 0\.1234567891', text, re.S)
    assert "<svg" in text
    assert text.count("<rect") == 30
    assert f"{today:%Y-%m-%d}</td><td>0.5000000000" in text
    assert "last 30 days (UTC): 0.5000000000 USD" in text


def test_admin_index_links_to_the_dashboard(reader):
    page = reader.get(reverse("admin:index")).content.decode()

    assert reverse("admin:reconciliation_reconciliationitem_dashboard") in page


def test_staff_actions_are_listed_read_only(finance, item):
    finance.post(confirm_url("resolve", item), {"ids": item.pk, "memo": "noted"})
    action = StaffAction.objects.get()

    page = finance.get(reverse("admin:reconciliation_staffaction_changelist")).content.decode()

    assert "noted" in page
    assert finance.get(reverse("admin:reconciliation_staffaction_add")).status_code == 403
    change = reverse("admin:reconciliation_staffaction_change", args=[action.pk])
    assert finance.post(change, {"memo": "changed"}).status_code == 403


def test_statement_of_a_system_account_sums_its_legs(reader, finance, item):
    finance.post(confirm_url("write_off", item), {"ids": item.pk, "memo": "goodwill"})

    page = reader.get(reverse("admin:billing_account_statement", args=[WRITE_OFFS]))

    assert page.status_code == 200
    assert 'id="statement-balance">-0.1234567891<' in page.content.decode()


def test_csv_export_streams_under_asgi(viewer, account, now):
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    client = AsyncClient()
    client.force_login(viewer)

    async def fetch() -> tuple[bool, str]:
        response = await client.get(
            reverse("admin:billing_ledgertransaction_export") + "?kind__exact=grant"
        )
        chunks = [chunk async for chunk in response.streaming_content]  # type: ignore[attr-defined]
        return response.is_async, b"".join(chunks).decode()  # type: ignore[attr-defined]

    is_async, body = async_to_sync(fetch)()

    assert is_async  # an async generator: ASGI servers stream it instead of buffering it
    rows = list(csv.DictReader(io.StringIO(body)))
    assert [(row["account_id"], row["amount"]) for row in rows] == [
        (str(account.pk), "10.0000000000"),
        (str(SYSTEM_ACCOUNT_IDS[Account.Kind.PROMOTIONS]), "-10.0000000000"),
    ]
