"""Balance alerts: one outbox event per crossing, written by the engine with the posting that
crossed (balance.low, key.budget_threshold) or after a 402 (balance.depleted), re-armed when
the balance is back; deliveries signed as Standard Webhooks to a real local receiver."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.core import mail
from django.core.management import call_command
from standardwebhooks import Webhook, WebhookVerificationError

from billing.errors import InsufficientFunds
from billing.models import Account, DeliveryAttempt, Notification, NotificationDelivery
from billing.payments.services import alerts_set, notification_deliver, notifications_dispatch
from billing.services.holds import hold_place
from tests.billing.payments.conftest import assert_books_clean
from tests.billing.payments.helpers import grant, spend
from tests.factories import make_key
from tests.workers import CeleryWorker, wait_until

pytestmark = pytest.mark.django_db


def _events(account: Account, type: str) -> list[dict[str, Any]]:
    return [n.payload for n in Notification.objects.filter(account=account, type=type)
            .order_by("pk")]


def test_balance_low_once_per_crossing_and_rearmed_when_back_above(
    account, issued_key, now  # type: ignore[no-untyped-def]
) -> None:
    alerts_set(account_id=account.pk, low_balance_threshold=Decimal("5"),
               webhook_url="http://127.0.0.1:9/hook")
    spend(issued_key, "3", now=now)  # 10 -> 7
    assert _events(account, "balance.low") == []
    spend(issued_key, "3", now=now)  # 7 -> 4: crossed
    spend(issued_key, "1", now=now)  # 4 -> 3: still below, no second event
    [low] = _events(account, "balance.low")
    assert low["type"] == "balance.low"
    assert low["account_id"] == account.pk
    assert (low["available"], low["threshold"]) == ("4.0000000000", "5.0000000000")
    assert low["created_at"].startswith("2026-11-22T12:00:00")
    grant(account.pk, "10", now=now)  # 3 -> 13: re-armed
    assert Account.objects.get(pk=account.pk).low_balance_armed
    spend(issued_key, "9", now=now)  # 13 -> 4: a second crossing
    assert len(_events(account, "balance.low")) == 2
    assert_books_clean()


def test_no_threshold_writes_no_event(account, issued_key, now) -> None:  # type: ignore[no-untyped-def]
    for _ in range(5):
        spend(issued_key, "1.9", now=now)
    assert not Notification.objects.exists()
    row = Account.objects.get(pk=account.pk)
    assert (row.low_balance_armed, row.auto_topup_armed, row.depleted_armed) == (True, True, True)


def test_balance_depleted_once_per_402_crossing(account, issued_key, now) -> None:  # type: ignore[no-untyped-def]
    alerts_set(account_id=account.pk, billing_email="ops@example.com")
    for _ in range(3):
        with pytest.raises(InsufficientFunds):
            hold_place(api_key=issued_key.api_key, request_id=f"req-big-{_}",
                       amount=Decimal("11"), now=now)
    [depleted] = _events(account, "balance.depleted")
    assert (depleted["available"], depleted["requested"]) == ("10.0000000000", "11.0000000000")
    grant(account.pk, "0.5", now=now)  # a credit re-arms it
    with pytest.raises(InsufficientFunds):
        hold_place(api_key=issued_key.api_key, request_id="req-big-after", amount=Decimal("11"),
                   now=now)
    assert len(_events(account, "balance.depleted")) == 2
    assert_books_clean()


def test_balance_depleted_needs_somewhere_to_send_it(account, issued_key, now) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InsufficientFunds):
        hold_place(api_key=issued_key.api_key, request_id="req-big", amount=Decimal("11"), now=now)
    assert not Notification.objects.exists()


def test_key_budget_threshold_at_50_80_and_100_percent(account, now) -> None:  # type: ignore[no-untyped-def]
    issued = make_key(account=account, now=now, budget_limit=Decimal("8"), budget_period="month")
    spend(issued, "3", now=now)  # 37.5 %
    assert _events(account, "key.budget_threshold") == []
    spend(issued, "1", now=now)  # 50 %
    spend(issued, "2.5", now=now)  # 81.25 %
    spend(issued, "0.1", now=now)  # 82.5 %: nothing new
    spend(issued, "1.4", now=now)  # 100 %
    events = _events(account, "key.budget_threshold")
    assert [e["percent"] for e in events] == [50, 80, 100]
    assert events[0]["api_key_id"] == issued.api_key.pk
    assert events[0]["spent"] == "4.0000000000"
    assert events[0]["budget_limit"] == "8.0000000000"
    # The next period starts over.
    next_month = now + timedelta(days=31)
    grant(account.pk, "10", now=next_month)
    spend(issued, "4", now=next_month)
    assert [e["percent"] for e in _events(account, "key.budget_threshold")] == [50, 80, 100, 50]
    assert_books_clean()


# --- delivery -------------------------------------------------------------------------------


class Receiver:
    """A real HTTP receiver that verifies Standard Webhooks signatures."""

    def __init__(self, secret: str, port: int) -> None:
        self.secret = secret
        self.port = port
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.rejected = 0
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"])).decode()
                try:
                    payload = Webhook(receiver.secret).verify(body, dict(self.headers.items()))
                except WebhookVerificationError:
                    receiver.rejected += 1
                    self.send_response(400)
                else:
                    receiver.received.append((self.headers["webhook-id"], payload))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def receiver_for(account: Account, *, up: bool = True) -> Iterator[Receiver]:
    port = _free_port()
    alerts = alerts_set(account_id=account.pk, low_balance_threshold=Decimal("5"),
                        webhook_url=f"http://127.0.0.1:{port}/alerts",
                        billing_email="billing@example.com")
    assert alerts.webhook_secret is not None and alerts.webhook_secret.startswith("whsec_")
    receiver = Receiver(alerts.webhook_secret, port)
    if up:
        receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def test_a_receiver_that_is_down_loses_nothing_and_gets_it_signed_when_back(
    account, issued_key, now  # type: ignore[no-untyped-def]
) -> None:
    with receiver_for(account, up=False) as receiver:
        spend(issued_key, "6", now=now)  # crosses below 5
        deliveries = notifications_dispatch(now=now)
        webhook = NotificationDelivery.objects.get(pk__in=deliveries, channel="webhook")
        down = notification_deliver(delivery_id=webhook.pk, now=now)
        assert down is not None and down.status == "pending" and down.attempts == 1
        assert down.next_attempt_at == now + timedelta(seconds=2)
        assert "Connection refused" in down.last_error or "URLError" in down.last_error
        receiver.start()
        later = now + timedelta(seconds=2)
        back = notification_deliver(delivery_id=webhook.pk, now=later)
        assert back is not None and back.status == "delivered" and back.delivered_at == later
        [(message_id, payload)] = receiver.received
        notification = Notification.objects.get(type="balance.low")
        assert message_id == f"msg_{notification.pk}"
        assert payload == notification.payload
        assert [a.ok for a in DeliveryAttempt.objects.filter(delivery=webhook).order_by("pk")] == [
            False, True]
        # Delivered: a duplicate task sends nothing more.
        notification_deliver(delivery_id=webhook.pk, now=later)
        assert len(receiver.received) == 1
    email = NotificationDelivery.objects.get(pk__in=deliveries, channel="email")
    assert notification_deliver(delivery_id=email.pk, now=now).status == "delivered"  # type: ignore[union-attr]
    [sent] = mail.outbox
    assert sent.to == ["billing@example.com"] and "balance.low" in sent.subject
    assert json.loads(str(sent.body))["available"] == "4.0000000000"


def test_a_signature_the_receiver_rejects_is_retried_then_failed(
    account, issued_key, now, settings  # type: ignore[no-untyped-def]
) -> None:
    settings.ALERT_DELIVERY_MAX_ATTEMPTS = 2
    with receiver_for(account) as receiver:
        receiver.secret = "whsec_" + "A" * 32  # not the account's: every signature fails
        spend(issued_key, "6", now=now)
        [webhook_id] = [d for d in notifications_dispatch(now=now)
                        if NotificationDelivery.objects.get(pk=d).channel == "webhook"]
        first = notification_deliver(delivery_id=webhook_id, now=now)
        assert first is not None and (first.status, first.last_error) == ("pending", "HTTP 400")
        second = notification_deliver(delivery_id=webhook_id, now=now + timedelta(seconds=2))
        assert second is not None and second.status == "failed"
        assert receiver.rejected == 2 and receiver.received == []


def test_set_alerts_command_returns_a_new_secret_each_time(account, now) -> None:  # type: ignore[no-untyped-def]
    from io import StringIO

    def run(*args: str) -> dict[str, Any]:
        out = StringIO()
        call_command("set_alerts", str(account.pk), *args, "--json", stdout=out)
        return json.loads(out.getvalue())

    first = run("--low-balance", "2.50", "--webhook-url", "https://example.com/hook",
                "--email", "a@example.com")
    assert first == {"account_id": account.pk, "low_balance_threshold": "2.5000000000",
                     "webhook_url": "https://example.com/hook", "billing_email": "a@example.com",
                     "webhook_secret": first["webhook_secret"]}
    assert first["webhook_secret"].startswith("whsec_")
    second = run("--webhook-url", "https://example.com/hook")
    assert second["webhook_secret"] != first["webhook_secret"]
    stored = Account.objects.get(pk=account.pk)
    assert stored.webhook_secret == second["webhook_secret"]
    assert stored.low_balance_threshold == Decimal("2.5")


@pytest.mark.django_db(transaction=True)
def test_a_real_worker_delivers_through_the_relay_and_retries_a_receiver_that_was_down(
    running_worker: CeleryWorker, account, issued_key  # type: ignore[no-untyped-def]
) -> None:
    from django.utils import timezone

    from billing.tasks import payments_relay

    with receiver_for(account, up=False) as receiver:
        spend(issued_key, "6", now=timezone.now())
        payments_relay.delay()
        webhook = wait_until(lambda: NotificationDelivery.objects.filter(
            channel="webhook", attempts__gte=1).first(), timeout=30)
        assert webhook.status == "pending"  # down: the task retries after its backoff
        receiver.start()
        wait_until(lambda: NotificationDelivery.objects.filter(
            pk=webhook.pk, status="delivered").exists(), timeout=30)
        assert [payload["type"] for _, payload in receiver.received] == ["balance.low"]
    assert_books_clean()


@pytest.mark.django_db(transaction=True)
def test_the_gateways_async_hold_records_balance_depleted_once(account, issued_key, now) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from billing.engine import sql_async_pool_close
    from billing.services.holds import hold_place_async

    alerts_set(account_id=account.pk, billing_email="ops@example.com")

    async def refused_twice() -> list[str]:
        errors = []
        try:
            for n in range(2):
                try:
                    await hold_place_async(api_key=issued_key.api_key, request_id=f"req-a{n}",
                                           amount=Decimal("50"), now=now)
                except InsufficientFunds as exc:
                    errors.append(type(exc).__name__)
        finally:
            await sql_async_pool_close()
        return errors

    assert asyncio.run(refused_twice()) == ["InsufficientFunds", "InsufficientFunds"]
    [depleted] = _events(account, "balance.depleted")
    assert depleted["requested"] == "50.0000000000"
    assert_books_clean()


@pytest.mark.django_db(transaction=True)
def test_the_api_sets_alerts_and_shows_a_new_secret_once(client, account, now) -> None:  # type: ignore[no-untyped-def]
    admin = make_key(account=account, now=now, scope="admin")
    auth = {"HTTP_AUTHORIZATION": f"Bearer {admin.secret}"}
    first = client.patch("/v1/billing/alerts", data={
        "low_balance_threshold": "3.50", "webhook_url": "https://example.com/hook",
        "billing_email": "billing@example.com",
    }, content_type="application/json", **auth)
    assert first.status_code == 200, first.content
    body = first.json()
    assert body["low_balance_threshold"] == "3.5000000000"
    assert body["webhook_secret"].startswith("whsec_")
    again = client.patch("/v1/billing/alerts", data={"low_balance_threshold": "4"},
                         content_type="application/json", **auth)
    assert again.json()["webhook_secret"] is None  # shown once
    rotated = client.patch("/v1/billing/alerts", data={"rotate_webhook_secret": True},
                           content_type="application/json", **auth)
    assert rotated.json()["webhook_secret"] not in (None, body["webhook_secret"])
    bad = client.patch("/v1/billing/alerts", data={"webhook_url": "ftp://x"},
                       content_type="application/json", **auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "webhook_url"
    inference = make_key(account=account, now=now)
    refused = client.patch("/v1/billing/alerts", data={}, content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {inference.secret}")
    assert refused.status_code == 403
