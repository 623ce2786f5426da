"""The one billing pipeline every endpoint goes through.

(the view: authenticate -> validate) -> the key's rate limits -> resolve model and price
-> estimate the worst case -> hold -> call upstream -> relay -> settle (-> count the tokens).

Async: a request lives on the event loop. Each money step (hold, settle, release, checkpoint)
is one call of the money engine on an async connection (billing's hold_place_async,
hold_settle_async, hold_release_async, hold_checkpoint_async), which decides every case,
refusals, replays and budgets included, within GATEWAY_DB_STEP_TIMEOUT_SECONDS. What the loop
cannot do (a key or route the caches miss, a prompt too long to count on the loop) is one call
into a hold thread, which keeps a pooled connection and runs the same engine call. Admission
control keeps the holds in flight below the async pool's size, so a burst of new requests
cannot take the connections that money already due needs. Settlement is awaited (shielded
from the client's cancellation) and a stream's last bytes go out only after it has committed.
A settle that cannot be written is handed to the retry task from a settle thread (the broker's
client blocks); the hold stays until it is settled or expires into reconciliation.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import aiohttp
import psycopg
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.utils import timezone

from billing import metrics
from billing.errors import (
    BillingError,
    HoldAlreadyResolved,
    IdempotencyConflict,
    InsufficientFunds,
)
from billing.models import ApiKey
from billing.money import MAX_AMOUNT, QUANTUM, money_str
from billing.pricing import Price, Usage
from billing.services.holds import (
    RequestDetails,
    SettleResult,
    hold_checkpoint_async,
    hold_place,
    hold_place_async,
    hold_release_async,
    hold_settle_async,
)
from gateway.errors import GatewayError, billing_unavailable, error_from_billing, invalid_param
from gateway.http import CompletionRequest, JsonAnswer, StreamAnswer
from gateway.ratelimit import KeyRateLimits, ratelimit_check, ratelimit_count
from gateway.selectors import (
    ModelContext,
    model_context_cached,
    model_context_get,
    price_select,
    provider_price_for,
)
from gateway.tokens import text_tokens, with_margin
from gateway.upstreams.base import Adapter, ParsedRequest, StreamState
from gateway.upstreams.client import UpstreamCall, UpstreamFailure
from reconciliation.services.failures import settlement_handoff

logger = logging.getLogger(__name__)

T = TypeVar("T")

_hold_threads = ThreadPoolExecutor(
    settings.GATEWAY_MAX_CONCURRENT_HOLDS, thread_name_prefix="gateway-hold"
)
_settle_threads = ThreadPoolExecutor(
    settings.GATEWAY_SETTLE_THREADS, thread_name_prefix="gateway-settle"
)
# Admission control: at most GATEWAY_MAX_CONCURRENT_HOLDS requests wait for or place a hold
# at once (on an async connection or in a hold thread, maybe waiting on a busy account's row
# lock); the rest queue here, on the loop, and get a 503 after
# GATEWAY_ADMISSION_TIMEOUT_SECONDS.
_admission: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def _admission_for_loop() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    if loop not in _admission:
        _admission[loop] = asyncio.Semaphore(settings.GATEWAY_MAX_CONCURRENT_HOLDS)
    return _admission[loop]


async def _in_threads(executor: ThreadPoolExecutor, work: Callable[..., T], **kwargs: Any) -> T:
    """Run sync database work in one of `executor`'s threads, in a copy of this context (the
    thread keeps its own connection: `_db_step`). Django's connections are per thread and these
    threads run no event loop, so the ORM is safe there; asgiref's sync_to_async would add
    per-call machinery for thread-sensitivity we do not want."""
    context = contextvars.copy_context()
    call = functools.partial(context.run, work, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(executor, call)


# Larger request bodies have their prompt counted in a hold thread: the tokenizer releases the
# GIL, and counting a long prompt on the loop would stall every other request meanwhile.
LOOP_PROMPT_MAX_BYTES = 64 * 1024

_kept = threading.local()


@contextlib.contextmanager
def _db_step() -> Iterator[None]:
    """One database step in a pipeline thread. The thread keeps its pooled connection for its
    next step: checking one out per step cost the pool's health-check round trip every time.
    A connection that saw an error goes back to the pool (which checks it before lending it
    again), and so does one kept longer than the pool's lifetime for its connections."""
    try:
        yield
    finally:
        now = time.monotonic()
        if getattr(_kept, "connection", None) is not connection.connection:
            _kept.connection, _kept.since = connection.connection, now
        if (
            connection.errors_occurred
            or now - _kept.since > settings.DB_CONNECTION_MAX_LIFETIME_SECONDS
        ):
            connection.close()


