"""POST /v1/billing/checkout: Stripe (through the local fake) and the dummy provider."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.test import Client

from billing.models import Account, Checkout, LedgerTransaction
from billing.services.accounts import account_status_set
from tests.billing.payments.conftest import assert_books_clean
from tests.billing.payments.stripe_fake import FakeStripe
from tests.factories import make_account, make_key

# API-key authentication gives its connection back to the pool at once: not in an atomic test.
pytestmark = pytest.mark.django_db(transaction=True)


def _checkout(client: Client, secret: str, body: Any) -> Any:
    return client.post("/v1/billing/checkout", data=body, content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {secret}")


@pytest.fixture
def admin_key(account, now):  # type: ignore[no-untyped-def]
    return make_key(account=account, now=now, scope="admin")


def test_stripe_checkout_is_a_payment_session_in_usd_for_the_account(
    client: Client, admin_key, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    answer = _checkout(client, admin_key.secret, {"amount": "25.00"})
    assert answer.status_code == 201, answer.content
    body = answer.json()
    assert body["checkout_id"].startswith("cs_")
    assert body["url"] == f"https://checkout.stripe.test/c/pay/{body['checkout_id']}"
    assert body["amount"] == "25.00"
    [session] = stripe_settings.calls("POST", "/v1/checkout/sessions")
    assert session["mode"] == "payment"
    assert session["line_items[0][price_data][currency]"] == "usd"
    assert session["line_items[0][price_data][unit_amount]"] == "2500"
    assert session["metadata[account_id]"] == str(account.pk)
    assert session["payment_intent_data[setup_future_usage]"] == "off_session"
    assert session["payment_intent_data[metadata][account_id]"] == str(account.pk)
    [customer] = stripe_settings.calls("POST", "/v1/customers")
    assert customer["metadata[account_id]"] == str(account.pk)
    account.refresh_from_db()
    assert session["customer"] == account.payment_customer_id
    checkout = Checkout.objects.get(session_id=body["checkout_id"])
    assert (checkout.account_id, checkout.amount, checkout.status) == (
        account.pk, Decimal("25.00"), "open")
    assert not LedgerTransaction.objects.filter(kind="purchase").exists()  # not paid yet


def test_a_second_checkout_reuses_the_accounts_stripe_customer(
    client: Client, admin_key, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    assert _checkout(client, admin_key.secret, {"amount": "5"}).status_code == 201
    assert _checkout(client, admin_key.secret, {"amount": "10000"}).status_code == 201
    assert len(stripe_settings.calls("POST", "/v1/customers")) == 1
    first, second = stripe_settings.calls("POST", "/v1/checkout/sessions")
    assert first["customer"] == second["customer"]


@pytest.mark.parametrize(
    "body",
    [
        {"amount": "4.99"},
        {"amount": "10000.01"},
        {"amount": "abc"},
        {"amount": "1e3"},  # a decimal, but 1000.00 is in range: accepted below, not here
        {"amount": 25.5},
        {"amount": "25.001"},
        {"amount": "-10"},
        {},
        {"amount": None},
    ],
    ids=["below-min", "above-max", "not-a-number", "exponent", "float", "sub-cent", "negative",
         "missing", "null"],
)
def test_a_bad_amount_is_a_400_naming_amount_and_creates_nothing(
    client: Client, admin_key, stripe_settings: FakeStripe, body: dict[str, Any]  # type: ignore[no-untyped-def]
) -> None:
    if body.get("amount") == "1e3":
        assert _checkout(client, admin_key.secret, body).status_code == 201
        return
    answer = _checkout(client, admin_key.secret, body)
    assert answer.status_code == 400, answer.content
    assert answer.json()["error"]["param"] == "amount"
    assert not Checkout.objects.exists()
    assert stripe_settings.requests == []


def test_a_closed_account_gets_a_400_naming_amount(
    client: Client, admin_key, account, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    account_status_set(account_id=account.pk, status=Account.Status.CLOSED)
    answer = _checkout(client, admin_key.secret, {"amount": "25.00"})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "amount"
    assert not Checkout.objects.exists()
    assert stripe_settings.requests == []


def test_an_inference_key_cannot_start_a_checkout(
    client: Client, issued_key, stripe_settings: FakeStripe  # type: ignore[no-untyped-def]
) -> None:
    answer = _checkout(client, issued_key.secret, {"amount": "25.00"})
    assert answer.status_code == 403
    assert not Checkout.objects.exists()


def test_the_dummy_checkout_pays_at_once_through_the_event_path(
    client: Client, admin_key, account, settings  # type: ignore[no-untyped-def]
) -> None:
    settings.PAYMENTS_PROVIDER = "dummy"
    answer = _checkout(client, admin_key.secret, {"amount": "12.34"})
    assert answer.status_code == 201
    body = answer.json()
    assert body["url"].endswith(f"/payments/dummy/checkout/{body['checkout_id']}")
    page = client.get(body["url"])
    assert b"12.34 USD" in page.content
    before = Account.objects.get(pk=account.pk).balance
    assert client.post(body["url"]).status_code == 302
    assert client.post(body["url"]).status_code == 302  # a second press pays nothing more
    account.refresh_from_db()
    assert account.balance == before + Decimal("12.34")
    [purchase] = LedgerTransaction.objects.filter(kind="purchase")
    assert purchase.idempotency_key == f"dummy:checkout:{body['checkout_id']}"
    assert body["checkout_id"] in purchase.memo
    # The same events Stripe sends: the session completed, and its intent kept the card.
    assert account.payment_method_id == f"pm_dummy_{account.pk}"
    assert Checkout.objects.get(session_id=body["checkout_id"]).status == "completed"
    assert_books_clean()


def test_other_accounts_are_untouched_by_a_checkout(
    client: Client, admin_key, settings, now  # type: ignore[no-untyped-def]
) -> None:
    settings.PAYMENTS_PROVIDER = "dummy"
    other = make_account(credits=Decimal("3"), now=now)
    url = _checkout(client, admin_key.secret, {"amount": "5.00"}).json()["url"]
    client.post(url)
    other.refresh_from_db()
    assert other.balance == Decimal("3")
