"""Two-phase holds: place before the upstream call, then settle, release or expire exactly once.

Each operation is one call of its function in the money engine (billing/sql/engine_0002.sql),
which decides and writes, or refuses and writes nothing. This module passes typed arguments in
and maps the result code to the hold and to the typed errors of billing/errors.py. The sync
services and their async twins (the gateway's event loop) run the same statement through the
same mapping; the async ones raise psycopg's errors where the sync ones raise Django's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from functools import cached_property
from typing import Any

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError
from psycopg.types.json import Jsonb

from billing.engine import Rows, engine_call, sql_rows, sql_rows_async
from billing.errors import (
    AccountInactive,
    AccountNotFound,
    ApiKeyInactive,
    BillingError,
    BudgetExceeded,
    HoldAlreadyResolved,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
)
from billing.models import ApiKey, Hold
from billing.money import from_units, money_parse, money_str, to_units
from billing.pricing import Usage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestDetails:
    """What the gateway knows about a request, stored on its usage record. `provider_cost` is
    what the usage cost us upstream (its provider price; None: the model has none): recorded,
    never charged. It travels with the details, so a settle handed to the retry task, a
    deduction failure and a stream's checkpoint all keep it."""

    endpoint: str
    started_at: datetime
    stream: bool = False
    outcome: str = ""
    first_byte_ms: int | None = None
    duration_ms: int | None = None
    provider_cost: Decimal | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "endpoint": self.endpoint,
            "started_at": self.started_at.isoformat(),
            "stream": self.stream,
            "outcome": self.outcome,
            "first_byte_ms": self.first_byte_ms,
            "duration_ms": self.duration_ms,
            "provider_cost": None if self.provider_cost is None else money_str(self.provider_cost),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> RequestDetails:
        return cls(
            endpoint=str(data["endpoint"]),
            started_at=datetime.fromisoformat(str(data["started_at"])),
            stream=bool(data.get("stream")),
            outcome=str(data.get("outcome") or ""),
            first_byte_ms=data.get("first_byte_ms"),  # type: ignore[arg-type]
            duration_ms=data.get("duration_ms"),  # type: ignore[arg-type]
            provider_cost=None
            if data.get("provider_cost") is None
            else money_parse(str(data["provider_cost"])),
        )


@dataclass(frozen=True)
class SettleResult:
    """What a settle posted: its cost and flags, read off the engine's row. `hold` is the
    settled hold as a model instance, built on first access (the gateway never reads it)."""

    outcome: _Outcome = field(repr=False)
    cost: Decimal
    replayed: bool = False

    @property
    def transaction_id(self) -> int | None:
        return self.outcome.transaction_id

    @property
    def is_overrun(self) -> bool:
        return bool(self.outcome.hold_values["is_overrun"])

    @property
    def is_late(self) -> bool:
        return bool(self.outcome.hold_values["is_late"])

    @property
    def hold(self) -> Hold:
        hold = self.outcome.hold
        assert hold is not None
        return hold


# --- the engine's hold result ------------------------------------------------------------------

# The hold columns of billing_engine.hold_result, in order, after (result, detail, charged).
HOLD_RESULT_COLUMNS = (
    "id",
    "request_id",
    "account_id",
    "api_key_id",
    "model_alias",
    "amount",
    "budgeted",
    "state",
    "created_at",
    "expires_at",
    "resolved_at",
    "settled_amount",
    "is_overrun",
    "is_late",
    "checkpoint_cost",
    "checkpoint_usage",
    "checkpoint_at",
    "transaction_id",
)
_HOLD_FIELDS = tuple(field.attname for field in Hold._meta.concrete_fields)
# A field added to or renamed in Hold must be returned by the engine too (and this fails at
# import, not at the first settle in production).
assert set(_HOLD_FIELDS) == set(HOLD_RESULT_COLUMNS), "billing_engine.hold_result is out of date"
_MONEY_COLUMNS = frozenset({"amount", "settled_amount", "checkpoint_cost"})


@dataclass
class _Outcome:
    result: str
    detail: str | None
    charged: Decimal | None
    # The hold's columns as the engine returned them (money in units); all None when the
    # result names no hold.
    hold_values: dict[str, Any]
    # The request's posting: the hold's, or a write-off's of a request that has no hold.
    transaction_id: int | None

    @cached_property
    def hold(self) -> Hold | None:
        """The hold as a model instance, built when first asked for: a settle's caller
        usually reads only the cost and flags, and building a model is most of the mapping."""
        if self.hold_values["id"] is None:
            return None
        values = dict(self.hold_values)
        for name in _MONEY_COLUMNS:
            if values[name] is not None:
                values[name] = from_units(values[name])
        # Model.from_db, as if the ORM had read the row: every column given, so none is
        # deferred (a deferred one would cost a query on first access).
        return Hold.from_db(DEFAULT_DB_ALIAS, _HOLD_FIELDS, [values[f] for f in _HOLD_FIELDS])


