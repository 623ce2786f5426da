"""A gateway killed mid-stream still bills what it relayed: the stream checkpoints its usage on
its hold as it goes, and when the hold expires the sweep charges the last checkpoint, once,
flagged late, with an estimated usage record, and the queue shows it was charged that way."""

from __future__ import annotations

import signal
from decimal import Decimal

import httpx

from billing.models import Hold, LedgerTransaction, UsageRecord
from billing.pricing import Usage
from reconciliation.models import ReconciliationItem
from reconciliation.services.sweeps import holds_expire_and_queue
from tests.gateway.conftest import start_gateway, stop_gateway
from tests.gateway.ledger import assert_clean, balance, charged, expected_cost
from tests.workers import wait_until


def test_a_gateway_killed_mid_stream_is_charged_its_last_checkpoint_when_the_hold_expires(
    world, tmp_path
):
    gateway = start_gateway(tmp_path / "gateway.log", GATEWAY_CHECKPOINT_TOKENS="5")
    body = {
        "model": world.openai_model,
        "stream": True,
        "messages": [{"role": "user", "content": "tell [mock:tokens=400] [mock:delay_ms=20]"}],
    }
    try:
        with httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {world.key}"}, timeout=60
        ) as client, client.stream("POST", "/v1/chat/completions", json=body) as response:
            request_id = response.headers["x-request-id"]
            # Kept until the kill: a dropped iterator would close the response, and the
            # client's leaving would be settled as a disconnect.
            lines = response.iter_lines()
            relayed = 0
            while relayed < 20:
                relayed += next(lines).startswith("data: ")
            # Checkpoints come every 5 content events: wait for one that counts some output.
            wait_until(
                lambda: (Hold.objects.get(request_id=request_id).checkpoint_cost or 0) > 0,
                timeout=30,
            )
            gateway.process.send_signal(signal.SIGKILL)
            gateway.process.wait(timeout=10)
    finally:
        stop_gateway(gateway)

    hold = Hold.objects.get(request_id=request_id)
    assert hold.state == Hold.State.ACTIVE  # nobody settled it: the process died
    assert charged(request_id) == 0

    swept = holds_expire_and_queue(now=hold.expires_at)
    again = holds_expire_and_queue(now=hold.expires_at)

    hold.refresh_from_db()
    checkpoint = Usage.from_dict(hold.checkpoint_usage or {})
    assert checkpoint.output_tokens > 0
    cost = expected_cost(Usage(input_tokens=checkpoint.input_tokens,
                               output_tokens=checkpoint.output_tokens))
    assert hold.checkpoint_cost == cost
    assert (swept["expired"], again["expired"]) == (1, 0)
    assert charged(request_id) == cost
    [txn] = LedgerTransaction.objects.filter(request_id=request_id)
    assert (txn.kind, txn.is_late) == ("usage", True)
    assert (hold.state, hold.settled_amount, hold.transaction_id) == ("expired", cost, txn.pk)
    record = UsageRecord.objects.get(request_id=request_id)
    assert (record.estimated, record.outcome, record.cost) == (True, "gateway_lost", cost)
    assert record.output_tokens == checkpoint.output_tokens
    item = ReconciliationItem.objects.get(request_id=request_id)
    assert (item.kind, item.status, item.cost, item.transaction_id) == (
        "expired_hold", "resolved", cost, txn.pk
    )
    assert item.details["charged_from_checkpoint"] is True
    assert "checkpoint" in item.resolution_memo
    assert balance(world.account) == (Decimal("10") - cost, 0)
    assert_clean(world.account)
