"""A real Celery worker for tests, and a row lock held from outside (the fault injection).

The worker runs `celery -A config worker -P solo` against the test database and Redis, on a
queue of its own (so it never takes another test run's tasks), with:
- BILLING_SETTLE_RETRY_BACKOFF_MAX=1: retries every second at most instead of every minute;
- CELERY_VISIBILITY_TIMEOUT=5: a killed worker's task comes back after 5 s, not an hour;
- PGOPTIONS lock_timeout=2s: a settle blocked by a row lock fails like a database error.

The fixtures are registered once, by tests/conftest.py: a session fixture defined (or imported)
in two conftest files or modules would start two workers on the same queue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import connection

from config.celery import app as celery_app

ROOT = Path(__file__).resolve().parents[1]
WORKER_LOCK_TIMEOUT_MS = 2000
WORKER_APP_NAME = "reconciliation-test-worker"


def database_url_of_tests() -> str:
    """The URL of pytest-django's test database (valid once django_db_setup has run)."""
    db = settings.DATABASES["default"]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class CeleryWorker:
    def __init__(self, *, queue: str, env: dict[str, str], log_dir: Path) -> None:
        self.queue = queue
        self.env = env
        self.log_dir = log_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = log_dir / "worker-0.log"
        self.starts = 0

    def start(self) -> None:
        self.log_path = self.log_dir / f"worker-{self.starts}.log"
        self.starts += 1
        self.process = subprocess.Popen(
            [
                str(ROOT / ".venv/bin/celery"),
                "-A",
                "config",
                "worker",
                "-P",
                "solo",
                "-Q",
                self.queue,
                "-n",
                f"{self.queue}-{self.starts}@%h",
                "-l",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                f"--logfile={self.log_path}",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: "ready." in self.log(), timeout=30)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no ack, no requeue; Redis must hand the task back."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def worker_queue() -> Iterator[str]:
    """Point this process' publishing at a queue only the test worker consumes."""
    queue = f"reconciliation-test-{os.getpid()}"
    previous = celery_app.conf.task_default_queue
    celery_app.conf.task_default_queue = queue
    celery_app.amqp.__dict__.pop("queues", None)  # rebuilt lazily with the new default
    yield queue
    celery_app.conf.task_default_queue = previous
    celery_app.amqp.__dict__.pop("queues", None)


@pytest.fixture(scope="session")
def celery_worker(
    django_db_setup: None, worker_queue: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CeleryWorker]:
    if connection.vendor != "postgresql" or not settings.CELERY_BROKER_URL.startswith("redis"):
        pytest.skip("needs PostgreSQL and Redis (run through bin/test)")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PROMETHEUS_MULTIPROC_DIR", "SENTRY_DSN", "CELERY_TASK_ALWAYS_EAGER"}
    }
    env |= {
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url_of_tests(),
        "REDIS_URL": settings.CELERY_BROKER_URL,
        "CELERY_TASK_DEFAULT_QUEUE": worker_queue,
        "CELERY_VISIBILITY_TIMEOUT": "5",
        "BILLING_SETTLE_RETRY_BACKOFF_MAX": "1",
        "PGOPTIONS": f"-c lock_timeout={WORKER_LOCK_TIMEOUT_MS}",
        "PGAPPNAME": WORKER_APP_NAME,
        "PYTHONUNBUFFERED": "1",
    }
    worker = CeleryWorker(queue=worker_queue, env=env, log_dir=tmp_path_factory.mktemp("celery"))
    worker.start()
    yield worker
    # Stopped before pytest-django drops the test database the worker is connected to.
    worker.stop()
    _worker_sessions_end()


def _worker_sessions_end() -> None:
    """Wait out the worker's database sessions (a killed worker's may linger), or the test
    database cannot be dropped."""
    with psycopg.connect(database_url_of_tests(), autocommit=True) as conn:

        def remaining() -> int:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s",
                [WORKER_APP_NAME],
            ).fetchone()
            return int(row[0]) if row else 0

        wait_until(lambda: remaining() == 0, timeout=10)


@pytest.fixture
def running_worker(celery_worker: CeleryWorker) -> CeleryWorker:
    """The session worker, restarted if a previous test killed it."""
    if celery_worker.process is None:
        celery_worker.start()
    return celery_worker


class RowLocker:
    """Holds row locks from a separate connection, like a long transaction elsewhere would."""

    def __init__(self) -> None:
        self.conn = psycopg.connect(database_url_of_tests())

    def hold_lock(self, request_id: str) -> None:
        self.conn.execute(
            "SELECT id FROM billing_hold WHERE request_id = %s FOR UPDATE", [request_id]
        ).fetchone()

    def lock_account(self, account_id: int) -> None:
        self.conn.execute(
            "SELECT id FROM billing_account WHERE id = %s FOR UPDATE", [account_id]
        ).fetchone()

    def release(self) -> None:
        self.conn.rollback()

    def waiting_backends(self) -> int:
        """Sessions on the test database currently blocked on a lock."""
        with psycopg.connect(database_url_of_tests(), autocommit=True) as probe:
            row = probe.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def row_locker(transactional_db: None) -> Iterator[RowLocker]:
    locker = RowLocker()
    yield locker
    locker.close()
