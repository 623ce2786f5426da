"""Two-phase holds: place before the upstream call, then settle, release or expire exactly once.

Lock order everywhere: hold row, then account rows (ascending id), then the API key row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, transaction
from django.db.models import Case, Exists, F, OuterRef, Q, Subquery, Sum, When

from billing.errors import (
    AccountInactive,
    AccountNotFound,
    ApiKeyInactive,
    BudgetExceeded,
    HoldAlreadyResolved,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
)
from billing.models import Account, ApiKey, Hold, LedgerTransaction, UsageRecord
from billing.money import ZERO, MoneyField, from_units, money_value, to_units
from billing.pricing import Usage
from billing.services.ledger import (
    Leg,
    Posting,
    ledger_post,
    posting_validate,
    request_idempotency_key,
    system_account_id,
)
from billing.sql import on_postgresql, one_statement_transaction, sql_rows, sql_rows_async

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestDetails:
    """What the gateway knows about a request, stored on its usage record."""

    endpoint: str
    started_at: datetime
    stream: bool = False
    outcome: str = ""
    first_byte_ms: int | None = None
    duration_ms: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "endpoint": self.endpoint,
            "started_at": self.started_at.isoformat(),
            "stream": self.stream,
            "outcome": self.outcome,
            "first_byte_ms": self.first_byte_ms,
            "duration_ms": self.duration_ms,
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
        )


@dataclass(frozen=True)
class SettleResult:
    hold: Hold
    cost: Decimal
    transaction_id: int | None
    replayed: bool = False

    @property
    def is_overrun(self) -> bool:
        return self.hold.is_overrun

    @property
    def is_late(self) -> bool:
        return self.hold.is_late


def budget_period_start(*, period: str, now: datetime) -> datetime:
    """Start (UTC) of the budget period containing `now`."""
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == ApiKey.BudgetPeriod.DAY:
        return day
    if period == ApiKey.BudgetPeriod.WEEK:
        return day - timedelta(days=day.weekday())
    if period == ApiKey.BudgetPeriod.MONTH:
        return day.replace(day=1)
    raise InvalidAmount(f"unknown budget period {period!r}")


def _budget_roll(*, start: datetime) -> Case:
    """budget_spent, reset to zero when the stored period is older than `start` (lazy rollover;
    budget_held is never reset: active holds carry over)."""
    return Case(
        When(budget_period_start=start, then=F("budget_spent")),
        default=money_value(ZERO),
        output_field=MoneyField(),
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
    """Reserve `amount` on the key's account, or raise InsufficientFunds / BudgetExceeded /
    AccountInactive. Idempotent by request id."""
    if amount <= 0:
        raise InvalidAmount("a hold must be positive")
    ttl = ttl_seconds if ttl_seconds is not None else settings.BILLING_HOLD_TTL_SECONDS
    params = _one_statement_hold_params(
        api_key=api_key,
        request_id=request_id,
        amount=amount,
        now=now,
        model_alias=model_alias,
        ttl=ttl,
    )
    if params is not None:
        try:
            with one_statement_transaction():
                rows = sql_rows(_HOLD_PLACE_SQL, params)
        except IntegrityError:
            rows = []  # the request id is taken: the general path replays it
        placed = _placed(rows, params=params, api_key=api_key, amount=amount)
        if placed is not None:
            return placed
        # Refused, a replay, or the key changed: nothing was written; the general path below
        # decides again and says why.

    def general(key: ApiKey) -> Hold:
        with transaction.atomic(durable=True):
            return _hold_place(
                api_key=key,
                request_id=request_id,
                amount=amount,
                now=now,
                model_alias=model_alias,
                ttl=ttl,
            )

    try:
        try:
            return general(api_key)
        except _KeyGainedBudget as changed:
            # The caller's copy of the key (the gateway caches keys) predates its budget.
            return general(changed.api_key)
    except IntegrityError:
        # The request id is taken: a retry gets the original hold back (it fails on the
        # unique index before any balance check, so even a now-exhausted account replays).
        existing = Hold.objects.filter(request_id=request_id).first()
        if existing is None:
            raise
        if existing.account_id != api_key.account_id or existing.amount != amount:
            raise IdempotencyConflict(
                f"request {request_id} already holds a different amount"
            ) from None
        return existing


# The common hold on PostgreSQL (a key without a budget) in one statement that is its own
# transaction: the conditional UPDATE is the check (the account's funds and status, and the
# key's status: a key revoked a moment ago is refused here, whatever the gateway's key cache
# says, and a key that gained a budget since the caller read it is not placed this way), and
# the hold row is inserted only if it matched. A taken request id fails the whole statement on
# the unique index. Either way nothing is written, and the general path decides again.
_HOLD_PLACE_SQL = """
WITH placed AS (
    UPDATE billing_account SET held = held + %(amount)s
    WHERE id = %(account_id)s AND kind = 'customer' AND status = 'active'
      AND balance >= held + %(amount)s - overdraft
      AND EXISTS (SELECT 1 FROM billing_apikey
                  WHERE id = %(api_key_id)s AND status = 'active'
                    AND (expires_at IS NULL OR expires_at > %(now)s)
                    AND (budget_limit IS NULL OR budget_period = ''))
    RETURNING id
)
INSERT INTO billing_hold (request_id, account_id, api_key_id, model_alias, amount, budgeted,
                          state, created_at, expires_at, is_overrun, is_late)
