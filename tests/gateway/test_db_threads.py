"""The pipeline's database threads keep their pooled connection between steps (no checkout and
health-check round trip per hold or settle) and give back one that failed or grew old."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import OperationalError, connection
from django.test import override_settings

from gateway.pipeline import _db_step

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def db_thread(postgres_only: None) -> Iterator[ThreadPoolExecutor]:
    thread = ThreadPoolExecutor(1)
    yield thread
    # Its kept connection back to the pool, or the test database could not be dropped.
    thread.submit(lambda: connection.close()).result()
    thread.shutdown()


def _step(statement: str = "SELECT pg_backend_pid()") -> tuple[int, bool]:
    """One step: the backend it ran on, and whether the thread still holds a connection."""
    with _db_step():
        with connection.cursor() as cursor:
            cursor.execute(statement)
            (pid,) = cursor.fetchone()
    return pid, connection.connection is not None


def test_a_step_keeps_the_threads_connection_for_the_next(db_thread: ThreadPoolExecutor) -> None:
    first, kept = db_thread.submit(_step).result()
    again, still_kept = db_thread.submit(_step).result()
    assert kept and still_kept
    assert again == first


def test_a_connection_that_failed_is_given_back_and_replaced(
    db_thread: ThreadPoolExecutor,
) -> None:
    first, _ = db_thread.submit(_step).result()
    with pytest.raises(OperationalError):
        db_thread.submit(_step, "SELECT pg_terminate_backend(pg_backend_pid())").result()
    assert db_thread.submit(lambda: connection.connection is None).result()
    replaced, kept = db_thread.submit(_step).result()
    assert replaced != first and kept


def test_a_connection_kept_past_the_pools_lifetime_is_given_back(
    db_thread: ThreadPoolExecutor,
) -> None:
    with override_settings(DB_CONNECTION_MAX_LIFETIME_SECONDS=-1):
        _, kept = db_thread.submit(_step).result()
    assert not kept
