"""The gateway's event-loop twins of hold, settle and release (hold_place_async,
hold_settle_async, hold_release_async): the same engine call on an async connection, so the
same rows as the sync services, the same refusals with nothing written, and psycopg's own
error, with nothing written, when the connection fails twice (a connection dropped while idle
is replaced once); the sync service (the settle retry task's) can then do the step."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
import pytest
from django.db import connections

from billing.engine import ASYNC_APPLICATION_NAME, sql_async_pool_close, sql_rows_async
from billing.errors import BillingError
from billing.models import ApiKey, Hold, LedgerTransaction, UsageRecord
from billing.pricing import Usage
from billing.selectors import ledger_audit
from billing.services.holds import (
    RequestDetails,
    SettleResult,
    hold_place,
    hold_place_async,
    hold_release,
    hold_release_async,
    hold_settle,
    hold_settle_async,
)
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


@pytest.mark.parametrize("budgeted", [False, True], ids=["plain-key", "budgeted-key"])
@pytest.mark.parametrize("cost", ["0.75", "0", "2.5", "release"])
def test_async_hold_settle_and_release_write_what_the_sync_services_write(
    now: datetime, cost: str, budgeted: bool
) -> None:
    results = {}
    for way in ("sync", "async"):
        account = make_account(credits=D("10"), now=now)
        options: dict[str, Any] = (
            {"budget_limit": D("100"), "budget_period": "month"} if budgeted else {}
        )
        key = make_key(account=account, now=now, **options).api_key
        request_id = f"{way}-1"
        place: dict[str, Any] = dict(
            api_key=key, request_id=request_id, amount=D("2"), now=now, model_alias="gpt-test"
        )
        later = now + timedelta(seconds=5)
        settle: dict[str, Any] = dict(
            request_id=request_id,
            cost=D(cost if cost != "release" else 0),
            now=later,
            usage=USAGE,
            details=_details(now),
        )
        release: dict[str, Any] = dict(request_id=request_id, now=later, details=_details(now))
        ended: Hold
        if way == "sync":
            hold = hold_place(**place)
            if cost == "release":
                ended = hold_release(**release)
            else:
                settled = hold_settle(**settle)
                ended = settled.hold
        else:
            hold = _on_a_loop(hold_place_async, **place)
            if cost == "release":
                ended = _on_a_loop(hold_release_async, **release)
            else:
                settled = _on_a_loop(hold_settle_async, **settle)
                ended = settled.hold
        assert (hold.amount, hold.account_id, hold.budgeted, hold.expires_at) == (
            D("2"),
            account.pk,
            budgeted,
            Hold.objects.get(request_id=request_id).expires_at,
        )
        if cost != "release":
            assert (settled.cost, settled.is_overrun, settled.replayed) == (
                D(cost),
                D(cost) > 2,
                False,
            )
        assert ended.state == (Hold.State.RELEASED if cost == "release" else Hold.State.SETTLED)
        key.refresh_from_db()
        results[way] = {
            **_rows(account, request_id),
            "budget": (key.budget_held, key.budget_spent),
        }
    assert results["async"] == results["sync"]
    assert ledger_audit().clean


def _outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """What a service call decided: its typed refusal, or what it returned."""
    try:
        value = call()
    except BillingError as exc:
        return ("refused", type(exc).__name__, str(exc), getattr(exc, "charged", None))
    hold = value.hold if isinstance(value, SettleResult) else value
    returned = (hold.pk, hold.state, hold.amount, hold.settled_amount, hold.transaction_id)
    if isinstance(value, SettleResult):
        return ("ok", returned, value.cost, value.transaction_id, value.replayed)
    return ("ok", returned)


def _written() -> tuple[Any, ...]:
    return (
        sorted(Hold.objects.values_list("request_id", "state", "settled_amount")),
        LedgerTransaction.objects.count(),
        UsageRecord.objects.count(),
        sorted(ApiKey.objects.values_list("pk", "budget_held", "budget_spent")),
    )


def test_async_twins_decide_every_case_as_the_sync_services_and_write_nothing_more(
    now: datetime,
) -> None:
    account = make_account(credits=D("1"), now=now)
    key = make_key(account=account, now=now).api_key
    budgeted = make_key(
        account=account, now=now, budget_limit=D("0.4"), budget_period="month"
    ).api_key
    revoked = make_key(account=account, now=now).api_key
    ApiKey.objects.filter(pk=revoked.pk).update(status=ApiKey.Status.REVOKED)
    hold_place(api_key=key, request_id="held", amount=D("0.3"), now=now)
    hold_place(api_key=key, request_id="to-release", amount=D("0.1"), now=now)
    hold_release(request_id="to-release", now=now)
    hold_place(api_key=key, request_id="settled", amount=D("0.2"), now=now)
    hold_settle(request_id="settled", cost=D("0.15"), now=now)

    def place(**options: Any) -> dict[str, Any]:
        return {"api_key": key, "request_id": "new", "amount": D("0.5"), "now": now, **options}

    def settle(request_id: str, cost: str) -> dict[str, Any]:
        return {"request_id": request_id, "cost": D(cost), "now": now, "usage": USAGE,
                "details": _details(now)}

    cases: list[tuple[str, Callable[..., Any], Callable[..., Awaitable[Any]], dict[str, Any]]] = [
        ("insufficient-funds", hold_place, hold_place_async, place(amount=D("0.8"))),
        ("budget-exceeded", hold_place, hold_place_async, place(api_key=budgeted)),
        ("key-revoked", hold_place, hold_place_async, place(api_key=revoked)),
        ("place-replayed", hold_place, hold_place_async, place(request_id="held", amount=D("0.3"))),
        ("place-conflict", hold_place, hold_place_async, place(request_id="held")),
        ("settle-unknown", hold_settle, hold_settle_async, settle("nothing", "0.1")),
        ("settle-released", hold_settle, hold_settle_async, settle("to-release", "0.1")),
        ("settle-replayed", hold_settle, hold_settle_async, settle("settled", "0.15")),
        ("settle-conflict", hold_settle, hold_settle_async, settle("settled", "0.1")),
        ("release-replayed", hold_release, hold_release_async,
         {"request_id": "to-release", "now": now}),
        ("release-settled", hold_release, hold_release_async,
         {"request_id": "settled", "now": now}),
        ("release-unknown", hold_release, hold_release_async,
         {"request_id": "nothing", "now": now}),
    ]
    before = _written()
    account.refresh_from_db()
    balances = (account.balance, account.held)
    for name, sync_step, async_step, arguments in cases:
        sync = _outcome(functools.partial(sync_step, **arguments))
        on_loop = _outcome(functools.partial(_on_a_loop, async_step, **arguments))
        assert on_loop == sync, name
        assert _written() == before, name
    account.refresh_from_db()
    assert (account.balance, account.held) == balances == (D("0.85"), D("0.3"))
    assert ledger_audit().clean


def test_async_statements_are_prepared_once_per_connection(
    now: datetime, settings: Any
) -> None:
    settings.GATEWAY_ASYNC_DB_CONNECTIONS = 1  # every statement on the one connection
    account = make_account(credits=D("1"), now=now)
    key = make_key(account=account, now=now).api_key

    async def three_requests() -> list[tuple[Any, ...]]:
        try:
            for n in range(3):
                await hold_place_async(api_key=key, request_id=f"p{n}", amount=D("0.1"), now=now)
                await hold_settle_async(request_id=f"p{n}", cost=D("0.01"), now=now)
                await hold_place_async(api_key=key, request_id=f"q{n}", amount=D("0.1"), now=now)
                await hold_release_async(request_id=f"q{n}", now=now)
            return list(await sql_rows_async(
                "SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements"
                " WHERE NOT from_sql AND statement LIKE %(engine)s",
                {"engine": "%billing_engine.%"},
            ))
        finally:
            await sql_async_pool_close()

    prepared = asyncio.run(three_requests())
    for function, runs in [("hold_place", 6), ("hold_settle", 3), ("hold_release", 3)]:
        assert [executions for statement, executions in prepared
                if f"billing_engine.{function}(" in statement] == [runs], function
    account.refresh_from_db()
    assert (account.balance, account.held) == (D("0.97"), D(0))


def _async_backends(admin: psycopg.Connection, *, waiting_on_a_lock: bool = False) -> list[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s AND (NOT %s OR wait_event_type = 'Lock')",
        [ASYNC_APPLICATION_NAME, waiting_on_a_lock],
    ).fetchall()
    return [pid for (pid,) in rows]


@pytest.fixture
def admin() -> Iterator[psycopg.Connection]:
    """A connection of its own that ends others' sessions, as a database restart would."""
    params = connections["default"].get_connection_params()
    params.pop("cursor_factory")
    with psycopg.connect(**params, autocommit=True) as conn:
        yield conn


