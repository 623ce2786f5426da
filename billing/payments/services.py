"""Payments' writes: checkouts, provider events, auto top-up, alert settings, the outbox.

Every posting goes through the engine (`credit_post`, `ledger_post`, `transaction_reverse`),
keyed by the provider's own ids, so a redelivered or concurrent event can never post twice:
- a checkout's purchase: `<provider>:checkout:<session id>`;
- an auto top-up's purchase: `<provider>:payment_intent:<intent id>`;
- a refund (money paid back out, customer → payments): `<provider>:refund:<refund id>`;
- a dispute (the same direction): `<provider>:dispute:<dispute id>`, and its reversal when the
  dispute is won: `<provider>:dispute:<dispute id>:won`.
The memo of each names the provider's ids (event, session or intent, charge, refund, dispute);
the stored event lists the transactions it caused.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Sum
from psycopg.types.json import Jsonb
from standardwebhooks import Webhook

from billing.engine import engine_call, sql_rows
from billing.errors import AccountNotFound, BillingError, InvalidAmount
from billing.models import (
    Account,
    AutoTopupAttempt,
    Checkout,
    DeliveryAttempt,
    LedgerLeg,
    LedgerTransaction,
    Notification,
    NotificationDelivery,
    PaymentEvent,
)
from billing.money import MoneyError, money_parse, money_str, to_units
from billing.payments.providers import (
    PaymentDeclined,
    PaymentProvider,
    cents_to_usd,
    payment_provider,
    usd_to_cents,
)
from billing.services.accounts import credit_post
from billing.services.ledger import Leg, Posted, Posting, ledger_post, system_account_id
from billing.services.ledger import transaction_reverse as ledger_transaction_reverse

logger = logging.getLogger(__name__)


class PaymentInputError(BillingError):
    """Input a payment endpoint or command refuses, naming the parameter (a 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class StaffNote:
    """Who in the admin made a change, why and when: recorded as a StaffAction in the same
    transaction as the change."""

    user_id: int
    memo: str
    now: datetime


def _staff_action_write(
    staff: StaffNote, *, action: str, account_id: int, details: dict[str, Any]
) -> None:
    from reconciliation.models import StaffAction

    StaffAction.objects.create(
        user_id=staff.user_id,
        action=action,
        target=f"account #{account_id}",
        memo=staff.memo.strip(),
        details=details,
        created_at=staff.now,
    )


# --- amounts ---------------------------------------------------------------------------------


def topup_amount_parse(raw: object, *, param: str = "amount") -> Decimal:
    """A top-up amount: a decimal string (or number without a fraction beyond cents) within
    PAYMENTS_MIN_TOPUP..PAYMENTS_MAX_TOPUP USD, in whole cents."""
    if isinstance(raw, float | bool) or raw is None:
        raise PaymentInputError(param, f"'{param}' must be a decimal string like \"25.00\".")
    try:
        amount = money_parse(str(raw))
        usd_to_cents(amount)
    except (MoneyError, ValueError):
        raise PaymentInputError(
            param, f"'{param}' must be a decimal amount in USD with at most 2 decimal places."
        ) from None
    low, high = Decimal(settings.PAYMENTS_MIN_TOPUP), Decimal(settings.PAYMENTS_MAX_TOPUP)
    if not low <= amount <= high:
        raise PaymentInputError(
            param, f"'{param}' must be between {money_str(low)} and {money_str(high)} USD."
        )
    return amount


def amount_out(amount: Decimal) -> str:
    """A payment amount on the wire: USD with its cents ("25.00")."""
    return f"{amount:.2f}"


# --- outbox ------------------------------------------------------------------------------------

_NOTIFICATION_WRITE_SQL = engine_call(
    "notification_write", ["account_id", "type", "figures", "now"]
)


def notification_write(
    *, account_id: int, type: str, figures: dict[str, Any], now: datetime
) -> None:
    """An outbox row, in the caller's transaction, shaped by the engine's one writer of them."""
    sql_rows(
        _NOTIFICATION_WRITE_SQL,
        {"account_id": account_id, "type": type, "figures": Jsonb(figures), "now": now},
    )


_BALANCE_DEPLETED_SQL = engine_call("balance_depleted_record", ["account_id", "amount", "now"])


def balance_depleted_params(*, account_id: int, amount: Decimal, now: datetime) -> dict[str, Any]:
    return {"account_id": account_id, "amount": to_units(amount), "now": now}


def balance_depleted_record(*, account_id: int, amount: Decimal, now: datetime) -> bool:
    """After a 402: a balance.depleted event, once per crossing (its own statement)."""
    [(written,)] = sql_rows(
        _BALANCE_DEPLETED_SQL,
        balance_depleted_params(account_id=account_id, amount=amount, now=now),
    )
    return bool(written)


async def balance_depleted_record_async(*, account_id: int, amount: Decimal, now: datetime) -> bool:
    from billing.engine import sql_rows_async

    [(written,)] = await sql_rows_async(
        _BALANCE_DEPLETED_SQL,
        balance_depleted_params(account_id=account_id, amount=amount, now=now),
    )
    return bool(written)


def _balance_figures(account_id: int) -> dict[str, str]:
    balance, held = Account.objects.filter(pk=account_id).values_list("balance", "held").get()
    return {"balance": money_str(balance), "available": money_str(balance - held)}


# --- checkout ----------------------------------------------------------------------------------


def _customer_account(account_id: int, *, lock: bool = False) -> Account:
    accounts = Account.objects.filter(pk=account_id, kind=Account.Kind.CUSTOMER)
    account = (accounts.select_for_update() if lock else accounts).first()
    if account is None:
        raise AccountNotFound(f"no customer account {account_id}")
    return account


def checkout_create(
    *,
    account_id: int,
    amount: Decimal,
    now: datetime,
    success_url: str = "",
    cancel_url: str = "",
    created_by_id: int | None = None,
    staff_memo: str = "",
    form_key: str = "",
    provider: PaymentProvider | None = None,
) -> Checkout:
    """A checkout session for `amount` USD at the configured provider, recorded. A closed
    account, or an amount out of range, is refused before anything is created. Made by staff
    (`created_by_id`), it is recorded as a StaffAction in the same transaction, once per
    `form_key` (a double submit gets the first link back)."""
    from reconciliation.models import StaffAction

    if created_by_id is not None:
        earlier = StaffAction.objects.filter(
            action="checkout_link", details__form_key=form_key, user_id=created_by_id
        ).first()
        if form_key and earlier is not None:
            return Checkout.objects.get(pk=earlier.details["checkout_id"])
    account = _customer_account(account_id)
    if account.status == Account.Status.CLOSED:
        raise PaymentInputError(
            "amount", f"account {account_id} is closed: it cannot be topped up."
        )
    provider = provider or payment_provider()
    session = provider.checkout_create(
        account_id=account.pk,
        customer_id=account.payment_customer_id,
        billing_email=account.billing_email,
        amount_cents=usd_to_cents(amount),
        success_url=success_url or settings.PAYMENTS_SUCCESS_URL,
        cancel_url=cancel_url or settings.PAYMENTS_CANCEL_URL,
        idempotency_key=f"checkout-{account.pk}-{secrets.token_hex(8)}",
    )
    with transaction.atomic(durable=True):
        if session.customer_id:
            Account.objects.filter(pk=account.pk, payment_customer_id="").update(
                payment_customer_id=session.customer_id
            )
        checkout = Checkout.objects.create(
            provider=provider.name,
            session_id=session.session_id,
            account_id=account.pk,
            amount=amount,
            url=session.url,
            created_by_id=created_by_id,
            created_at=now,
        )
        if created_by_id is not None:
            _staff_action_write(
                StaffNote(user_id=created_by_id, memo=staff_memo, now=now),
                action="checkout_link",
                account_id=account.pk,
                details={
                    "checkout_id": checkout.pk,
                    "session_id": checkout.session_id,
                    "amount": money_str(amount),
                    "form_key": form_key,
                },
            )
    return checkout


# --- provider events ---------------------------------------------------------------------------


def payment_event_record(*, provider: str, event: dict[str, Any], now: datetime) -> PaymentEvent:
    """Store an event, unique by its id, before anything acts on it (a duplicate gets the
    stored one back)."""
    with transaction.atomic(durable=True):
        stored, _ = PaymentEvent.objects.get_or_create(
            provider=provider,
            event_id=str(event["id"]),
            defaults={
                "type": str(event.get("type", "")),
                "payload": event,
                "received_at": now,
            },
        )
    return stored


@dataclass
class _Applied:
    status: str = PaymentEvent.Status.APPLIED
    detail: str = ""
    account_id: int | None = None
    transaction_ids: list[int] = field(default_factory=list)
    credited_intent: str = ""  # a purchase for this intent was posted: waiting events may go


class _Waiting(Exception):
    """The event refers to a payment not credited yet (it arrived first): stored as failed,
    applied again when the payment is."""

    def __init__(self, detail: str, *, payment_intent_id: str) -> None:
        super().__init__(detail)
        self.payment_intent_id = payment_intent_id


def _object(event: PaymentEvent) -> dict[str, Any]:
    data = event.payload.get("data") or {}
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else {}


def _metadata_account(obj: dict[str, Any]) -> int | None:
    raw = (obj.get("metadata") or {}).get("account_id")
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def _ids(obj: dict[str, Any], *names: str) -> str:
    return ", ".join(f"{name} {obj[name]}" for name in names if obj.get(name))


def _purchase_post(
    *,
    account_id: int,
    amount: Decimal,
    memo: str,
    idempotency_key: str,
    source: str,
    provider_id: str,
    now: datetime,
) -> Posted:
    """A payment credited: one purchase (payments → customer) by its key, and, when new,
    payment.succeeded in the same transaction."""
    posted = credit_post(
        kind=LedgerTransaction.Kind.PURCHASE,
        account_id=account_id,
        amount=amount,
        memo=memo,
        idempotency_key=idempotency_key,
        now=now,
    )
    if posted.replayed:
        return posted
    notification_write(
        account_id=account_id,
        type="payment.succeeded",
        figures={
            "amount": money_str(amount),
            "source": source,
            "payment_id": provider_id,
            **_balance_figures(account_id),
        },
        now=now,
    )
    return posted


def _checkout_completed(event: PaymentEvent, obj: dict[str, Any], now: datetime) -> _Applied:
    if obj.get("payment_status") != "paid":
        return _Applied(
            PaymentEvent.Status.IGNORED, f"payment_status is {obj.get('payment_status')!r}"
        )
    account_id = _metadata_account(obj)
    if account_id is None:
        return _Applied(PaymentEvent.Status.IGNORED, "no metadata.account_id: not our checkout")
    if str(obj.get("currency", "")).lower() != "usd":
        raise InvalidAmount(f"checkout in {obj.get('currency')!r}, not USD")
    session_id, intent_id = str(obj["id"]), str(obj.get("payment_intent") or "")
    amount = cents_to_usd(int(obj["amount_total"]))
    checkout = (
        Checkout.objects.select_for_update()
        .filter(provider=event.provider, session_id=session_id)
        .first()
    )
    posted = _purchase_post(
        account_id=account_id,
        amount=amount,
        memo=f"{event.provider} checkout {session_id} ({_ids(obj, 'payment_intent')}; "
        f"event {event.event_id})",
        idempotency_key=f"{event.provider}:checkout:{session_id}",
        source="checkout",
        provider_id=session_id,
        now=now,
    )
    fields = {
        "status": Checkout.Status.COMPLETED,
        "payment_intent_id": intent_id,
        "transaction_id": posted.transaction_id,
        "completed_at": now,
    }
    if checkout is None:  # made elsewhere (the provider's dashboard) with our metadata
        Checkout.objects.create(
            provider=event.provider,
            session_id=session_id,
            account_id=account_id,
            amount=amount,
            url="",
            created_at=now,
            **fields,
        )
    elif checkout.status != Checkout.Status.COMPLETED:
        Checkout.objects.filter(pk=checkout.pk).update(**fields)
    if obj.get("customer"):
        Account.objects.filter(pk=account_id, payment_customer_id="").update(
            payment_customer_id=str(obj["customer"])
        )
    return _Applied(
        account_id=account_id,
        credited_intent=intent_id,
        transaction_ids=[] if posted.replayed else [posted.transaction_id],
    )


def _auto_topup_attempt(obj: dict[str, Any], account_id: int) -> AutoTopupAttempt | None:
    raw = (obj.get("metadata") or {}).get("auto_topup_attempt_id")
    try:
        attempt_id = int(str(raw))
    except (TypeError, ValueError):
        return None
    return (
        AutoTopupAttempt.objects.select_for_update()
        .filter(pk=attempt_id, account_id=account_id)
        .first()
    )


def _intent_succeeded(event: PaymentEvent, obj: dict[str, Any], now: datetime) -> _Applied:
    account_id = _metadata_account(obj)
    kind = (obj.get("metadata") or {}).get("kind")
    if account_id is None or kind not in ("checkout", "auto_topup"):
        return _Applied(PaymentEvent.Status.IGNORED, "not one of our payment intents")
    intent_id = str(obj["id"])
    if kind == "checkout":
        # The checkout's card, kept for auto top-up: the first checkout's, as Stripe saved it
        # with the customer (setup_future_usage=off_session). Its credit is the session's.
        method = str(obj.get("payment_method") or "")
        if method:
            Account.objects.filter(pk=account_id, payment_method_id="").update(
                payment_method_id=method
            )
            if obj.get("customer"):
                Account.objects.filter(pk=account_id, payment_customer_id="").update(
                    payment_customer_id=str(obj["customer"])
                )
        return _Applied(account_id=account_id, detail=f"payment method {method or 'none'} kept")
    attempt = _auto_topup_attempt(obj, account_id)
    if attempt is None:
        raise AccountNotFound(f"no auto top-up attempt for intent {intent_id}")
    amount = cents_to_usd(int(obj.get("amount_received") or obj["amount"]))
    posted = _purchase_post(
        account_id=account_id,
        amount=amount,
        memo=f"{event.provider} auto top-up #{attempt.pk}: payment intent {intent_id} "
        f"({_ids(obj, 'latest_charge')}; event {event.event_id})",
        idempotency_key=f"{event.provider}:payment_intent:{intent_id}",
        source="auto_topup",
        provider_id=intent_id,
        now=now,
    )
    AutoTopupAttempt.objects.filter(pk=attempt.pk).update(
        status=AutoTopupAttempt.Status.SUCCEEDED,
        payment_intent_id=intent_id,
        transaction_id=posted.transaction_id,
        failure_reason="",
        updated_at=now,
    )
    return _Applied(
        account_id=account_id,
        credited_intent=intent_id,
        transaction_ids=[] if posted.replayed else [posted.transaction_id],
    )


def _payment_failed(*, attempt: AutoTopupAttempt, reason: str, now: datetime) -> None:
    """Record a failed auto top-up and tell the account, once (the caller holds its lock)."""
    AutoTopupAttempt.objects.filter(pk=attempt.pk).update(
        status=AutoTopupAttempt.Status.FAILED, failure_reason=reason[:2000], updated_at=now
    )
    notification_write(
        account_id=attempt.account_id,
        type="payment.failed",
        figures={
            "amount": money_str(attempt.amount),
            "source": "auto_topup",
            "payment_id": attempt.payment_intent_id,
            "reason": reason[:500],
            **_balance_figures(attempt.account_id),
        },
        now=now,
    )


def _intent_failed(event: PaymentEvent, obj: dict[str, Any], now: datetime) -> _Applied:
    account_id = _metadata_account(obj)
    if account_id is None or (obj.get("metadata") or {}).get("kind") != "auto_topup":
        return _Applied(PaymentEvent.Status.IGNORED, "not an auto top-up")
    attempt = _auto_topup_attempt(obj, account_id)
    if attempt is None or attempt.status in (
        AutoTopupAttempt.Status.SUCCEEDED,
        AutoTopupAttempt.Status.FAILED,
    ):
        return _Applied(PaymentEvent.Status.IGNORED, "attempt already decided", account_id)
    error = obj.get("last_payment_error") or {}
    attempt.payment_intent_id = str(obj["id"])
    AutoTopupAttempt.objects.filter(pk=attempt.pk).update(
        payment_intent_id=attempt.payment_intent_id
    )
    _payment_failed(attempt=attempt, reason=str(error.get("message") or "payment failed"), now=now)
    return _Applied(account_id=account_id, detail="auto top-up failed")


@dataclass(frozen=True)
class _Purchase:
    account_id: int
    amount: Decimal  # what the purchase credited


def _purchase_for_intent(provider: str, intent_id: str) -> _Purchase:
    """The credited payment an intent paid for, its row locked (refunds and disputes of one
    payment take their turns), or _Waiting when its credit has not arrived yet."""
    if intent_id:
        checkout = (
            Checkout.objects.select_for_update()
            .filter(provider=provider, payment_intent_id=intent_id, transaction__isnull=False)
            .first()
        )
        source: Checkout | AutoTopupAttempt | None = checkout or (
            AutoTopupAttempt.objects.select_for_update()
            .filter(payment_intent_id=intent_id, transaction__isnull=False)
            .first()
        )
        if source is not None and source.transaction_id is not None:
            amount = LedgerLeg.objects.get(
                transaction_id=source.transaction_id, account_id=source.account_id
            ).amount
            return _Purchase(account_id=source.account_id, amount=amount)
    raise _Waiting(
        f"no credited payment for intent {intent_id or '(none)'} yet", payment_intent_id=intent_id
    )


def _paid_back(
    *, provider: str, account_id: int, amount: Decimal, key: str, memo: str, now: datetime
) -> tuple[int, bool]:
    """Money paid back out through the provider: a refund posting, customer → payments."""
    posted = ledger_post(
        posting=Posting(
            kind=LedgerTransaction.Kind.REFUND,
            legs=[
                Leg(account_id=account_id, amount=-amount),
                Leg(account_id=system_account_id(Account.Kind.PAYMENTS), amount=amount),
            ],
            idempotency_key=key,
            occurred_at=now,
            memo=memo,
        ),
        now=now,
    )
    return posted.transaction_id, posted.replayed


def _charge_refunded(event: PaymentEvent, obj: dict[str, Any], now: datetime) -> _Applied:
    purchase = _purchase_for_intent(event.provider, str(obj.get("payment_intent") or ""))
    applied = _Applied(account_id=purchase.account_id)
    for refund in obj["refunds"]["data"]:  # filled by payment_event_process when missing
        if refund.get("status") in ("failed", "canceled"):
            continue
        transaction_id, replayed = _paid_back(
            provider=event.provider,
            account_id=purchase.account_id,
            amount=cents_to_usd(int(refund["amount"])),
            key=f"{event.provider}:refund:{refund['id']}",
            memo=f"{event.provider} refund {refund['id']} of charge {obj['id']} "
            f"({_ids(obj, 'payment_intent')}; event {event.event_id})",
            now=now,
        )
        if not replayed:
            applied.transaction_ids.append(transaction_id)
    applied.detail = f"{len(applied.transaction_ids)} new refund(s)"
    return applied


def _dispute_won_stored(provider: str, dispute_id: str) -> bool:
    return PaymentEvent.objects.filter(
        provider=provider,
        type="charge.dispute.closed",
        payload__data__object__id=dispute_id,
        payload__data__object__status="won",
    ).exists()


def _dispute_created(event: PaymentEvent, obj: dict[str, Any], now: datetime) -> _Applied:
    purchase = _purchase_for_intent(event.provider, str(obj.get("payment_intent") or ""))
    dispute_id = str(obj["id"])
    if _dispute_won_stored(event.provider, dispute_id):  # the closing came first
        return _Applied(
            PaymentEvent.Status.IGNORED, "the dispute was already won", purchase.account_id
        )
    # Bounded by the disputed payment: never more out than it brought in.
    amount = min(cents_to_usd(int(obj["amount"])), purchase.amount)
    transaction_id, replayed = _paid_back(
        provider=event.provider,
        account_id=purchase.account_id,
        amount=amount,
        key=f"{event.provider}:dispute:{dispute_id}",
        memo=f"{event.provider} dispute {dispute_id} of charge {obj.get('charge')} "
        f"({_ids(obj, 'payment_intent')}; event {event.event_id})",
        now=now,
    )
    return _Applied(
        account_id=purchase.account_id,
        detail=f"{amount} USD disputed",
        transaction_ids=[] if replayed else [transaction_id],
    )


def _dispute_closed(event: PaymentEvent, obj: dict[str, Any], now: datetime) -> _Applied:
    purchase = _purchase_for_intent(event.provider, str(obj.get("payment_intent") or ""))
    if obj.get("status") != "won":
        return _Applied(
            PaymentEvent.Status.IGNORED, f"closed {obj.get('status')!r}", purchase.account_id
        )
    dispute_id = str(obj["id"])
    disputed = (
        LedgerTransaction.objects.filter(idempotency_key=f"{event.provider}:dispute:{dispute_id}")
        .values_list("pk", flat=True)
        .first()
    )
    if disputed is None:
        return _Applied(account_id=purchase.account_id, detail="won before anything was moved out")
    posted = ledger_transaction_reverse(
        transaction_id=disputed,
        memo=f"{event.provider} dispute {dispute_id} won (event {event.event_id})",
        idempotency_key=f"{event.provider}:dispute:{dispute_id}:won",
        now=now,
    )
    return _Applied(
        account_id=purchase.account_id,
        detail="dispute won: given back",
        transaction_ids=[] if posted.replayed else [posted.transaction_id],
    )


_HANDLERS: dict[str, Callable[[PaymentEvent, dict[str, Any], datetime], _Applied]] = {
    "checkout.session.completed": _checkout_completed,
    "payment_intent.succeeded": _intent_succeeded,
    "payment_intent.payment_failed": _intent_failed,
    "charge.refunded": _charge_refunded,
    "charge.dispute.created": _dispute_created,
    "charge.dispute.closed": _dispute_closed,
}


def _refunds_fill(event: PaymentEvent) -> None:
    """A charge.refunded event that does not carry all its refunds: list them through the
    API, before the event's transaction (no lock is held across a provider call)."""
    obj = _object(event)
    refunds = obj.get("refunds")
    if (
        isinstance(refunds, dict)
        and isinstance(refunds.get("data"), list)
        and not refunds.get("has_more")
    ):
        return
    listed = payment_provider(event.provider).refunds_list(charge_id=str(obj["id"]))
    obj["refunds"] = {"object": "list", "data": listed, "has_more": False}


def payment_event_apply(*, event_id: int, now: datetime) -> PaymentEvent:
    """Act on a stored event once: its row lock serializes concurrent deliveries, and a
    decided event (applied, ignored) is left as it is."""
    event = PaymentEvent.objects.get(pk=event_id)
    if event.status in (PaymentEvent.Status.APPLIED, PaymentEvent.Status.IGNORED):
        return event
    if event.type == "charge.refunded":
        _refunds_fill(event)
    handler = _HANDLERS.get(event.type)
    try:
        with transaction.atomic(durable=True):
            locked = PaymentEvent.objects.select_for_update().get(pk=event_id)
            if locked.status in (PaymentEvent.Status.APPLIED, PaymentEvent.Status.IGNORED):
                return locked
            locked.payload = event.payload  # with any refunds listed above
            if handler is None:
                applied = _Applied(PaymentEvent.Status.IGNORED, "event type not used")
            else:
                applied = handler(locked, _object(locked), now)
            locked.status = applied.status
            locked.detail = applied.detail
            locked.account_id = applied.account_id
            locked.transaction_ids = [*locked.transaction_ids, *applied.transaction_ids]
            locked.applied_at = now
            locked.payment_intent_id = applied.credited_intent
            locked.save()
    except _Waiting as waiting:
        stored = _event_failed(event_id, str(waiting), payment_intent_id=waiting.payment_intent_id)
        # The payment may have been credited since the handler looked, its waiting events
        # collected before this one was marked: looked at again once, now that it is marked.
        if _intent_credited(stored.provider, waiting.payment_intent_id):
            return payment_event_apply(event_id=event_id, now=now)
        return stored
    except (BillingError, KeyError, TypeError, ValueError) as exc:
        # The event cannot be applied as it is (malformed, an account we do not have): kept,
        # visible in the admin as failed; a redelivery tries again.
        return _event_failed(event_id, f"{type(exc).__name__}: {exc}", payment_intent_id="")
    return locked


def _intent_credited(provider: str, intent_id: str) -> bool:
    return bool(intent_id) and (
        Checkout.objects.filter(
            provider=provider, payment_intent_id=intent_id, transaction__isnull=False
        ).exists()
        or AutoTopupAttempt.objects.filter(
            payment_intent_id=intent_id, transaction__isnull=False
        ).exists()
    )


def _event_failed(event_id: int, detail: str, *, payment_intent_id: str) -> PaymentEvent:
    with transaction.atomic(durable=True):
        PaymentEvent.objects.filter(pk=event_id, status__in=["received", "failed"]).update(
            status=PaymentEvent.Status.FAILED,
            detail=detail[:2000],
            payment_intent_id=payment_intent_id,
        )
    return PaymentEvent.objects.get(pk=event_id)


def payment_event_process(*, event_id: int, now: datetime) -> PaymentEvent:
    """Apply an event, then any stored earlier that were waiting for the payment it credited
    (a refund or dispute delivered before its checkout's completion)."""
    event = payment_event_apply(event_id=event_id, now=now)
    if event.status == PaymentEvent.Status.APPLIED and event.payment_intent_id:
        waiting = (
            PaymentEvent.objects.filter(
                provider=event.provider,
                status=PaymentEvent.Status.FAILED,
                payment_intent_id=event.payment_intent_id,
            )
            .order_by("received_at", "pk")
            .values_list("pk", flat=True)
        )
        for waiting_id in list(waiting):
            payment_event_apply(event_id=waiting_id, now=now)
    return event


def payment_events_receive(*, provider: str, events: list[dict[str, Any]], now: datetime) -> None:
    """Events a provider produced itself (the dummy's): stored and applied like webhooks."""
    for event in events:
        stored = payment_event_record(provider=provider, event=event, now=now)
        payment_event_process(event_id=stored.pk, now=now)


def dummy_checkout_pay(*, session_id: str, now: datetime) -> Checkout:
    """The dummy checkout page's Pay button."""
    from billing.payments.dummy import dummy_checkout_events

    checkout = Checkout.objects.get(provider="dummy", session_id=session_id)
    payment_events_receive(
        provider="dummy",
        events=dummy_checkout_events(
            session_id=session_id,
            account_id=checkout.account_id,
            amount_cents=usd_to_cents(checkout.amount),
        ),
        now=now,
    )
    checkout.refresh_from_db()
    return checkout


# --- settings: auto top-up and alerts ----------------------------------------------------------


@dataclass(frozen=True)
class AutoTopupSettings:
    enabled: bool
    threshold: Decimal | None
    amount: Decimal | None
    monthly_limit: Decimal | None

    def as_json(self) -> dict[str, Any]:
        def out(value: Decimal | None) -> str | None:
            return None if value is None else money_str(value)

        return {
            "enabled": self.enabled,
            "auto_topup_threshold": out(self.threshold),
            "auto_topup_amount": out(self.amount),
            "auto_topup_monthly_limit": out(self.monthly_limit),
        }


def auto_topup_set(
    *,
    account_id: int,
    enabled: bool,
    threshold: Decimal | None = None,
    amount: Decimal | None = None,
    monthly_limit: Decimal | None = None,
    staff: StaffNote | None = None,
) -> AutoTopupSettings:
    """Set (and arm) auto top-up; given values replace, None keeps the stored one. Enabled, it
    needs all three: the amount within the top-up range, a threshold and limit not negative."""
    with transaction.atomic(durable=True):
        account = _customer_account(account_id, lock=True)
        threshold = account.auto_topup_threshold if threshold is None else threshold
        amount = account.auto_topup_amount if amount is None else amount
        monthly_limit = account.auto_topup_monthly_limit if monthly_limit is None else monthly_limit
        if amount is not None:
            topup_amount_parse(str(amount), param="auto_topup_amount")
        for param, value in (
            ("auto_topup_threshold", threshold),
            ("auto_topup_monthly_limit", monthly_limit),
        ):
            if value is not None and value < 0:
                raise PaymentInputError(param, f"'{param}' cannot be negative.")
        if enabled:
            for param, value in (
                ("auto_topup_threshold", threshold),
                ("auto_topup_amount", amount),
                ("auto_topup_monthly_limit", monthly_limit),
            ):
                if value is None:
                    raise PaymentInputError(param, f"'{param}' is required to enable auto top-up.")
        Account.objects.filter(pk=account_id).update(
            auto_topup_enabled=enabled,
            auto_topup_threshold=threshold,
            auto_topup_amount=amount,
            auto_topup_monthly_limit=monthly_limit,
            auto_topup_armed=True,
        )
        settings_now = AutoTopupSettings(
            enabled=enabled, threshold=threshold, amount=amount, monthly_limit=monthly_limit
        )
        if staff is not None:
            _staff_action_write(
                staff,
                action="set_auto_topup",
                account_id=account_id,
                details=settings_now.as_json(),
            )
    return settings_now


def webhook_secret_new() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


_UNSET: Any = object()


@dataclass(frozen=True)
class AlertSettings:
    low_balance_threshold: Decimal | None
    webhook_url: str
    billing_email: str
    webhook_secret: str | None  # only when a new one was made: it is shown once

    def as_json(self) -> dict[str, Any]:
        threshold = self.low_balance_threshold
        return {
            "low_balance_threshold": None if threshold is None else money_str(threshold),
            "webhook_url": self.webhook_url,
            "billing_email": self.billing_email,
            "webhook_secret": self.webhook_secret,
        }


def alerts_set(
    *,
    account_id: int,
    low_balance_threshold: Decimal | None = _UNSET,
    webhook_url: str = _UNSET,
    billing_email: str = _UNSET,
    rotate_secret: bool = False,
    staff: StaffNote | None = None,
) -> AlertSettings:
    """Set the account's alerts; an argument not given keeps its value. A webhook URL gets a
    signing secret when it has none, or when asked to rotate it; the new one is returned."""
    from django.core.exceptions import ValidationError
    from django.core.validators import EmailValidator, URLValidator

    with transaction.atomic(durable=True):
        account = _customer_account(account_id, lock=True)
        updates: dict[str, Any] = {}
        if low_balance_threshold is not _UNSET:
            if low_balance_threshold is not None and low_balance_threshold < 0:
                raise PaymentInputError(
                    "low_balance_threshold", "'low_balance_threshold' cannot be negative."
                )
            updates |= {"low_balance_threshold": low_balance_threshold, "low_balance_armed": True}
        if webhook_url is not _UNSET:
            if webhook_url:
                try:
                    URLValidator(schemes=["http", "https"])(webhook_url)
                except ValidationError:
                    raise PaymentInputError(
                        "webhook_url", "'webhook_url' must be an http(s) URL."
                    ) from None
            updates["webhook_url"] = webhook_url
        if billing_email is not _UNSET:
            if billing_email:
                try:
                    EmailValidator()(billing_email)
                except ValidationError:
                    raise PaymentInputError(
                        "billing_email", "'billing_email' must be an email address."
                    ) from None
            updates["billing_email"] = billing_email
        url = updates.get("webhook_url", account.webhook_url)
        secret = None
        if url and (rotate_secret or not account.webhook_secret):
            secret = updates["webhook_secret"] = webhook_secret_new()
        if updates:
            Account.objects.filter(pk=account_id).update(**updates)
        account.refresh_from_db()
        alerts = AlertSettings(
            low_balance_threshold=account.low_balance_threshold,
            webhook_url=account.webhook_url,
            billing_email=account.billing_email,
            webhook_secret=secret,
        )
        if staff is not None:  # the secret itself is never recorded
            _staff_action_write(
                staff,
                action="set_alerts",
                account_id=account_id,
                details={**alerts.as_json(), "webhook_secret": secret is not None},
            )
    return alerts


# --- auto top-up ---------------------------------------------------------------------------------


def _month_start(now: datetime) -> datetime:
    now = now.astimezone(UTC)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


_COUNTED = (
    AutoTopupAttempt.Status.CHARGING,
    AutoTopupAttempt.Status.CONFIRMED,
    AutoTopupAttempt.Status.SUCCEEDED,
)


def _auto_topup_claim(*, attempt_id: int, now: datetime) -> AutoTopupAttempt | None:
    """Decide a pending attempt under its account's lock (which orders attempts of one
    account): skipped, or charging and counted against the month's limit (UTC)."""
    account_id = AutoTopupAttempt.objects.values_list("account_id", flat=True).get(pk=attempt_id)
    with transaction.atomic(durable=True):
        account = _customer_account(account_id, lock=True)
        attempt = AutoTopupAttempt.objects.select_for_update().get(pk=attempt_id)
        if attempt.status == AutoTopupAttempt.Status.CHARGING:
            return attempt  # a redelivered task: charge again under the same idempotency key
        if attempt.status != AutoTopupAttempt.Status.PENDING:
            return None
        month_start = _month_start(attempt.created_at)
        spent = AutoTopupAttempt.objects.filter(
            account_id=account_id,
            status__in=_COUNTED,
            created_at__gte=month_start,
            created_at__lt=(month_start + timedelta(days=32)).replace(day=1),
        ).aggregate(total=Sum("amount"))["total"] or Decimal(0)
        reason = ""
        if not account.auto_topup_enabled:
            reason = "auto top-up is off"
        elif not account.payment_method_id or not account.payment_customer_id:
            reason = "no saved payment method (the first checkout saves one)"
        elif account.auto_topup_monthly_limit is None or (
            spent + attempt.amount > account.auto_topup_monthly_limit
        ):
            reason = (
                f"monthly limit: {money_str(spent)} of "
                f"{money_str(account.auto_topup_monthly_limit or Decimal(0))} USD used"
            )
        status = AutoTopupAttempt.Status.SKIPPED if reason else AutoTopupAttempt.Status.CHARGING
        AutoTopupAttempt.objects.filter(pk=attempt_id).update(
            status=status, failure_reason=reason, updated_at=now
        )
        attempt.status = status
        attempt.failure_reason = reason
        return None if reason else attempt


def auto_topup_charge(
    *, attempt_id: int, now: datetime, provider: PaymentProvider | None = None
) -> AutoTopupAttempt:
    """Charge one crossing's auto top-up off-session, at most once: one PaymentIntent under an
    idempotency key per account and crossing. The credit comes with payment_intent.succeeded.
    A decline is recorded and sends payment.failed; an unreachable provider raises
    PaymentProviderError for the task to retry (the same key: still one intent)."""
    attempt = _auto_topup_claim(attempt_id=attempt_id, now=now)
    if attempt is None:
        return AutoTopupAttempt.objects.get(pk=attempt_id)
    account = Account.objects.get(pk=attempt.account_id)
    provider = provider or payment_provider()
    try:
        charge = provider.off_session_charge(
            account_id=account.pk,
            attempt_id=attempt.pk,
            customer_id=account.payment_customer_id,
            payment_method_id=account.payment_method_id,
            amount_cents=usd_to_cents(attempt.amount),
            idempotency_key=f"auto-topup-{account.pk}-{attempt.pk}",
        )
    except PaymentDeclined as exc:
        auto_topup_fail(attempt_id=attempt.pk, reason=str(exc), now=now)
        return AutoTopupAttempt.objects.get(pk=attempt_id)
    with transaction.atomic(durable=True):
        locked = AutoTopupAttempt.objects.select_for_update().get(pk=attempt.pk)
        if locked.status == AutoTopupAttempt.Status.CHARGING:
            locked.payment_intent_id = charge.intent_id
            if charge.status in ("succeeded", "processing"):
                AutoTopupAttempt.objects.filter(pk=locked.pk).update(
                    status=AutoTopupAttempt.Status.CONFIRMED,
                    payment_intent_id=charge.intent_id,
                    updated_at=now,
                )
            else:  # requires_action, requires_payment_method: no customer is there to act
                AutoTopupAttempt.objects.filter(pk=locked.pk).update(
                    payment_intent_id=charge.intent_id
                )
                _payment_failed(attempt=locked, reason=f"payment intent {charge.status}", now=now)
    payment_events_receive(provider=provider.name, events=charge.events, now=now)
    return AutoTopupAttempt.objects.get(pk=attempt_id)


def auto_topup_fail(*, attempt_id: int, reason: str, now: datetime) -> None:
    """An attempt that cannot go on (declined, or the provider unreachable after the task's
    retries): failed, and payment.failed sent, once."""
    with transaction.atomic(durable=True):
        attempt = AutoTopupAttempt.objects.select_for_update().get(pk=attempt_id)
        if attempt.status in (AutoTopupAttempt.Status.CHARGING, AutoTopupAttempt.Status.PENDING):
            _payment_failed(attempt=attempt, reason=reason, now=now)


# --- delivery ------------------------------------------------------------------------------------


def notifications_dispatch(*, now: datetime, limit: int = 500) -> list[int]:
    """Fan new outbox rows out into deliveries (the account's webhook and billing email as
    they are now); returns the new deliveries' ids for the relay to hand to Celery."""
    with transaction.atomic(durable=True):
        rows = list(
            Notification.objects.filter(dispatched_at__isnull=True)
            .select_for_update(skip_locked=True, of=("self",))
            .select_related("account")
            .order_by("pk")[:limit]
        )
        deliveries = []
        for notification in rows:
            account = notification.account
            for channel, target in (
                (NotificationDelivery.Channel.WEBHOOK, account.webhook_url),
                (NotificationDelivery.Channel.EMAIL, account.billing_email),
            ):
                if target:
                    deliveries.append(
                        NotificationDelivery(
                            notification=notification,
                            channel=channel,
                            target=target,
                            next_attempt_at=now,
                        )
                    )
        created = NotificationDelivery.objects.bulk_create(deliveries)
        Notification.objects.filter(pk__in=[n.pk for n in rows]).update(dispatched_at=now)
    return [delivery.pk for delivery in created]


def deliveries_overdue(*, now: datetime, grace: timedelta) -> list[int]:
    """Pending deliveries whose retry is long overdue (its task was lost): handed out again."""
    return list(
        NotificationDelivery.objects.filter(
            status=NotificationDelivery.Status.PENDING, next_attempt_at__lte=now - grace
        )
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:500]
    )


