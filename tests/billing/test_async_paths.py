"""The gateway's event-loop versions of the common hold and settle (hold_place_async,
hold_settle_async): the same one statement on an async connection, so the same rows as the
sync services, and None with nothing written whenever the sync path must decide instead."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
import pytest
from django.db import connections

from billing.models import Hold, LedgerTransaction, UsageRecord
from billing.pricing import Usage
from billing.selectors import ledger_audit
from billing.services.holds import (
    RequestDetails,
    hold_place,
    hold_place_async,
    hold_release,
    hold_settle,
    hold_settle_async,
)
from billing.sql import ASYNC_APPLICATION_NAME, sql_async_pool_close
from tests.billing.test_settle_paths import _rows
from tests.factories import make_account, make_key

# The async connection is a second session: it sees committed rows only.
pytestmark = pytest.mark.django_db(transaction=True)

D = Decimal
T = TypeVar("T")


def _on_a_loop(step: Callable[..., Awaitable[T]], **kwargs: Any) -> T:
    """One async step on its own event loop (as asyncio.run gives each call a new one)."""

    async def run() -> T:
        try:
            return await step(**kwargs)
        finally:
            await sql_async_pool_close()

    return asyncio.run(run())


def _details(now: datetime) -> RequestDetails:
    return RequestDetails(
        endpoint="chat.completions",
        started_at=now,
        stream=True,
        outcome="completed",
        first_byte_ms=12,
        duration_ms=345,
    )


USAGE = Usage(input_tokens=11, cached_input_tokens=3, output_tokens=7, reasoning_tokens=2)


@pytest.mark.parametrize("cost", ["0.75", "0", "2.5"])
def test_async_hold_and_settle_write_what_the_sync_services_write(now: datetime, cost: str) -> None:
    results = {}
    for way in ("sync", "async"):
        account = make_account(credits=D("10"), now=now)
        key = make_key(account=account, now=now).api_key
        request_id = f"{way}-1"
        place: dict[str, Any] = dict(
            api_key=key, request_id=request_id, amount=D("2"), now=now, model_alias="gpt-test"
        )
        settle: dict[str, Any] = dict(
            request_id=request_id,
            account_id=account.pk,
            cost=D(cost),
            now=now + timedelta(seconds=5),
            usage=USAGE,
            details=_details(now),
        )
        if way == "sync":
            hold = hold_place(**place)
            settled = hold_settle(**settle)
        else:
            placed = _on_a_loop(hold_place_async, **place)
            assert placed is not None
            hold = placed
            result = _on_a_loop(hold_settle_async, **settle)
            assert result is not None
            settled = result
        assert (hold.amount, hold.account_id, hold.expires_at) == (
            D("2"),
            account.pk,
            Hold.objects.get(request_id=request_id).expires_at,
        )
        assert (settled.cost, settled.is_overrun, settled.replayed) == (
            D(cost),
            D(cost) > 2,
            False,
        )
        results[way] = _rows(account, request_id)
    assert results["async"] == results["sync"]
    assert ledger_audit().clean


def test_async_paths_write_nothing_and_leave_the_decision_to_the_sync_services(
    now: datetime,
) -> None:
    account = make_account(credits=D("1"), now=now)
    key = make_key(account=account, now=now).api_key
    budgeted = make_key(
        account=account, now=now, budget_limit=D("5"), budget_period="month"
    ).api_key

    def place(**options: Any) -> Hold | None:
        args: dict[str, Any] = dict(api_key=key, request_id="r1", amount=D("0.5"), now=now)
        return _on_a_loop(hold_place_async, **{**args, **options})

    # Refused for funds; a key with a budget: the sync path decides (and says why).
    assert place(request_id="too-big", amount=D("1.5")) is None
    assert place(request_id="budgeted", api_key=budgeted) is None
    assert not Hold.objects.filter(request_id__in=["too-big", "budgeted"]).exists()

    # A taken request id: no second hold, no second reservation.
    assert place() is not None
    assert place() is None
    account.refresh_from_db()
    assert (Hold.objects.filter(request_id="r1").count(), account.held) == (1, D("0.5"))

    # A released hold, then a replayed settle: nothing is posted by the async path.
    hold_release(request_id="r1", now=now)
    settle: dict[str, Any] = dict(request_id="r1", account_id=account.pk, cost=D("0.1"), now=now)
    assert _on_a_loop(hold_settle_async, **settle) is None
    assert not LedgerTransaction.objects.filter(request_id="r1").exists()
    assert not UsageRecord.objects.filter(request_id="r1").exists()

    assert place(request_id="r2") is not None
    assert _on_a_loop(hold_settle_async, **{**settle, "request_id": "r2"}) is not None
    assert _on_a_loop(hold_settle_async, **{**settle, "request_id": "r2"}) is None
    assert LedgerTransaction.objects.filter(request_id="r2").count() == 1
    account.refresh_from_db()
    assert (account.balance, account.held) == (D("0.9"), D(0))
    assert ledger_audit().clean


def test_an_async_connection_lost_mid_request_writes_nothing_and_the_sync_path_places_it(
    now: datetime,
) -> None:
    """A database restart (here: the async connection terminated) fails the statement; the
    caller gets None and the sync path, on its own connection, does the step."""
    account = make_account(credits=D("1"), now=now)
    key = make_key(account=account, now=now).api_key
    place: dict[str, Any] = dict(api_key=key, amount=D("0.5"), now=now)

    async def lose_the_connection_then_place() -> Hold | None:
        try:
            assert await hold_place_async(request_id="before", **place) is not None
            params = connections["default"].get_connection_params()
            params.pop("cursor_factory")
            with psycopg.connect(**params, autocommit=True) as admin:
                ended = admin.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = %s",
                    [ASYNC_APPLICATION_NAME],
                ).fetchone()
            assert ended is not None and ended[0] >= 1
            return await hold_place_async(request_id="after", **place)
        finally:
            await sql_async_pool_close()

    assert asyncio.run(lose_the_connection_then_place()) is None
    assert not Hold.objects.filter(request_id="after").exists()
    hold_place(request_id="after", **place)
    account.refresh_from_db()
    assert account.held == D("1.0")
    assert ledger_audit().clean
