"""The operator commands refuse what the database cannot hold (an amount beyond bigint units
of 1e-10 USD, a balance pushed beyond it, an instant beyond year 9999 in UTC) in one line
with a non-zero exit, and change nothing. Stored, such an instant would make its key or
tariff unreadable: every request using it would fail."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from billing.models import Account
from billing.money import MAX_AMOUNT, money_str
from tests.billing.test_commands import fill, manage, run_json, table_counts
from tests.factories import make_account

pytestmark = pytest.mark.django_db

D = Decimal
TOO_MUCH = "999999999999"  # the amount of the admin's crash: about 1000 x what fits
NEARLY_ALL = str(MAX_AMOUNT - 5)


def test_the_largest_amount_is_the_largest_bigint_in_units() -> None:
    assert D(2**63 - 1).scaleb(-10) == MAX_AMOUNT
    assert money_str(MAX_AMOUNT) == "922337203.6854775807"


def refused(args: list[str], account: Account) -> str:
    """The command's one-line error; asserts nothing changed."""
    before = table_counts()
    with pytest.raises(CommandError) as caught:
        call_command(*fill(args, account), "--json", stdout=StringIO(), stderr=StringIO())
    message = str(caught.value)
    assert "\n" not in message
    assert table_counts() == before
    account.refresh_from_db()
    assert (account.balance, account.held) == (D(10), 0)
    return message


TARIFF = ["set_tariff", "m", "--input-per-mtok", "1", "--output-per-mtok", "1"]

OUT_OF_RANGE = [
    pytest.param(["create_account", "X", "--credits", TOO_MUCH], "--credits", id="credits"),
    pytest.param(["create_account", "X", "--overdraft", TOO_MUCH], "--overdraft", id="overdraft"),
    pytest.param(["grant_credits", "{account}", TOO_MUCH, "--memo", "m"], "amount", id="grant"),
    pytest.param(
        ["issue_api_key", "{account}", "--budget", TOO_MUCH, "--budget-period", "day"],
        "--budget",
        id="budget",
    ),
    pytest.param(
        ["set_tariff", "m", "--input-per-mtok", TOO_MUCH, "--output-per-mtok", "1"],
        "--input-per-mtok",
        id="input-price",
    ),
    pytest.param(
        [*TARIFF, "--reasoning-per-mtok", TOO_MUCH], "--reasoning-per-mtok", id="reasoning-price"
    ),
]


@pytest.mark.parametrize(("args", "what"), OUT_OF_RANGE)
def test_an_amount_beyond_what_the_database_holds_is_refused(args: list[str], what: str) -> None:
    message = refused(args, make_account(credits=D(10)))
    assert message.startswith(f"invalid {what}: ")
    assert "out of range" in message


def test_a_grant_that_would_push_the_balance_beyond_what_fits_is_refused() -> None:
    account = make_account(credits=D(10))
    # The amount fits; the balance after it (10 + MAX - 5) does not.
    message = refused(["grant_credits", "{account}", NEARLY_ALL, "--memo", "m"], account)
    assert message == (
        f"invalid amount: the balance would be {money_str(D(10) + D(NEARLY_ALL))} USD, "
        f"more than the largest amount that can be stored ({money_str(MAX_AMOUNT)} USD)"
    )


def test_a_grant_up_to_the_largest_balance_is_posted() -> None:
    account = make_account(credits=D(10))
    data = run_json("grant_credits", str(account.pk), str(MAX_AMOUNT - 10), "--memo", "m")
    assert data["balance"] == money_str(MAX_AMOUNT)


@pytest.mark.django_db(transaction=True)
def test_a_balance_overflow_in_a_real_process_fails_in_one_line() -> None:
    account = make_account(credits=D(10))
    before = table_counts()
    result = manage("grant_credits", str(account.pk), NEARLY_ALL, "--memo", "m", "--json")
    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert table_counts() == before


INSTANTS_BEYOND_UTC = [
    # Year 9999 in its zone, year 10000 in UTC: PostgreSQL stores it, Python cannot load it.
    pytest.param(
        ["issue_api_key", "{account}", "--expires", "9999-12-31T23:00:00-05:00"],
        "--expires",
        id="expiry-after-9999",
    ),
    pytest.param(
        [*TARIFF, "--valid-until", "9999-12-31T23:30:00-01:00"], "--valid-until", id="until"
    ),
    pytest.param(
        [*TARIFF, "--valid-from", "0001-01-01T00:00:00+01:00"], "--valid-from", id="from-year-0"
    ),
]


@pytest.mark.parametrize(("args", "what"), INSTANTS_BEYOND_UTC)
def test_an_instant_outside_the_calendar_in_utc_is_refused(args: list[str], what: str) -> None:
    message = refused(args, make_account(credits=D(10)))
    assert message.startswith(f"invalid {what}: ")
    assert "out of range" in message


def test_an_instant_with_an_offset_is_kept_as_that_instant() -> None:
    account = make_account(credits=D(10))
    data = run_json("issue_api_key", str(account.pk), "--expires", "9999-12-31T18:00:00-05:00")
    assert datetime.fromisoformat(data["expires_at"]) == datetime(9999, 12, 31, 23, tzinfo=UTC)


@pytest.mark.parametrize(
    "credits", [TOO_MUCH, "ten", "-1"], ids=["too_much", "not_a_number", "negative"]
)
def test_seed_demo_refuses_bad_credits_before_writing_anything(credits: str) -> None:
    from gateway.models import Route, Upstream

    before = (table_counts(), Upstream.objects.count(), Route.objects.count())
    with pytest.raises(CommandError) as caught:
        call_command(
            "seed_demo", "--credits", credits, "--json", stdout=StringIO(), stderr=StringIO()
        )
    assert str(caught.value).startswith("invalid --credits: ")
    assert (table_counts(), Upstream.objects.count(), Route.objects.count()) == before