SELECT %(request_id)s, id, %(api_key_id)s, %(model_alias)s, %(amount)s, false,
       'active', %(now)s, %(expires_at)s, false, false
FROM placed
RETURNING id
"""


_HOLD_COLUMNS = tuple(field.attname for field in Hold._meta.concrete_fields)


def _hold_loaded(**columns: Any) -> Hold:
    """A Hold built from what our own statement wrote, as if the ORM had read it (every
    column given: a deferred one would cost a query on first access). Model.from_db's
    positional build is about three times cheaper than keyword arguments, on the hot path."""
    return Hold.from_db(DEFAULT_DB_ALIAS, _HOLD_COLUMNS, [columns[name] for name in _HOLD_COLUMNS])


def _one_statement_hold_params(
    *, api_key: ApiKey, request_id: str, amount: Decimal, now: datetime, model_alias: str, ttl: int
) -> dict[str, Any] | None:
    """The one-statement hold's parameters, or None where it does not apply (not PostgreSQL, a
    key with a budget: the general path places those)."""
    if not on_postgresql() or _is_budgeted(api_key):
        return None
    return {
        "amount": to_units(amount),
        "account_id": api_key.account_id,
        "request_id": request_id,
        "api_key_id": api_key.pk,
        "model_alias": model_alias,
        "now": now,
        "expires_at": now + timedelta(seconds=ttl),
    }


def _placed(
    rows: Sequence[tuple[Any, ...]], *, params: dict[str, Any], api_key: ApiKey, amount: Decimal
) -> Hold | None:
    if not rows:
        return None
    hold = _hold_loaded(
        id=rows[0][0],
        request_id=params["request_id"],
        account_id=api_key.account_id,
        api_key_id=api_key.pk,
        model_alias=params["model_alias"],
        amount=amount,
        budgeted=False,
        state=Hold.State.ACTIVE,
        created_at=params["now"],
        expires_at=params["expires_at"],
        resolved_at=None,
        settled_amount=None,
        is_overrun=False,
        is_late=False,
        transaction_id=None,
    )
    hold.api_key = api_key  # the caller's copy: no query when read
    return hold


async def hold_place_async(
    *,
    api_key: ApiKey,
    request_id: str,
    amount: Decimal,
    now: datetime,
    model_alias: str = "",
    ttl_seconds: int | None = None,
) -> Hold | None:
    """hold_place's common case from the event loop (PostgreSQL, a key without a budget): the
    same one statement, on an async connection, so the caller needs no thread. None when it
    placed nothing (refused, a replay, the key changed) or could not run: then hold_place, in a
    thread, decides and says why. Nothing was written in that case."""
    params = _one_statement_hold_params(
        api_key=api_key,
        request_id=request_id,
        amount=amount,
        now=now,
        model_alias=model_alias,
        ttl=ttl_seconds if ttl_seconds is not None else settings.BILLING_HOLD_TTL_SECONDS,
    )
    if params is None or amount <= 0:
        return None
    rows = await _rows_or_none_async(_HOLD_PLACE_SQL, params, step="hold")
    return _placed(rows or [], params=params, api_key=api_key, amount=amount)


async def _rows_or_none_async(
    statement: str, params: dict[str, Any], *, step: str
) -> Sequence[tuple[Any, ...]] | None:
    """The statement's rows, or None if it failed (a taken request id, the database): then
    nothing was written and the sync path decides again."""
    try:
        return await sql_rows_async(statement, params)
    except psycopg.Error as exc:
        logger.info("async %s of %s fell back: %s", step, params["request_id"], type(exc).__name__)
        return None


class _KeyGainedBudget(Exception):
    """A hold for a key believed budget-free found a budget on it: place it again with this."""

    def __init__(self, api_key: ApiKey) -> None:
        self.api_key = api_key


def _key_usable(*, api_key_id: int, now: datetime, budgeted: bool) -> Q:
    usable = Q(pk=api_key_id, status=ApiKey.Status.ACTIVE) & (
        Q(expires_at__isnull=True) | Q(expires_at__gt=now)
    )
    # A key still without a budget, as the caller believed: else its holds must count.
    return usable if budgeted else usable & (Q(budget_limit__isnull=True) | Q(budget_period=""))


def _hold_refusal(*, api_key: ApiKey, amount: Decimal, now: datetime) -> Exception:
    """Why a hold's conditional UPDATE matched no row (read only on this error path)."""
    key = ApiKey.objects.filter(pk=api_key.pk).first()
    if key is None or key.status != ApiKey.Status.ACTIVE:
        return ApiKeyInactive(api_key_id=api_key.pk, reason=key.status if key else "missing")
    if key.expires_at is not None and key.expires_at <= now:
        return ApiKeyInactive(api_key_id=api_key.pk, reason="expired")
    if _is_budgeted(key) and not _is_budgeted(api_key):
        return _KeyGainedBudget(key)
    status = Account.objects.filter(pk=api_key.account_id).values_list("status", flat=True).first()
    if status is None:
        return AccountNotFound(f"no account {api_key.account_id}")
    if status != Account.Status.ACTIVE:
        return AccountInactive(account_id=api_key.account_id, status=status)
    return InsufficientFunds(account_id=api_key.account_id, amount=amount)


