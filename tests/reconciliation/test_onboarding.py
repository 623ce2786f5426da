"""Issue 17, items 1, 2 and 6: onboarding in the admin (accounts, keys, budgets, upstreams and
routes) through confirmation pages and StaffActions, the account page as one screen, and money
rounded for reading with the exact value kept. Through the Django test client and the services."""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group, User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from billing.admin import money_display, money_reading
from billing.errors import ApiKeyInactive, BudgetExceeded, InvalidAmount, InvalidKeyField
from billing.models import Account, ApiKey, LedgerLeg, LedgerTransaction, UsageRecord
from billing.pricing import Usage
from billing.selectors import account_overview_get, account_usage_by_day
from billing.services.accounts import credit_post
from billing.services.holds import RequestDetails, hold_place, hold_settle
from billing.services.keys import MAX_RATE_LIMIT, api_key_hash, api_key_issue, api_key_revoke
from billing.services.tariffs import tariff_set
from gateway.models import Route, Upstream
from gateway.selectors import model_context_cached, model_context_get
from gateway.services import route_save, upstream_save
from reconciliation.models import ReconciliationItem, StaffAction
from reconciliation.services.onboarding import (
    account_open_by_staff,
    api_key_budget_set_by_staff,
    api_key_issue_by_staff,
    api_key_rate_limits_set_by_staff,
    route_save_by_staff,
)
from tests.factories import EPOCH

pytestmark = pytest.mark.django_db
D = Decimal


@pytest.fixture
def finance_user(db: None) -> User:
    user = User.objects.create_user("finance", password="pw", is_staff=True)
    user.groups.add(Group.objects.get(name="Finance"))
    return user


@pytest.fixture
def finance(finance_user: User) -> Client:
    client = Client()
    client.force_login(finance_user)
    return client


@pytest.fixture
def superuser(db: None) -> User:
    return User.objects.create_superuser("root", password="pw")


def form_key(page: str, name: str = "form_key") -> str:
    match = re.search(rf'name="{name}" value="([0-9a-f]+)"', page)
    assert match, f"the form carries a {name}"
    return match.group(1)


# --- Reading money ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "shown"),
    [
        ("10.0000000000", "10.00"),
        ("0.1234567891", "0.1235"),
        ("1234567.5", "1,234,567.50"),
        ("-0.75", "-0.75"),
        ("0.0000125000", "0.000012"),
        ("-0.0000000001", "-0.0000000001"),
        ("0E-10", "0.00"),
    ],
    ids=["whole", "four-places", "grouped", "negative", "tiny", "smallest-unit", "zero"],
)
def test_money_reads_rounded(amount: str, shown: str) -> None:
    assert money_reading(D(amount)) == shown


def test_money_display_keeps_the_exact_value_on_hover_and_in_the_detail() -> None:
    amount = D("0.1234567891")

    assert money_display(amount) == ('<span class="money" title="0.1234567891 USD">0.1235</span>')
    assert money_display(amount, exact=True) == "0.1234567891"
    assert money_display(None) == "—"


# --- Accounts ---------------------------------------------------------------------------------


def test_account_open_by_staff_creates_a_zero_balance_account_and_records_it(finance_user, now):
    opened = account_open_by_staff(
        name=" Acme ",
        billing_email="ap@acme.test",
        overdraft=D("5"),
        user=finance_user,
        memo="signed 2026-11-20",
        form_key="f1",
        now=now,
    )

    account = Account.objects.get(pk=opened.account.pk)
    assert (account.name, account.billing_email, account.overdraft) == ("Acme", "ap@acme.test", 5)
    assert account.balance == 0
    assert not LedgerLeg.objects.filter(account=account).exists()
    action = StaffAction.objects.get()
    assert (action.action, action.memo, action.details["account_id"]) == (
        "account_open",
        "signed 2026-11-20",
        account.pk,
    )


def test_account_open_replayed_with_the_same_form_creates_nothing_new(finance_user, now):
    args = {
        "name": "Acme",
        "billing_email": "",
        "overdraft": D(0),
        "user": finance_user,
        "memo": "m",
        "form_key": "f1",
        "now": now,
    }
    first = account_open_by_staff(**args)
    second = account_open_by_staff(**args)

    assert second.replayed and not first.replayed
    assert second.account.pk == first.account.pk
    assert Account.objects.filter(name="Acme").count() == 1
    assert StaffAction.objects.count() == 1


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("name", "  ", "needs a name"), ("memo", " ", "memo"), ("overdraft", D("-1"), "negative")],
)
def test_account_open_refusals_create_nothing(finance_user, now, field, value, message):
    args = {
        "name": "Acme",
        "billing_email": "",
        "overdraft": D(0),
        "user": finance_user,
        "memo": "m",
        "form_key": "f1",
        "now": now,
        field: value,
    }
    with pytest.raises(InvalidAmount, match=message):
        account_open_by_staff(**args)
    assert not Account.objects.filter(name="Acme").exists()
    assert not StaffAction.objects.exists()


