"""Fixtures for reconciliation: a short lock timeout, and a way to run code in a fresh process
with a broken dependency. The Celery worker, the row locker and the capturing Sentry transport
come from tests/conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from django.db import connection

from tests.workers import ROOT


@pytest.fixture
def short_lock_timeout(transactional_db: None) -> Iterator[None]:
    """This process' settles give up on a row lock after 200 ms (an injected DB failure)."""
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '200ms'")
    yield
    with connection.cursor() as cursor:
        cursor.execute("RESET lock_timeout")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh Django process with `env` overriding this one's environment."""
    full_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **env}
    prelude = "import django; django.setup()\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
