"""Settles that could not be written: the hand-off to the retry task, and the failure record.

Nothing here may lose a request. `settlement_handoff` runs when the database just failed, so it
touches only the broker. `deduction_failure_record` runs when the retries ran out; if it cannot
write either, the hold is still active and the expiry sweep queues it later.
"""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal

import sentry_sdk
from django.db import DatabaseError, transaction

from billing import metrics
from billing.models import Hold
from billing.money import money_str
from billing.pricing import Usage
from billing.services.holds import RequestDetails
from reconciliation.models import ReconciliationItem

logger = logging.getLogger(__name__)

# Seconds the gateway may wait on a broker that is down before giving up on the hand-off.
HANDOFF_PUBLISH_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2}


def settlement_retry_kwargs(
    *, request_id: str, cost: Decimal, usage: Usage, details: RequestDetails | None
) -> dict[str, object]:
    """The task's arguments: plain JSON data, never model instances."""
    return {
        "request_id": request_id,
        "cost": money_str(cost),
        "usage": usage.to_dict(),
        "details": details.to_dict() if details is not None else None,
    }


def settlement_handoff(
    *,
    request_id: str,
    cost: Decimal,
    usage: Usage,
    details: RequestDetails | None,
    error: str,
) -> bool:
    """Queue the settle the gateway could not write. Never raises; True if queued.

    If the broker is down too, the hold stays active and expires into the reconciliation
    queue, where finance charges it under the same idempotency key.
    """
    from reconciliation.tasks import settlement_retry  # the task module imports this one

    try:
        settlement_retry.apply_async(
            kwargs=settlement_retry_kwargs(
                request_id=request_id, cost=cost, usage=usage, details=details
            ),
            retry=True,
            retry_policy=HANDOFF_PUBLISH_POLICY,
        )
    except Exception:
        # Any broker or serialisation error: the caller is finishing a response and must not fail.
        logger.exception(
            "settle hand-off failed for request %s (settle error: %s); the hold will expire "
            "into reconciliation",
            request_id,
            error,
        )
        metrics.SETTLEMENTS.labels(outcome="handoff_failed").inc()
        return False
    # The caller counts SETTLEMENTS{outcome="handed_off"} (gateway/pipeline.py); only the
    # failure of the hand-off itself is counted here.
    logger.warning("settle for request %s handed to the retry task: %s", request_id, error)
    return True


def deduction_failure_record(
    *,
    request_id: str,
    cost: Decimal,
    usage: Usage,
    details: RequestDetails | None,
    error: str,
    attempts: int,
    now: datetime,
) -> ReconciliationItem | None:
    """Queue a settle that exhausted its retries for finance: one item per request.

    The first record alerts (a fatal Sentry event) and counts the missed deduction; a repeat
    (the task ran twice, or finance retried and it failed again) only updates the attempts.
    Returns None if the record itself could not be written (logged, never raised).
    """
    try:
        with transaction.atomic(durable=True):
            hold = (
                Hold.objects.select_related("api_key")
                .filter(request_id=request_id)
                .only("account_id", "model_alias", "amount", "api_key__prefix")
                .first()
            )
            item, created = ReconciliationItem.objects.select_for_update().get_or_create(
                kind=ReconciliationItem.Kind.DEDUCTION_FAILURE,
                request_id=request_id,
                defaults={
                    "account_id": hold.account_id if hold else None,
                    # The display prefix only: the secret is never stored, let alone here.
                    "key_prefix": hold.api_key.prefix if hold and hold.api_key else "",
                    "model_alias": hold.model_alias if hold else "",
                    "usage": usage.to_dict(),
                    "details": details.to_dict() if details is not None else {},
                    "cost": cost,
                    "held_amount": hold.amount if hold else None,
                    "error": error[:4000],
                    "attempts": attempts,
                    "created_at": now,
                },
            )
            if not created:
                item.attempts += attempts
                item.error = error[:4000]
                item.save(update_fields=["attempts", "error"])
    except DatabaseError:
        logger.exception(
            "could not record the deduction failure of request %s (cost %s); its hold will "
            "expire into reconciliation",
            request_id,
            money_str(cost),
        )
        return None
    if created:
        metrics.MISSED_DEDUCTIONS.inc()
        metrics.MISSED_DEDUCTIONS_USD.inc(float(cost))  # a metric sample, not money
        _deduction_failure_alert(item=item)
    return item


def _deduction_failure_alert(*, item: ReconciliationItem) -> None:
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("request_id", item.request_id)
        scope.set_tag("account_id", str(item.account_id or ""))
        scope.set_tag("key_prefix", item.key_prefix)
        scope.set_context(
            "deduction",
            {
                "model": item.model_alias,
                "cost": money_str(item.cost) if item.cost is not None else None,
                "attempts": item.attempts,
                "item_id": item.pk,
            },
        )
        scope.fingerprint = ["deduction-failure", item.request_id]
        sentry_sdk.capture_message(
            f"deduction failure: request {item.request_id} not charged after retries",
            level="fatal",
        )


def settled_items_resolve(*, request_id: str, transaction_id: int | None, now: datetime) -> int:
    """Close the request's pending failure and expired-hold items once a settle has landed
    (a retry, possibly late). Staff decisions (written off, resolved) are left alone."""
    with transaction.atomic(durable=True):
        return ReconciliationItem.objects.filter(
            request_id=request_id,
            status=ReconciliationItem.Status.PENDING,
            kind__in=[
                ReconciliationItem.Kind.DEDUCTION_FAILURE,
                ReconciliationItem.Kind.EXPIRED_HOLD,
            ],
        ).update(
            status=ReconciliationItem.Status.RESOLVED,
            resolved_at=now,
            resolution_memo="settled automatically by the settlement retry",
            transaction_id=transaction_id,
        )


def deduction_failures_requeue(*, limit: int | None = None) -> dict[str, int]:
    """Queue the settle again for every pending deduction failure whose request has not been
    charged since (its hold has no posting and was not released). Safe to repeat: the settle
    is idempotent by the request's key. Returns counts of enqueued / skipped / failed."""
    from reconciliation.tasks import settlement_retry

    items = (
        ReconciliationItem.objects.filter(
            kind=ReconciliationItem.Kind.DEDUCTION_FAILURE,
            status=ReconciliationItem.Status.PENDING,
        )
        .order_by("created_at", "id")
        .values("request_id", "cost", "usage", "details")
    )
    if limit is not None:
        items = items[:limit]
    counts = {"enqueued": 0, "skipped": 0, "failed": 0}
    for item in items.iterator(chunk_size=500):
        chargeable = Hold.objects.filter(
            request_id=item["request_id"],
            transaction__isnull=True,
            state__in=[Hold.State.ACTIVE, Hold.State.EXPIRED],
        ).exists()
        if not chargeable or item["cost"] is None:
            counts["skipped"] += 1
            continue
        details = item["details"] or {}
        kwargs = {
            "request_id": item["request_id"],
            "cost": money_str(item["cost"]),
            "usage": item["usage"] or {},
            # Only a full RequestDetails can be rebuilt by the task.
            "details": details if {"endpoint", "started_at"} <= set(details) else None,
        }
        try:
            settlement_retry.apply_async(kwargs=kwargs, retry_policy=HANDOFF_PUBLISH_POLICY)
        except Exception:
            logger.exception("could not queue the settle of request %s", item["request_id"])
            counts["failed"] += 1
            continue
        counts["enqueued"] += 1
    return counts
