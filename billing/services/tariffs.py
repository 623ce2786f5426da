"""Tariffs and provider prices are append-mostly: a new price is a new row with its own validity
window. Provider prices from the catalogue are proposed, and priced by only once accepted."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction

from billing.catalogue import SOURCE, catalogue_price_get, provider_price_select
from billing.errors import BillingError, InvalidAmount
from billing.models import (
    Account,
    ApiKey,
    LanguageModel,
    ProviderPrice,
    ProviderPriceProposal,
    Tariff,
)
from billing.money import money_str
from billing.pricing import Price


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
    account_id: int | None = None,
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
        account_id=account_id,
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
    account_id: int | None = None,
) -> Tariff:
    """Add a tariff in the caller's transaction (the admin's, a staff service's): it neither
    commits nor refuses to nest. Creates the model alias if it is new. With `account_id`, a
    negotiated price for that customer account only."""
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
    _prices_check(prices, valid_from=valid_from, valid_until=valid_until)
    if (
        account_id is not None
        and not Account.objects.filter(pk=account_id, kind=Account.Kind.CUSTOMER).exists()
    ):
        raise InvalidAmount(f"no customer account {account_id}")
    # savepoint=False: joins the caller's transaction without a savepoint, so an error here
    # marks it for rollback and no caller commits a new model without its tariff; called
    # outside any transaction, the two writes still commit together.
    with transaction.atomic(savepoint=False):
        model, _ = LanguageModel.objects.get_or_create(alias=model_alias.strip())
        return Tariff.objects.create(
            model=model,
            purpose=purpose,
            completion_window=completion_window,
            account_id=account_id,
            valid_from=valid_from,
            valid_until=valid_until,
            input_per_mtok=input_per_mtok,
            output_per_mtok=output_per_mtok,
            cached_input_per_mtok=cached_input_per_mtok,
            cache_write_per_mtok=cache_write_per_mtok,
            reasoning_per_mtok=reasoning_per_mtok,
        )


def _prices_check(
    prices: list[Decimal | None], *, valid_from: datetime, valid_until: datetime | None
) -> None:
    if any(price is not None and price < 0 for price in prices):
        raise InvalidAmount("prices cannot be negative")
    if valid_until is not None and valid_until <= valid_from:
        raise InvalidAmount("valid_until must be after valid_from")


def _price_fields(price: Price) -> dict[str, Decimal | None]:
    return {name: getattr(price, name) for name in ProviderPrice.PRICE_FIELDS}


@transaction.atomic(durable=True)
def tariff_set_marked_up(
    *,
    model_alias: str,
    markup_percent: Decimal,
    valid_from: datetime,
    purpose: str = ApiKey.Purpose.REALTIME,
    completion_window: str = "",
    valid_until: datetime | None = None,
    account_id: int | None = None,
) -> Tariff:
    """A tariff whose sell prices are the provider price in force at `valid_from` plus
    `markup_percent` (Price.marked_up), stored as ordinary tariff prices: a later change of
    the provider price does not move it."""
    if markup_percent <= -100:
        raise InvalidAmount("a markup must be above -100 percent")
    provider_price = provider_price_select(model_alias=model_alias.strip(), at=valid_from)
    if provider_price is None:
        raise InvalidAmount(f"model {model_alias!r} has no provider price at {valid_from:%Y-%m-%d}")
    return tariff_create(
        model_alias=model_alias,
        valid_from=valid_from,
        purpose=purpose,
        completion_window=completion_window,
        valid_until=valid_until,
        account_id=account_id,
        **_price_fields(provider_price.price.marked_up(markup_percent)),  # type: ignore[arg-type]
    )


@transaction.atomic(durable=True)
def provider_price_set(
    *,
    model_alias: str,
    price: Price,
    valid_from: datetime,
    valid_until: datetime | None = None,
    provider: str = "",
    source: str = "manual",
) -> ProviderPrice:
    """Set what a model costs us upstream from `valid_from` on (an operator, by hand)."""
    return _provider_price_create(
        model_alias=model_alias,
        price=price,
        valid_from=valid_from,
        valid_until=valid_until,
        provider=provider,
        source=source,
    )


def _provider_price_create(
    *,
    model_alias: str,
    price: Price,
    valid_from: datetime,
    valid_until: datetime | None,
    provider: str,
    source: str,
) -> ProviderPrice:
    if not model_alias.strip():
        raise InvalidAmount("a model alias is required")
    _prices_check(
        list(_price_fields(price).values()), valid_from=valid_from, valid_until=valid_until
    )
    model, _ = LanguageModel.objects.get_or_create(alias=model_alias.strip())
    return ProviderPrice.objects.create(
        model=model,
        provider=provider,
        source=source,
        valid_from=valid_from,
        valid_until=valid_until,
        **_price_fields(price),
    )


@dataclass(frozen=True)
class RoutedModel:
    """A routed model alias, the provider its upstream kind names, and the upstream's name."""

    alias: str
    provider: str
    upstream_model: str


