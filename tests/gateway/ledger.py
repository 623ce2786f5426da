"""Ledger assertions shared by the gateway tests: what a request was charged, to the digit."""

from __future__ import annotations

import time
from decimal import Decimal

from billing.models import Account, Hold, LedgerLeg, LedgerTransaction, UsageRecord
from billing.pricing import Price, Usage
from billing.selectors import ledger_audit
from tests.gateway.conftest import (
    CACHE_WRITE_PER_MTOK,
    CACHED_INPUT_PER_MTOK,
    INPUT_PER_MTOK,
    OUTPUT_PER_MTOK,
    REASONING_PER_MTOK,
)

PRICE = Price(
    input_per_mtok=INPUT_PER_MTOK,
    output_per_mtok=OUTPUT_PER_MTOK,
    cached_input_per_mtok=CACHED_INPUT_PER_MTOK,
    cache_write_per_mtok=CACHE_WRITE_PER_MTOK,
    reasoning_per_mtok=REASONING_PER_MTOK,
)


def expected_cost(usage: Usage) -> Decimal:
    return PRICE.cost(usage)


def charged(request_id: str) -> Decimal:
    """What the customer was charged for the request (0 if nothing was posted)."""
    txns = list(LedgerTransaction.objects.filter(request_id=request_id, kind="usage"))
    assert len(txns) <= 1, "a request must be charged at most once"
    if not txns:
        return Decimal(0)
    legs = {leg.account_id: leg.amount for leg in LedgerLeg.objects.filter(transaction=txns[0])}
    assert sum(legs.values()) == 0
    return -min(legs.values())


def balance(account: Account) -> tuple[Decimal, Decimal]:
    account.refresh_from_db()
    return account.balance, account.held


def assert_clean(account: Account) -> None:
    """No hold left open and the cached balance equals the ledger."""
    assert not Hold.objects.filter(account=account, state=Hold.State.ACTIVE).exists()
    report = ledger_audit()
    assert report.clean, report.as_json()


def wait_for_hold_resolution(request_id: str, timeout: float = 10.0) -> Hold:
    """Streams settle after the client stopped reading; give the server a moment."""
    deadline = time.monotonic() + timeout
    while True:
        hold = Hold.objects.filter(request_id=request_id).first()
        if hold is not None and hold.state != Hold.State.ACTIVE:
            return hold
        if time.monotonic() > deadline:
            raise AssertionError(f"hold {request_id} still {hold and hold.state}")
        time.sleep(0.05)


def usage_record(request_id: str) -> UsageRecord:
    return UsageRecord.objects.get(request_id=request_id)
