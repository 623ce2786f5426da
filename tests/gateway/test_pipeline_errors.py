"""An unexpected error of ours after the hold was placed, before anything reached the client:
the whole hold goes back at once (outcome gateway_error), never left for the sweeper."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from billing.models import Account, Hold, UsageRecord
from billing.pricing import Price
from billing.services.holds import hold_place
from billing.sql import sql_async_pool_close
from gateway import pipeline
from gateway.http import CompletionRequest
from gateway.upstreams.openai import OpenAIChat
from tests.factories import make_account, make_key

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def settle_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The pipeline's settle threads, as one thread whose kept connection the test closes."""
    thread = ThreadPoolExecutor(1)
    monkeypatch.setattr(pipeline, "_settle_threads", thread)
    yield
    thread.submit(lambda: connection.close()).result()
    thread.shutdown()


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a bug of ours")


def _held(*, stream: bool) -> pipeline.BilledRequest:
    """A request whose hold (0.50 of 10.00) is placed, as the hold stage leaves it."""
    now = timezone.now()
    account = make_account(credits=Decimal("10"), now=now)
    key = make_key(account=account, now=now).api_key
    parsed = OpenAIChat.parse(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    )
    hold_place(api_key=key, request_id="req-1", amount=Decimal("0.5"), now=now)
    return pipeline.BilledRequest(
        request_id="req-1",
        account_id=account.pk,
        adapter=OpenAIChat,
        parsed=parsed,
        context=None,  # type: ignore[arg-type]  # not read by the stages under test
        price=Price(input_per_mtok=Decimal(1), output_per_mtok=Decimal(1)),
        prompt_tokens=1,
        hold_amount=Decimal("0.5"),
        max_output_tokens=16,
        started_at=now,
        started=time.monotonic(),
    )


@pytest.mark.parametrize("stream", [False, True], ids=["non_stream", "stream"])
def test_an_unexpected_error_before_the_upstream_call_releases_the_whole_hold(
    settle_thread: None, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    billed = _held(stream=stream)
    monkeypatch.setattr(pipeline, "_upstream_call", _boom)
    stage = pipeline._stream_start if stream else pipeline._complete

    with pytest.raises(RuntimeError, match="a bug of ours"):
        asyncio.run(stage(CompletionRequest(request_id="req-1", body=b"", headers={}), billed))

    hold = Hold.objects.get(request_id="req-1")
    assert hold.state == Hold.State.RELEASED
    assert UsageRecord.objects.get(request_id="req-1").outcome == "gateway_error"
    account = Account.objects.get(pk=billed.account_id)
    assert (account.balance, account.held) == (Decimal("10"), 0)


class _StreamCall:
    """Stands in for the upstream stream: these events, one at a time, then the end."""

    def __init__(self, events: list[bytes]) -> None:
        self.events = events
        self.closed = False

    async def next_events(self) -> list[bytes] | None:
        return [self.events.pop(0)] if self.events else None

    def close(self) -> None:
        self.closed = True


def test_an_unexpected_error_in_the_relay_still_settles_what_was_relayed(
    settle_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    billed = _held(stream=True)
    state = OpenAIChat.stream_state(billed.parsed)
    fed: list[bytes] = []

    def feed_then_fail(event: bytes) -> bytes:
        if fed:
            raise RuntimeError("a bug of ours")
        fed.append(event)
        state.unparsed.append(event.removeprefix(b"data: ").strip())
        return event

    monkeypatch.setattr(state, "feed", feed_then_fail)
    chunk = b'data: {"choices": [{"index": 0, "delta": {"content": " the quick"}}]}\n\n'
    call = _StreamCall([chunk])

    async def relay() -> list[bytes]:
        try:
            return [out async for out in pipeline._relay(billed, call, state, [chunk])]  # type: ignore[arg-type]
        finally:
            await sql_async_pool_close()

    sent = asyncio.run(relay())

    assert sent[0] == chunk and b"partial output was billed" in sent[-1]
    assert call.closed
    hold = Hold.objects.get(request_id="req-1")
    assert hold.state == Hold.State.SETTLED
    record = UsageRecord.objects.get(request_id="req-1")
    assert (record.outcome, record.estimated, record.output_tokens) == ("gateway_error", True, 2)
