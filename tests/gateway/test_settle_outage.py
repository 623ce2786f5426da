"""Lesson 1 and 2 of the brief, end to end: the gateway's own settle cannot be written, the
response still completes, and the real Celery worker charges the request exactly once later."""

from __future__ import annotations

from decimal import Decimal

import httpx

from billing.models import SYSTEM_ACCOUNT_IDS, Account, Hold, LedgerTransaction
from billing.selectors import ledger_audit
from reconciliation.models import ReconciliationItem
from tests.gateway.conftest import start_gateway, stop_gateway
from tests.gateway.ledger import charged
from tests.workers import wait_until


def test_settle_that_cannot_be_written_is_retried_by_the_worker_and_charged_once(
    world, running_worker, worker_queue, row_locker, tmp_path
):
    # The gateway gives up on a row lock after 300 ms, as it would on a database outage.
    gateway = start_gateway(
        tmp_path / "gateway.log",
        PGOPTIONS="-c lock_timeout=300",
        CELERY_TASK_DEFAULT_QUEUE=worker_queue,
    )
    try:
        # Taken before the request starts: the revenue account's row, which the hold never
        # touches and every settle's posting needs (its revenue leg's foreign key). The hold is
        # placed, the answer relayed, and the settle fails on this lock, whatever the timing.
        row_locker.lock_account(SYSTEM_ACCOUNT_IDS[Account.Kind.REVENUE])
        body = {
            "model": world.openai_model,
            "messages": [{"role": "user", "content": "hi [mock:tokens=5]"}],
        }
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {world.key}"},
            timeout=30,
        )
        assert response.status_code == 200
        hold = Hold.objects.get(account=world.account)
        cost = Decimal(response.headers["x-request-cost"])
        assert "handing it to the retry task" in gateway.log_text()
        assert charged(hold.request_id) == 0  # not yet: the hold is still there
        assert hold.state == Hold.State.ACTIVE
        row_locker.release()  # the outage ends
        wait_until(lambda: Hold.objects.get(pk=hold.pk).state == Hold.State.SETTLED, timeout=30)
    finally:
        stop_gateway(gateway)
    assert charged(hold.request_id) == cost > 0
    assert LedgerTransaction.objects.filter(request_id=hold.request_id).count() == 1
    world.account.refresh_from_db()
    assert (world.account.balance, world.account.held) == (Decimal("10") - cost, 0)
    assert not ReconciliationItem.objects.filter(
        request_id=hold.request_id, status=ReconciliationItem.Status.PENDING
    ).exists()
    assert ledger_audit().clean
