"""Fixtures for reconciliation: a capturing Sentry transport, a short lock timeout, and a way
to run code in a fresh process with a broken dependency. The Celery worker and the row locker
come from tests/workers.py (registered in tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from django.db import connection
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from tests.workers import ROOT


@pytest.fixture
def short_lock_timeout(transactional_db: None) -> Iterator[None]:
    """This process' settles give up on a row lock after 200 ms (an injected DB failure)."""
    with connection.cursor() as cursor:
        cursor.execute("SET lock_timeout = '200ms'")
    yield
    with connection.cursor() as cursor:
        cursor.execute("RESET lock_timeout")


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
