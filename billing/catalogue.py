"""The price catalogue: what providers charge, as the `genai-prices` package ships it (offline:
its data is package data, read through its public API, `calc_price(...).model_price`), and
our reviewed provider prices (reads; the writes are billing/services/tariffs.py).

What our Price has room for is taken: input, output, cache read and cache write per million
tokens. The catalogue has no separate reasoning price (reasoning is billed as output), so that
class is left unset and falls back to the output price. A tiered price (a higher rate above a
prompt size) is proposed at its base tier: finance sees the catalogue's id and can correct it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import genai_prices

from billing.models import ProviderPrice, TokenPrices
from billing.money import money_round
from billing.pricing import Price, provider_price_choose

SOURCE = f"genai-prices {genai_prices.__version__}"


@dataclass(frozen=True)
class CataloguePrice:
    provider: str
    catalogue_model: str  # the catalogue's id of the model it matched
    price: Price


def _rate(value: Any) -> Decimal | None:
    if value is None:
        return None
    base = getattr(value, "base", value)  # a TieredPrices: its base tier
    return money_round(Decimal(base))


def catalogue_price_get(*, provider: str, model: str, at: datetime) -> CataloguePrice | None:
    """The catalogue's price of `model` at `provider` at time `at`, or None if the catalogue
    does not know the provider or the model (or has no token prices for it)."""
    try:
        found = genai_prices.calc_price(
            genai_prices.Usage(), model, provider_id=provider, genai_request_timestamp=at
        )
    except LookupError:
        return None
    prices = found.model_price
    input_rate = _rate(getattr(prices, "input_mtok", None))
    output_rate = _rate(getattr(prices, "output_mtok", None))
    if input_rate is None or output_rate is None:
        return None
    return CataloguePrice(
        provider=found.provider.id,
        catalogue_model=found.model.id,
        price=Price(
            input_per_mtok=input_rate,
            output_per_mtok=output_rate,
            cached_input_per_mtok=_rate(getattr(prices, "cache_read_mtok", None)),
            cache_write_per_mtok=_rate(getattr(prices, "cache_write_mtok", None)),
        ),
    )


# --- our provider prices (what we pay upstream): reads --------------------------------------


def provider_price_select(*, model_alias: str, at: datetime) -> ProviderPrice | None:
    """The provider price of `model_alias` in force at `at` (reviewed prices only)."""
    return provider_price_choose(
        ProviderPrice.objects.filter(model__alias=model_alias, valid_from__lte=at), at=at
    )


@dataclass(frozen=True)
class PriceChange:
    """One token class of a proposal beside the price in force (None: not set)."""

    token_class: str
    current: Decimal | None
    proposed: Decimal | None

    @property
    def changed(self) -> bool:
        return self.current != self.proposed

    @property
    def percent(self) -> Decimal | None:
        """The change in percent of the current rate, to two places (for reading only)."""
        if self.current is None or self.proposed is None or self.current == 0:
            return None
        return ((self.proposed - self.current) / self.current * 100).quantize(Decimal("0.01"))


def prices_compare(*, current: Price | None, proposed: Price) -> list[PriceChange]:
    return [
        PriceChange(
            token_class=name.removesuffix("_per_mtok"),
            current=None if current is None else getattr(current, name),
            proposed=getattr(proposed, name),
        )
        for name in TokenPrices.PRICE_FIELDS
    ]
