"""What finance staff do to money and keys, each in one durable transaction with its StaffAction.

The admin calls these and nothing else. Every action needs a memo; the StaffAction row is
written in the same transaction as the effect, so there is never an effect without a record
or a record without an effect.

Lock order: hold row, then the reconciliation item, then account rows, then the key row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.apps import apps as global_apps
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from billing.errors import AccountNotFound, BillingError, InvalidAmount
from billing.models import ApiKey, Hold, Tariff
from billing.money import money_str
from billing.services.accounts import credit_posting
from billing.services.holds import request_charge_post, request_write_off_post
from billing.services.keys import RevokedKey, api_key_revoke_locked
from billing.services.ledger import Posted, ledger_post
from billing.services.tariffs import tariff_create
from reconciliation.models import ReconciliationItem, StaffAction

FINANCE_GROUP = "Finance"
# app_label.codename; every money action checks one of the first two. Not among them:
# billing.post_balance_adjustment, which adjustments (signed, unbounded corrections) need; a
# superuser or a finance lead grants it to the few who may post them.
FINANCE_PERMISSIONS = (
    "billing.post_adjustment",
    "reconciliation.reconcile_item",
    "billing.view_account",
    "billing.view_apikey",
    "billing.view_languagemodel",
    "billing.view_tariff",
    "billing.view_ledgertransaction",
    "billing.view_ledgerleg",
    "billing.view_hold",
    "billing.view_usagerecord",
    "reconciliation.view_reconciliationitem",
    "reconciliation.view_staffaction",
    # Onboarding in the admin (reconciliation/migrations/0007_back_office.py).
    "billing.add_account",
    "billing.add_apikey",
    "billing.change_apikey",
    "gateway.view_upstream",
    "gateway.add_upstream",
    "gateway.change_upstream",
    "gateway.view_route",
    "gateway.add_route",
    "gateway.change_route",
    # Payments (reconciliation/migrations/0006_payments.py).
    "billing.view_paymentevent",
    "billing.view_checkout",
    "billing.add_checkout",
    "billing.view_autotopupattempt",
    "billing.view_notification",
    "billing.view_notificationdelivery",
    "billing.view_deliveryattempt",
    "billing.set_auto_topup",
    "billing.set_alerts",
    # The price catalogue and statements (billing/migrations/0011_provider_prices_and_...).
    "billing.view_providerprice",
    "billing.view_providerpriceproposal",
    "billing.decide_providerpriceproposal",
    "billing.view_statement",
)


class ItemNotActionable(BillingError):
    """The item is not pending, or the action does not apply to its kind."""


@dataclass(frozen=True)
class ItemActionResult:
    item: ReconciliationItem
    transaction_id: int | None
    # False when the request already had its posting (a late settle, an earlier write-off).
    posted: bool


def finance_group_ensure(*, apps: Any = global_apps) -> None:
    """Create the Finance group with its permissions (idempotent, additive). Runs from the
    data migration and after every migrate/flush, like the system accounts."""
    group_model = apps.get_model("auth", "Group")
    permission_model = apps.get_model("auth", "Permission")
    group, _ = group_model.objects.get_or_create(name=FINANCE_GROUP)
    wanted = [name.split(".", 1) for name in FINANCE_PERMISSIONS]
    permissions = [
        permission
        for permission in permission_model.objects.filter(
            codename__in=[codename for _, codename in wanted]
        ).select_related("content_type")
        if [permission.content_type.app_label, permission.codename] in wanted
    ]
    group.permissions.add(*permissions)


def _memo_clean(memo: str) -> str:
    memo = memo.strip()
    if not memo:
        raise InvalidAmount("a memo is required")
    return memo


def _item_lock(item_id: int) -> ReconciliationItem:
    """Lock the item's hold (if any) before the item itself, then check it is pending."""
    request_id = (
        ReconciliationItem.objects.filter(pk=item_id).values_list("request_id", flat=True).first()
    )
    if request_id is None:
        raise ItemNotActionable(f"no reconciliation item {item_id}")
    if request_id:
        list(Hold.objects.select_for_update().filter(request_id=request_id).values_list("pk"))
    item = ReconciliationItem.objects.select_for_update().get(pk=item_id)
    if item.status != ReconciliationItem.Status.PENDING:
        raise ItemNotActionable(f"item {item_id} is already {item.status}")
    return item


