"""The payment-provider interface: what the services need from Stripe (or the dummy).

Amounts cross this boundary in minor units (cents), as the providers count them; everything
on our side of it is Decimal USD (`cents_to_usd`, `usd_to_cents`: the one conversion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from django.conf import settings

from billing.money import money_round

CENTS = Decimal(100)


class PaymentProviderError(Exception):
    """The provider could not be reached or refused the request (nothing was charged, or
    the call is safe to repeat with the same idempotency key)."""


class PaymentDeclined(PaymentProviderError):
    """The provider answered: the charge failed (card declined, authentication required)."""


class WebhookSignatureInvalid(Exception):
    pass


def usd_to_cents(amount: Decimal) -> int:
    cents = amount * CENTS
    if cents != cents.to_integral_value():
        raise ValueError(f"{amount} USD is not a whole number of cents")
    return int(cents)


def cents_to_usd(cents: int) -> Decimal:
    return money_round(Decimal(int(cents)) / CENTS)


@dataclass(frozen=True)
class CheckoutSession:
    session_id: str
    url: str
    customer_id: str  # the provider's customer for the account ("" if the provider has none)


@dataclass(frozen=True)
class OffSessionCharge:
    intent_id: str
    status: str  # the provider's: succeeded, processing, requires_action, ...
    # Events the provider produced at once (the dummy, which has no webhooks); Stripe's
    # arrive at /webhooks/stripe.
    events: list[dict[str, Any]] = field(default_factory=list)


class PaymentProvider(Protocol):
    name: str

    def checkout_create(
        self,
        *,
        account_id: int,
        customer_id: str,
        billing_email: str,
        amount_cents: int,
        success_url: str,
        cancel_url: str,
        idempotency_key: str,
    ) -> CheckoutSession: ...

    def off_session_charge(
        self,
        *,
        account_id: int,
        attempt_id: int,
        customer_id: str,
        payment_method_id: str,
        amount_cents: int,
        idempotency_key: str,
    ) -> OffSessionCharge: ...

    def refunds_list(self, *, charge_id: str) -> list[dict[str, Any]]: ...

    def webhook_verify(self, *, payload: bytes, signature: str) -> dict[str, Any]:
        """The event, parsed, if `signature` signs `payload`; else WebhookSignatureInvalid."""
        ...


def payment_provider(name: str | None = None) -> PaymentProvider:
    """The configured provider (PAYMENTS_PROVIDER), or the one that produced an event."""
    name = name or settings.PAYMENTS_PROVIDER
    if name == "stripe":
        from billing.payments.stripe_provider import StripeProvider

        return StripeProvider()
    if name == "dummy":
        from billing.payments.dummy import DummyProvider

        return DummyProvider()
    raise ValueError(f"unknown PAYMENTS_PROVIDER {name!r}: choose stripe or dummy")