def test_finance_user_adds_an_account_and_posts_its_opening_credit(finance, finance_user):
    add = reverse("admin:billing_account_add")
    assert add in finance.get(reverse("admin:billing_account_changelist")).content.decode()
    key = form_key(finance.get(add).content.decode())
    fields = {
        "name": "Acme",
        "billing_email": "ap@acme.test",
        "overdraft": "2.5",
        "opening_credit": "25",
        "opening_credit_kind": "purchase",
        "memo": "new customer, contract 17",
        "form_key": key,
    }

    review = finance.post(add, fields).content.decode()
    assert 'id="open-name">Acme<' in review
    assert "25.0000000000 USD as a purchase" in review
    assert not Account.objects.filter(name="Acme").exists()  # a review changes nothing

    created = finance.post(add, {**fields, "confirm": "1"})
    account = Account.objects.get(name="Acme")
    credit = reverse("admin:billing_account_credit", args=[account.pk, "purchase"])
    assert created.status_code == 302
    assert created["Location"].startswith(credit + "?")
    assert account.billing_email == "ap@acme.test"
    assert account.overdraft == D("2.5")
    assert account.balance == 0  # the credit is not posted until its own confirmation

    credit_page = finance.get(created["Location"]).content.decode()
    assert 'value="25.0000000000"' in credit_page
    credit_key = form_key(credit_page, "idempotency_key")
    posted = finance.post(
        credit,
        {"amount": "25", "memo": "Opening credit", "idempotency_key": credit_key, "confirm": "1"},
    )

    assert posted["Location"] == reverse("admin:billing_account_change", args=[account.pk])
    account.refresh_from_db()
    assert account.balance == D("25")
    assert list(StaffAction.objects.order_by("pk").values_list("action", flat=True)) == [
        "account_open",
        "credit_purchase",
    ]
    assert {a.user for a in StaffAction.objects.all()} == {finance_user}


def test_account_add_form_errors_keep_the_review_from_happening(finance):
    add = reverse("admin:billing_account_add")
    key = form_key(finance.get(add).content.decode())

    page = finance.post(
        add, {"name": "", "overdraft": "-1", "memo": "m", "form_key": key, "confirm": "1"}
    )

    assert page.status_code == 200
    assert "This field is required" in page.content.decode()
    assert not StaffAction.objects.exists()


# --- Keys -------------------------------------------------------------------------------------


def issue_fields(page: str, account: Account, **more: str) -> dict[str, str]:
    return {
        "account": str(account.pk),
        "name": "prod",
        "purpose": "batch",
        "scope": "inference",
        "budget_limit": "20",
        "budget_period": "day",
        "expires_at": "",
        "memo": "ticket 41",
        "form_key": form_key(page),
        **more,
    }


def test_finance_user_issues_a_key_and_sees_the_secret_once(finance, finance_user, account, caplog):
    caplog.set_level(logging.DEBUG)
    add = reverse("admin:billing_apikey_add")
    page = finance.get(f"{add}?account={account.pk}").content.decode()
    assert f'<option value="{account.pk}" selected>' in page
    fields = issue_fields(page, account)

    review = finance.post(add, fields).content.decode()
    assert "20.0000000000 USD per day" in review
    assert not ApiKey.objects.filter(account=account, name="prod").exists()

    issued = finance.post(add, {**fields, "confirm": "1"})
    text = issued.content.decode()
    secret = re.search(r'id="key-secret">(sk-gw-[^<]+)<', text)
    assert secret, "the secret is on the confirmation's answer"
    key = ApiKey.objects.get(account=account, name="prod")
    assert key.secret_hash == api_key_hash(secret.group(1))
    assert (key.purpose, key.scope, key.budget_limit, key.budget_period) == (
        "batch",
        "inference",
        D("20"),
        "day",
    )
    assert "no-store" in issued["Cache-Control"]

    again = finance.post(add, {**fields, "confirm": "1"}).content.decode()  # a reload
    assert 'id="key-already-issued"' in again
    assert secret.group(1) not in again
    assert ApiKey.objects.filter(account=account, name="prod").count() == 1

    action = StaffAction.objects.get(action="api_key_issue")
    assert (action.user, action.memo, action.details["prefix"]) == (
        finance_user,
        "ticket 41",
        key.prefix,
    )
    for where in (
        str(action.details),
        action.memo,
        action.target,
        finance.get(reverse("admin:billing_apikey_change", args=[key.pk])).content.decode(),
        finance.get(reverse("admin:billing_account_change", args=[account.pk])).content.decode(),
        finance.get(reverse("admin:billing_apikey_changelist")).content.decode(),
        caplog.text,
    ):
        assert secret.group(1) not in where
        assert secret.group(1)[len(key.prefix) :] not in where