def _item_close(
    *,
    item: ReconciliationItem,
    status: str,
    user: AbstractBaseUser,
    memo: str,
    now: datetime,
    txn: int | None,
) -> None:
    item.status = status
    item.resolved_by = user  # type: ignore[assignment]
    item.resolved_at = now
    item.resolution_memo = memo
    item.transaction_id = txn
    item.save(
        update_fields=["status", "resolved_by", "resolved_at", "resolution_memo", "transaction"]
    )


def _staff_action_record(
    *,
    user: AbstractBaseUser,
    action: str,
    target: str,
    memo: str,
    now: datetime,
    txn: int | None = None,
    details: dict[str, Any] | None = None,
) -> StaffAction:
    return StaffAction.objects.create(  # type: ignore[misc]
        user=user,
        action=action,
        target=target,
        memo=memo,
        details=details or {},
        transaction_id=txn,
        created_at=now,
    )


def _item_target(item: ReconciliationItem) -> str:
    return f"reconciliation item #{item.pk} ({item.kind} {item.request_id or item.account_id})"


def item_charge_amount(item: ReconciliationItem) -> Decimal:
    """What a charge posts: the known cost of the request (never the hold, which is a bound)."""
    if item.kind == ReconciliationItem.Kind.AUDIT_MISMATCH or not item.request_id:
        raise ItemNotActionable("only a request's item can be charged")
    if item.cost is None or item.cost <= 0:
        raise ItemNotActionable(
            f"item {item.pk} has no known cost to charge: write it off or resolve it with a note"
        )
    return item.cost


def item_write_off_amount(item: ReconciliationItem) -> Decimal:
    """The cost when known, else the whole hold (what the request may have used at most)."""
    if item.kind == ReconciliationItem.Kind.AUDIT_MISMATCH or not item.request_id:
        raise ItemNotActionable("only a request's item can be written off")
    amount = item.cost if item.cost else item.held_amount
    if amount is None or amount <= 0:
        raise ItemNotActionable(f"item {item.pk} has neither a cost nor a held amount")
    return amount


@transaction.atomic(durable=True)
def item_charge(
    *, item_id: int, user: AbstractBaseUser, memo: str, now: datetime
) -> ItemActionResult:
    """Post the request's usage (once, under its idempotency key) and resolve the item."""
    memo = _memo_clean(memo)
    item = _item_lock(item_id)
    cost = item_charge_amount(item)
    charge = request_charge_post(
        request_id=item.request_id, cost=cost, memo=memo, now=now, posted_by_id=user.pk
    )
    txn, posted = charge.transaction_id, charge.posted
    _item_close(
        item=item,
        status=ReconciliationItem.Status.RESOLVED,
        user=user,
        memo=memo,
        now=now,
        txn=txn,
    )
    _staff_action_record(
        user=user,
        action="item_charge",
        target=_item_target(item),
        memo=memo,
        now=now,
        txn=txn,
        details={"request_id": item.request_id, "amount": money_str(cost), "posted": posted},
    )
    return ItemActionResult(item=item, transaction_id=txn, posted=posted)


