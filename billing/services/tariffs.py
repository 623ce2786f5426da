"""Tariffs are append-mostly: a new price is a new row with its own validity window."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import transaction

from billing.errors import InvalidAmount
from billing.models import ApiKey, LanguageModel, Tariff


@transaction.atomic(durable=True)
def tariff_set(
    *,
    model_alias: str,
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    valid_from: datetime,
    cached_input_per_mtok: Decimal | None = None,
    cache_write_per_mtok: Decimal | None = None,
    reasoning_per_mtok: Decimal | None = None,
    purpose: str = ApiKey.Purpose.REALTIME,
    completion_window: str = "",
    valid_until: datetime | None = None,
) -> Tariff:
    """Add a tariff in its own transaction (commands, seeding). Durable: it commits on return,
    so it refuses to run inside another atomic block; there, call `tariff_create`."""
    return tariff_create(
        model_alias=model_alias,
        input_per_mtok=input_per_mtok,
        output_per_mtok=output_per_mtok,
        valid_from=valid_from,
        cached_input_per_mtok=cached_input_per_mtok,
        cache_write_per_mtok=cache_write_per_mtok,
        reasoning_per_mtok=reasoning_per_mtok,
        purpose=purpose,
        completion_window=completion_window,
        valid_until=valid_until,
    )


def tariff_create(
    *,
    model_alias: str,
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    valid_from: datetime,
    cached_input_per_mtok: Decimal | None = None,
    cache_write_per_mtok: Decimal | None = None,
    reasoning_per_mtok: Decimal | None = None,
    purpose: str = ApiKey.Purpose.REALTIME,
    completion_window: str = "",
    valid_until: datetime | None = None,
) -> Tariff:
    """Add a tariff in the caller's transaction (the admin's, a staff service's): it neither
    commits nor refuses to nest. Creates the model alias if it is new."""
    if not model_alias.strip():
        raise InvalidAmount("a model alias is required")
    if purpose not in ApiKey.Purpose.values:
        raise InvalidAmount(f"unknown purpose {purpose!r}")
    prices = [
        input_per_mtok,
        output_per_mtok,
        cached_input_per_mtok,
        cache_write_per_mtok,
        reasoning_per_mtok,
    ]
    if any(price is not None and price < 0 for price in prices):
        raise InvalidAmount("prices cannot be negative")
    if valid_until is not None and valid_until <= valid_from:
        raise InvalidAmount("valid_until must be after valid_from")
    # savepoint=False: joins the caller's transaction without a savepoint, so an error here
    # marks it for rollback and no caller commits a new model without its tariff; called
    # outside any transaction, the two writes still commit together.
    with transaction.atomic(savepoint=False):
        model, _ = LanguageModel.objects.get_or_create(alias=model_alias.strip())
        return Tariff.objects.create(
            model=model,
            purpose=purpose,
            completion_window=completion_window,
            valid_from=valid_from,
            valid_until=valid_until,
            input_per_mtok=input_per_mtok,
            output_per_mtok=output_per_mtok,
            cached_input_per_mtok=cached_input_per_mtok,
            cache_write_per_mtok=cache_write_per_mtok,
            reasoning_per_mtok=reasoning_per_mtok,
        )
