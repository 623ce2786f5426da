"""Background work: settlement retries and the periodic sweeps. Each task calls one service.

Every task may run twice (acks_late, reject_on_worker_lost: a worker killed mid-task gives its
task back), so each one is idempotent: settles by the request's idempotency key, sweeps by
state transitions and unique reconciliation items.
"""

from __future__ import annotations

import logging
import random
from decimal import Decimal
from typing import Any

import psycopg
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError
from django.utils import timezone

from billing import metrics
from billing.errors import HoldAlreadyResolved, IdempotencyConflict
from billing.pricing import Usage
from billing.services.budgets import api_key_budgets_roll
from billing.services.holds import RequestDetails, hold_settle
from billing.services.statements import (
    statement_accounts,
    statement_issue,
    statement_month_last,
)
from billing.statements import month_parse
from reconciliation.services.failures import deduction_failure_record, settled_items_resolve
from reconciliation.services.sweeps import holds_expire_and_queue, ledger_audit_and_queue

logger = logging.getLogger(__name__)

# A database that is down, restarting or failing over; a pool with no free connection; a lock
# that timed out. All pass by themselves, so the settle is tried again.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    psycopg.OperationalError,
    SoftTimeLimitExceeded,
)


def settle_retry_delay(*, retries: int, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before retry number `retries + 1`: 1, 2, 4, ... capped, with "equal jitter".

    Celery's own retry_jitter draws from [0, delay], which can make the whole schedule far
    shorter than intended; drawing from [delay/2, delay] still spreads a burst of retries
    after an outage, and keeps a lower bound on the time the retries span (at the default
    60 s cap and 25 retries: at least 11 minutes, at most 21).
    """
    delay = min(cap, 2.0**retries)
    return delay / 2 + (rng or random).uniform(0, delay / 2)


class SettlementTask(Task):
    """When a settle fails for good, record it for finance (the failure hook calls a service)."""

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        # An error nobody expected (bad arguments, a bug): never retried, never lost either.
        _failure_record(self, kwargs=kwargs, exc=exc)


def _task_kwargs(
    request_id: str, cost: str, usage: dict[str, Any], details: dict[str, Any] | None
) -> dict[str, Any]:
    return {"request_id": request_id, "cost": cost, "usage": usage, "details": details}


def _failure_record(task: Task, *, kwargs: dict[str, Any], exc: BaseException) -> None:
    try:
        details = _details(kwargs.get("details"))
    except (KeyError, TypeError, ValueError):
        details = None  # unusable details must not stop the record
    deduction_failure_record(
        request_id=str(kwargs["request_id"]),
        cost=Decimal(kwargs["cost"]),
        usage=Usage.from_dict(kwargs.get("usage") or {}),
        details=details,
        error=f"{type(exc).__name__}: {exc}",
        attempts=task.request.retries + 1,
        now=timezone.now(),
    )


def _details(raw: dict[str, Any] | None) -> RequestDetails | None:
    return RequestDetails.from_dict(raw) if raw else None


@shared_task(
    name="reconciliation.settlement_retry",
    base=SettlementTask,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=settings.BILLING_SETTLE_MAX_RETRIES,
    # Both limits stay far below the Redis visibility timeout (CELERY_VISIBILITY_TIMEOUT).
    soft_time_limit=60,
    time_limit=90,
)
def settlement_retry(
    self: SettlementTask,
    *,
    request_id: str,
    cost: str,
    usage: dict[str, Any],
    details: dict[str, Any] | None = None,
) -> str:
    """Settle a request the gateway could not settle. Returns settled / replayed /
    already_resolved, or failed / conflict after recording a deduction failure for finance."""
    try:
        result = hold_settle(
            request_id=request_id,
            cost=Decimal(cost),
            usage=Usage.from_dict(usage),
            details=_details(details),
            now=timezone.now(),
        )
    except TRANSIENT_ERRORS as exc:
        if self.request.retries >= (self.max_retries or 0):
            # Handled here rather than re-raised: the failure record's fatal event is the one
            # alert, not that plus Celery's error event for the same request.
            metrics.SETTLEMENT_RETRIES.labels(outcome="exhausted").inc()
            _failure_record(self, kwargs=_task_kwargs(request_id, cost, usage, details), exc=exc)
            return "failed"
        delay = settle_retry_delay(
            retries=self.request.retries, cap=settings.BILLING_SETTLE_RETRY_BACKOFF_MAX
        )
        logger.warning(
            "settle of request %s failed (attempt %d): %s; retrying in %.1fs",
            request_id,
            self.request.retries + 1,
            exc,
            delay,
        )
        metrics.SETTLEMENT_RETRIES.labels(outcome="retried").inc()
        raise self.retry(exc=exc, countdown=delay) from exc
    except HoldAlreadyResolved as exc:
        # Released by the gateway, or charged/written off by finance first: nothing to charge.
        logger.warning("settle retry of request %s: %s", request_id, exc)
        metrics.SETTLEMENTS.labels(outcome="already_resolved").inc()
        return "already_resolved"
    except IdempotencyConflict as exc:
        # Settled before at a different cost: a human must look, and retrying cannot help.
        logger.error("settle retry of request %s conflicts: %s", request_id, exc)
        metrics.SETTLEMENTS.labels(outcome="conflict").inc()
        _failure_record(self, kwargs=_task_kwargs(request_id, cost, usage, details), exc=exc)
        return "conflict"

    outcome = "replayed" if result.replayed else "settled"
    if self.request.retries:
        metrics.SETTLEMENT_RETRIES.labels(outcome="succeeded").inc()
    metrics.SETTLEMENTS.labels(outcome=f"retry_{outcome}").inc()
    if not result.replayed:
        metrics.HOLDS.labels(event="settled").inc()
        metrics.SETTLED_USD.inc(float(result.cost))  # a metric sample, not money
    try:
        settled_items_resolve(
            request_id=request_id, transaction_id=result.transaction_id, now=timezone.now()
        )
    except DatabaseError:
        # The charge is committed; a stale pending item is finance's to close, not a failure.
        logger.exception("could not close the items of settled request %s", request_id)
    return outcome


@shared_task(name="reconciliation.expire_holds", acks_late=True, reject_on_worker_lost=True)
def expire_holds() -> dict[str, int]:
    return holds_expire_and_queue(now=timezone.now())


@shared_task(name="reconciliation.audit_ledger", acks_late=True, reject_on_worker_lost=True)
def audit_ledger() -> dict[str, object]:
    return ledger_audit_and_queue(now=timezone.now())


@shared_task(name="reconciliation.budgets_roll", acks_late=True, reject_on_worker_lost=True)
def budgets_roll() -> int:
    return api_key_budgets_roll(now=timezone.now())


@shared_task(name="reconciliation.statements_issue", acks_late=True, reject_on_worker_lost=True)
def statements_issue(*, month: str | None = None) -> dict[str, object]:
    """Last month's statements (beat: 00:30 UTC on the 1st), or `month`'s (YYYY-MM): one
    task per account not issued yet, so a PDF each never makes one long task. Idempotent."""
    issuing = statement_month_last(now=timezone.now()) if month is None else month_parse(month)
    accounts = statement_accounts(month=issuing, unissued_only=True)
    for account_id in accounts:
        statement_issue_account.apply_async(
            kwargs={"account_id": account_id, "month": f"{issuing:%Y-%m}"}
        )
    return {"month": f"{issuing:%Y-%m}", "queued": len(accounts)}


@shared_task(
    name="reconciliation.statement_issue_account",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=1,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=20,
    soft_time_limit=120,
    time_limit=180,
)
def statement_issue_account(*, account_id: int, month: str) -> bool:
    """Issue one account's statement of `month`; True if this run issued it."""
    _, issued = statement_issue(account_id=account_id, month=month_parse(month), now=timezone.now())
    return issued
