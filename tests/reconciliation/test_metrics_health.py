"""/metrics (one process and several), the Sentry scrubber, /healthz and /readyz."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
import sentry_sdk
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from billing.services.holds import hold_place
from reconciliation.services.sweeps import holds_expire_and_queue
from tests.reconciliation.conftest import run_python
from tests.workers import database_url_of_tests


def _sample(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return sample.value
    return 0.0


@pytest.mark.django_db
def test_metrics_endpoint_exposes_billing_metrics(client):
    response = client.get("/metrics")

    assert response.status_code == 200
    text = response.content.decode()
    for name in (
        "billing_settlements_total",
        "billing_settlement_retries_total",
        "billing_missed_deductions_total",
        "billing_missed_deductions_usd_total",
        "billing_holds_total",
        "gateway_stream_duration_seconds",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text


def test_expiry_sweep_moves_the_expired_holds_counter(client, issued_key, now):
    expired = {"event": "expired"}
    before = _sample(client.get("/metrics").content.decode(), "billing_holds_total", expired)
    for n in range(3):
        hold_place(
            api_key=issued_key.api_key,
            request_id=f"r{n}",
            amount=Decimal("1"),
            now=now,
            ttl_seconds=60,
        )

    holds_expire_and_queue(now=now + timedelta(minutes=1))

    after = _sample(client.get("/metrics").content.decode(), "billing_holds_total", expired)
    assert after == before + 3


INCREMENT = """
from billing.metrics import MISSED_DEDUCTIONS
MISSED_DEDUCTIONS.inc()
"""
SCRAPE = """
from django.test import Client
print(Client().get("/metrics").content.decode())
"""


def test_metrics_sum_counters_over_processes_in_multiprocess_mode(tmp_path):
    # Two "workers" count, then a third process (a web worker) serves /metrics for all.
    for _ in range(2):
        done = run_python(INCREMENT, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
        assert done.returncode == 0, done.stderr

    scraped = run_python(SCRAPE, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))

    assert scraped.returncode == 0, scraped.stderr
    assert _sample(scraped.stdout, "billing_missed_deductions_total") == 2.0


# --- Sentry -----------------------------------------------------------------------------------

SECRET = "sk-gw-AbCdEfGh12_-ZZtopSECRETsecret0123456789abcdef"
PROMPT = "my secret prompt about the merger"
COMPLETION = "the completion text nobody may see"


def test_scrubber_removes_keys_headers_prompts_and_completions(sentry_events):
    sentry_sdk.capture_event(
        {
            "message": f"upstream refused key {SECRET}",
            "level": "error",
            "request": {
                "url": "https://gw.example/v1/chat/completions",
                "method": "POST",
                "headers": {"Authorization": f"Bearer {SECRET}", "X-Api-Key": SECRET},
                "data": {"model": "m", "messages": [{"role": "user", "content": PROMPT}]},
            },
            "extra": {
                "body": {"prompt": PROMPT},
                "response": {"choices": [{"message": {"content": COMPLETION}}]},
                "note": f"key was {SECRET}",
            },
        }
    )

    assert len(sentry_events) == 1
    sent = json.dumps(sentry_events[0])
    assert SECRET not in sent
    assert SECRET.removeprefix("sk-gw-") not in sent
    assert PROMPT not in sent
    assert COMPLETION not in sent
    assert sentry_events[0]["request"]["url"] == "https://gw.example/v1/chat/completions"


def test_scrubber_masks_a_key_quoted_in_an_exception(sentry_events):
    try:
        raise ValueError(f"bad key {SECRET}")
    except ValueError:
        sentry_sdk.capture_exception()

    assert len(sentry_events) == 1
    sent = json.dumps(sentry_events[0])
    assert SECRET not in sent
    assert "bad key [redacted]" in sent


# --- probes -----------------------------------------------------------------------------------


def test_healthz_answers_without_checking_dependencies(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_is_ready_when_database_and_broker_answer(client):
    response = client.get("/readyz")

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version_num")  # e.g. 180001 for PostgreSQL 18.1
        version = int(cursor.fetchone()[0])
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "broker": "ok"},
        "database": "postgresql",
        "database_version": f"{version // 10000}.{version % 10000}",
    }


READYZ = """
from django.test import Client
response = Client().get("/readyz")
print(response.status_code, response.content.decode())
"""


def _readyz_in_a_fresh_process(**env: str) -> tuple[int, dict[str, str]]:
    done = run_python(READYZ, **env)
    assert done.returncode == 0, done.stderr
    status, body = done.stdout.strip().split(" ", 1)
    return int(status), json.loads(body)["checks"]


# Port 1 refuses connections: the dependency is down for a fresh process pointed at it.


def test_readyz_is_unavailable_when_the_database_is_down():
    status, checks = _readyz_in_a_fresh_process(
        DATABASE_URL="postgres://postgres@127.0.0.1:1/billing"
    )

    assert status == 503
    assert checks["database"] in {"OperationalError", "PoolTimeout"}
    assert checks["broker"] == "ok"


def test_readyz_is_unavailable_when_the_broker_is_down(django_db_setup):
    status, checks = _readyz_in_a_fresh_process(
        DATABASE_URL=database_url_of_tests(), REDIS_URL="redis://127.0.0.1:1/0"
    )

    assert status == 503
    assert checks["database"] == "ok"
    assert checks["broker"] != "ok"
