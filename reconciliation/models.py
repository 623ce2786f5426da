"""What needs a human: the reconciliation queue, and the record of what staff did."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from billing.models import Account, LedgerTransaction
from billing.money import MoneyField


class ReconciliationItem(models.Model):
    """One case for finance: a settle that exhausted its retries (deduction failure), a hold
    that expired unsettled, or an account the audit found out of step with the ledger."""

    class Kind(models.TextChoices):
        DEDUCTION_FAILURE = "deduction_failure"
        EXPIRED_HOLD = "expired_hold"
        AUDIT_MISMATCH = "audit_mismatch"

    class Status(models.TextChoices):
        PENDING = "pending"
        RESOLVED = "resolved"
        WRITTEN_OFF = "written_off"

    kind = models.CharField(max_length=24, choices=Kind.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    # Looked up with its kind: the unique (kind, request_id) index below serves it.
    request_id = models.CharField(max_length=64, blank=True, default="")
    # No database constraint: the sweep writes an item per expired hold (a million in one run),
    # and each row's deferred foreign-key check was an eighth of the sweep's server time. The
    # account is always the one of a hold or a posting, whose own constraints guarantee it
    # exists, and accounts are never deleted (PROTECT everywhere).
    account = models.ForeignKey(
        Account,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="reconciliation_items",
        db_constraint=False,
    )
    key_prefix = models.CharField(max_length=16, blank=True, default="")  # never the secret
    model_alias = models.CharField(max_length=200, blank=True, default="")
    usage = models.JSONField(default=dict, blank=True)  # token counts by class
    details = models.JSONField(default=dict, blank=True)  # request details, audit figures
    cost = MoneyField(null=True, blank=True)  # what the request should have been charged
    held_amount = MoneyField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,  # partial index below
    )
    resolution_memo = models.TextField(blank=True, default="")
    transaction = models.ForeignKey(
        LedgerTransaction,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,  # partial index below
    )

    class Meta:
        constraints = [
            # A task may run twice (acks_late): one item per request and kind, whatever happens.
            models.UniqueConstraint(
                fields=["kind", "request_id"],
                condition=~Q(request_id=""),
                name="one_item_per_request_and_kind",
            ),
        ]
        # An expired-hold sweep inserts an item per hold: every index is paid for there. The
        # two foreign keys are empty until an item is resolved, so only set ones are indexed.
        indexes = [
            models.Index(fields=["status", "kind", "created_at"]),
            models.Index(
                fields=["resolved_by"],
                condition=Q(resolved_by__isnull=False),
                name="item_resolved_by",
            ),
            models.Index(
                fields=["transaction"],
                condition=Q(transaction__isnull=False),
                name="item_transaction",
            ),
        ]
        permissions = [
            ("reconcile_item", "Can retry, charge, write off and resolve reconciliation items"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.request_id or self.account_id} ({self.status})"


class StaffAction(models.Model):
    """Who did what to money, when and why; written in the same transaction as the effect."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    action = models.CharField(max_length=64)
    target = models.CharField(max_length=200)
    memo = models.TextField()
    details = models.JSONField(default=dict, blank=True)
    transaction = models.ForeignKey(
        LedgerTransaction, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.user} {self.action} {self.target}"