def auto_topups_pending(*, now: datetime) -> list[int]:
    return list(
        AutoTopupAttempt.objects.filter(status=AutoTopupAttempt.Status.PENDING)
        .order_by("pk")
        .values_list("pk", flat=True)[:500]
    )


def delivery_backoff(attempts: int) -> timedelta:
    """Seconds before the next attempt after `attempts` failed ones: 2, 4, 8, ... capped."""
    return timedelta(seconds=min(2**attempts, settings.ALERT_DELIVERY_BACKOFF_MAX_SECONDS))


def webhook_headers(*, secret: str, message_id: str, body: str, now: datetime) -> dict[str, str]:
    """Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature (v1,<base64 HMAC>)."""
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id=message_id, timestamp=now, data=body),
    }


def _send(delivery: NotificationDelivery, *, now: datetime) -> tuple[bool, int | None, str]:
    notification = delivery.notification
    body = json.dumps(notification.payload, separators=(",", ":"), sort_keys=True)
    if delivery.channel == NotificationDelivery.Channel.EMAIL:
        try:
            send_mail(
                subject=f"[billing] {notification.type} on account {notification.account_id}",
                message=json.dumps(notification.payload, indent=2, sort_keys=True),
                from_email=None,
                recipient_list=[delivery.target],
            )
        except OSError as exc:  # smtplib's errors are OSErrors
            return False, None, f"{type(exc).__name__}: {exc}"
        return True, None, ""
    secret = notification.account.webhook_secret
    if not secret:
        return False, None, "the account has no webhook secret"
    request = urllib.request.Request(  # noqa: S310 - an http(s) URL, validated when set
        delivery.target,
        data=body.encode(),
        method="POST",
        # Signed at the wall clock's time, whatever `now` the caller passed: receivers refuse a
        # webhook-timestamp more than 5 minutes from theirs (a replay guard).
        headers=webhook_headers(
            secret=secret, message_id=notification.message_id, body=body, now=datetime.now(UTC)
        ),
    )
    try:
        with urllib.request.urlopen(  # noqa: S310 - http(s) only, validated when set
            request, timeout=settings.ALERT_WEBHOOK_TIMEOUT_SECONDS
        ) as answer:
            return 200 <= answer.status < 300, answer.status, ""
    except urllib.error.HTTPError as exc:
        return False, exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, None, f"{type(exc).__name__}: {exc}"