def _is_budgeted(api_key: ApiKey) -> bool:
    return api_key.budget_limit is not None and bool(api_key.budget_period)


def _hold_place(
    *, api_key: ApiKey, request_id: str, amount: Decimal, now: datetime, model_alias: str, ttl: int
) -> Hold:
    budgeted = _is_budgeted(api_key)
    expires_at = now + timedelta(seconds=ttl)
    # The hold row goes in first: a replay fails on the unique request id before touching any
    # balance, and the account row is locked only from its UPDATE to COMMIT (the hot row in
    # a busy account is the throughput limit).
    hold = Hold.objects.create(
        request_id=request_id,
        account_id=api_key.account_id,
        api_key=api_key,
        model_alias=model_alias,
        amount=amount,
        budgeted=budgeted,
        created_at=now,
        expires_at=expires_at,
    )
    # The conditional UPDATE is the check: no read-then-write race.
    placed = Account.objects.filter(
        Exists(
            ApiKey.objects.filter(_key_usable(api_key_id=api_key.pk, now=now, budgeted=budgeted))
        ),
        pk=api_key.account_id,
        kind=Account.Kind.CUSTOMER,
        status=Account.Status.ACTIVE,
        balance__gte=F("held") + money_value(amount) - F("overdraft"),
    ).update(held=F("held") + money_value(amount))
    if not placed:
        raise _hold_refusal(api_key=api_key, amount=amount, now=now)

    if budgeted:
        start = budget_period_start(period=api_key.budget_period, now=now)
        fits_current = Q(budget_period_start=start) & Q(
            budget_limit__gte=F("budget_spent") + F("budget_held") + money_value(amount)
        )
        fits_new_period = ~Q(budget_period_start=start) & Q(
            budget_limit__gte=F("budget_held") + money_value(amount)
        )
        within_budget = (
            ApiKey.objects.filter(pk=api_key.pk)
            .filter(Q(budget_limit__isnull=True) | fits_current | fits_new_period)
            .update(
                budget_spent=_budget_roll(start=start),
                budget_period_start=start,
                budget_held=F("budget_held") + money_value(amount),
            )
        )
        if not within_budget:
            raise BudgetExceeded(api_key_id=api_key.pk, amount=amount)
    return hold


