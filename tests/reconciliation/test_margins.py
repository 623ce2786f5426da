"""Margins: revenue, provider cost and gross margin per day and per model, from the usage
records settled in a range; usage with no provider price is counted as unpriced revenue, never
as free. The margin_report command and the dashboard show the same figures."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from billing.models import ApiKey
from billing.pricing import Usage
from billing.services.holds import RequestDetails, hold_place, hold_release, hold_settle
from reconciliation.selectors import margins_get
from tests.factories import make_account, make_key

D = Decimal


def _settled(
    key: ApiKey,
    request_id: str,
    *,
    model: str,
    cost: str,
    provider_cost: str | None,
    at: datetime,
) -> None:
    hold_place(api_key=key, request_id=request_id, amount=D("5"), now=at, model_alias=model)
    hold_settle(
        request_id=request_id,
        cost=D(cost),
        now=at + timedelta(seconds=1),
        usage=Usage(input_tokens=10, output_tokens=10),
        details=RequestDetails(
            endpoint="chat.completions",
            started_at=at,
            outcome="completed",
            provider_cost=None if provider_cost is None else D(provider_cost),
        ),
    )


def _traffic(day_one: datetime) -> None:
    account = make_account(credits=D("100"), now=day_one - timedelta(days=1))
    key = make_key(account=account, now=day_one - timedelta(days=1)).api_key
    day_two = day_one + timedelta(days=1)
    _settled(key, "a1", model="gpt-a", cost="1.20", provider_cost="0.80", at=day_one)
    _settled(key, "a2", model="gpt-a", cost="0.60", provider_cost="0.45", at=day_two)
    _settled(key, "b1", model="gpt-b", cost="2.00", provider_cost="1.10", at=day_two)
    # No provider price for this model: in revenue, out of the margin.
    _settled(key, "c1", model="house", cost="0.50", provider_cost=None, at=day_two)
    # A released request costs nothing on either side.
    hold_place(api_key=key, request_id="r1", amount=D("1"), now=day_two, model_alias="gpt-a")
    hold_release(
        request_id="r1",
        now=day_two,
        details=RequestDetails(endpoint="chat.completions", started_at=day_two),
    )
    # Outside the range.
    _settled(key, "late", model="gpt-a", cost="9", provider_cost="1", at=day_two + timedelta(2))


DAY_ONE = datetime(2026, 11, 10, 12, tzinfo=UTC)
RANGE = {"start": datetime(2026, 11, 10, tzinfo=UTC), "end": datetime(2026, 11, 12, tzinfo=UTC)}


@pytest.mark.django_db
def test_margins_by_model_and_day_count_unpriced_usage_apart() -> None:
    _traffic(DAY_ONE)
    margins: dict[str, Any] = margins_get(**RANGE).as_json()
    assert {key: margins[key] for key in ("revenue", "provider_cost", "gross_margin")} == {
        "revenue": "4.3000000000",
        "provider_cost": "2.3500000000",
        "gross_margin": "1.4500000000",  # 4.30 - 0.50 unpriced - 2.35
    }
    assert margins["unpriced_revenue"] == "0.5000000000"
    assert margins["by_model"] == [
        {
            "model": "gpt-a",
            "revenue": "1.8000000000",
            "provider_cost": "1.2500000000",
            "gross_margin": "0.5500000000",
            "unpriced_revenue": "0.0000000000",
        },
        {
            "model": "gpt-b",
            "revenue": "2.0000000000",
            "provider_cost": "1.1000000000",
            "gross_margin": "0.9000000000",
            "unpriced_revenue": "0.0000000000",
        },
        {
            "model": "house",
            "revenue": "0.5000000000",
            "provider_cost": "0.0000000000",
            "gross_margin": "0.0000000000",
            "unpriced_revenue": "0.5000000000",
        },
    ]
    assert [(row["day"], row["revenue"], row["gross_margin"]) for row in margins["by_day"]] == [
        ("2026-11-10", "1.2000000000", "0.4000000000"),
        ("2026-11-11", "3.1000000000", "1.0500000000"),
    ]


@pytest.mark.django_db
def test_margin_report_json_is_one_line_with_the_same_figures() -> None:
    _traffic(DAY_ONE)
    out = StringIO()
    call_command(
        "margin_report", "--start", "2026-11-10", "--end", "2026-11-11", "--json", stdout=out
    )
    [line] = out.getvalue().splitlines()
    report = json.loads(line)
    assert (report["revenue"], report["provider_cost"], report["gross_margin"]) == (
        "4.3000000000",
        "2.3500000000",
        "1.4500000000",
    )
    assert [row["model"] for row in report["by_model"]] == ["gpt-a", "gpt-b", "house"]
    assert set(report["by_model"][0]) >= {"model", "revenue", "provider_cost", "gross_margin"}
    with pytest.raises(CommandError, match="--start is after --end"):
        call_command("margin_report", "--start", "2026-11-12", "--end", "2026-11-11", "--json")
    with pytest.raises(CommandError, match="not a date"):
        call_command("margin_report", "--start", "yesterday", "--json")


@pytest.mark.django_db
def test_the_dashboard_shows_margins_per_model_and_day() -> None:
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(hours=1)
    _traffic(today - timedelta(days=3))
    finance = User.objects.create_user("fin", password="x", is_staff=True)
    finance.groups.add(Group.objects.get(name="Finance"))
    client = Client()
    client.force_login(finance)
    page = client.get("/admin/reconciliation/reconciliationitem/dashboard/").content.decode()
    assert 'id="margins-by-model"' in page and 'id="margins-by-day"' in page
    # Rounded for reading, exact on hover: the late request is in the last 30 days too.
    assert 'title="13.3000000000">13.3000<' in page  # revenue
    assert 'title="3.3500000000">3.3500<' in page  # provider cost
    assert 'title="9.4500000000">9.4500<' in page  # gross margin: 13.30 - 0.50 - 3.35
    assert "house" in page
