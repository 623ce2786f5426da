"""Periodic sweeps that feed the reconciliation queue: expired holds and ledger audit findings."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import sentry_sdk
from django.db import transaction
from django.db.models import Q

from billing import metrics
from billing.engine import sql_batches
from billing.selectors import ledger_audit
from reconciliation.models import ReconciliationItem

logger = logging.getLogger(__name__)


_EXPIRE_AND_QUEUE_SQL = (
    "SELECT * FROM reconciliation_engine.holds_expire_and_queue("
    "%(now)s, %(limit)s, %(after_at)s, %(after_id)s)"
)
_SWEEP_START = {"after_at": datetime.min.replace(tzinfo=UTC), "after_id": 0}


def holds_expire_and_queue(
    *, now: datetime, batch_size: int = 10_000, max_batches: int | None = None
) -> dict[str, int]:
    """Expire every active hold whose expiry is at or before `now` (never one before its
    time) and turn each into an expired-hold reconciliation item: one engine call per batch
    (reconciliation/sql/queue_0001.sql), each its own transaction, so a hold is never expired
    without its item and memory stays flat however many there are."""
    batches = sql_batches(
        _EXPIRE_AND_QUEUE_SQL,
        {"now": now, **_SWEEP_START},
        batch_size=batch_size,
        max_batches=max_batches,
        next_params=lambda row: {"after_at": row[2], "after_id": row[3]},
        count=lambda row: row[0],
    )
    expired = sum(row[0] for row in batches)
    queued = sum(row[1] for row in batches)
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
