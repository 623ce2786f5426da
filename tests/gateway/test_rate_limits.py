"""Per-key rate limits (gateway/ratelimit.py) over real HTTP against the live gateway, whose
windows live in the test Redis (bin/test's REDIS_URL): requests per minute refused with a
provider-shaped 429 and retry-after before anything is held, billed tokens counted when a
request settles, OpenAI's x-ratelimit headers, and the store shared by two gateway processes.

Time is not waited for: each test uses a fresh key (its own windows), and a window is moved
on by clearing it from the test process through the same store (ratelimit_clear)."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal

import httpx
import pytest
from django.conf import settings
from django.test import override_settings
from django.utils import timezone
from prometheus_client import REGISTRY

from billing.models import SYSTEM_ACCOUNT_IDS, Account, Hold, LedgerTransaction, UsageRecord
from billing.services.keys import api_key_update
from gateway import ratelimit
from gateway.errors import GatewayError
from gateway.ratelimit import (
    KeyRateLimits,
    duration,
    ratelimit_check,
    ratelimit_clear,
    tokens_below_in,
    tokens_counted,
)
from tests.factories import make_key
from tests.gateway.conftest import start_gateway, stop_gateway
from tests.gateway.ledger import assert_clean
from tests.workers import wait_until

RATELIMIT_HEADERS = {
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
}


def limited_key(world, **limits):  # type: ignore[no-untyped-def]
    return make_key(account=world.account, now=timezone.now(), **limits)


def chat(gateway_url: str, secret: str, model: str, text: str = "hi", **body):  # type: ignore[no-untyped-def]
    return httpx.post(
        f"{gateway_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {secret}"},
        json={"model": model, "messages": [{"role": "user", "content": text}], **body},
        timeout=30,
    )


def assert_no_trace(request_id: str) -> None:
    assert not Hold.objects.filter(request_id=request_id).exists()
    assert not LedgerTransaction.objects.filter(request_id=request_id).exists()
    assert not UsageRecord.objects.filter(request_id=request_id).exists()


def test_rpm_refuses_the_request_beyond_it_with_a_429_and_leaves_no_trace(world):
    issued = limited_key(world, rpm=2)
    answers = [chat(world.gateway.url, issued.secret, world.openai_model) for _ in range(3)]

    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert [answer.headers["x-ratelimit-remaining-requests"] for answer in answers] == [
        "1",
        "0",
        "0",
    ]
    for answer in answers:
        assert answer.headers["x-ratelimit-limit-requests"] == "2"
        assert answer.headers["x-ratelimit-reset-requests"].endswith("s")
        assert "x-ratelimit-limit-tokens" not in answer.headers  # the key has no tpm
    refused = answers[2]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert "requests" in error["message"]
    assert_no_trace(refused.headers["x-request-id"])
    assert UsageRecord.objects.filter(api_key=issued.api_key).count() == 2
    assert_clean(world.account)


def test_anthropic_gets_its_own_rate_limit_error_shape(world):
    issued = limited_key(world, rpm=1)
    claude = world.anthropic(issued.secret)
    claude.messages.create(
        model=world.anthropic_model, max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    )
    refused = httpx.post(
        f"{world.gateway.url}/v1/messages",
        headers={"x-api-key": issued.secret, "anthropic-version": "2023-06-01"},
        json={
            "model": world.anthropic_model,
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}],
        },
        timeout=30,
    )
    assert refused.status_code == 429
    assert refused.json() == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": refused.json()["error"]["message"]},
    }
    assert "requests" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert_no_trace(refused.headers["x-request-id"])
    assert_clean(world.account)


def test_tpm_counts_a_request_s_billed_tokens_when_it_settles(world):
    issued = limited_key(world, tpm=50)
    first = chat(world.gateway.url, issued.secret, world.openai_model, "[mock:tokens=80]")
    assert first.status_code == 200, first.text
    usage = first.json()["usage"]
    billed = usage["prompt_tokens"] + usage["completion_tokens"]
    assert billed > 50
    assert first.headers["x-ratelimit-limit-tokens"] == "50"
    # The answer is sent after its settle, which counted its tokens.
    assert first.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "x-ratelimit-limit-requests" not in first.headers  # the key has no rpm

    refused = chat(world.gateway.url, issued.secret, world.openai_model)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "tokens")
    assert f"Used {billed}" in error["message"]
    assert "tokens" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert_no_trace(refused.headers["x-request-id"])
    assert_clean(world.account)


def test_a_stream_s_tokens_count_once_it_has_settled(world):
    issued = limited_key(world, rpm=10, tpm=30)
    with httpx.stream(
        "POST",
        f"{world.gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {issued.secret}"},
        json={
            "model": world.openai_model,
            "messages": [{"role": "user", "content": "[mock:tokens=40]"}],
            "stream": True,
        },
        timeout=30,
    ) as streamed:
        # Sent before the stream: nothing of it counted yet.
        assert streamed.headers["x-ratelimit-remaining-tokens"] == "30"
        assert streamed.headers["x-ratelimit-remaining-requests"] == "9"
        assert set(streamed.headers) >= RATELIMIT_HEADERS
        body = streamed.read()
    assert body.rstrip().endswith(b"data: [DONE]")

    refused = chat(world.gateway.url, issued.secret, world.openai_model)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert_clean(world.account)


def test_an_error_after_the_check_carries_the_ratelimit_headers(world):
    issued = limited_key(world, rpm=5, tpm=1000)
    failed = chat(world.gateway.url, issued.secret, world.openai_model, "[mock:status=500]")
    assert failed.status_code == 502
    assert set(failed.headers) >= RATELIMIT_HEADERS
    assert failed.headers["x-ratelimit-remaining-requests"] == "4"
    assert_clean(world.account)


def test_a_key_without_limits_gets_no_ratelimit_headers(world):
    answer = chat(world.gateway.url, world.key, world.openai_model)
    assert answer.status_code == 200
    assert not RATELIMIT_HEADERS & set(answer.headers)


needs_redis = pytest.mark.skipif(
    not settings.REDIS_URL, reason="the store is shared across processes only through Redis"
)


@needs_redis
def test_a_cleared_window_admits_the_key_again(world):
    issued = limited_key(world, rpm=1)
    assert chat(world.gateway.url, issued.secret, world.openai_model).status_code == 200
    assert chat(world.gateway.url, issued.secret, world.openai_model).status_code == 429
    asyncio.run(ratelimit_clear(api_key=issued.api_key))  # the minute has passed, as it were
    again = chat(world.gateway.url, issued.secret, world.openai_model)
    assert again.status_code == 200
    assert again.headers["x-ratelimit-remaining-requests"] == "0"


@needs_redis
def test_two_gateway_processes_share_a_key_s_limits_through_redis(world, tmp_path):
    # The second one's key cache expires at once: it sees a changed limit on the next request.
    second = start_gateway(tmp_path / "second.log", GATEWAY_KEY_CACHE_TTL_SECONDS="0.001")
    try:
        issued = limited_key(world, rpm=2)
        answers = [
            chat(url, issued.secret, world.openai_model)
            for url in (world.gateway.url, second.url, second.url)
        ]
        api_key_update(
            key_id=issued.api_key.pk, account_id=world.account.pk, now=timezone.now(), rpm=3
        )
        raised = chat(second.url, issued.secret, world.openai_model)
    finally:
        stop_gateway(second)
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert answers[1].headers["x-ratelimit-remaining-requests"] == "0"
    # The window kept its two requests: the third of the new three is admitted.
    assert raised.status_code == 200
    assert (
        raised.headers["x-ratelimit-limit-requests"],
        raised.headers["x-ratelimit-remaining-requests"],
    ) == ("3", "0")
    assert_clean(world.account)


def _unavailable_count(step: str) -> float:
    value = REGISTRY.get_sample_value("gateway_ratelimit_unavailable_total", {"step": step})
    return value or 0.0


@pytest.mark.django_db
def test_an_unreachable_store_lets_requests_through_logged_and_counted(
    account, monkeypatch, caplog
):
    issued = make_key(account=account, now=timezone.now(), rpm=1, tpm=10)
    monkeypatch.setattr(ratelimit, "_unavailable_until", 0.0)
    before = _unavailable_count("check")
    with (
        override_settings(REDIS_URL="redis://127.0.0.1:1/0"),  # nothing listens on port 1
        caplog.at_level(logging.WARNING, logger="gateway.ratelimit"),
    ):
        admitted = asyncio.run(ratelimit_check(api_key=issued.api_key))
        # While the store rests, the next request does not wait for it.
        rested = asyncio.run(ratelimit_check(api_key=issued.api_key))
    assert admitted is None and rested is None  # no limits applied, no headers
    assert _unavailable_count("check") == before + 1
    assert "rate-limit store unavailable" in caplog.text


@pytest.mark.django_db
def test_without_redis_the_limits_hold_in_the_process(account):
    issued = make_key(account=account, now=timezone.now(), rpm=1, tpm=10)

    async def two_requests_and_tokens() -> tuple[KeyRateLimits | None, int, str]:
        first = await ratelimit_check(api_key=issued.api_key)
        await ratelimit.ratelimit_count(first, tokens=25)
        try:
            await ratelimit_check(api_key=issued.api_key)
        except GatewayError as refused:
            return first, refused.status, refused.type
        raise AssertionError("the second request was admitted")

    with override_settings(REDIS_URL=""):
        first, status, limit = asyncio.run(two_requests_and_tokens())
    assert first is not None and first.headers()["x-ratelimit-remaining-tokens"] == "0"
    assert (status, limit) == (429, "requests")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0ms"),
        (0.02, "20ms"),
        (1, "1s"),
        (17.4681, "17.468s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (79.2, "1m19.2s"),
    ],
)
def test_reset_durations_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text


def test_the_token_window_fades_the_previous_minute_out():
    # 90 tokens last minute with 30 s of it still in the window, 20 this minute (80 s to live).
    window = (90, 30.0, 20, 80.0)
    assert tokens_counted(window) == 65  # 90 x 30/60 + 20
    assert tokens_below_in(window, limit=65) == 1
    assert tokens_below_in(window, limit=50) == 11  # 90 x (30 - t)/60 + 20 < 50: t > 10
    # This minute ends in 20 s: last minute's tokens are gone, and this minute's 20 fade out
    # over the next one.
    assert tokens_below_in(window, limit=30) == 20
    assert tokens_counted(window, after=21) == 19
    assert tokens_below_in(window, limit=20) == 21
    assert tokens_below_in(window, limit=1000) == 0


def test_a_refusal_tells_how_long_to_wait():
    limits = KeyRateLimits(name="k", rpm=3, tpm=None, requests_reset=4.2)
    error = limits.refusal("requests")
    assert error.status == 429
    assert error.headers["retry-after"] == "5"
    assert "Limit 3" in error.message and "4.2s" in error.message
    assert Decimal(error.headers["x-ratelimit-limit-requests"]) == 3


def test_a_settle_handed_to_the_retry_task_still_counts_its_tokens(
    world, running_worker, worker_queue, row_locker, tmp_path
):
    # As in test_settle_outage: the revenue account's row is locked, so the gateway's settle
    # gives up after 300 ms and hands the settle (and its usage) to the worker.
    gateway = start_gateway(
        tmp_path / "gateway.log",
        PGOPTIONS="-c lock_timeout=300",
        CELERY_TASK_DEFAULT_QUEUE=worker_queue,
    )
    issued = limited_key(world, tpm=50)
    try:
        row_locker.lock_account(SYSTEM_ACCOUNT_IDS[Account.Kind.REVENUE])
        handed_off = chat(gateway.url, issued.secret, world.openai_model, "[mock:tokens=80]")
        assert handed_off.status_code == 200
        assert "handing it to the retry task" in gateway.log_text()
        assert handed_off.headers["x-ratelimit-remaining-tokens"] == "0"
        refused = chat(gateway.url, issued.secret, world.openai_model)
        row_locker.release()
        request_id = handed_off.headers["x-request-id"]
        wait_until(
            lambda: Hold.objects.get(request_id=request_id).state == Hold.State.SETTLED,
            timeout=30,
        )
    finally:
        stop_gateway(gateway)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert_no_trace(refused.headers["x-request-id"])
    assert_clean(world.account)
