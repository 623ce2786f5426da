"""Shared fixtures. Tests run against PostgreSQL (bin/test sets DATABASE_URL)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from tests.factories import make_account, make_key
from tests.workers import celery_worker, row_locker, running_worker, worker_queue

# Registered here, once, for every test directory (see tests/workers.py).
__all__ = ["celery_worker", "row_locker", "running_worker", "worker_queue"]


@pytest.fixture
def now() -> datetime:
    return datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture
def account(db, now):  # type: ignore[no-untyped-def]
    return make_account(credits=Decimal("10"), now=now)


@pytest.fixture
def issued_key(account, now):  # type: ignore[no-untyped-def]
    return make_key(account=account, now=now)


class CapturingTransport(Transport):
    """A Sentry transport that keeps events in memory instead of sending them."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        for item in envelope.items:
            if item.type in {"event", "transaction"} and item.payload.json is not None:
                self.events.append(item.payload.json)


@pytest.fixture
def sentry_events() -> Iterator[list[dict[str, Any]]]:
    """The production Sentry setup (config.sentry), with events captured in memory."""
    from config.sentry import sentry_init

    transport = CapturingTransport()
    sentry_init(dsn="https://public@sentry.invalid/1", transport=transport)
    yield transport.events
    sentry_sdk.get_client().close()
    sentry_sdk.init()  # back to a client that sends nothing