def _hold_lock(request_id: str) -> Hold:
    try:
        return Hold.objects.select_for_update().get(request_id=request_id)
    except Hold.DoesNotExist as exc:
        raise HoldNotFound(f"no hold for request {request_id}") from exc


def _budget_release(*, hold: Hold, release: Decimal, spent: Decimal, now: datetime) -> None:
    """Move a budgeted hold's amount out of budget_held and its cost into budget_spent."""
    if not hold.budgeted or hold.api_key_id is None or (not release and not spent):
        return
    api_key = ApiKey.objects.only("budget_period").get(pk=hold.api_key_id)
    changes: dict[str, object] = {"budget_held": F("budget_held") - money_value(release)}
    if spent and api_key.budget_period:
        start = budget_period_start(period=api_key.budget_period, now=now)
        changes["budget_spent"] = _budget_roll(start=start) + money_value(spent)
        changes["budget_period_start"] = start
    ApiKey.objects.filter(pk=hold.api_key_id).update(**changes)


# Public for finance postings (billing/services/requests.py) that resolve a hold themselves.
hold_budget_release = _budget_release


def _usage_record_write(
    *,
    hold: Hold,
    usage: Usage | None,
    cost: Decimal,
    status: str,
    details: RequestDetails | None,
    now: datetime,
) -> None:
    if details is None:
        return
    usage = usage or Usage()
    UsageRecord.objects.create(
        request_id=hold.request_id,
        account_id=hold.account_id,
        api_key_id=hold.api_key_id,
        model_alias=hold.model_alias,
        endpoint=details.endpoint,
        stream=details.stream,
        input_tokens=usage.input_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        output_tokens=usage.output_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        estimated=usage.estimated,
        cost=cost,
        status=status,
        outcome=details.outcome,
        started_at=details.started_at,
        first_byte_ms=details.first_byte_ms,
        duration_ms=details.duration_ms,
        created_at=now,
    )


def usage_posting(
    *, hold: Hold, cost: Decimal, now: datetime, is_late: bool, memo: str = ""
) -> Posting:
    return Posting(
        kind=LedgerTransaction.Kind.USAGE,
        legs=[
            Leg(account_id=hold.account_id, amount=-cost),
            Leg(account_id=system_account_id(Account.Kind.REVENUE), amount=cost),
        ],
        idempotency_key=request_idempotency_key(hold.request_id),
        occurred_at=hold.created_at,
        request_id=hold.request_id,
        model_alias=hold.model_alias,
        memo=memo,
        is_overrun=cost > hold.amount,
        is_late=is_late,
    )


def hold_settle(
    *,
    request_id: str,
    cost: Decimal,
    now: datetime,
    usage: Usage | None = None,
    details: RequestDetails | None = None,
    account_id: int | None = None,
) -> SettleResult:
    """Charge the actual cost and release the rest of the hold, in one short transaction.

    `account_id`, when the caller knows the hold's account (the gateway does), saves a read.

    More than held is posted and flagged as an overrun, never dropped. After expiry the usage
    is still posted once and flagged late. A replay with the same cost returns the original.
    """
    if cost < 0:
        raise InvalidAmount("a cost cannot be negative")
    if on_postgresql():
        with one_statement_transaction():
            result = _hold_settle_common(
                request_id=request_id,
                cost=cost,
                now=now,
                usage=usage,
                details=details,
                account_id=account_id,
            )
        if result is not None:
            return result
    with transaction.atomic(durable=True):
        hold = _hold_lock(request_id)
        # settled_amount also marks a late settle of an expired hold (which may have no posting
        # when the cost was zero): a second settle of it is a replay, never a second charge.
        if (
            hold.state == Hold.State.SETTLED
            or hold.transaction_id is not None
            or hold.settled_amount is not None
        ):
            return _settle_replay(hold=hold, cost=cost)
        if hold.state == Hold.State.RELEASED:
            raise HoldAlreadyResolved(request_id=request_id, state=hold.state)

        txn = hold_charge(hold=hold, cost=cost, now=now, usage=usage, details=details)
    return SettleResult(hold=hold, cost=cost, transaction_id=txn.pk if txn else None)


