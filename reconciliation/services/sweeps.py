"""Periodic sweeps that feed the reconciliation queue: expired holds and ledger audit findings."""

from __future__ import annotations

import logging
from datetime import datetime

import sentry_sdk
from django.db import connection, transaction
from django.db.models import Q

from billing import metrics
from billing.models import Hold
from billing.selectors import ledger_audit
from billing.services.holds import holds_expire
from reconciliation.models import ReconciliationItem

logger = logging.getLogger(__name__)


# PostgreSQL: the whole batch in one INSERT ... SELECT; the unique (kind, request_id) index
# makes a second sweep of the same hold a no-op.
_QUEUE_EXPIRED_SQL = """
INSERT INTO reconciliation_reconciliationitem
    (kind, status, request_id, account_id, key_prefix, model_alias, usage, details,
     cost, held_amount, error, attempts, created_at, resolution_memo)
SELECT 'expired_hold', 'pending', h.request_id, h.account_id, COALESCE(k.prefix, ''),
       h.model_alias, '{}'::jsonb, jsonb_build_object('expires_at', h.expires_at),
       NULL, h.amount, '', 0, %(now)s, ''
FROM billing_hold AS h LEFT JOIN billing_apikey AS k ON k.id = h.api_key_id
WHERE h.id = ANY(%(ids)s) AND h.transaction_id IS NULL
ON CONFLICT DO NOTHING
"""


def _expired_holds_queue(*, hold_ids: list[int], now: datetime) -> int:
    """Queue the just-expired holds that nobody charged; runs inside the expiry's transaction,
    so a hold is never expired without its item. Memory is bounded by one batch."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(_QUEUE_EXPIRED_SQL, {"ids": hold_ids, "now": now})
            return cursor.rowcount
    rows = list(
        Hold.objects.filter(id__in=hold_ids, transaction__isnull=True).values_list(
            "request_id", "account_id", "api_key__prefix", "model_alias", "amount", "expires_at"
        )
    )
    already = set(
        ReconciliationItem.objects.filter(
            kind=ReconciliationItem.Kind.EXPIRED_HOLD,
            request_id__in=[row[0] for row in rows],
        ).values_list("request_id", flat=True)
    )
    items = [
        ReconciliationItem(
            kind=ReconciliationItem.Kind.EXPIRED_HOLD,
            request_id=request_id,
            account_id=account_id,
            key_prefix=key_prefix or "",
            model_alias=model_alias,
            held_amount=amount,
            details={"expires_at": expires_at.isoformat()},
            created_at=now,
        )
        for request_id, account_id, key_prefix, model_alias, amount, expires_at in rows
        if request_id not in already
    ]
    # The holds are locked by this transaction, so the pre-check is exact; ignore_conflicts
    # only guards the unique (kind, request_id) in case a sweep is ever run another way.
    ReconciliationItem.objects.bulk_create(items, ignore_conflicts=True)
    return len(items)


def holds_expire_and_queue(*, now: datetime, batch_size: int = 10_000) -> dict[str, int]:
    """Expire every active hold whose expiry is at or before `now` (never one before its
    time) and turn each into an expired-hold reconciliation item."""
    queued = 0

    def on_expired(hold_ids: list[int]) -> None:
        nonlocal queued
        queued += _expired_holds_queue(hold_ids=hold_ids, now=now)

    expired = holds_expire(now=now, batch_size=batch_size, on_expired=on_expired)
    if expired:
        metrics.HOLDS.labels(event="expired").inc(expired)
        logger.info("expired %d holds, queued %d for reconciliation", expired, queued)
    return {"expired": expired, "queued": queued}


def ledger_audit_and_queue(*, now: datetime) -> dict[str, object]:
    """Run the ledger audit; each account out of step with its legs becomes (or refreshes)
    one pending audit-mismatch item, and any finding raises a Sentry error."""
    report = ledger_audit()
    created = updated = 0
    findings: list[tuple[int | None, dict[str, object]]] = [
        (int(mismatch["account_id"]), mismatch)  # type: ignore[call-overload]
        for mismatch in report.mismatches
    ]
    if report.unbalanced_transactions:
        findings.append((None, {"unbalanced_transactions": report.unbalanced_transactions}))
    with transaction.atomic(durable=True):
        for account_id, figures in findings:
            pending = (
                ReconciliationItem.objects.select_for_update()
                .filter(
                    kind=ReconciliationItem.Kind.AUDIT_MISMATCH,
                    status=ReconciliationItem.Status.PENDING,
                )
                .filter(
                    Q(account_id=account_id) if account_id is not None else Q(account__isnull=True)
                )
                .first()
            )
            details = {**figures, "audited_at": now.isoformat()}
            if pending is None:
                ReconciliationItem.objects.create(
                    kind=ReconciliationItem.Kind.AUDIT_MISMATCH,
                    account_id=account_id,
                    details=details,
                    created_at=now,
                )
                created += 1
            else:
                pending.details = details
                pending.save(update_fields=["details"])
                updated += 1
    if findings:
        metrics.AUDIT_MISMATCHES.inc(len(report.mismatches))
        with sentry_sdk.new_scope() as scope:
            scope.set_context(
                "audit",
                {
                    "accounts_checked": report.accounts_checked,
                    "mismatches": len(report.mismatches),
                    "unbalanced_transactions": len(report.unbalanced_transactions),
                },
            )
            sentry_sdk.capture_message(
                f"ledger audit: {len(report.mismatches)} accounts out of step with the ledger, "
                f"{len(report.unbalanced_transactions)} unbalanced transactions",
                level="error",
            )
    return {
        "accounts_checked": report.accounts_checked,
        "mismatches": len(report.mismatches),
        "unbalanced_transactions": len(report.unbalanced_transactions),
        "items_created": created,
        "items_updated": updated,
        "ok": report.clean,
    }