@dataclass
class PriceImport:
    proposed: int = 0
    unchanged: int = 0
    unknown_models: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "proposed": self.proposed,
            "unchanged": self.unchanged,
            "unknown_models": self.unknown_models,
        }


@transaction.atomic(durable=True)
def provider_prices_propose(
    *, models: list[RoutedModel], now: datetime, provider: str | None = None
) -> PriceImport:
    """Propose the catalogue's current price of each model as its provider price, for
    finance to accept or reject: nothing is priced by a proposal. A model whose price in force
    (or whose pending proposal) already says the same is `unchanged`; a new proposal
    supersedes an older pending one for the model. `provider` overrides each route's."""
    report = PriceImport()
    for routed in models:
        wanted = provider or routed.provider
        found = catalogue_price_get(
            provider=wanted, model=routed.upstream_model, at=now
        ) or catalogue_price_get(provider=wanted, model=routed.alias, at=now)
        if found is None:
            report.unknown_models.append(routed.alias)
            continue
        current = provider_price_select(model_alias=routed.alias, at=now)
        pending = ProviderPriceProposal.objects.select_for_update().filter(
            model__alias=routed.alias, status=ProviderPriceProposal.Status.PENDING
        )
        if (current is not None and current.price == found.price) or any(
            proposal.price == found.price for proposal in pending
        ):
            report.unchanged += 1
            continue
        pending.update(status=ProviderPriceProposal.Status.SUPERSEDED, decided_at=now)
        model, _ = LanguageModel.objects.get_or_create(alias=routed.alias)
        ProviderPriceProposal.objects.create(
            model=model,
            provider=found.provider,
            catalogue_model=found.catalogue_model,
            source=SOURCE,
            created_at=now,
            **_price_fields(found.price),
        )
        report.proposed += 1
    return report


class ProposalAlreadyDecided(BillingError):
    def __init__(self, *, proposal_id: int, status: str) -> None:
        super().__init__(f"provider price proposal {proposal_id} is already {status}")


@transaction.atomic(durable=True)
def provider_price_proposal_decide(
    *, proposal_id: int, accept: bool, user: AbstractBaseUser, memo: str, now: datetime
) -> ProviderPriceProposal:
    """Finance accepts (the proposal becomes the provider price from `now` on) or rejects a
    pending proposal, with a StaffAction in the same transaction."""
    # Imported here: reconciliation depends on billing, never the other way at import time.
    from reconciliation.models import StaffAction

    memo = memo.strip()
    if not memo:
        raise InvalidAmount("a memo is required")
    proposal = (
        ProviderPriceProposal.objects.select_for_update()
        .select_related("model")
        .get(pk=proposal_id)
    )
    if proposal.status != ProviderPriceProposal.Status.PENDING:
        raise ProposalAlreadyDecided(proposal_id=proposal_id, status=proposal.status)
    previous = provider_price_select(model_alias=proposal.model.alias, at=now)
    if accept:
        proposal.accepted_price = _provider_price_create(
            model_alias=proposal.model.alias,
            price=proposal.price,
            valid_from=now,
            valid_until=None,
            provider=proposal.provider,
            source=proposal.source,
        )
    proposal.status = (
        ProviderPriceProposal.Status.ACCEPTED if accept else ProviderPriceProposal.Status.REJECTED
    )
    proposal.decided_at = now
    proposal.decided_by = user  # type: ignore[assignment]
    proposal.save(update_fields=["status", "decided_at", "decided_by", "accepted_price"])
    StaffAction.objects.create(  # type: ignore[misc]
        user=user,
        action="provider_price_accept" if accept else "provider_price_reject",
        target=f"provider price proposal #{proposal.pk} ({proposal.model.alias})",
        memo=memo,
        details={
            "proposed": {k: _text(v) for k, v in _price_fields(proposal.price).items()},
            "previous": None
            if previous is None
            else {k: _text(v) for k, v in _price_fields(previous.price).items()},
            "provider_price_id": proposal.accepted_price_id,
        },
        created_at=now,
    )
    return proposal


def _text(amount: Decimal | None) -> str | None:
    return None if amount is None else money_str(amount)