# The common settle on PostgreSQL (an active hold of a key without a budget, nothing posted yet)
# in one statement: lock the hold, then write the posting, its legs, the hold's resolution, the
# usage record and the account's balance and held, deciding overrun and lateness as hold_charge
# does. The hold is found by its request id alone and only then checked: with the account and
# state in the same WHERE, the planner walked the account's (account_id, state) index instead,
# through every active hold of the account and the dead entries of settled ones. If the hold
# is not in that state (replay, late after expiry, released, budgeted, or a different account
# than the caller said) nothing is written and the ORM path below takes it.
# Casts are for the server-side binding of billing/sql.py (a NULL parameter has no type).
_HOLD_ACCOUNT_SQL = "SELECT account_id FROM billing_hold WHERE request_id = %(request_id)s"

_SETTLE_SQL = """
WITH target AS (
    SELECT id, account_id, state, budgeted, transaction_id, settled_amount, amount,
           created_at, expires_at, model_alias
    FROM billing_hold WHERE request_id = %(request_id)s
    FOR UPDATE
), locked AS (
    SELECT id, amount, created_at, model_alias, %(cost)s::bigint > amount AS is_overrun,
           %(now)s >= expires_at AS is_late
    FROM target
    WHERE account_id = %(account_id)s AND state = 'active'
      AND NOT budgeted AND transaction_id IS NULL AND settled_amount IS NULL
), txn AS (
    INSERT INTO billing_ledgertransaction (kind, idempotency_key, content_hash, request_id, memo,
        posted_by_id, occurred_at, posted_at, reverses_id, model_alias, is_overrun, is_late)
    SELECT 'usage', %(idempotency_key)s, %(content_hash)s, %(request_id)s, '', NULL,
        created_at, %(now)s, NULL, model_alias, is_overrun, is_late
    FROM locked WHERE %(cost)s::bigint > 0
    RETURNING id
), legs AS (
    INSERT INTO billing_ledgerleg (transaction_id, account_id, amount)
    SELECT id, %(account_id)s::bigint, -%(cost)s::bigint FROM txn
    UNION ALL
    SELECT id, %(revenue_id)s::bigint, %(cost)s::bigint FROM txn
), resolved AS (
    UPDATE billing_hold AS h
    SET state = 'settled', resolved_at = %(now)s, settled_amount = %(cost)s,
        is_overrun = locked.is_overrun, is_late = locked.is_late,
        transaction_id = (SELECT id FROM txn)
    FROM locked WHERE h.id = locked.id
    RETURNING h.id, h.api_key_id, h.model_alias, h.amount, h.created_at, h.expires_at,
        h.is_overrun, h.is_late, h.transaction_id
), usage_row AS (
    INSERT INTO billing_usagerecord (request_id, account_id, api_key_id, model_alias, endpoint,
        stream, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens,
        reasoning_tokens, estimated, cost, status, outcome, started_at, first_byte_ms,
        duration_ms, created_at)
    SELECT %(request_id)s, %(account_id)s, api_key_id, model_alias, %(endpoint)s,
        %(stream)s, %(input_tokens)s, %(cached_input_tokens)s, %(cache_write_tokens)s,
        %(output_tokens)s, %(reasoning_tokens)s, %(estimated)s, %(cost)s, 'settled', %(outcome)s,
        %(started_at)s, %(first_byte_ms)s::integer, %(duration_ms)s::integer, %(now)s
    FROM resolved WHERE %(record_usage)s
), account AS (
    UPDATE billing_account AS a SET balance = a.balance - %(cost)s, held = a.held - locked.amount
    FROM locked WHERE a.id = %(account_id)s
)
SELECT * FROM resolved
"""


def _hold_settle_common(
    *,
    request_id: str,
    cost: Decimal,
    now: datetime,
    usage: Usage | None,
    details: RequestDetails | None,
    account_id: int | None,
) -> SettleResult | None:
    """The common settle in one statement (its own transaction), or None when the hold needs
    the general path (then nothing was written)."""
    if account_id is None:
        # A hold's account never changes: no lock needed to read it.
        found = sql_rows(_HOLD_ACCOUNT_SQL, {"request_id": request_id})
        if not found:
            return None
        [(account_id,)] = found
    return _settled(
        sql_rows(
            _SETTLE_SQL,
            _settle_params(
                request_id=request_id,
                account_id=account_id,
                cost=cost,
                now=now,
                usage=usage,
                details=details,
            ),
        ),
        request_id=request_id,
        account_id=account_id,
        cost=cost,
        now=now,
    )