def test_issued_key_form_refusals_show_on_the_form(finance, account):
    add = reverse("admin:billing_apikey_add")
    page = finance.get(add).content.decode()
    fields = issue_fields(page, account, budget_period="", confirm="1")

    answer = finance.post(add, fields).content.decode()

    assert "a budget needs both an amount and a period" in answer
    assert 'id="key-secret"' not in answer
    assert not ApiKey.objects.filter(name="prod").exists()
    assert not StaffAction.objects.exists()


def test_api_key_issue_by_staff_never_records_the_secret(finance_user, account, now):
    issued = api_key_issue_by_staff(
        account_id=account.pk,
        name="n",
        purpose="realtime",
        scope="admin",
        budget_limit=None,
        budget_period="",
        rpm=None,
        tpm=None,
        expires_at=now + timedelta(days=30),
        user=finance_user,
        memo="m",
        form_key="k1",
        now=now,
    )

    assert issued.secret is not None
    assert issued.api_key.scope == "admin"
    assert issued.api_key.expires_at == now + timedelta(days=30)
    action = StaffAction.objects.get()
    assert issued.secret not in repr(action.__dict__)


def test_finance_user_edits_a_key_budget_through_a_confirmation(
    finance, finance_user, issued_key, now
):
    key = issued_key.api_key
    hold_place(api_key=key, request_id="req-b", amount=D("0.5"), now=now)
    url = reverse("admin:billing_apikey_budget", args=[key.pk])
    key_page = finance.get(reverse("admin:billing_apikey_change", args=[key.pk])).content.decode()
    assert url in key_page

    review = finance.post(url, {"budget_limit": "3", "budget_period": "week", "memo": "raise"})
    text = review.content.decode()
    assert 'id="budget-now">no budget<' in text
    assert 'id="budget-after">3.0000000000 USD per week<' in text
    key.refresh_from_db()
    assert key.budget_limit is None

    done = finance.post(
        url, {"budget_limit": "3", "budget_period": "week", "memo": "raise", "confirm": "1"}
    )

    assert done.status_code == 302
    key.refresh_from_db()
    assert (key.budget_limit, key.budget_period) == (D("3"), "week")
    action = StaffAction.objects.get()
    assert (action.user, action.action, action.memo) == (
        finance_user,
        "api_key_budget_set",
        "raise",
    )
    assert action.details["before"] == {"budget_limit": None, "budget_period": ""}
    assert action.details["after"] == {"budget_limit": "3.0000000000", "budget_period": "week"}


def test_budget_edit_keeps_spend_and_applies_to_it(finance_user, issued_key, now):
    key = issued_key.api_key
    api_key_budget_set_by_staff(
        key_id=key.pk,
        budget_limit=D("1"),
        budget_period="day",
        user=finance_user,
        memo="m",
        now=now,
    )
    hold_place(api_key=key, request_id="req-1", amount=D("0.8"), now=now)
    hold_settle(request_id="req-1", cost=D("0.8"), now=now)

    api_key_budget_set_by_staff(
        key_id=key.pk,
        budget_limit=D("0.9"),
        budget_period="day",
        user=finance_user,
        memo="m",
        now=now,
    )

    key.refresh_from_db()
    assert key.budget_spent == D("0.8")
    with pytest.raises(BudgetExceeded):
        hold_place(api_key=key, request_id="req-2", amount=D("0.2"), now=now)
    assert StaffAction.objects.filter(action="api_key_budget_set").count() == 2


def test_budget_edit_refusal_changes_nothing(finance_user, issued_key, now):
    with pytest.raises(InvalidAmount):
        api_key_budget_set_by_staff(
            key_id=issued_key.api_key.pk,
            budget_limit=D("-1"),
            budget_period="day",
            user=finance_user,
            memo="m",
            now=now,
        )
    issued_key.api_key.refresh_from_db()
    assert issued_key.api_key.budget_limit is None
    assert not StaffAction.objects.exists()


