"""Test data built through the real services, so cached balances always match the ledger."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from itertools import count

import factory

from billing.models import Account, LanguageModel, Tariff
from billing.services.accounts import account_create
from billing.services.keys import IssuedKey, api_key_issue

_names = count(1)
EPOCH = datetime(2020, 1, 1, tzinfo=UTC)


def make_account(
    *,
    credits: Decimal = Decimal("10"),
    overdraft: Decimal = Decimal("0"),
    now: datetime | None = None,
) -> Account:
    return account_create(
        name=f"customer-{next(_names)}", credits=credits, overdraft=overdraft, now=now or EPOCH
    )


def make_key(*, account: Account, now: datetime | None = None, **options) -> IssuedKey:  # type: ignore[no-untyped-def]
    return api_key_issue(account_id=account.pk, now=now or EPOCH, **options)


class LanguageModelFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = LanguageModel
        django_get_or_create = ("alias",)

    alias = factory.Sequence(lambda n: f"model-{n}")


class TariffFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tariff

    model = factory.SubFactory(LanguageModelFactory)
    purpose = "realtime"
    completion_window = ""
    valid_from = EPOCH
    valid_until = None
    input_per_mtok = Decimal("2.50")
    output_per_mtok = Decimal("10.00")


def expire_holds(*, now: datetime, batch_size: int = 10_000) -> int:
    """The production sweep (expire and queue), counting the holds it expired."""
    from reconciliation.services.sweeps import holds_expire_and_queue

    return holds_expire_and_queue(now=now, batch_size=batch_size)["expired"]


def request_key(request_id: str) -> str:
    """The idempotency key the engine gives a request's one posting (billing_engine.request_key)."""
    return f"request:{request_id}"