def _outcome(rows: Rows) -> _Outcome:
    [(result, detail, charged, *columns)] = rows
    values = dict(zip(HOLD_RESULT_COLUMNS, columns, strict=True))
    return _Outcome(
        result=result,
        detail=detail,
        charged=from_units(charged) if charged is not None else None,
        hold_values=values,
        transaction_id=values["transaction_id"],
    )


def _refusal(outcome: _Outcome, *, request_id: str, api_key_id: int | None = None,
             account_id: int | None = None, amount: Decimal | None = None) -> BillingError:
    """The typed error for a result code the engine refused with (nothing was written)."""
    match outcome.result:
        case "key_inactive":
            return ApiKeyInactive(api_key_id=api_key_id or 0, reason=outcome.detail or "missing")
        case "account_missing":
            return AccountNotFound(f"no customer account {account_id}")
        case "account_inactive":
            return AccountInactive(account_id=account_id or 0, status=outcome.detail or "")
        case "insufficient_funds":
            return InsufficientFunds(account_id=account_id or 0, amount=amount or Decimal(0))
        case "budget_exceeded":
            return BudgetExceeded(api_key_id=api_key_id or 0, amount=amount or Decimal(0))
        case "invalid_amount":
            return InvalidAmount("the amount must be positive")
        case "not_found":
            return HoldNotFound(f"no hold for request {request_id}")
        case "conflict":
            held = outcome.hold
            return IdempotencyConflict(
                f"request {request_id} was already used for a different hold or settle"
                + (f" (settled at {held.settled_amount})" if held and held.settled_amount else ""),
                charged=outcome.charged,
            )
        case "already_posted":
            return HoldAlreadyResolved(
                request_id=request_id, state="posted by finance", charged=outcome.charged
            )
        case "already_released" | "already_settled" | "already_resolved":
            return HoldAlreadyResolved(
                request_id=request_id,
                state=outcome.detail or outcome.result.removeprefix("already_"),
                charged=outcome.charged,
            )
    raise AssertionError(f"unknown engine result {outcome.result!r}")


# --- place -------------------------------------------------------------------------------------


def balance_depleted_tell(*, account_id: int, amount: Decimal, now: datetime) -> None:
    """A 402: the account's balance.depleted alert, once per crossing, in its own statement
    (the refusal wrote nothing). Failing to record it never changes the 402."""
    from billing.payments.services import balance_depleted_record

    try:
        balance_depleted_record(account_id=account_id, amount=amount, now=now)
    except DatabaseError as exc:
        logger.warning("balance.depleted for account %s not recorded: %s", account_id, exc)


async def balance_depleted_tell_async(*, account_id: int, amount: Decimal, now: datetime) -> None:
    from billing.payments.services import balance_depleted_record_async

    try:
        await balance_depleted_record_async(account_id=account_id, amount=amount, now=now)
    except psycopg.Error as exc:
        logger.warning("balance.depleted for account %s not recorded: %s", account_id, exc)


_HOLD_PLACE_SQL = engine_call(
    "hold_place",
    ["request_id", "account_id", "api_key_id", "model_alias", "amount", "now", "expires_at"],
)


def _place_params(
    *, api_key: ApiKey, request_id: str, amount: Decimal, now: datetime, model_alias: str,
    ttl_seconds: int | None
) -> dict[str, Any]:
    ttl = ttl_seconds if ttl_seconds is not None else settings.BILLING_HOLD_TTL_SECONDS
    return {
        "request_id": request_id,
        "account_id": api_key.account_id,
        "api_key_id": api_key.pk,
        "model_alias": model_alias,
        "amount": to_units(amount),
        "now": now,
        "expires_at": now + timedelta(seconds=ttl),
    }


def _placed(rows: Rows, *, api_key: ApiKey, request_id: str, amount: Decimal) -> Hold:
    outcome = _outcome(rows)
    if outcome.result in ("placed", "replayed"):
        assert outcome.hold is not None
        if outcome.hold.api_key_id == api_key.pk:
            outcome.hold.api_key = api_key  # the caller's copy: no query when read
        return outcome.hold
    raise _refusal(
        outcome,
        request_id=request_id,
        api_key_id=api_key.pk,
        account_id=api_key.account_id,
        amount=amount,
    )


