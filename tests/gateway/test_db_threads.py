"""The pipeline's database threads keep their pooled connection between steps (no checkout and
health-check round trip per hold or settle) and give back one that failed or grew old."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import OperationalError, connection
from django.test import override_settings

from gateway.pipeline import _db_step, _on_live_connection

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def db_thread() -> Iterator[ThreadPoolExecutor]:
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


def _terminate(pid: int) -> None:
    """The database drops that backend, as a restart or failover would (from outside it)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])


def _retried_step() -> tuple[int, int]:
    """A step through _on_live_connection: the backend it ended on, and how many tries."""
    tries = []

    def work() -> int:
        tries.append(1)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return int(cursor.fetchone()[0])

    with _db_step():
        pid = _on_live_connection(work)
    return pid, len(tries)


def test_a_kept_connection_the_database_dropped_while_idle_is_replaced_and_the_step_retried(
    db_thread: ThreadPoolExecutor,
) -> None:
    first, _ = db_thread.submit(_step).result()
    _terminate(first)
    pid, tries = db_thread.submit(_retried_step).result()
    assert (tries, pid != first) == (2, True)
    again, tries = db_thread.submit(_retried_step).result()
    assert (again, tries) == (pid, 1)  # the fresh connection is kept


def _failing_step(statement: str) -> int:
    tries = []

    def work() -> None:
        tries.append(1)
        with connection.cursor() as cursor:
            cursor.execute(statement)

    with _db_step(), contextlib.suppress(OperationalError):
        _on_live_connection(work)
    return len(tries)


def test_an_error_on_a_live_connection_is_not_retried(db_thread: ThreadPoolExecutor) -> None:
    db_thread.submit(_step).result()
    # A statement timeout (a lock timeout alike) is an OperationalError on a healthy connection.
    timed_out = "SET LOCAL statement_timeout = 10; SELECT pg_sleep(1)"
    assert db_thread.submit(_failing_step, timed_out).result() == 1


def test_a_fresh_connection_that_fails_is_not_retried(db_thread: ThreadPoolExecutor) -> None:
    # Nothing kept: the failure is not an idle connection's, so it is the step's own.
    dropped = "SELECT pg_terminate_backend(pg_backend_pid())"
    assert db_thread.submit(_failing_step, dropped).result() == 1