def notification_deliver(*, delivery_id: int, now: datetime) -> NotificationDelivery | None:
    """One attempt at a pending delivery, recorded. The delivery's row lock is held across it,
    so one delivery is never being sent twice at once (a second task skips it: None). A
    failure schedules the next attempt (`delivery_backoff`) until ALERT_DELIVERY_MAX_ATTEMPTS,
    then the delivery is failed. Receivers dedupe by webhook-id, the same on every attempt."""
    with transaction.atomic(durable=True):
        delivery = (
            NotificationDelivery.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("notification__account")
            .filter(pk=delivery_id)
            .first()
        )
        if delivery is None:
            return None
        if delivery.status != NotificationDelivery.Status.PENDING:
            return delivery
        ok, status_code, error = _send(delivery, now=now)
        DeliveryAttempt.objects.create(
            delivery=delivery, attempted_at=now, ok=ok, status_code=status_code, error=error[:2000]
        )
        delivery.attempts += 1
        if ok:
            delivery.status = NotificationDelivery.Status.DELIVERED
            delivery.delivered_at = now
            delivery.last_error = ""
        else:
            delivery.last_error = error[:2000]
            if delivery.attempts >= settings.ALERT_DELIVERY_MAX_ATTEMPTS:
                delivery.status = NotificationDelivery.Status.FAILED
            else:
                delivery.next_attempt_at = now + delivery_backoff(delivery.attempts)
        delivery.save()
    if not ok:
        logger.warning(
            "delivery %s of notification %s failed: %s",
            delivery.pk,
            delivery.notification_id,
            error,
        )
    return delivery
