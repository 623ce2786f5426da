"""A database outage while requests are in flight: the upstream's work is answered at once,
not after the pool's timeouts. A settle the database refuses, drops or never answers is handed
to the retry task within the step deadline, and the real worker charges it exactly once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import pytest
from django.conf import settings

from bench.tcp_proxy import TcpProxy
from billing.models import Hold, LedgerTransaction
from tests.gateway.conftest import start_gateway, stop_gateway
from tests.gateway.ledger import assert_clean, charged
from tests.workers import wait_until

STEP_TIMEOUT = 2  # GATEWAY_DB_STEP_TIMEOUT_SECONDS for these gateways
# Far below the 90 s the old fallbacks took, far above the deadline on a loaded machine.
ANSWERED_WITHIN = 20


@pytest.fixture
def db_proxy() -> Iterator[TcpProxy]:
    db = settings.DATABASES["default"]
    proxy = TcpProxy((db.get("HOST") or "127.0.0.1", int(db.get("PORT") or 5432)))
    yield proxy
    proxy.close()


def _gateway_through(proxy: TcpProxy, tmp_path, queue: str):  # type: ignore[no-untyped-def]
    db = settings.DATABASES["default"]
    user = db.get("USER") or "postgres"
    return start_gateway(
        tmp_path / "gateway.log",
        DATABASE_URL=f"postgres://{user}@127.0.0.1:{proxy.port}/{db['NAME']}",
        DB_CONNECT_TIMEOUT_SECONDS="1",
        GATEWAY_DB_STEP_TIMEOUT_SECONDS=str(STEP_TIMEOUT),
        CELERY_TASK_DEFAULT_QUEUE=queue,
    )


@pytest.mark.parametrize("outage", ["cut", "stall"])
def test_a_stream_whose_settle_meets_an_outage_ends_at_once_and_is_charged_once_later(
    world, running_worker, worker_queue, db_proxy, tmp_path, outage
):
    gateway = _gateway_through(db_proxy, tmp_path, worker_queue)
    body = {
        "model": world.openai_model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi [mock:tokens=6]"}],
    }
    headers = {"Authorization": f"Bearer {world.key}"}
    try:
        with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as client:
            client.post("/v1/chat/completions", json={**body, "stream": False}).raise_for_status()
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                request_id = response.headers["x-request-id"]
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")  # relayed: the hold was placed
                getattr(db_proxy, outage)()
                started = time.monotonic()
                rest = list(lines)
                elapsed = time.monotonic() - started
        assert elapsed < ANSWERED_WITHIN
        assert "data: [DONE]" in rest
        assert "handing it to the retry task" in gateway.log_text()
        db_proxy.restore()
        # The worker reaches the database directly: the retry lands, once.
        wait_until(lambda: charged(request_id) > 0, timeout=60)
    finally:
        stop_gateway(gateway)
    assert LedgerTransaction.objects.filter(request_id=request_id).count() == 1
    assert Hold.objects.get(request_id=request_id).state == Hold.State.SETTLED
    usage_line = next(line for line in rest if '"cost"' in line)
    assert charged(request_id) == Decimal(usage_line.split('"cost":"')[1].split('"')[0])
    assert_clean(world.account)


def test_ten_requests_cut_off_from_the_database_are_all_answered_within_the_deadline(
    world, running_worker, worker_queue, db_proxy, tmp_path
):
    gateway = _gateway_through(db_proxy, tmp_path, worker_queue)
    body = {
        "model": world.openai_model,
        "messages": [{"role": "user", "content": "hi [mock:tokens=4] [mock:delay_ms=300]"}],
    }
    headers = {"Authorization": f"Bearer {world.key}"}
    try:
        with httpx.Client(base_url=gateway.url, headers=headers, timeout=120) as client:
            client.post("/v1/chat/completions", json=body).raise_for_status()  # warm caches

            def ask() -> tuple[int, str, float]:
                response = client.post("/v1/chat/completions", json=body)
                return response.status_code, response.headers["x-request-id"], time.monotonic()

            with ThreadPoolExecutor(10) as pool:
                futures = [pool.submit(ask) for _ in range(10)]
                # Once every hold is placed, the database goes away under the upstream calls.
                wait_until(
                    lambda: Hold.objects.filter(
                        account=world.account, state=Hold.State.ACTIVE
                    ).count()
                    == 10,
                    timeout=30,
                    interval=0.02,
                )
                db_proxy.cut()
                cut_at = time.monotonic()
                answers = [future.result() for future in futures]
        assert [status for status, _, _ in answers] == [200] * 10
        assert max(answered for _, _, answered in answers) - cut_at < ANSWERED_WITHIN
        db_proxy.restore()
        request_ids = [request_id for _, request_id, _ in answers]
        wait_until(lambda: all(charged(rid) > 0 for rid in request_ids), timeout=90)
    finally:
        stop_gateway(gateway)
    for request_id in request_ids:
        assert LedgerTransaction.objects.filter(request_id=request_id).count() == 1
    assert not Hold.objects.filter(account=world.account, state=Hold.State.ACTIVE).exists()
    assert_clean(world.account)