@transaction.atomic(durable=True)
def item_write_off(
    *, item_id: int, user: AbstractBaseUser, memo: str, now: datetime
) -> ItemActionResult:
    """Write the request's usage off (revenue +x, write-offs -x) and close the item."""
    memo = _memo_clean(memo)
    item = _item_lock(item_id)
    amount = item_write_off_amount(item)
    txn = request_write_off_post(
        request_id=item.request_id, amount=amount, memo=memo, now=now, posted_by_id=user.pk
    ).transaction_id
    _item_close(
        item=item,
        status=ReconciliationItem.Status.WRITTEN_OFF,
        user=user,
        memo=memo,
        now=now,
        txn=txn,
    )
    _staff_action_record(
        user=user,
        action="item_write_off",
        target=_item_target(item),
        memo=memo,
        now=now,
        txn=txn,
        details={"request_id": item.request_id, "amount": money_str(amount)},
    )
    return ItemActionResult(item=item, transaction_id=txn, posted=True)


@transaction.atomic(durable=True)
def item_resolve(
    *, item_id: int, user: AbstractBaseUser, memo: str, now: datetime
) -> ItemActionResult:
    """Close the item with a note and no money (explained elsewhere, or nothing to collect)."""
    memo = _memo_clean(memo)
    item = _item_lock(item_id)
    _item_close(
        item=item,
        status=ReconciliationItem.Status.RESOLVED,
        user=user,
        memo=memo,
        now=now,
        txn=None,
    )
    _staff_action_record(
        user=user,
        action="item_resolve",
        target=_item_target(item),
        memo=memo,
        now=now,
        details={"request_id": item.request_id},
    )
    return ItemActionResult(item=item, transaction_id=None, posted=False)


def _retry_details(details: dict[str, Any]) -> dict[str, Any] | None:
    # The task rebuilds RequestDetails from these; audit figures or partial data are not that.
    return details if {"endpoint", "started_at"} <= set(details) else None


@transaction.atomic(durable=True)
def item_retry(
    *, item_id: int, user: AbstractBaseUser, memo: str, now: datetime
) -> ItemActionResult:
    """Queue the settle again (after commit). The item stays pending until the settle lands;
    the settle's idempotency key makes a retry after any other posting charge nothing."""
    memo = _memo_clean(memo)
    item = _item_lock(item_id)
    if item.kind != ReconciliationItem.Kind.DEDUCTION_FAILURE:
        raise ItemNotActionable("only a deduction failure can be retried")
    cost = item_charge_amount(item)
    kwargs = {
        "request_id": item.request_id,
        "cost": money_str(cost),
        "usage": dict(item.usage or {}),
        "details": _retry_details(dict(item.details or {})),
    }

    def enqueue() -> None:
        # Imported here: the task module imports services, not the other way round.
        from reconciliation.tasks import settlement_retry

        settlement_retry.apply_async(kwargs=kwargs)

    transaction.on_commit(enqueue)
    _staff_action_record(
        user=user,
        action="item_retry",
        target=_item_target(item),
        memo=memo,
        now=now,
        details={"request_id": item.request_id, "amount": money_str(cost)},
    )
    return ItemActionResult(item=item, transaction_id=None, posted=False)


ITEM_ACTIONS = {
    "charge": item_charge,
    "write_off": item_write_off,
    "resolve": item_resolve,
    "retry": item_retry,
}


def credit_post_by_staff(
    *,
    kind: str,
    account_id: int,
    amount: Decimal,
    memo: str,
    idempotency_key: str,
    user: AbstractBaseUser,
    now: datetime,
) -> Posted:
    """A grant, purchase, refund or adjustment by staff, with its StaffAction.

    Idempotent on the key (made when the confirmation form was rendered): a double submit
    returns the original posting and records nothing new.
    """
    memo = _memo_clean(memo)
    if not idempotency_key.strip():
        raise InvalidAmount("an idempotency key is required")
    posting = credit_posting(
        kind=kind,
        account_id=account_id,
        amount=amount,
        idempotency_key=f"staff:{idempotency_key.strip()}",
        memo=memo,
        now=now,
    )
    with transaction.atomic(durable=True):
        try:
            posted = ledger_post(posting=posting, now=now, posted_by_id=user.pk)
        except AccountNotFound:
            raise AccountNotFound(f"no customer account {account_id}") from None
        if not posted.replayed:
            _staff_action_record(
                user=user,
                action=f"credit_{kind}",
                target=f"account #{account_id}",
                memo=memo,
                now=now,
                txn=posted.transaction_id,
                details={"kind": kind, "amount": money_str(amount)},
            )
    return posted


