"""Shared fixtures. Tests run against PostgreSQL (bin/test sets DATABASE_URL)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import connection

from tests.factories import make_account, make_key
from tests.workers import celery_worker, row_locker, running_worker, worker_queue

# Registered here, once, for every test directory (see tests/workers.py).
__all__ = ["celery_worker", "row_locker", "running_worker", "worker_queue"]


@pytest.fixture
def now() -> datetime:
    return datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


@pytest.fixture
def postgres_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL")


@pytest.fixture
def account(db, now):  # type: ignore[no-untyped-def]
    return make_account(credits=Decimal("10"), now=now)


@pytest.fixture
def issued_key(account, now):  # type: ignore[no-untyped-def]
    return make_key(account=account, now=now)