def _on_live_connection(work: Callable[..., T], /, **kwargs: Any) -> T:
    """work(**kwargs); once more if the thread's kept connection turned out to be dead (the
    database restarted, failed over or dropped it while it sat idle): the retry checks out a
    live one (the pool checks before lending). Only a lost connection is retried, never a
    refusal, a lock timeout or a constraint. Every step run this way is idempotent by request
    id (authenticate reads; a hold, settle or release replays), so a first try that committed
    before its connection went cannot hold or charge twice."""
    reused = connection.connection is not None
    try:
        return work(**kwargs)
    except (OperationalError, InterfaceError):
        if not (reused and _connection_lost()):
            raise
        logger.warning("database connection lost while idle; retrying on a fresh one")
        connection.close()
    return work(**kwargs)


def _connection_lost() -> bool:
    # Django drops a connection whose rollback failed; psycopg marks one whose socket failed.
    conn = connection.connection
    return conn is None or bool(conn.closed) or bool(conn.broken)


@dataclass(frozen=True)
class HoldAsk:
    """A request as the hold stage gets it: who asks, for what, and when."""

    request_id: str
    adapter: type[Adapter]
    parsed: ParsedRequest
    api_key: ApiKey
    now: datetime
    started: float  # monotonic
    rate_limits: KeyRateLimits | None = None  # the key's, if it has any


@dataclass
class BilledRequest:
    """Everything the later stages need, fixed once the hold is placed."""

    request_id: str
    account_id: int
    adapter: type[Adapter]
    parsed: ParsedRequest
    context: ModelContext
    price: Price
    prompt_tokens: int  # our count, without the hold's margin
    hold_amount: Decimal
    max_output_tokens: int  # what we forward upstream, so what the hold covers
    started_at: datetime
    started: float  # monotonic
    first_byte_ms: int | None = None
    # A stream's checkpoints (_checkpoint_due): when the last was taken, the output tokens
    # counted so far and how many of the stream's texts they cover, and the one in flight.
    checkpointed: float = 0.0
    counted_tokens: int = 0
    counted_texts: int = 0
    checkpoint: asyncio.Future[None] | None = None
    rate_limits: KeyRateLimits | None = None  # its settle counts the tokens against them
    provider_price: Price | None = None  # what the model costs us upstream (None: unknown)

    def details(self, outcome: str, *, usage: Usage | None = None) -> RequestDetails:
        """The usage record's details; with `usage`, also what it cost us upstream (priced
        once, at the provider price chosen with the tariff when the hold was placed)."""
        provider = self.provider_price
        return RequestDetails(
            provider_cost=None if usage is None or provider is None else provider.cost(usage),
            endpoint=self.adapter.endpoint,
            started_at=self.started_at,
            stream=self.parsed.stream,
            outcome=outcome,
            first_byte_ms=self.first_byte_ms,
            duration_ms=int((time.monotonic() - self.started) * 1000),
        )

    def mark_first_byte(self) -> None:
        if self.first_byte_ms is None:
            elapsed = time.monotonic() - self.started
            self.first_byte_ms = int(elapsed * 1000)
            metrics.TIME_TO_FIRST_BYTE.labels(self.adapter.endpoint).observe(elapsed)