def api_keys_revoke_by_staff(
    *, key_ids: Iterable[int], user: AbstractBaseUser, memo: str, now: datetime
) -> list[RevokedKey]:
    """Revoke keys, all or none, with one StaffAction per key revoked, in one transaction.

    Key rows are locked in ascending id order (two bulk revokes cannot deadlock). A key that
    was revoked already changes nothing and records nothing.
    """
    memo = _memo_clean(memo)
    results = []
    with transaction.atomic(durable=True):
        for key_id in sorted(set(key_ids)):
            result = api_key_revoke_locked(key_id=key_id, now=now)
            results.append(result)
            if not result.changed:
                continue
            api_key = result.api_key
            _staff_action_record(
                user=user,
                action="api_key_revoke",
                target=f"API key #{api_key.pk} ({api_key.prefix})",
                memo=memo,
                now=now,
                details={
                    "api_key_id": api_key.pk,
                    "prefix": api_key.prefix,
                    "account_id": api_key.account_id,
                },
            )
    return results


def tariff_set_by_staff(
    *,
    user: AbstractBaseUser,
    memo: str,
    now: datetime,
    model_alias: str,
    input_per_mtok: Decimal,
    output_per_mtok: Decimal,
    valid_from: datetime,
    cached_input_per_mtok: Decimal | None = None,
    cache_write_per_mtok: Decimal | None = None,
    reasoning_per_mtok: Decimal | None = None,
    purpose: str = ApiKey.Purpose.REALTIME,
    completion_window: str = "",
    valid_until: datetime | None = None,
    account_id: int | None = None,
) -> Tariff:
    """A new tariff added by staff, with its StaffAction (prices as decimal strings).

    Unlike the services above, not durable: the admin's add view (ModelAdmin.changeform_view)
    already runs save_model, its history entry and the redirect in one atomic block, and a
    durable block refuses to nest in it (that was the admin's 500). A plain atomic block is the
    outermost transaction when called alone, and a savepoint inside the admin's: either way the
    tariff, the new model alias if any and the StaffAction commit together or not at all, and
    in the admin they commit with its LogEntry. No lock is needed: a tariff is a new row, and
    the model alias is get_or_create'd under its unique constraint.
    """
    memo = _memo_clean(memo)
    with transaction.atomic():
        tariff = tariff_create(
            model_alias=model_alias,
            input_per_mtok=input_per_mtok,
            output_per_mtok=output_per_mtok,
            valid_from=valid_from,
            cached_input_per_mtok=cached_input_per_mtok,
            cache_write_per_mtok=cache_write_per_mtok,
            reasoning_per_mtok=reasoning_per_mtok,
            purpose=purpose,
            completion_window=completion_window,
            valid_until=valid_until,
            account_id=account_id,
        )
        _staff_action_record(
            user=user,
            action="tariff_set",
            target=f"model {tariff.model.alias}",
            memo=memo,
            now=now,
            details={
                "tariff_id": tariff.pk,
                "account_id": tariff.account_id,
                "purpose": tariff.purpose,
                "completion_window": tariff.completion_window,
                "valid_from": tariff.valid_from.isoformat(),
                "valid_until": tariff.valid_until.isoformat() if tariff.valid_until else None,
                **{
                    name: None if price is None else money_str(price)
                    for name, price in (
                        ("input_per_mtok", tariff.input_per_mtok),
                        ("output_per_mtok", tariff.output_per_mtok),
                        ("cached_input_per_mtok", tariff.cached_input_per_mtok),
                        ("cache_write_per_mtok", tariff.cache_write_per_mtok),
                        ("reasoning_per_mtok", tariff.reasoning_per_mtok),
                    )
                },
            },
        )
    return tariff
