"""Tariff selection and cost arithmetic: the pure function, then the selector over real rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from billing.models import Tariff
from billing.money import money_str
from billing.pricing import Price, Usage, tariff_choose
from billing.selectors import tariff_select
from tests.factories import LanguageModelFactory, TariffFactory


def at(year: int, month: int = 1, day: int = 1) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


@dataclass
class T:
    name: str
    purpose: str
    completion_window: str
    valid_from: datetime
    valid_until: datetime | None = None
    account_id: int | None = None


PRICE_CHANGE = at(2026)
# One model's tariff history. Names say what each row is for.
UNIVERSE = {
    t.name: t
    for t in [
        T("realtime-2025", "realtime", "", at(2025), PRICE_CHANGE),
        T("realtime-2026", "realtime", "", PRICE_CHANGE),
        T("batch", "batch", "", at(2025)),
        T("batch-24h", "batch", "24h", at(2025)),
        T("batch-1h", "batch", "1h", at(2025)),
        T("playground-2030", "playground", "", at(2030)),
        T("platform-h1-2025", "platform", "", at(2025), at(2025, 7)),
    ]
}
ALL = tuple(UNIVERSE)

# (tariffs present, key purpose, key completion window, when, expected tariff or None)
CASES = [
    pytest.param(ALL, "realtime", "", at(2026, 6), "realtime-2026", id="realtime-current-price"),
    pytest.param(ALL, "batch", "", at(2026, 6), "batch", id="purpose-beats-realtime"),
    pytest.param(
        ALL,
        "playground",
        "",
        at(2026, 6),
        "realtime-2026",
        id="unpriced-purpose-falls-back-to-realtime",
    ),
    pytest.param(
        ALL, "realtime", "", at(2025, 6), "realtime-2025", id="historical-price-before-change"
    ),
    pytest.param(
        ALL, "realtime", "", PRICE_CHANGE, "realtime-2026", id="new-price-from-change-instant"
    ),
    pytest.param(
        ALL,
        "realtime",
        "",
        PRICE_CHANGE - timedelta(microseconds=1),
        "realtime-2025",
        id="old-price-until-just-before-change",
    ),
    pytest.param(ALL, "batch", "24h", at(2026, 6), "batch-24h", id="exact-completion-window"),
    pytest.param(ALL, "batch", "1h", at(2026, 6), "batch-1h", id="other-exact-completion-window"),
    pytest.param(
        ALL, "batch", "7d", at(2026, 6), "batch", id="unknown-window-falls-back-to-purpose-generic"
    ),
    pytest.param(
        ("batch-24h", "batch-1h", "realtime-2026"),
        "batch",
        "7d",
        at(2026, 6),
        "realtime-2026",
        id="unknown-window-never-takes-another-windows-price",
    ),
    pytest.param(
        ("batch-24h",),
        "batch",
        "",
        at(2026, 6),
        None,
        id="only-windowed-tariff-does-not-price-generic-request",
    ),
    pytest.param(
        ALL,
        "realtime",
        "24h",
        at(2026, 6),
        "realtime-2026",
        id="window-without-purpose-tariff-uses-realtime",
    ),
    pytest.param(
        ALL, "playground", "", at(2030), "playground-2030", id="tariff-applies-from-its-start"
    ),
    pytest.param(
        ("playground-2030",),
        "playground",
        "",
        at(2029, 12, 31),
        None,
        id="future-tariff-never-used",
    ),
    pytest.param(
        ALL, "platform", "", at(2025, 3), "platform-h1-2025", id="bounded-tariff-inside-its-window"
    ),
    pytest.param(ALL, "platform", "", at(2025, 7), "realtime-2025", id="valid-until-is-exclusive"),
    pytest.param(ALL, "realtime", "", at(2024, 12, 31), None, id="before-any-tariff-is-none"),
    pytest.param((), "realtime", "", at(2026), None, id="no-tariffs-is-none"),
]


@pytest.mark.parametrize(("present", "purpose", "window", "when", "expected"), CASES)
def test_tariff_choose(present, purpose, window, when, expected) -> None:  # type: ignore[no-untyped-def]
    chosen = tariff_choose(
        [UNIVERSE[name] for name in present], purpose=purpose, completion_window=window, at=when
    )
    assert (chosen.name if chosen else None) == expected


def test_tariff_choose_prefers_latest_start_when_open_ended_tariffs_overlap() -> None:
    old = T("old", "realtime", "", at(2025))
    new = T("new", "realtime", "", at(2026))
    assert (
        tariff_choose([new, old], purpose="realtime", completion_window="", at=at(2026, 2)) is new
    )
    assert (
        tariff_choose([new, old], purpose="realtime", completion_window="", at=at(2025, 2)) is old
    )


@pytest.mark.django_db
@pytest.mark.parametrize(("present", "purpose", "window", "when", "expected"), CASES)
def test_tariff_select(present, purpose, window, when, expected) -> None:  # type: ignore[no-untyped-def]
    model = LanguageModelFactory(alias="gpt-test")
    # A decoy model with a tariff for everything: selection must never look across models.
    TariffFactory(
        model=LanguageModelFactory(alias="decoy"),
        purpose=purpose,
        completion_window=window,
        valid_from=at(2000),
    )
    ids = {}
    for name in present:
        spec = UNIVERSE[name]
        row: Tariff = TariffFactory(  # type: ignore[assignment]
            model=model,
            purpose=spec.purpose,
            completion_window=spec.completion_window,
            valid_from=spec.valid_from,
            valid_until=spec.valid_until,
        )
        ids[row.pk] = name
    chosen = tariff_select(
        model_alias="gpt-test", purpose=purpose, completion_window=window, at=when
    )
    assert (ids[chosen.pk] if chosen else None) == expected


PRICE = Price(
    input_per_mtok=Decimal("2.5"),
    output_per_mtok=Decimal("10"),
    cached_input_per_mtok=Decimal("1.25"),
    cache_write_per_mtok=Decimal("3.75"),
    reasoning_per_mtok=Decimal("15"),
)
BARE = Price(input_per_mtok=Decimal("2.5"), output_per_mtok=Decimal("10"))


@pytest.mark.parametrize(
    ("price", "usage", "expected"),
    [
        pytest.param(PRICE, Usage(input_tokens=1000), "0.0025", id="input"),
        pytest.param(PRICE, Usage(cached_input_tokens=1000), "0.00125", id="cached-input"),
        pytest.param(
            BARE, Usage(cached_input_tokens=1000), "0.0025", id="cached-input-falls-back-to-input"
        ),
        pytest.param(PRICE, Usage(cache_write_tokens=1000), "0.00375", id="cache-write"),
        pytest.param(
            BARE, Usage(cache_write_tokens=1000), "0.0025", id="cache-write-falls-back-to-input"
        ),
        pytest.param(PRICE, Usage(output_tokens=1000), "0.01", id="output"),
        pytest.param(
            PRICE,
            Usage(output_tokens=1000, reasoning_tokens=400),
            "0.0120",
            id="reasoning-within-output",
        ),
        pytest.param(
            BARE,
            Usage(output_tokens=1000, reasoning_tokens=400),
            "0.01",
            id="reasoning-falls-back-to-output",
        ),
        pytest.param(
            PRICE,
            Usage(
                input_tokens=1_000_003,
                cached_input_tokens=17,
                cache_write_tokens=333,
                output_tokens=9_999,
                reasoning_tokens=1_234,
            ),
            "2.6074375",
            id="every-class-at-once-exact",
        ),
        pytest.param(PRICE, Usage(), "0", id="nothing-costs-nothing"),
    ],
)
def test_price_cost_is_exact(price: Price, usage: Usage, expected: str) -> None:
    cost = price.cost(usage)
    assert isinstance(cost, Decimal)
    assert cost == Decimal(expected)
    assert cost.as_tuple().exponent == -10  # always at the stored precision


HALF = Price(input_per_mtok=Decimal("0.00005"), output_per_mtok=Decimal("0"))


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        pytest.param(1, "0.0000000000", id="0.5-rounds-down-to-even-0"),
        pytest.param(3, "0.0000000002", id="1.5-rounds-up-to-even-2"),
        pytest.param(5, "0.0000000002", id="2.5-rounds-down-to-even-2"),
        pytest.param(7, "0.0000000004", id="3.5-rounds-up-to-even-4"),
        pytest.param(11, "0.0000000006", id="5.5-rounds-up-to-even-6"),
    ],
)
def test_price_cost_rounds_half_even_at_ten_places(tokens: int, expected: str) -> None:
    # 0.00005 USD per million tokens is exactly half of one stored unit (1e-10) per token.
    assert money_str(HALF.cost(Usage(input_tokens=tokens))) == expected


def test_price_cost_rounds_once_not_per_token_class() -> None:
    # Each class alone is half a unit (rounds to 0, half-even); together they are one unit.
    price = Price(input_per_mtok=Decimal("0.00005"), output_per_mtok=Decimal("0.00005"))
    assert price.cost(Usage(input_tokens=1, output_tokens=1)) == Decimal("0.0000000001")


# --- per-account (negotiated) tariffs --------------------------------------------------------

ACME, OTHER = 7, 8
# The general history above plus negotiated rows. Names say whose and what for.
ACCOUNT_UNIVERSE = {
    **UNIVERSE,
    **{
        t.name: t
        for t in [
            T("acme-realtime-2025", "realtime", "", at(2025), PRICE_CHANGE, account_id=ACME),
            T("acme-realtime-2026", "realtime", "", PRICE_CHANGE, account_id=ACME),
            T("acme-batch-24h", "batch", "24h", at(2025), account_id=ACME),
            T("acme-playground-2030", "playground", "", at(2030), account_id=ACME),
            T("other-realtime", "realtime", "", at(2025), account_id=OTHER),
            T("other-batch", "batch", "", at(2025), account_id=OTHER),
        ]
    },
}
WITH_ACCOUNTS = tuple(ACCOUNT_UNIVERSE)
GENERAL_ONLY = ALL

# (tariffs present, account, key purpose, key completion window, when, expected tariff or None)
ACCOUNT_CASES = [
    pytest.param(
        WITH_ACCOUNTS,
        ACME,
        "realtime",
        "",
        at(2026, 6),
        "acme-realtime-2026",
        id="account-tariff-beats-general-in-its-tier",
    ),
    pytest.param(
        WITH_ACCOUNTS,
        ACME,
        "realtime",
        "",
        at(2025, 6),
        "acme-realtime-2025",
        id="account-tariff-history-by-validity",
    ),
    pytest.param(
        WITH_ACCOUNTS,
        ACME,
        "batch",
        "24h",
        at(2026, 6),
        "acme-batch-24h",
        id="account-window-tariff-beats-general-window-tariff",
    ),
    pytest.param(
        WITH_ACCOUNTS,
        ACME,
        "batch",
        "",
        at(2026, 6),
        "batch",
        id="general-purpose-tier-beats-account-realtime-fallback",
    ),
    pytest.param(
        WITH_ACCOUNTS,
        ACME,
        "batch",
        "7d",
        at(2026, 6),
        "batch",
        id="account-window-never-prices-another-window",
    ),
    pytest.param(
        WITH_ACCOUNTS,
        ACME,
        "playground",
        "",
        at(2026, 6),
        "acme-realtime-2026",
        id="unpriced-purpose-falls-back-to-account-realtime",
    ),
    pytest.param(
        WITH_ACCOUNTS,
        ACME,
        "playground",
        "",
        at(2029, 12, 31),
        "acme-realtime-2026",
        id="future-account-tariff-never-used",
    ),
    pytest.param(
        WITH_ACCOUNTS,
        ACME,
        "playground",
        "",
        at(2030),
        "acme-playground-2030",
        id="account-tariff-applies-from-its-start",
    ),
    pytest.param(
        WITH_ACCOUNTS,
        ACME,
        "realtime",
        "",
        at(2024, 12, 31),
        None,
        id="account-before-any-tariff-is-none",
    ),
    pytest.param(
        WITH_ACCOUNTS,
        OTHER,
        "batch",
        "",
        at(2026, 6),
        "other-batch",
        id="each-account-gets-its-own",
    ),
    pytest.param(
        WITH_ACCOUNTS,
        9,
        "realtime",
        "",
        at(2026, 6),
        "realtime-2026",
        id="account-without-own-tariff-gets-general",
    ),
    pytest.param(
        WITH_ACCOUNTS,
        None,
        "realtime",
        "",
        at(2026, 6),
        "realtime-2026",
        id="no-account-never-gets-a-negotiated-price",
    ),
    pytest.param(
        ("other-realtime", "acme-batch-24h"),
        9,
        "realtime",
        "",
        at(2026, 6),
        None,
        id="another-accounts-tariff-never-prices",
    ),
    pytest.param(
        GENERAL_ONLY,
        ACME,
        "batch",
        "24h",
        at(2026, 6),
        "batch-24h",
        id="account-with-no-negotiated-price-is-priced-as-before",
    ),
]


@pytest.mark.parametrize(
    ("present", "account", "purpose", "window", "when", "expected"), ACCOUNT_CASES
)
def test_tariff_choose_for_account(present, account, purpose, window, when, expected) -> None:  # type: ignore[no-untyped-def]
    chosen = tariff_choose(
        [ACCOUNT_UNIVERSE[name] for name in present],
        purpose=purpose,
        completion_window=window,
        at=when,
        account_id=account,
    )
    assert (chosen.name if chosen else None) == expected


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("present", "account", "purpose", "window", "when", "expected"), ACCOUNT_CASES
)
def test_tariff_select_for_account(present, account, purpose, window, when, expected) -> None:  # type: ignore[no-untyped-def]
    from tests.factories import make_account

    model = LanguageModelFactory(alias="gpt-test")
    accounts = {ACME: make_account(), OTHER: make_account(), 9: make_account()}
    ids = {}
    for name in present:
        spec = ACCOUNT_UNIVERSE[name]
        row: Tariff = TariffFactory(  # type: ignore[assignment]
            model=model,
            account=accounts[spec.account_id] if spec.account_id else None,
            purpose=spec.purpose,
            completion_window=spec.completion_window,
            valid_from=spec.valid_from,
            valid_until=spec.valid_until,
        )
        ids[row.pk] = name
    chosen = tariff_select(
        model_alias="gpt-test",
        purpose=purpose,
        completion_window=window,
        at=when,
        account_id=accounts[account].pk if account else None,
    )
    assert (ids[chosen.pk] if chosen else None) == expected


@pytest.mark.parametrize(
    ("percent", "expected_input", "expected_cached"),
    [
        pytest.param(Decimal("20"), "3.0000000000", "1.5000000000", id="plus-20-percent"),
        pytest.param(Decimal("0"), "2.5000000000", "1.2500000000", id="at-cost"),
        pytest.param(Decimal("-10"), "2.2500000000", "1.1250000000", id="a-discount"),
        pytest.param(
            Decimal("33.333333333333"), "3.3333333333", "1.6666666667", id="rounded-once-half-even"
        ),
    ],
)
def test_marked_up_price_is_exact(
    percent: Decimal, expected_input: str, expected_cached: str
) -> None:
    marked = PRICE.marked_up(percent)
    assert money_str(marked.input_per_mtok) == expected_input
    assert money_str(marked.cached_input_per_mtok) == expected_cached  # type: ignore[arg-type]
    assert BARE.marked_up(percent).reasoning_per_mtok is None  # unset stays unset: falls back