async def pipeline_run(
    *,
    request: CompletionRequest,
    adapter: type[Adapter],
    api_key: ApiKey,
    parsed: ParsedRequest,
    started: float,
) -> JsonAnswer | StreamAnswer:
    """The request's answer, from its authenticated key (gateway/auth.py) and its body as the
    adapter validated it (gateway/serializers.py); `started` is monotonic."""
    # The key's rate limits, before anything is held: a refused request leaves no trace.
    limits = await ratelimit_check(api_key=api_key)
    run = _billed_run(
        request=request, adapter=adapter, api_key=api_key, parsed=parsed, started=started,
        limits=limits,
    )
    if limits is None:
        return await run
    try:
        answer = await run
    except GatewayError as error:
        raise dataclasses.replace(error, headers={**error.headers, **limits.headers()}) from error
    answer.headers.update(limits.headers())  # a completion's: its tokens counted by now
    return answer


async def _billed_run(
    *,
    request: CompletionRequest,
    adapter: type[Adapter],
    api_key: ApiKey,
    parsed: ParsedRequest,
    started: float,
    limits: KeyRateLimits | None,
) -> JsonAnswer | StreamAnswer:
    request_id = request.request_id
    now = timezone.now()
    admission = _admission_for_loop()
    await _admit(admission)
    ask = HoldAsk(
        request_id=request_id,
        adapter=adapter,
        parsed=parsed,
        api_key=api_key,
        now=now,
        started=started,
        rate_limits=limits,
    )
    placing = asyncio.ensure_future(
        _hold_stage(ask, on_loop=len(request.body) <= LOOP_PROMPT_MAX_BYTES)
    )
    try:
        billed = await asyncio.shield(placing)
    except asyncio.CancelledError:
        # The client left while its hold was being placed (the thread cannot be stopped):
        # once placed, give it back, so no hold waits for the sweeper.
        try:
            placed = await placing
        except Exception:
            raise asyncio.CancelledError from None  # refused: nothing to give back
        await _give_back(placed, outcome="client_disconnected")
        raise
    finally:
        admission.release()
    if parsed.stream:
        return await _stream_start(request, billed)
    # The provider bills a completion whether or not our client waits for it: once asked, the
    # answer is read and settled even if the client leaves meanwhile.
    return await _to_completion(_complete(request, billed))


async def _admit(admission: asyncio.Semaphore) -> None:
    """Take a slot for the hold; when every slot is taken, wait for one, but not forever."""
    if not admission.locked():
        await admission.acquire()  # at once, without a timer to set up and cancel
        return
    try:
        async with asyncio.timeout(settings.GATEWAY_ADMISSION_TIMEOUT_SECONDS):
            await admission.acquire()
    except TimeoutError:
        metrics.HOLD_REFUSALS.labels("Overloaded").inc()
        raise GatewayError(
            503, "The gateway is overloaded; retry shortly.", "server_error", "overloaded"
        ) from None