def test_finance_user_issues_a_key_with_rate_limits(finance, finance_user, account):
    add = reverse("admin:billing_apikey_add")
    fields = issue_fields(finance.get(add).content.decode(), account, rpm="600", tpm="200000")

    review = finance.post(add, fields).content.decode()
    assert 'id="issue-rate-limits">600 requests and 200,000 tokens per minute<' in review
    assert not ApiKey.objects.filter(name="prod").exists()
    finance.post(add, {**fields, "confirm": "1"})

    key = ApiKey.objects.get(account=account, name="prod")
    assert (key.rpm, key.tpm) == (600, 200000)
    action = StaffAction.objects.get(action="api_key_issue")
    assert (action.details["rpm"], action.details["tpm"]) == (600, 200000)


def test_a_key_issued_without_rate_limits_has_none(finance, account):
    add = reverse("admin:billing_apikey_add")
    fields = issue_fields(finance.get(add).content.decode(), account, rpm="", tpm="")

    review = finance.post(add, fields).content.decode()
    assert 'id="issue-rate-limits">no limit<' in review
    finance.post(add, {**fields, "confirm": "1"})

    key = ApiKey.objects.get(account=account, name="prod")
    assert (key.rpm, key.tpm) == (None, None)
    action = StaffAction.objects.get(action="api_key_issue")
    assert (action.details["rpm"], action.details["tpm"]) == (None, None)


@pytest.mark.parametrize("stage", [{}, {"confirm": "1"}], ids=["review", "confirm"])
@pytest.mark.parametrize(
    ("field", "value"),
    [("rpm", "0"), ("tpm", "-5"), ("rpm", str(MAX_RATE_LIMIT + 1))],
    ids=["zero-rpm", "negative-tpm", "rpm-beyond-the-column"],
)
def test_key_issue_refuses_a_rate_limit_the_key_cannot_have(finance, account, field, value, stage):
    add = reverse("admin:billing_apikey_add")
    fields = issue_fields(finance.get(add).content.decode(), account, **{field: value}, **stage)

    answer = finance.post(add, fields).content.decode()

    assert f"{field} must be from 1 to {MAX_RATE_LIMIT}" in answer
    assert 'id="issue-rate-limits"' not in answer  # no review of it
    assert not ApiKey.objects.filter(name="prod").exists()
    assert not StaffAction.objects.exists()


def rate_limited_key(account: Account, now: datetime) -> ApiKey:
    return api_key_issue_by_staff(
        account_id=account.pk,
        name="limited",
        purpose="realtime",
        scope="inference",
        budget_limit=None,
        budget_period="",
        rpm=600,
        tpm=200000,
        expires_at=None,
        user=User.objects.create_user("issuer"),
        memo="m",
        form_key="k-limited",
        now=now,
    ).api_key


@pytest.mark.parametrize("who", ["finance_user", "superuser"])
def test_staff_edit_a_key_rate_limits_through_a_confirmation(request, who, account, now):
    user: User = request.getfixturevalue(who)
    client = Client()
    client.force_login(user)
    key = rate_limited_key(account, now)
    url = reverse("admin:billing_apikey_rate_limits", args=[key.pk])
    key_page = client.get(reverse("admin:billing_apikey_change", args=[key.pk])).content.decode()
    assert f'href="{url}">Edit rate limits<' in key_page
    edit = client.get(url).content.decode()
    assert 'name="rpm" value="600"' in edit

    review = client.post(url, {"rpm": "60", "tpm": "5000", "memo": "abuse ticket 9"})
    text = review.content.decode()
    assert 'id="rate-limits-now">600 requests and 200,000 tokens per minute<' in text
    assert 'id="rate-limits-after">60 requests and 5,000 tokens per minute<' in text
    key.refresh_from_db()
    assert (key.rpm, key.tpm) == (600, 200000)

    done = client.post(
        url, {"rpm": "60", "tpm": "5000", "memo": "abuse ticket 9", "confirm": "1"}, follow=True
    )

    assert done.redirect_chain == [(reverse("admin:billing_apikey_change", args=[key.pk]), 302)]
    assert f"Rate limits of {key.prefix} changed." in done.content.decode()
    key.refresh_from_db()
    assert (key.rpm, key.tpm) == (60, 5000)
    action = StaffAction.objects.get(action="api_key_rate_limits_set")
    assert (action.user, action.memo, action.target) == (
        user,
        "abuse ticket 9",
        f"API key #{key.pk} ({key.prefix})",
    )
    assert action.details == {
        "api_key_id": key.pk,
        "prefix": key.prefix,
        "account_id": account.pk,
        "before": {"rpm": 600, "tpm": 200000},
        "after": {"rpm": 60, "tpm": 5000},
    }