async def hold_settle_async(
    *,
    request_id: str,
    account_id: int,
    cost: Decimal,
    now: datetime,
    usage: Usage | None = None,
    details: RequestDetails | None = None,
) -> SettleResult | None:
    """hold_settle's common case from the event loop (PostgreSQL, an active hold of a key
    without a budget, nothing posted yet): the same one statement, on an async connection.
    None when it wrote nothing or could not run: then hold_settle, in a thread, decides
    (replays, late settles, budgets, refusals, a database outage and its hand-off)."""
    if not on_postgresql() or cost < 0:
        return None
    params = _settle_params(
        request_id=request_id,
        account_id=account_id,
        cost=cost,
        now=now,
        usage=usage,
        details=details,
    )
    rows = await _rows_or_none_async(_SETTLE_SQL, params, step="settle")
    return _settled(rows or [], request_id=request_id, account_id=account_id, cost=cost, now=now)


def _settle_params(
    *,
    request_id: str,
    account_id: int,
    cost: Decimal,
    now: datetime,
    usage: Usage | None,
    details: RequestDetails | None,
) -> dict[str, Any]:
    # The posting's identity, as ledger_post would compute it (the legs are fixed by the
    # account and the cost; nothing else the statement decides enters it).
    posting = Posting(
        kind=LedgerTransaction.Kind.USAGE,
        legs=[
            Leg(account_id=account_id, amount=-cost),
            Leg(account_id=system_account_id(Account.Kind.REVENUE), amount=cost),
        ],
        idempotency_key=request_idempotency_key(request_id),
        occurred_at=now,
        request_id=request_id,
    )
    if cost > 0:
        posting_validate(posting)
    usage = usage or Usage()
    return {
        "request_id": request_id,
        "account_id": account_id,
        "cost": to_units(cost),
        "now": now,
        "idempotency_key": posting.idempotency_key,
        "content_hash": posting.content_hash,
        "revenue_id": system_account_id(Account.Kind.REVENUE),
        "record_usage": details is not None,
        "endpoint": details.endpoint if details else "",
        "stream": details.stream if details else False,
        "outcome": details.outcome if details else "",
        "started_at": details.started_at if details else now,
        "first_byte_ms": details.first_byte_ms if details else None,
        "duration_ms": details.duration_ms if details else None,
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "output_tokens": usage.output_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "estimated": usage.estimated,
    }


def _settled(
    rows: Sequence[tuple[Any, ...]],
    *,
    request_id: str,
    account_id: int,
    cost: Decimal,
    now: datetime,
) -> SettleResult | None:
    if not rows:
        return None
    [(hold_id, api_key_id, alias, amount, created_at, expires_at, overrun, late, txn_id)] = rows
    hold = _hold_loaded(
        id=hold_id,
        request_id=request_id,
        account_id=account_id,
        api_key_id=api_key_id,
        model_alias=alias,
        amount=from_units(amount),
        budgeted=False,
        state=Hold.State.SETTLED,
        created_at=created_at,
        expires_at=expires_at,
        resolved_at=now,
        settled_amount=cost,
        is_overrun=overrun,
        is_late=late,
        transaction_id=txn_id,
    )
    return SettleResult(hold=hold, cost=cost, transaction_id=txn_id)