async def _to_completion(work: Awaitable[T]) -> T:
    """Await `work` in its own task; if our caller is cancelled (the client went away), the
    work still runs to the end before the cancellation goes on."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):  # nobody is left to tell
            await task
        raise


async def _give_back(billed: BilledRequest, *, outcome: str) -> None:
    """Release the whole hold, even if our caller is cancelled."""
    await _to_completion(_release_stage(billed=billed, outcome=outcome))


async def _release_stage(*, billed: BilledRequest, outcome: str) -> None:
    """The release, on the loop, within the step deadline. If it cannot be written the hold
    stays, and the sweep reclaims it at expiry; the client still gets its answer."""
    try:
        await _within_step_deadline(
            hold_release_async(
                request_id=billed.request_id, now=timezone.now(), details=billed.details(outcome)
            )
        )
    except (psycopg.Error, TimeoutError) as exc:
        logger.warning(
            "release of %s failed (%s); it will expire", billed.request_id, type(exc).__name__
        )
    except BillingError as exc:
        logger.error("release of %s refused: %s", billed.request_id, exc)
    else:
        metrics.HOLDS.labels("released").inc()
        metrics.OUTCOMES.labels(billed.adapter.endpoint, outcome).inc()


async def _within_step_deadline(work: Awaitable[T]) -> T:
    """`work`, or TimeoutError once GATEWAY_DB_STEP_TIMEOUT_SECONDS have passed. A database
    that refuses, drops or stalls connections must not hold a finished response: the step is
    left to finish or fail by itself (it is not awaited, in case its cancellation stalls too).
    If it does commit after all, nothing counts twice: every engine call is idempotent by its
    request id, so the settle's retry replays it."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=settings.GATEWAY_DB_STEP_TIMEOUT_SECONDS)
    if task in done:
        return task.result()
    task.cancel()
    task.add_done_callback(_step_abandoned)
    raise TimeoutError("the database did not answer within the step deadline")