def test_clearing_a_rate_limit_removes_it(finance, account, now):
    key = rate_limited_key(account, now)
    url = reverse("admin:billing_apikey_rate_limits", args=[key.pk])

    review = finance.post(url, {"rpm": "", "tpm": "200000", "memo": "m"}).content.decode()
    assert 'id="rate-limits-after">200,000 tokens per minute<' in review
    finance.post(url, {"rpm": "", "tpm": "", "memo": "lift both", "confirm": "1"})

    key.refresh_from_db()
    assert (key.rpm, key.tpm) == (None, None)
    action = StaffAction.objects.get(action="api_key_rate_limits_set")
    assert (action.details["before"], action.details["after"]) == (
        {"rpm": 600, "tpm": 200000},
        {"rpm": None, "tpm": None},
    )


@pytest.mark.parametrize("stage", [{}, {"confirm": "1"}], ids=["review", "confirm"])
@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"memo": " "}, "This field is required."),  # the memo, stripped
        ({"rpm": "0"}, f"rpm must be from 1 to {MAX_RATE_LIMIT}"),
        ({"tpm": "-1"}, f"tpm must be from 1 to {MAX_RATE_LIMIT}"),
        ({"tpm": "lots"}, "Enter a whole number."),
    ],
    ids=["no-memo", "zero-rpm", "negative-tpm", "not-a-number"],
)
def test_rate_limits_edit_form_errors_change_nothing(finance, account, now, changes, error, stage):
    key = rate_limited_key(account, now)
    url = reverse("admin:billing_apikey_rate_limits", args=[key.pk])
    fields = {"rpm": "60", "tpm": "5000", "memo": "m", **changes, **stage}

    answer = finance.post(url, fields)

    assert answer.status_code == 200
    text = answer.content.decode()
    assert error in text
    assert 'id="rate-limits-after"' not in text
    key.refresh_from_db()
    assert (key.rpm, key.tpm) == (600, 200000)
    assert not StaffAction.objects.filter(action="api_key_rate_limits_set").exists()


def test_a_revoked_key_rate_limits_are_not_edited(finance, account, now):
    key = rate_limited_key(account, now)
    api_key_revoke(key_id=key.pk, now=now)
    url = reverse("admin:billing_apikey_rate_limits", args=[key.pk])
    change = reverse("admin:billing_apikey_change", args=[key.pk])
    assert url not in finance.get(change).content.decode()

    shown = finance.get(url, follow=True)
    posted = finance.post(url, {"rpm": "1", "tpm": "1", "memo": "m", "confirm": "1"}, follow=True)

    for answer in (shown, posted):
        assert answer.redirect_chain == [(change, 302)]
        assert "its rate limits cannot change" in answer.content.decode()
    key.refresh_from_db()
    assert (key.rpm, key.tpm) == (600, 200000)
    assert not StaffAction.objects.filter(action="api_key_rate_limits_set").exists()


def test_the_setting_services_refuse_a_key_revoked_under_their_lock(finance_user, account, now):
    # The admin page checks the key when it is shown; a revoke between that check and the
    # confirmation is refused by the service itself, under the key's row lock.
    key = rate_limited_key(account, now)
    api_key_revoke(key_id=key.pk, now=now)

    with pytest.raises(ApiKeyInactive) as budget_refused:
        api_key_budget_set_by_staff(
            key_id=key.pk,
            budget_limit=D("5"),
            budget_period="month",
            user=finance_user,
            memo="m",
            now=now,
        )
    with pytest.raises(ApiKeyInactive) as limits_refused:
        api_key_rate_limits_set_by_staff(
            key_id=key.pk, rpm=1, tpm=1, user=finance_user, memo="m", now=now
        )

    assert budget_refused.value.reason == limits_refused.value.reason == "revoked"
    key.refresh_from_db()
    assert (key.budget_limit, key.budget_period, key.rpm, key.tpm) == (None, "", 600, 200000)
    assert not StaffAction.objects.filter(
        action__in=["api_key_budget_set", "api_key_rate_limits_set"]
    ).exists()


def test_rate_limits_edit_refusal_changes_nothing(finance_user, account, now):
    key = rate_limited_key(account, now)

    with pytest.raises(InvalidKeyField) as refused:
        api_key_rate_limits_set_by_staff(
            key_id=key.pk, rpm=60, tpm=0, user=finance_user, memo="m", now=now
        )

    assert refused.value.field == "tpm"
    key.refresh_from_db()
    assert (key.rpm, key.tpm) == (600, 200000)
    assert not StaffAction.objects.filter(action="api_key_rate_limits_set").exists()