def hold_charge(
    *,
    hold: Hold,
    cost: Decimal,
    now: datetime,
    usage: Usage | None = None,
    details: RequestDetails | None = None,
    memo: str = "",
    posted_by: AbstractBaseUser | None = None,
) -> LedgerTransaction | None:
    """Post `cost` as the request's usage and resolve its hold: the step a settle and a
    finance charge share. Inner: the caller holds the hold's row lock in its transaction and
    has checked the request has no posting yet."""
    was_active = hold.state == Hold.State.ACTIVE
    is_late = not was_active or now >= hold.expires_at
    release = hold.amount if was_active else ZERO
    if was_active:
        hold.state = Hold.State.SETTLED
        hold.resolved_at = now
    hold.settled_amount = cost
    hold.is_overrun = cost > hold.amount
    hold.is_late = is_late
    _usage_record_write(
        hold=hold,
        usage=usage,
        cost=cost,
        status=UsageRecord.Status.SETTLED,
        details=details,
        now=now,
    )

    def record(posted: LedgerTransaction | None) -> None:
        hold.transaction = posted
        hold.save(
            update_fields=[
                "state",
                "resolved_at",
                "settled_amount",
                "is_overrun",
                "is_late",
                "transaction",
            ]
        )

    # Per-request rows are written first; the shared account row is locked last, from its
    # UPDATE to COMMIT only.
    txn = None
    if cost > 0:
        posting = usage_posting(hold=hold, cost=cost, now=now, is_late=is_late, memo=memo)
        txn = ledger_post(
            posting=posting,
            now=now,
            posted_by=posted_by,
            held_release={hold.account_id: release},
            on_posted=record,
        )
    else:
        record(None)
        if release:
            Account.objects.filter(pk=hold.account_id).update(held=F("held") - money_value(release))
    _budget_release(hold=hold, release=release, spent=cost, now=now)
    return txn


def _settle_replay(*, hold: Hold, cost: Decimal) -> SettleResult:
    """Second settle of the same request: a no-op if it agrees, an error if it does not."""
    if hold.settled_amount == cost and (
        hold.transaction_id is None
        or LedgerTransaction.objects.filter(
            pk=hold.transaction_id, kind=LedgerTransaction.Kind.USAGE
        ).exists()
    ):
        return SettleResult(hold=hold, cost=cost, transaction_id=hold.transaction_id, replayed=True)
    if hold.settled_amount is not None and hold.settled_amount != cost:
        raise IdempotencyConflict(
            f"request {hold.request_id} was settled at {hold.settled_amount}, not {cost}"
        )
    # Charged or written off by finance before this settle arrived: never charge twice.
    raise HoldAlreadyResolved(request_id=hold.request_id, state="posted by finance")


def hold_release(*, request_id: str, now: datetime, details: RequestDetails | None = None) -> Hold:
    """Give the whole hold back (the upstream failed before producing anything)."""
    with transaction.atomic(durable=True):
        hold = _hold_lock(request_id)
        if hold.state == Hold.State.RELEASED:
            return hold
        if hold.state != Hold.State.ACTIVE:
            raise HoldAlreadyResolved(request_id=request_id, state=hold.state)
        Account.objects.filter(pk=hold.account_id).update(held=F("held") - money_value(hold.amount))
        _budget_release(hold=hold, release=hold.amount, spent=ZERO, now=now)
        hold.state = Hold.State.RELEASED
        hold.resolved_at = now
        hold.save(update_fields=["state", "resolved_at"])
        _usage_record_write(
            hold=hold,
            usage=None,
            cost=ZERO,
            status=UsageRecord.Status.RELEASED,
            details=details,
            now=now,
        )
    return hold


def holds_expire(
    *,
    now: datetime,
    batch_size: int = 10_000,
    max_batches: int | None = None,
    on_expired: Callable[[list[int]], None] | None = None,
) -> int:
    """Expire every active hold whose expiry is at or before `now`, in bounded batches.

    Each batch is one short transaction of a fixed number of set-based statements, so memory
    and lock time do not grow with the number of holds. Holds a settle is working on are
    skipped (SKIP LOCKED) and left to it. `on_expired(hold_ids)` runs inside each batch's
    transaction (reconciliation queues the holds there, atomically with their expiry).
    """
    expired = 0
    batches = 0
    cursor = _SWEEP_START
    while max_batches is None or batches < max_batches:
        with transaction.atomic(durable=True):
            count, cursor = _holds_expire_batch(
                now=now, batch_size=batch_size, on_expired=on_expired, after=cursor
            )
        expired += count
        batches += 1
        if count < batch_size:
            break
    return expired


