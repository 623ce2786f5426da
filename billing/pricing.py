"""Pure pricing: which tariff (and which provider price) applies, what a usage costs under it,
and sell prices derived from a provider price. No database here.

The same `Price.cost` prices a request for the customer (its tariff) and for us (its provider
price): one cost rule."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, TypeVar

from billing.money import MILLION, money_round

REALTIME = "realtime"


@dataclass(frozen=True)
class Usage:
    """Token counts by class. `input_tokens` excludes cache reads and writes;
    `output_tokens` includes `reasoning_tokens`."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cached_input_tokens + self.cache_write_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Usage:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


@dataclass(frozen=True)
class Price:
    """USD per million tokens. Optional classes fall back to the input or output price."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None
    reasoning_per_mtok: Decimal | None = None

    def cost(self, usage: Usage) -> Decimal:
        """Exact cost of `usage`, rounded once (half-even, 10 places)."""
        cached = self.cached_input_per_mtok
        cache_write = self.cache_write_per_mtok
        reasoning = self.reasoning_per_mtok
        plain_output = max(usage.output_tokens - usage.reasoning_tokens, 0)
        total = (
            usage.input_tokens * self.input_per_mtok
            + usage.cached_input_tokens * (self.input_per_mtok if cached is None else cached)
            + usage.cache_write_tokens
            * (self.input_per_mtok if cache_write is None else cache_write)
            + plain_output * self.output_per_mtok
            + usage.reasoning_tokens * (self.output_per_mtok if reasoning is None else reasoning)
        )
        return money_round(total / MILLION)

    def worst_case(self, *, prompt_tokens: int, max_output_tokens: int) -> Decimal:
        """Upper bound for a hold: every prompt token at the dearest input class, every output
        token at the dearest output class."""
        input_rate = max(
            rate
            for rate in (self.input_per_mtok, self.cached_input_per_mtok, self.cache_write_per_mtok)
            if rate is not None
        )
        output_rate = max(self.output_per_mtok, self.reasoning_per_mtok or self.output_per_mtok)
        return money_round((prompt_tokens * input_rate + max_output_tokens * output_rate) / MILLION)

    def marked_up(self, percent: Decimal) -> Price:
        """Sell prices `percent` above these (a provider price): each class's rate times
        (1 + percent/100), rounded once (half-even, 10 places); an unset class stays unset,
        so it falls back as the provider's does."""
        factor = 1 + percent / 100

        def rate(value: Decimal | None) -> Decimal | None:
            return None if value is None else money_round(value * factor)

        return Price(
            input_per_mtok=money_round(self.input_per_mtok * factor),
            output_per_mtok=money_round(self.output_per_mtok * factor),
            cached_input_per_mtok=rate(self.cached_input_per_mtok),
            cache_write_per_mtok=rate(self.cache_write_per_mtok),
            reasoning_per_mtok=rate(self.reasoning_per_mtok),
        )


class Validity(Protocol):
    valid_from: datetime
    valid_until: datetime | None


class TariffLike(Validity, Protocol):
    purpose: str
    completion_window: str
    account_id: int | None


V = TypeVar("V", bound=Validity)
T = TypeVar("T", bound=TariffLike)


def _valid_at(rows: Iterable[V], at: datetime) -> list[V]:
    """Rows valid at `at`: started (a future one never counts) and not yet ended."""
    return [
        row
        for row in rows
        if row.valid_from <= at and (row.valid_until is None or at < row.valid_until)
    ]


def _latest(rows: list[V]) -> V | None:
    return max(rows, key=lambda row: row.valid_from) if rows else None


def tariff_choose(
    tariffs: Iterable[T],
    *,
    purpose: str,
    completion_window: str,
    at: datetime,
    account_id: int | None = None,
) -> T | None:
    """Pick the tariff that prices a request of `account_id`'s key at time `at`.

    Only tariffs valid at `at` count (a future one never does). In order: the key's purpose
    with exactly this completion window, that purpose with no window, realtime with no window.
    A window nobody priced falls back to the generic tariffs, never to another window's.
    Within a tier the most recently started tariff wins.

    Within each tier the account's own tariff (a negotiated price) wins over the general one
    (no account); another account's tariffs never count. So a negotiated realtime price does
    not make the account's batch requests dearer than the general batch tariff: the batch
    tier is decided first, by the account's batch tariff if it has one.
    """
    valid = _valid_at(tariffs, at)
    tiers = []
    if completion_window:
        tiers.append((purpose, completion_window))
    tiers.append((purpose, ""))
    tiers.append((REALTIME, ""))
    owners = [account_id, None] if account_id is not None else [None]
    for tier_purpose, tier_window in tiers:
        for owner in owners:
            chosen = _latest(
                [
                    tariff
                    for tariff in valid
                    if tariff.account_id == owner
                    and tariff.purpose == tier_purpose
                    and tariff.completion_window == tier_window
                ]
            )
            if chosen is not None:
                return chosen
    return None


def provider_price_choose(prices: Iterable[V], *, at: datetime) -> V | None:
    """The provider price in force at `at`: the most recently started of those valid then."""
    return _latest(_valid_at(prices, at))