# --- The account page -------------------------------------------------------------------------


def test_account_page_shows_each_key_s_rate_limits_and_links_their_edit(finance, account, now):
    limited = rate_limited_key(account, now)
    revoked = api_key_issue(account_id=account.pk, now=now, rpm=600, tpm=200000).api_key
    api_key_revoke(key_id=revoked.pk, now=now)

    page = finance.get(reverse("admin:billing_account_change", args=[account.pk]))
    keys = page.content.decode().split('id="account-keys"')[1].split('id="account-holds"')[0]

    assert keys.count("600 requests and 200,000 tokens per minute") == 2
    assert reverse("admin:billing_apikey_rate_limits", args=[limited.pk]) in keys
    # A revoked key's limits are shown, not offered for change.
    assert reverse("admin:billing_apikey_rate_limits", args=[revoked.pk]) not in keys


def test_account_page_shows_one_screen(finance, account, issued_key, now):
    key = issued_key.api_key
    hold_place(api_key=key, request_id="req-open", amount=D("0.4"), now=now)
    for n in range(55):
        credit_post(
            kind="grant",
            account_id=account.pk,
            amount=D("0.01"),
            memo=f"grant-{n}",
            idempotency_key=f"g{n}",
            now=now,
        )
    hold_place(api_key=key, request_id="req-done", amount=D("1"), now=now)
    hold_settle(request_id="req-done", cost=D("0.0000125"), now=now)
    item = ReconciliationItem.objects.create(
        kind=ReconciliationItem.Kind.EXPIRED_HOLD,
        request_id="req-lost",
        account=account,
        held_amount=D("0.3"),
        created_at=now,
    )

    page = finance.get(reverse("admin:billing_account_change", args=[account.pk]))
    text = page.content.decode()

    assert page.status_code == 200
    figures = text[text.index('id="account-figures"') : text.index('id="account-keys"')]
    assert "10.5499875000 USD" in figures  # balance, exact beneath the rounded figure
    assert "0.4000000000 USD" in figures  # held
    assert "10.1499875000 USD" in figures  # available
    assert key.prefix in text
    holds = text[text.index('id="account-holds"') : text.index('id="account-usage"')]
    assert "req-open" in holds and "req-done" not in holds
    entries = text[text.index('id="account-entries"') : text.index('id="account-items"')]
    assert entries.count("<tr>") == 1 + 50  # the header and the last 50 entries
    assert "grant-54<" in entries and "grant-6<" in entries and "grant-5<" not in entries
    assert "req-done" in entries
    assert "<svg" in text[text.index('id="account-usage"') :]
    items = text[text.index('id="account-items"') : text.index('id="account-statements"')]
    assert reverse("admin:reconciliation_reconciliationitem_change", args=[item.pk]) in items
    assert reverse("admin:billing_account_statement", args=[account.pk]) in text
    assert f"{reverse('admin:billing_apikey_add')}?account={account.pk}" in text
    for link in (
        f"{reverse('admin:billing_apikey_changelist')}?account__id__exact={account.pk}",
        f"{reverse('admin:reconciliation_reconciliationitem_changelist')}"
        f"?account__id__exact={account.pk}&amp;status__exact=pending",
        f"{reverse('admin:billing_ledgertransaction_changelist')}?account={account.pk}",
    ):
        assert link in text
        listed = finance.get(link.replace("&amp;", "&"))
        assert listed.status_code == 200  # a lookup the admin refused would redirect (?e=1)
    holds_list = f"{reverse('admin:billing_hold_changelist')}?account__id__exact={account.pk}"
    assert "req-open" in finance.get(f"{holds_list}&state__exact=active").content.decode()


def test_account_page_links_its_monthly_statements_and_payment_settings(finance, account):
    page = finance.get(reverse("admin:billing_account_change", args=[account.pk])).content.decode()
    statements = page[page.index('id="account-statements"') :]
    this_month = f"{timezone.now():%Y-%m}"
    statement = reverse("admin:billing_account_statement", args=[account.pk])
    assert f"{statement}?month={this_month}" in statements
    assert "(provisional)" in statements
    monthly = finance.get(f"{statement}?month={this_month}")
    assert monthly.status_code == 200
    for url in (
        reverse("admin:billing_account_auto_topup", args=[account.pk]),
        reverse("admin:billing_account_alerts", args=[account.pk]),
        f"{reverse('admin:billing_checkout_link')}?account={account.pk}",
    ):
        assert url in statements
        assert finance.get(url).status_code == 200