def _step_abandoned(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.info("an abandoned database step ended with %s", type(task.exception()).__name__)


def _upstream_call(
    request: CompletionRequest, billed: BilledRequest
) -> tuple[str, dict[str, str], dict[str, Any], aiohttp.ClientTimeout]:
    context = billed.context
    url, headers, body = billed.adapter.upstream_request(
        billed.parsed,
        context.target(),
        max_output_tokens=billed.max_output_tokens,
        anthropic_version=request.headers.get("anthropic-version"),
    )
    timeout = aiohttp.ClientTimeout(
        # The whole call, stream included, ends before the hold expires.
        total=settings.GATEWAY_UPSTREAM_TIMEOUT_SECONDS,
        sock_connect=context.connect_timeout,
        sock_read=context.read_timeout,
    )
    return url, headers, body, timeout


async def _upstream_failed(billed: BilledRequest, failure: UpstreamFailure) -> GatewayError:
    """Nothing reached the client: the whole hold goes back, on every endpoint."""
    await _give_back(billed, outcome=f"upstream_{failure.kind}")
    metrics.UPSTREAM_ERRORS.labels("before_first_byte", failure.kind).inc()
    return upstream_error(failure)


async def _complete(request: CompletionRequest, billed: BilledRequest) -> JsonAnswer:
    """A non-streaming completion: call, read, settle, answer."""
    try:
        payload = await _call_json(*_upstream_call(request, billed))
    except UpstreamFailure as failure:
        raise await _upstream_failed(billed, failure) from failure
    except BaseException as exc:
        await _give_back(billed, outcome=_outcome_before_first_byte(exc))
        raise
    billed.mark_first_byte()
    adapter = billed.adapter
    usage = adapter.usage_from_body(payload)
    if usage is None or usage.estimated:
        output = _tokens(adapter.texts_from_body(payload))
        usage = _estimated_usage(billed, reported=usage, output_tokens=output)
    cost = await _settle_stage(billed=billed, usage=usage, outcome="completed")
    priced = money_str(cost)
    return JsonAnswer(
        adapter.with_cost(payload, usage=usage, cost=priced), headers={"x-request-cost": priced}
    )


async def _stream_start(request: CompletionRequest, billed: BilledRequest) -> StreamAnswer:
    """Open the stream (a failure before its first byte is answered like any other), then
    hand the relay over as the response's body."""
    try:
        call, state, first = await _stream_open(billed, *_upstream_call(request, billed))
    except UpstreamFailure as failure:
        raise await _upstream_failed(billed, failure) from failure
    except BaseException as exc:
        await _give_back(billed, outcome=_outcome_before_first_byte(exc))
        raise
    return StreamAnswer(
        _relay(billed, call, state, first),
        content_type=billed.adapter.stream_content_type,
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def _outcome_before_first_byte(exc: BaseException) -> str:
    """Why a request ended after its hold and before the upstream's first byte, when the
    upstream did not fail: the client left (its task was cancelled), or a bug of ours."""
    return "client_disconnected" if isinstance(exc, asyncio.CancelledError) else "gateway_error"


def _hold_for(ask: HoldAsk) -> BilledRequest:
    """Resolve model and price, estimate the worst case and place the hold (sync, in a hold
    thread). The request keeps no connection while it waits on the upstream: the connection
    stays with the thread."""
    with _db_step():
        billed = _on_live_connection(_hold_place_priced, ask=ask)
    metrics.HOLDS.labels("placed").inc()
    return billed


def _hold_place_priced(*, ask: HoldAsk) -> BilledRequest:
    billed = _billed_for(ask, context=model_context_get(alias=ask.parsed.model))
    try:
        hold_place(
            api_key=ask.api_key,
            request_id=ask.request_id,
            amount=billed.hold_amount,
            now=ask.now,
            model_alias=ask.parsed.model,
        )
    except BillingError as exc:
        metrics.HOLD_REFUSALS.labels(type(exc).__name__).inc()
        raise error_from_billing(exc) from exc
    return billed


async def _hold_stage(ask: HoldAsk, *, on_loop: bool) -> BilledRequest:
    """Price, estimate and hold. With the route and tariffs cached and a prompt small enough
    to count on the loop, the hold is placed from the loop and decided there, refusals
    included, within the step deadline; anything else goes to a hold thread, which reads
    what the caches missed and runs the same engine call."""
    context = model_context_cached(alias=ask.parsed.model) if on_loop else None
    if context is not None:
        billed = _billed_for(ask, context=context)
        try:
            await _within_step_deadline(
                hold_place_async(
                    api_key=ask.api_key,
                    request_id=ask.request_id,
                    amount=billed.hold_amount,
                    now=ask.now,
                    model_alias=ask.parsed.model,
                )
            )
        except BillingError as exc:
            metrics.HOLD_REFUSALS.labels(type(exc).__name__).inc()
            raise error_from_billing(exc) from exc
        except (psycopg.Error, TimeoutError) as exc:
            # Nothing was held (or, if the statement still commits, the hold expires into
            # reconciliation uncharged): the client may retry.
            logger.warning("hold of %s failed: %s", ask.request_id, type(exc).__name__)
            metrics.HOLD_REFUSALS.labels("DatabaseUnavailable").inc()
            raise billing_unavailable() from exc
        metrics.HOLDS.labels("placed").inc()
        return billed
    return await _in_threads(_hold_threads, _hold_for, ask=ask)


def _billed_for(ask: HoldAsk, *, context: ModelContext) -> BilledRequest:
    """The price and the worst case the hold must cover (no database)."""
    parsed = ask.parsed
    ask.adapter.route_check(model=parsed.model, upstream_kind=context.target_kind)
    try:
        price = price_select(context=context, api_key=ask.api_key, at=ask.now)
    except BillingError as exc:
        raise error_from_billing(exc) from exc
    # None: the client set no limit, so the route's. (0: the endpoint generates nothing.)
    max_output = (
        context.max_output_tokens if parsed.max_output_tokens is None else parsed.max_output_tokens
    )
    if max_output > context.max_output_tokens:
        raise invalid_param(
            parsed.max_tokens_param,
            f"'{parsed.max_tokens_param}' is too large: this model allows at most "
            f"{context.max_output_tokens}.",
        )
    prompt_tokens = ask.adapter.prompt_tokens(parsed)
    hold_amount = max(
        price.worst_case(
            prompt_tokens=with_margin(prompt_tokens), max_output_tokens=max_output * parsed.n
        ),
        QUANTUM,
    )
    if hold_amount > MAX_AMOUNT:
        # More than any balance can hold (an absurd price times a long output): no account
        # can cover it.
        raise error_from_billing(
            InsufficientFunds(account_id=ask.api_key.account_id, amount=hold_amount)
        )
    return BilledRequest(
        request_id=ask.request_id,
        account_id=ask.api_key.account_id,
        adapter=ask.adapter,
        parsed=parsed,
        context=context,
        price=price,
        provider_price=provider_price_for(context=context, at=ask.now),
        prompt_tokens=prompt_tokens,
        hold_amount=hold_amount,
        max_output_tokens=max_output,
        started_at=ask.now,
        started=ask.started,
        rate_limits=ask.rate_limits,
    )


async def _call_json(
    url: str, headers: dict[str, str], body: dict[str, Any], timeout: aiohttp.ClientTimeout
) -> dict[str, Any]:
    call = await UpstreamCall.open(url=url, headers=headers, body=body, timeout=timeout)
    return await call.read_json()


async def _stream_open(
    billed: BilledRequest,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
    timeout: aiohttp.ClientTimeout,
) -> tuple[UpstreamCall, StreamState, list[bytes]]:
    """Open the upstream stream and wait for its first events, so that a failure before the
    first byte is still answered with a proper status and a full release."""
    call = await UpstreamCall.open(url=url, headers=headers, body=body, timeout=timeout)
    try:
        first = await call.next_events()
    except BaseException:
        call.close()
        raise
    if first is None:
        call.close()
        raise UpstreamFailure("protocol", "the upstream closed the stream before sending anything")
    return call, billed.adapter.stream_state(billed.parsed), first


def _feed(state: StreamState, events: list[bytes]) -> tuple[bytes, Exception | None]:
    """What to relay of events that arrived together, and the failure that stopped them."""
    out = []
    try:
        for event in events:
            relayed = state.feed(event)
            if relayed:
                out.append(relayed)
            if state.finished:
                break
    except (UpstreamFailure, ValueError) as failure:  # ValueError: a chunk that is not JSON
        return b"".join(out), failure
    return b"".join(out), None


async def _relay(
    billed: BilledRequest, call: UpstreamCall, state: StreamState, first: list[bytes]
) -> AsyncGenerator[bytes, None]:
    outcome = "completed"
    try:
        events: list[bytes] | None = first
        while events is not None:
            out, failure = _feed(state, events)
            if out:
                billed.mark_first_byte()
                yield out
                if _checkpoint_due(billed, state):
                    billed.checkpoint = asyncio.ensure_future(_checkpoint(billed, state))
            if failure is not None:
                raise failure
            if state.finished:
                break
            events = await call.next_events()
        if not state.finished:
            outcome = "upstream_incomplete"
    except UpstreamFailure as failure:
        outcome = f"upstream_{failure.kind}"
    except ValueError:
        outcome = "upstream_protocol"
    except Exception:
        # A bug of ours must not leave the hold to the sweeper: bill what was relayed.
        logger.exception("relay of %s failed", billed.request_id)
        outcome = "gateway_error"
    except (asyncio.CancelledError, GeneratorExit):
        # The client went away: stop the upstream, bill what was generated, never free.
        call.close()
        await _settle_protected(billed, state, outcome="client_disconnected")
        raise
    finally:
        call.close()

    if outcome != "completed":
        metrics.UPSTREAM_ERRORS.labels("mid_stream", outcome).inc()
    usage, cost = await _settle_protected(billed, state, outcome=outcome)
    metrics.STREAM_DURATION.labels(billed.adapter.endpoint).observe(
        time.monotonic() - billed.started
    )
    if outcome == "completed":
        yield state.closing(usage=usage, cost=cost)
    else:
        failed = "The upstream failed mid-stream; the partial output was billed."
        yield state.failure_event(failed) or billed.adapter.stream_error(failed)


def _checkpoint_due(billed: BilledRequest, state: StreamState) -> bool:
    """Whether to checkpoint the stream now: GATEWAY_CHECKPOINT_TOKENS content events (about a
    token each, on both providers' streams) or GATEWAY_CHECKPOINT_SECONDS since the last one,
    with something new relayed, and none still in flight. Costs a length and a clock read per
    relayed write; a long stream pays one engine call per checkpoint."""
    pending = len(state.unparsed)  # content events relayed since the last checkpoint parsed them
    if not pending or (billed.checkpoint is not None and not billed.checkpoint.done()):
        return False
    now = time.monotonic()
    if not billed.checkpointed:
        billed.checkpointed = billed.started
    return (
        pending >= settings.GATEWAY_CHECKPOINT_TOKENS
        or now - billed.checkpointed >= settings.GATEWAY_CHECKPOINT_SECONDS
    )


async def _checkpoint(billed: BilledRequest, state: StreamState) -> None:
    """Record what the stream relayed so far on its hold, within the step deadline: if this
    process dies before settling, the sweep charges it at expiry. A failure only costs the
    checkpoint; the settle still decides."""
    billed.checkpointed = time.monotonic()
    texts = state.generated_texts()  # parses only the events relayed since the last time
    billed.counted_tokens += sum(text_tokens(text) for text in texts[billed.counted_texts :])
    billed.counted_texts = len(texts)
    usage = _estimated_usage(
        billed, reported=state.reported_usage(), output_tokens=billed.counted_tokens
    )
    try:
        await _within_step_deadline(
            hold_checkpoint_async(
                request_id=billed.request_id,
                cost=billed.price.cost(usage),
                usage=usage,
                details=billed.details("checkpoint", usage=usage),
                now=timezone.now(),
            )
        )
    except (psycopg.Error, TimeoutError) as exc:
        logger.info("checkpoint of %s skipped: %s", billed.request_id, type(exc).__name__)


async def _settle_protected(
    billed: BilledRequest, state: StreamState, *, outcome: str
) -> tuple[Usage, Decimal]:
    """Settle from the stream's state; a cancellation of the client's request cannot cut it
    short (the settle runs to completion in its own task, and we wait for it)."""
    reported = state.reported_usage()
    complete = outcome == "completed" and reported is not None and not reported.estimated
    usage = (
        reported
        if complete
        else _estimated_usage(
            billed, reported=reported, output_tokens=_tokens(state.generated_texts())
        )
    )
    assert usage is not None
    cost = await _to_completion(_settle_stage(billed=billed, usage=usage, outcome=outcome))
    return usage, cost


def _estimated_usage(
    billed: BilledRequest, *, reported: Usage | None, output_tokens: int
) -> Usage:
    """Usage when the upstream reported none (or only part), or so far: the provider's prompt
    counts if it gave them, else ours, and our count of the output generated."""
    output = output_tokens
    if reported is not None and reported.prompt_tokens:
        return Usage(
            input_tokens=reported.input_tokens,
            cached_input_tokens=reported.cached_input_tokens,
            cache_write_tokens=reported.cache_write_tokens,
            output_tokens=max(reported.output_tokens, output),
            reasoning_tokens=reported.reasoning_tokens,
            estimated=True,
        )
    return Usage(input_tokens=billed.prompt_tokens, output_tokens=output, estimated=True)


def _tokens(texts: list[str]) -> int:
    return sum(text_tokens(text) for text in texts)


def _handoff(*, billed: BilledRequest, usage: Usage, cost: Decimal, outcome: str, error: str
             ) -> None:
    """Give the settle the database would not take to the retry task (sync: the broker's
    client blocks, briefly, so it runs in a settle thread)."""
    logger.warning("settle of %s failed (%s); handing it to the retry task", billed.request_id,
                   error)
    metrics.SETTLEMENTS.labels("handed_off").inc()
    settlement_handoff(
        request_id=billed.request_id,
        cost=cost,
        usage=usage,
        details=billed.details(outcome, usage=usage),
        error=error,
    )


def _settle_refused(
    billed: BilledRequest, exc: HoldAlreadyResolved | IdempotencyConflict, *, cost: Decimal
) -> Decimal:
    """The request was posted another way first (finance charged or wrote it off, or it was
    settled at another cost): nothing new is charged, and the client is told what was."""
    logger.error("settle of %s at %s refused: %s", billed.request_id, cost, exc)
    metrics.SETTLEMENTS.labels("refused").inc()
    return exc.charged if exc.charged is not None else cost


async def _settle_stage(*, billed: BilledRequest, usage: Usage, outcome: str) -> Decimal:
    """Post the exact cost, on the loop, within the step deadline. A settle the database
    refuses, drops or leaves unanswered is handed to the retry task at once, and the client
    gets its answer; the hold stays until the retry lands. Returns what the customer was
    charged."""
    cost = billed.price.cost(usage)
    started = time.monotonic()
    try:
        result = await _within_step_deadline(
            hold_settle_async(
                request_id=billed.request_id,
                cost=cost,
                now=timezone.now(),
                usage=usage,
                details=billed.details(outcome, usage=usage),
            )
        )
    except (psycopg.Error, TimeoutError) as exc:
        await _in_threads(
            _settle_threads,
            _handoff,
            billed=billed,
            usage=usage,
            cost=cost,
            outcome=outcome,
            error=f"{type(exc).__name__}: {exc}",
        )
        charged = cost
    except (HoldAlreadyResolved, IdempotencyConflict) as exc:
        charged = _settle_refused(billed, exc, cost=cost)
    else:
        _settled_count(billed, result=result, usage=usage, outcome=outcome, started=started)
        charged = result.cost
    if billed.rate_limits is not None:
        # The key's tpm counts the billed tokens however the settle went: they were used.
        tokens = usage.prompt_tokens + usage.output_tokens
        await ratelimit_count(billed.rate_limits, tokens=tokens)
    return charged


def _settled_count(
    billed: BilledRequest, *, result: SettleResult, usage: Usage, outcome: str, started: float
) -> None:
    cost = result.cost
    metrics.OUTCOMES.labels(billed.adapter.endpoint, outcome).inc()
    metrics.SETTLE_LATENCY.observe(time.monotonic() - started)
    metrics.SETTLEMENTS.labels("replayed" if result.replayed else "settled").inc()
    if result.is_overrun:
        metrics.SETTLEMENTS.labels("overrun").inc()
        logger.warning(
            "request %s overran its hold: cost %s > held %s",
            billed.request_id,
            cost,
            billed.hold_amount,
        )
    if result.is_late:
        metrics.SETTLEMENTS.labels("late").inc()
    metrics.HOLDS.labels("settled").inc()
    metrics.SETTLED_USD.inc(float(cost))  # metric only: money itself never passes a float
    if usage.estimated:
        metrics.ESTIMATED_USAGE.inc()
    _count_tokens(billed.parsed.model, usage)


def _count_tokens(model: str, usage: Usage) -> None:
    for kind, count in (
        ("input", usage.input_tokens),
        ("cached_input", usage.cached_input_tokens),
        ("cache_write", usage.cache_write_tokens),
        ("output", usage.output_tokens),
        ("reasoning", usage.reasoning_tokens),
    ):
        if count:
            metrics.TOKENS.labels(model, kind).inc(count)


def upstream_error(failure: UpstreamFailure) -> GatewayError:
    if failure.kind == "timeout":
        return GatewayError(
            504, "The upstream provider timed out.", "server_error", "upstream_timeout"
        )
    if failure.kind == "status" and failure.status is not None:
        message = (
            _upstream_message(failure.body) or f"The upstream provider answered {failure.status}."
        )
        if failure.status == 429:
            return GatewayError(429, message, "rate_limit_error", "rate_limit_exceeded")
        if failure.status in (400, 404, 409, 413, 422):
            return GatewayError(400, message, "invalid_request_error", "upstream_rejected")
    return GatewayError(502, "The upstream provider failed.", "server_error", "upstream_error")


def _upstream_message(body: Any) -> str:
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
    return ""