# One statement per batch on PostgreSQL: pick the due holds (skipping any a settle has locked),
# expire them, lock their accounts in id order (concurrent sweeps cannot deadlock), and take the
# expired amounts off the accounts' and budgeted keys' held totals. SUM(bigint) is numeric, so
# the subtraction stays exact. Each batch starts after the last one's (expires_at, id): the
# partial index still holds the entries of holds expired moments ago (until vacuum), and
# rescanning them from the start every batch made the sweep quadratic. The update finds the
# batch by primary key (= ANY of the locked ids): a join with the CTE let the planner hash the
# whole hold table for every batch, a third of the time of a sweep of 1,000,000.
_EXPIRE_BATCH_SQL = """
WITH due AS (
    SELECT id FROM billing_hold
    WHERE state = 'active' AND expires_at <= %(now)s
      AND (expires_at, id) > (%(after_at)s, %(after_id)s)
    ORDER BY expires_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), expired AS (
    UPDATE billing_hold AS h SET state = 'expired', resolved_at = %(now)s
    WHERE h.id = ANY(ARRAY(SELECT id FROM due))
    RETURNING h.id, h.expires_at, h.account_id, h.api_key_id, h.amount, h.budgeted
), per_account AS (
    SELECT account_id, SUM(amount) AS total FROM expired GROUP BY account_id
), locked AS (
    SELECT a.id FROM billing_account AS a
    WHERE a.id IN (SELECT account_id FROM per_account)
    ORDER BY a.id FOR UPDATE
), accounts AS (
    UPDATE billing_account AS a SET held = a.held - p.total
    FROM per_account AS p, locked AS l WHERE a.id = p.account_id AND l.id = a.id
    RETURNING a.id
), per_key AS (
    SELECT api_key_id, SUM(amount) AS total FROM expired
    WHERE budgeted AND api_key_id IS NOT NULL GROUP BY api_key_id
), keys AS (
    UPDATE billing_apikey AS k SET budget_held = k.budget_held - p.total
    FROM per_key AS p WHERE k.id = p.api_key_id
    RETURNING k.id
)
SELECT id, expires_at FROM expired
"""


_SWEEP_START = (datetime.min.replace(tzinfo=UTC), 0)


def _holds_expire_batch(
    *,
    now: datetime,
    batch_size: int,
    on_expired: Callable[[list[int]], None] | None,
    after: tuple[datetime, int],
) -> tuple[int, tuple[datetime, int]]:
    """Expire one batch; returns (count, where the next batch starts)."""
    if on_postgresql():
        with connection.cursor() as cursor:
            cursor.execute(
                _EXPIRE_BATCH_SQL,
                {"now": now, "limit": batch_size, "after_at": after[0], "after_id": after[1]},
            )
            rows = cursor.fetchall()
        ids = [row[0] for row in rows]
        if ids and on_expired is not None:
            on_expired(ids)
        return len(ids), max(((at, hold_id) for hold_id, at in rows), default=after)
    # Elsewhere (SQLite, the embedded default) the same steps as separate set-based statements.
    ids = list(
        Hold.objects.filter(state=Hold.State.ACTIVE, expires_at__lte=now)
        .order_by("expires_at", "id")
        .select_for_update(skip_locked=True)
        .values_list("id", flat=True)[:batch_size]
    )
    if not ids:
        return 0, after
    batch = Hold.objects.filter(id__in=ids)
    account_totals = (
        batch.filter(account_id=OuterRef("pk"))
        .values("account_id")
        .annotate(total=Sum("amount"))
        .values("total")
    )
    key_totals = (
        batch.filter(api_key_id=OuterRef("pk"), budgeted=True)
        .values("api_key_id")
        .annotate(total=Sum("amount"))
        .values("total")
    )
    # Lock the affected rows in id order first: concurrent sweeps then cannot deadlock.
    account_ids = list(
        Account.objects.filter(pk__in=batch.values("account_id"))
        .order_by("pk")
        .select_for_update()
        .values_list("pk", flat=True)
    )
    Account.objects.filter(pk__in=account_ids).update(
        held=F("held") - Subquery(account_totals, output_field=MoneyField())
    )
    ApiKey.objects.filter(pk__in=batch.filter(budgeted=True).values("api_key_id")).update(
        budget_held=F("budget_held") - Subquery(key_totals, output_field=MoneyField())
    )
    count = batch.update(state=Hold.State.EXPIRED, resolved_at=now)
    if on_expired is not None:
        on_expired(ids)
    return count, after
