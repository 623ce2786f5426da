"""Money moves for the payments tests, through the real services."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from billing.services.accounts import credit_post
from billing.services.holds import hold_place, hold_settle
from billing.services.keys import IssuedKey


def spend(issued: IssuedKey, cost: str, *, now: datetime) -> None:
    """One request: hold its cost, then settle it."""
    request_id = f"req-{uuid.uuid4().hex}"
    hold_place(api_key=issued.api_key, request_id=request_id, amount=Decimal(cost), now=now)
    hold_settle(request_id=request_id, cost=Decimal(cost), now=now)


def grant(account_id: int, amount: str, *, now: datetime) -> None:
    credit_post(kind="grant", account_id=account_id, amount=Decimal(amount), memo="test",
                idempotency_key=f"grant:{uuid.uuid4().hex}", now=now)