def test_account_overview_selector(account, issued_key, now):
    hold_place(api_key=issued_key.api_key, request_id="req-1", amount=D("1"), now=now)
    hold_settle(
        request_id="req-1",
        cost=D("0.25"),
        now=now,
        usage=Usage(input_tokens=100, output_tokens=20),
        details=RequestDetails(endpoint="chat_completions", started_at=now),
    )

    overview = account_overview_get(account_id=account.pk, now=now)

    assert overview.balance == D("9.75")
    assert [key.pk for key in overview.keys] == [issued_key.api_key.pk]
    assert overview.active_holds == [] and overview.active_holds_count == 0
    assert [leg.transaction.kind for leg in overview.entries] == ["usage", "grant"]
    assert len(overview.usage_by_day) == 30
    assert overview.usage_by_day[-1].day == now.date()
    assert (overview.usage_requests, overview.usage_tokens) == (1, 120)
    assert overview.usage_cost == D("0.25")


def test_usage_by_day_is_zero_filled_and_counts_tokens_of_every_class_once(
    account, issued_key, now
):
    UsageRecord.objects.create(
        request_id="r-old",
        account=account,
        model_alias="m",
        endpoint="chat",
        input_tokens=10,
        cached_input_tokens=2,
        output_tokens=5,
        reasoning_tokens=1,
        cost=D("0.5"),
        status="settled",
        started_at=now - timedelta(days=3),
        created_at=now,
    )
    UsageRecord.objects.create(
        request_id="r-too-old",
        account=account,
        model_alias="m",
        endpoint="chat",
        input_tokens=10,
        cost=D("9"),
        status="settled",
        started_at=now - timedelta(days=30),
        created_at=now,
    )

    days = account_usage_by_day(account_id=account.pk, now=now)

    assert len(days) == 30
    by_day = {day.day: day for day in days}
    three_ago = by_day[(now - timedelta(days=3)).date()]
    assert (three_ago.requests, three_ago.tokens, three_ago.cost) == (1, 17, D("0.5"))
    assert sum(day.cost for day in days) == D("0.5")


# --- Upstreams and routes ---------------------------------------------------------------------


def test_upstream_and_route_added_in_the_admin_are_recorded(finance, finance_user, monkeypatch):
    monkeypatch.delenv("ONBOARDING_TEST_KEY", raising=False)
    response = finance.post(
        reverse("admin:gateway_upstream_add"),
        {
            "name": "openai-prod",
            "kind": "openai",
            "base_url": "https://api.openai.example/v1/",
            "api_key_env": "ONBOARDING_TEST_KEY",
            "connect_timeout_seconds": "10",
            "read_timeout_seconds": "120",
            "memo": "new provider",
        },
    )
    assert response.status_code == 302, response.content.decode()
    upstream = Upstream.objects.get(name="openai-prod")
    assert upstream.base_url == "https://api.openai.example/v1"

    response = finance.post(
        reverse("admin:gateway_route_add"),
        {
            "alias": "gpt-onboard",
            "upstream": str(upstream.pk),
            "upstream_model": "",
            "max_output_tokens": "2048",
            "memo": "route it",
        },
    )
    assert response.status_code == 302, response.content.decode()
    route = Route.objects.select_related("model").get(model__alias="gpt-onboard")
    assert (route.upstream_model, route.max_output_tokens) == ("gpt-onboard", 2048)
    assert list(StaffAction.objects.order_by("pk").values_list("action", "memo")) == [
        ("upstream_add", "new provider"),
        ("route_add", "route it"),
    ]
    assert {a.user for a in StaffAction.objects.all()} == {finance_user}

    listing = finance.get(reverse("admin:gateway_route_changelist")).content.decode()
    assert "API-key variable unset" in listing
    assert "no tariff" in listing
    change = finance.get(reverse("admin:gateway_route_change", args=[route.pk])).content.decode()
    assert 'id="route-problems"' in change
    assert "ONBOARDING_TEST_KEY is not set" in change

    monkeypatch.setenv("ONBOARDING_TEST_KEY", "x")
    tariff_set(
        model_alias="gpt-onboard", input_per_mtok=D(1), output_per_mtok=D(2), valid_from=EPOCH
    )
    listing = finance.get(reverse("admin:gateway_route_changelist")).content.decode()
    assert "API-key variable unset" not in listing and "no tariff" not in listing
    change = finance.get(reverse("admin:gateway_route_change", args=[route.pk])).content.decode()
    assert 'id="route-problems"' not in change