def test_an_async_connection_dropped_while_idle_is_replaced_and_the_step_runs_once(
    now: datetime, admin: psycopg.Connection
) -> None:
    account = make_account(credits=D("1"), now=now)
    key = make_key(account=account, now=now).api_key
    place: dict[str, Any] = dict(api_key=key, amount=D("0.5"), now=now)

    async def restart_between_requests() -> Hold:
        try:
            await hold_place_async(request_id="before", **place)
            dropped = _async_backends(admin)
            assert dropped
            for pid in dropped:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
            hold = await hold_place_async(request_id="after", **place)
            assert not set(dropped) & set(_async_backends(admin))
            return hold
        finally:
            await sql_async_pool_close()

    after = asyncio.run(restart_between_requests())
    assert after.request_id == "after" and after.state == Hold.State.ACTIVE
    assert Hold.objects.filter(request_id__in=["before", "after"]).count() == 2
    account.refresh_from_db()
    assert account.held == D("1.0")
    assert ledger_audit().clean


def test_an_async_connection_lost_mid_request_writes_nothing_and_the_sync_call_places_it(
    now: datetime, admin: psycopg.Connection, row_locker: Any
) -> None:
    """The connection dies while the engine is inside the hold (here: terminated while the
    hold waits on the account row another session has locked), and so does the one the step
    is retried on: psycopg's error and nothing written; the sync service, on its own
    connection, then places the hold once."""
    account = make_account(credits=D("1"), now=now)
    key = make_key(account=account, now=now).api_key
    place: dict[str, Any] = dict(api_key=key, amount=D("0.5"), now=now)

    async def lose_the_connection_mid_statement() -> int:
        terminated = 0
        try:
            await hold_place_async(request_id="before", **place)
            row_locker.lock_account(account.pk)
            step = asyncio.ensure_future(hold_place_async(request_id="after", **place))
            for _ in range(200):
                await asyncio.sleep(0.05)
                if step.done():
                    break
                for pid in _async_backends(admin, waiting_on_a_lock=True):
                    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
                    terminated += 1
            with pytest.raises(psycopg.OperationalError):
                await step
            return terminated
        finally:
            await sql_async_pool_close()

    assert asyncio.run(lose_the_connection_mid_statement()) == 2  # the try and its one retry
    row_locker.release()
    assert not Hold.objects.filter(request_id="after").exists()
    account.refresh_from_db()
    assert account.held == D("0.5")
    hold_place(request_id="after", **place)
    account.refresh_from_db()
    assert account.held == D("1.0")
    assert Hold.objects.filter(request_id__in=["before", "after"]).count() == 2
    assert ledger_audit().clean