def hold_place(
    *,
    api_key: ApiKey,
    request_id: str,
    amount: Decimal,
    now: datetime,
    model_alias: str = "",
    ttl_seconds: int | None = None,
) -> Hold:
    """Reserve `amount` on the key's account (and its budget, if it has one), or raise
    InsufficientFunds / BudgetExceeded / AccountInactive / ApiKeyInactive /
    IdempotencyConflict. A replay with the same request id and amount returns the original.
    The key is checked as it is in the database, whatever the caller's copy says."""
    if amount <= 0:
        raise InvalidAmount("a hold must be positive")
    params = _place_params(
        api_key=api_key, request_id=request_id, amount=amount, now=now,
        model_alias=model_alias, ttl_seconds=ttl_seconds,
    )
    rows = sql_rows(_HOLD_PLACE_SQL, params)
    try:
        return _placed(rows, api_key=api_key, request_id=request_id, amount=amount)
    except InsufficientFunds:
        balance_depleted_tell(account_id=api_key.account_id, amount=amount, now=now)
        raise


async def hold_place_async(
    *,
    api_key: ApiKey,
    request_id: str,
    amount: Decimal,
    now: datetime,
    model_alias: str = "",
    ttl_seconds: int | None = None,
) -> Hold:
    """hold_place from the event loop: the same statement on an async connection."""
    if amount <= 0:
        raise InvalidAmount("a hold must be positive")
    params = _place_params(
        api_key=api_key, request_id=request_id, amount=amount, now=now,
        model_alias=model_alias, ttl_seconds=ttl_seconds,
    )
    rows = await sql_rows_async(_HOLD_PLACE_SQL, params)
    try:
        return _placed(rows, api_key=api_key, request_id=request_id, amount=amount)
    except InsufficientFunds:
        await balance_depleted_tell_async(account_id=api_key.account_id, amount=amount, now=now)
        raise


# --- settle ------------------------------------------------------------------------------------

_DETAIL_ARGUMENTS = [
    "endpoint", "stream", "outcome", "started_at", "first_byte_ms", "duration_ms",
]
_USAGE_ARGUMENTS = [
    "input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens",
    "reasoning_tokens", "estimated",
]
_HOLD_SETTLE_SQL = engine_call(
    "hold_settle",
    ["request_id", "cost", "now", *_USAGE_ARGUMENTS, *_DETAIL_ARGUMENTS, "provider_cost"],
)


def _detail_params(details: RequestDetails | None, *, now: datetime) -> dict[str, Any]:
    """The usage record's request columns; a NULL endpoint tells the engine to write none."""
    if details is None:
        return {"endpoint": None, "stream": False, "outcome": "", "started_at": now,
                "first_byte_ms": None, "duration_ms": None}
    return {
        "endpoint": details.endpoint,
        "stream": details.stream,
        "outcome": details.outcome,
        "started_at": details.started_at,
        "first_byte_ms": details.first_byte_ms,
        "duration_ms": details.duration_ms,
    }


def _settle_params(
    *, request_id: str, cost: Decimal, now: datetime, usage: Usage | None,
    details: RequestDetails | None
) -> dict[str, Any]:
    if cost < 0:
        raise InvalidAmount("a cost cannot be negative")
    usage = usage or Usage()
    return {
        "request_id": request_id,
        "cost": to_units(cost),
        "now": now,
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "output_tokens": usage.output_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "estimated": usage.estimated,
        **_detail_params(details, now=now),
        "provider_cost": None
        if details is None or details.provider_cost is None
        else to_units(details.provider_cost),
    }


def _settled(rows: Rows, *, request_id: str) -> SettleResult:
    outcome = _outcome(rows)
    if outcome.result in ("settled", "replayed"):
        assert outcome.hold_values["id"] is not None and outcome.charged is not None
        return SettleResult(
            outcome=outcome, cost=outcome.charged, replayed=outcome.result == "replayed"
        )
    raise _refusal(outcome, request_id=request_id)


def hold_settle(
    *,
    request_id: str,
    cost: Decimal,
    now: datetime,
    usage: Usage | None = None,
    details: RequestDetails | None = None,
) -> SettleResult:
    """Charge the actual cost and release the rest of the hold, in one statement.

    More than held is posted and flagged as an overrun, never dropped. After expiry the usage
    is still posted once and flagged late. A replay with the same cost returns the original;
    another cost is an IdempotencyConflict. A request finance already charged or wrote off,
    or whose hold was released, raises HoldAlreadyResolved, whose `charged` says what the
    customer actually paid for it.
    """
    params = _settle_params(
        request_id=request_id, cost=cost, now=now, usage=usage, details=details
    )
    return _settled(sql_rows(_HOLD_SETTLE_SQL, params), request_id=request_id)


