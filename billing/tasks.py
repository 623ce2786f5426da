"""Payments' background work (billing/payments/): the outbox relay, alert deliveries and auto
top-up charges. Each task calls one service and may run twice (acks_late): the services are
idempotent (a delivery's row lock and status, an attempt's status and idempotency key)."""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import Task, shared_task
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from billing.models import NotificationDelivery
from billing.payments.providers import PaymentProviderError
from billing.payments.services import (
    auto_topup_charge,
    auto_topup_fail,
    auto_topups_pending,
    deliveries_overdue,
    delivery_backoff,
    notification_deliver,
    notifications_dispatch,
)

logger = logging.getLogger(__name__)

# A delivery whose retry is this far overdue lost its task (a broker flush): the relay hands
# it out again.
OVERDUE_GRACE = timedelta(minutes=5)


@shared_task(name="billing.payments_relay", acks_late=True, reject_on_worker_lost=True)
def payments_relay() -> dict[str, int]:
    """The outbox relay (beat, every few seconds): new notifications into deliveries, and
    pending auto top-ups, each handed to its task."""
    now = timezone.now()
    delivery_ids = notifications_dispatch(now=now)
    delivery_ids += deliveries_overdue(now=now, grace=OVERDUE_GRACE)
    for delivery_id in delivery_ids:
        notification_deliver_task.delay(delivery_id=delivery_id)
    attempt_ids = auto_topups_pending(now=now)
    for attempt_id in attempt_ids:
        auto_topup_charge_task.delay(attempt_id=attempt_id)
    return {"deliveries": len(delivery_ids), "auto_topups": len(attempt_ids)}


@shared_task(
    bind=True,
    name="billing.notification_deliver",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError, InterfaceError),
    retry_backoff=True,
    max_retries=None,  # the delivery's own attempt count is the cap
)
def notification_deliver_task(self: Task, *, delivery_id: int) -> str:
    delivery = notification_deliver(delivery_id=delivery_id, now=timezone.now())
    if delivery is None:
        return "busy"  # another task holds it
    if delivery.status == NotificationDelivery.Status.PENDING:
        # The receiver is down: try again after the backoff, never losing the event.
        raise self.retry(
            countdown=delivery_backoff(delivery.attempts).total_seconds(),
            max_retries=settings.ALERT_DELIVERY_MAX_ATTEMPTS,
        )
    return str(delivery.status)


class AutoTopupTask(Task):
    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: object,
        kwargs: dict[str, object],
        einfo: object,
    ) -> None:
        # Retries exhausted (the provider unreachable): the attempt fails, payment.failed is
        # sent; the crossing gets no second attempt.
        auto_topup_fail(
            attempt_id=int(str(kwargs["attempt_id"])),
            reason=f"{type(exc).__name__}: {exc}",
            now=timezone.now(),
        )


@shared_task(
    bind=True,
    base=AutoTopupTask,
    name="billing.auto_topup_charge",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(PaymentProviderError, OperationalError, InterfaceError),
    retry_backoff=2,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=8,
)
def auto_topup_charge_task(self: Task, *, attempt_id: int) -> str:
    return str(auto_topup_charge(attempt_id=attempt_id, now=timezone.now()).status)
