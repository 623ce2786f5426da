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
from django.db import connection, transaction
from django.utils import timezone

from billing.engine import sql_async_pool_close
from billing.models import Account, Hold, LedgerTransaction, UsageRecord
from billing.pricing import Price, Usage
from billing.services.holds import hold_place, request_charge_post, request_write_off_post
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

    async def run() -> None:
        try:
            await stage(CompletionRequest(request_id="req-1", body=b"", headers={}), billed)
        finally:
            await sql_async_pool_close()  # the release ran on this loop's async pool

    with pytest.raises(RuntimeError, match="a bug of ours"):
        asyncio.run(run())

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


def _written_off(billed: pipeline.BilledRequest) -> None:
    with transaction.atomic():
        request_write_off_post(
            request_id=billed.request_id,
            amount=Decimal("0.5"),
            memo="goodwill",
            now=timezone.now(),
            posted_by_id=None,
        )


def _charged_by_finance(billed: pipeline.BilledRequest) -> None:
    with transaction.atomic():
        request_charge_post(
            request_id=billed.request_id,
            cost=Decimal("0.25"),
            memo="agreed",
            now=timezone.now(),
            posted_by_id=None,
        )


@pytest.mark.parametrize(
    ("finance", "charged"),
    [(_written_off, Decimal(0)), (_charged_by_finance, Decimal("0.25"))],
    ids=["written_off", "charged_by_finance"],
)
def test_a_settle_refused_after_finance_posted_reports_what_was_posted(
    settle_thread: None, finance: Any, charged: Decimal
) -> None:
    billed = _held(stream=False)
    finance(billed)
    usage = Usage(input_tokens=100_000, output_tokens=20_000)  # would cost 0.12 at this price

    async def settle() -> Decimal:
        try:
            return await pipeline._settle_stage(billed=billed, usage=usage, outcome="completed")
        finally:
            await sql_async_pool_close()

    assert asyncio.run(settle()) == charged
    account = Account.objects.get(pk=billed.account_id)
    assert (account.balance, account.held) == (Decimal("10") - charged, 0)
    assert LedgerTransaction.objects.filter(request_id="req-1").count() == 1


def test_the_settle_hand_off_is_imported_at_start_not_guarded() -> None:
    # A broken import in the hand-off's chain must fail the gateway at start, not quietly
    # leave every failed settle to expire: the pipeline imports it at module level.
    from reconciliation.services.failures import settlement_handoff

    assert pipeline.settlement_handoff is settlement_handoff