async def hold_settle_async(
    *,
    request_id: str,
    cost: Decimal,
    now: datetime,
    usage: Usage | None = None,
    details: RequestDetails | None = None,
) -> SettleResult:
    """hold_settle from the event loop: the same statement on an async connection."""
    params = _settle_params(
        request_id=request_id, cost=cost, now=now, usage=usage, details=details
    )
    return _settled(await sql_rows_async(_HOLD_SETTLE_SQL, params), request_id=request_id)


# --- release -----------------------------------------------------------------------------------

_HOLD_RELEASE_SQL = engine_call("hold_release", ["request_id", "now", *_DETAIL_ARGUMENTS])


def _released(rows: Rows, *, request_id: str) -> Hold:
    outcome = _outcome(rows)
    if outcome.result in ("released", "replayed"):
        assert outcome.hold is not None
        return outcome.hold
    raise _refusal(outcome, request_id=request_id)


def _release_params(
    *, request_id: str, now: datetime, details: RequestDetails | None
) -> Mapping[str, Any]:
    return {"request_id": request_id, "now": now, **_detail_params(details, now=now)}


def hold_release(*, request_id: str, now: datetime, details: RequestDetails | None = None) -> Hold:
    """Give the whole hold back (the upstream failed before producing anything)."""
    params = _release_params(request_id=request_id, now=now, details=details)
    return _released(sql_rows(_HOLD_RELEASE_SQL, params), request_id=request_id)


async def hold_release_async(
    *, request_id: str, now: datetime, details: RequestDetails | None = None
) -> Hold:
    """hold_release from the event loop: the same statement on an async connection."""
    params = _release_params(request_id=request_id, now=now, details=details)
    return _released(await sql_rows_async(_HOLD_RELEASE_SQL, params), request_id=request_id)


# --- finance's postings of a request ------------------------------------------------------------

_REQUEST_CHARGE_SQL = engine_call(
    "request_charge", ["request_id", "cost", "now", "memo", "posted_by"]
)
_REQUEST_WRITE_OFF_SQL = engine_call(
    "request_write_off", ["request_id", "amount", "now", "memo", "posted_by"]
)


@dataclass(frozen=True)
class RequestPosting:
    """A finance posting of a request: its transaction, and whether this call made it."""

    transaction_id: int | None
    posted: bool


def request_charge_post(
    *, request_id: str, cost: Decimal, memo: str, now: datetime, posted_by_id: int | None
) -> RequestPosting:
    """Charge the request's usage exactly as its settle would have. If the request already has
    its posting (a late settle got there first, or it was written off), nothing is posted and
    that posting is returned; a hold settled at zero cost has none, and nothing is charged.
    Runs in the caller's transaction (finance records who did it atomically with it)."""
    if cost <= 0:
        raise InvalidAmount("a charge must be positive")
    outcome = _outcome(sql_rows(_REQUEST_CHARGE_SQL, {
        "request_id": request_id, "cost": to_units(cost), "now": now, "memo": memo,
        "posted_by": posted_by_id,
    }))
    if outcome.result in ("charged", "already_posted", "already_settled"):
        return RequestPosting(
            transaction_id=outcome.transaction_id, posted=outcome.result == "charged"
        )
    raise _refusal(outcome, request_id=request_id)


def request_write_off_post(
    *, request_id: str, amount: Decimal, memo: str, now: datetime, posted_by_id: int | None
) -> RequestPosting:
    """Write off the request's usage under its key, giving its hold back if still active.
    Refuses (HoldAlreadyResolved) if the request already has its posting: a request is
    charged or written off, never both. Runs in the caller's transaction."""
    if amount <= 0:
        raise InvalidAmount("a write-off must be positive")
    outcome = _outcome(sql_rows(_REQUEST_WRITE_OFF_SQL, {
        "request_id": request_id, "amount": to_units(amount), "now": now, "memo": memo,
        "posted_by": posted_by_id,
    }))
    if outcome.result == "written_off":
        return RequestPosting(transaction_id=outcome.transaction_id, posted=True)
    raise _refusal(outcome, request_id=request_id)


# --- checkpoints -------------------------------------------------------------------------------

_HOLD_CHECKPOINT_SQL = engine_call("hold_checkpoint", ["request_id", "cost", "usage", "now"])


async def hold_checkpoint_async(
    *, request_id: str, cost: Decimal, usage: Usage, details: RequestDetails, now: datetime
) -> bool:
    """Record on the active hold what the stream has relayed so far and what it costs: if the
    gateway dies before it settles, the sweep charges this when the hold expires. False when
    the hold is no longer active (the settle got there first)."""
    params = {
        "request_id": request_id,
        "cost": to_units(cost),
        "usage": Jsonb({**usage.to_dict(), **details.to_dict()}),
        "now": now,
    }
    [(marked,)] = await sql_rows_async(_HOLD_CHECKPOINT_SQL, params)
    return bool(marked)
