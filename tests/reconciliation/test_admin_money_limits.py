"""The admin's money forms refuse what the database cannot hold (an amount beyond bigint units
of 1e-10 USD, or a balance it would push beyond that) with a form error: never a 500, and
nothing posted, nothing recorded."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from django.contrib.auth.models import Group, Permission, User
from django.db import DataError
from django.test import Client
from django.urls import reverse

from billing.models import Account, LedgerTransaction, Tariff
from billing.money import MAX_AMOUNT, money_str
from reconciliation.models import StaffAction
from tests.factories import make_account

pytestmark = pytest.mark.django_db

TOO_MUCH = "999999999999"
KINDS = ["grant", "purchase", "refund", "adjustment"]


@pytest.fixture
def finance_user(db) -> User:  # type: ignore[no-untyped-def]
    user = User.objects.create_user("finance", password="pw", is_staff=True)
    user.groups.add(Group.objects.get(name="Finance"))
    # A finance lead's extra permission, for signed adjustments.
    user.user_permissions.add(Permission.objects.get(codename="post_balance_adjustment"))
    return user


@pytest.fixture
def finance(finance_user: User) -> Client:
    client = Client(raise_request_exception=False)
    client.force_login(finance_user)
    return client


def credit_url(account: Account, kind: str) -> str:
    return reverse("admin:billing_account_credit", args=[account.pk, kind])


def form_key(client: Client, account: Account, kind: str) -> str:
    match = re.search(
        r'name="idempotency_key" value="([0-9a-f]+)"',
        client.get(credit_url(account, kind)).content.decode(),
    )
    assert match
    return match.group(1)


def assert_nothing_posted(account: Account, balance: Decimal) -> None:
    account.refresh_from_db()
    assert account.balance == balance
    assert not LedgerTransaction.objects.exclude(kind="grant", memo="opening credits").exists()
    assert not StaffAction.objects.exists()


@pytest.mark.parametrize("stage", ["edit", "confirm"])
@pytest.mark.parametrize("amount", [TOO_MUCH, f"-{TOO_MUCH}"], ids=["too_much", "too_little"])
@pytest.mark.parametrize("kind", KINDS)
def test_an_amount_beyond_what_fits_is_a_form_error(finance, kind, amount, stage):
    account = make_account(credits=Decimal(10))
    form = {"amount": amount, "memo": "m", "idempotency_key": form_key(finance, account, kind)}
    if stage == "confirm":
        form["confirm"] = "1"

    response = finance.post(credit_url(account, kind), form)

    assert response.status_code == 200
    errors = response.context["form"].errors
    assert list(errors) == ["amount"]
    bound = "less than or equal to" if amount == TOO_MUCH else "greater than or equal to"
    assert bound in errors["amount"][0]
    assert money_str(MAX_AMOUNT) in errors["amount"][0]
    assert_nothing_posted(account, Decimal(10))


@pytest.mark.parametrize("stage", ["edit", "confirm"])
@pytest.mark.parametrize("kind", ["grant", "purchase", "adjustment"])
def test_an_amount_that_fits_but_overflows_the_balance_is_a_form_error(finance, kind, stage):
    account = make_account(credits=Decimal(10))
    amount = MAX_AMOUNT - 5
    form = {
        "amount": str(amount),
        "memo": "m",
        "idempotency_key": form_key(finance, account, kind),
    }
    if stage == "confirm":
        form["confirm"] = "1"

    response = finance.post(credit_url(account, kind), form)

    assert response.status_code == 200
    assert response.context["stage"] == "edit"  # no confirmation page for it either
    assert response.context["form"].errors == {
        "amount": [
            f"The balance would be {money_str(amount + 10)} USD, more than the largest "
            f"amount that can be stored ({money_str(MAX_AMOUNT)} USD)."
        ]
    }
    assert_nothing_posted(account, Decimal(10))


def test_a_negative_adjustment_below_what_fits_is_a_form_error(finance):
    account = make_account(credits=Decimal(10))
    response = finance.post(
        credit_url(account, "adjustment"),
        {
            "amount": str(-MAX_AMOUNT),
            "memo": "m",
            "idempotency_key": form_key(finance, account, "adjustment"),
            "confirm": "1",
        },
    )
    # -MAX fits, and the balance after it (10 - MAX) too: the engine posts it. What would not
    # fit is refused as above; this one goes through, so the bound is exact.
    assert response.status_code == 302
    account.refresh_from_db()
    assert account.balance == 10 - MAX_AMOUNT


def test_a_grant_up_to_the_largest_balance_is_posted(finance):
    account = make_account(credits=Decimal(10))
    response = finance.post(
        credit_url(account, "grant"),
        {
            "amount": str(MAX_AMOUNT - 10),
            "memo": "m",
            "idempotency_key": form_key(finance, account, "grant"),
            "confirm": "1",
        },
    )
    assert response.status_code == 302
    account.refresh_from_db()
    assert account.balance == MAX_AMOUNT


def test_a_balance_that_grew_between_confirmation_and_posting_is_a_form_error(finance, monkeypatch):
    """The balance is checked when the form is posted; if it moved meanwhile and the engine's
    UPDATE overflows after all, its DataError is the form's error too."""
    account = make_account(credits=Decimal(10))

    def overflowing(**kwargs: object) -> None:
        raise DataError("bigint out of range\nCONTEXT:  SQL statement ...")

    monkeypatch.setattr("reconciliation.services.finance.credit_post_by_staff", overflowing)
    response = finance.post(
        credit_url(account, "grant"),
        {
            "amount": "5",
            "memo": "m",
            "idempotency_key": form_key(finance, account, "grant"),
            "confirm": "1",
        },
    )
    assert response.status_code == 200
    assert response.context["form"].non_field_errors() == [
        "Nothing was posted: the database cannot store the result (bigint out of range)."
    ]
    assert_nothing_posted(account, Decimal(10))


@pytest.fixture
def superuser_client(db) -> Client:  # type: ignore[no-untyped-def]
    client = Client(raise_request_exception=False)
    client.force_login(User.objects.create_superuser("root", password="pw"))
    return client


def tariff_form(**prices: str) -> dict[str, str]:
    from billing.models import LanguageModel

    model = LanguageModel.objects.get_or_create(alias="gpt-admin")[0]
    return {
        "model": str(model.pk),
        "purpose": "realtime",
        "completion_window": "",
        "valid_from_0": "2026-01-01",
        "valid_from_1": "00:00:00",
        "input_per_mtok": "1",
        "output_per_mtok": "1",
        "memo": "price list",
        **prices,
    }


@pytest.mark.parametrize(
    "field", ["input_per_mtok", "output_per_mtok", "cached_input_per_mtok", "reasoning_per_mtok"]
)
def test_a_tariff_price_beyond_what_fits_is_a_form_error(superuser_client, field):
    response = superuser_client.post(
        reverse("admin:billing_tariff_add"), tariff_form(**{field: TOO_MUCH})
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert money_str(MAX_AMOUNT) in errors[field][0]
    assert not Tariff.objects.exists()