def test_route_form_refuses_a_model_routed_already(finance):
    upstream = upstream_save(
        upstream_id=None, name="u", kind="openai", base_url="http://upstream.test/v1"
    )
    route_save(route_id=None, alias="m-1", upstream_id=upstream.pk)

    response = finance.post(
        reverse("admin:gateway_route_add"),
        {
            "alias": "m-1",
            "upstream": str(upstream.pk),
            "max_output_tokens": "10",
            "memo": "again",
        },
    )

    assert response.status_code == 200
    assert "is routed already" in response.content.decode()
    assert Route.objects.count() == 1
    assert not StaffAction.objects.exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "azure"}, "unknown upstream kind"),
        ({"base_url": "ftp://files/v1"}, "invalid base URL"),
        ({"api_key_env": "NOT A NAME"}, "not an environment variable name"),
        ({"read_timeout_seconds": 0}, "at least 1 second"),
        ({"name": " "}, "needs a name"),
    ],
    ids=["kind", "scheme", "env-name", "timeout", "name"],
)
def test_upstream_save_refusals(changes, message):
    fields = {
        "upstream_id": None,
        "name": "u",
        "kind": "openai",
        "base_url": "http://upstream.test/v1",
    }
    with pytest.raises(InvalidAmount, match=message):
        upstream_save(**{**fields, **changes})
    assert not Upstream.objects.exists()


def test_route_change_moves_the_route_and_forgets_both_aliases(transactional_db, finance_user, now):
    upstream = upstream_save(
        upstream_id=None, name="u", kind="openai", base_url="http://upstream.test/v1"
    )
    route = route_save(route_id=None, alias="old-alias", upstream_id=upstream.pk)
    model_context_get(alias="old-alias")  # now cached in this process
    assert model_context_cached(alias="old-alias") is not None

    route_save_by_staff(
        route_id=route.pk,
        alias="new-alias",
        upstream_id=upstream.pk,
        upstream_model="provider-model",
        max_output_tokens=100,
        user=finance_user,
        memo="rename",
        now=now,
    )

    assert model_context_cached(alias="old-alias") is None
    assert model_context_get(alias="new-alias").upstream_model == "provider-model"
    assert Route.objects.get().model.alias == "new-alias"
    assert StaffAction.objects.get().action == "route_change"


def test_ledger_entries_keep_their_exact_amounts_in_the_export(finance, account):
    txn = LedgerTransaction.objects.get(memo="opening credits")
    page = finance.get(reverse("admin:billing_ledgertransaction_change", args=[txn.pk]))
    assert "10.0000000000" in page.content.decode()


def test_a_system_account_page_sums_its_legs_and_offers_no_key(finance, account):
    promotions = Account.objects.get(kind=Account.Kind.PROMOTIONS)

    page = finance.get(reverse("admin:billing_account_change", args=[promotions.pk]))

    text = page.content.decode()
    assert page.status_code == 200
    figures = text[text.index('id="account-figures"') : text.index('id="account-keys"')]
    assert "-10.0000000000 USD" in figures  # the opening grant's other leg
    assert 'id="issue-key"' not in text


def test_upstream_change_applies_to_its_routes_at_once_in_this_process(
    transactional_db, finance_user, now
):
    from reconciliation.services.onboarding import upstream_save_by_staff

    upstream = upstream_save(
        upstream_id=None, name="u", kind="openai", base_url="https://old.test/v1"
    )
    route_save(route_id=None, alias="m-moved", upstream_id=upstream.pk)
    assert model_context_get(alias="m-moved").base_url == "https://old.test/v1"

    upstream_save_by_staff(
        upstream_id=upstream.pk,
        name="u-renamed",
        kind="openai",
        base_url="https://new.test/v1/",
        api_key_env="NEW_KEY",
        connect_timeout_seconds=3,
        read_timeout_seconds=30,
        user=finance_user,
        memo="moved",
        now=now,
    )

    context = model_context_get(alias="m-moved")
    assert (context.base_url, context.api_key_env, context.read_timeout) == (
        "https://new.test/v1",
        "NEW_KEY",
        30,
    )
    assert Upstream.objects.get().name == "u-renamed"
    action = StaffAction.objects.get()
    assert (action.action, action.details["api_key_env"]) == ("upstream_change", "NEW_KEY")
    with pytest.raises(InvalidAmount, match="exists already"):
        upstream_save(upstream_id=None, name="u-renamed", kind="openai", base_url="https://x.test")
