"""POST /v1/responses (OpenAI's Responses API) through the one pipeline: the official `openai`
SDK against a real uvicorn and the shipped mock, asserted on the ledger to the digit."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from django.utils import timezone

from billing.models import Hold, LedgerTransaction
from billing.pricing import Usage
from billing.selectors import ledger_audit
from gateway.mock.server import COMPLETION_WORDS, completion_text
from gateway.tokens import responses_input_tokens, text_tokens, with_margin
from gateway.upstreams.client import sse_event
from gateway.upstreams.responses import OpenAIResponses
from tests.factories import make_account, make_key
from tests.gateway.ledger import (
    PRICE,
    assert_clean,
    balance,
    charged,
    expected_cost,
    usage_record,
    wait_for_hold_resolution,
)
from tests.gateway.refusals import (
    OPENAI_FIELDS,
    assert_no_trace,
    assert_openai_error,
    assert_released_whole,
    openai_bad_input,
    post_raw,
)

START = Decimal("10")
ROUTE_MAX_OUTPUT = 4096  # priced_models' route default


def prompt(input: Any, instructions: str | None = None) -> int:
    """The mock's prompt count, which is our own."""
    return responses_input_tokens(input, instructions=instructions)


def sse(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event name, payload) of each event of a streamed answer."""
    events, name = [], ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


@contextlib.contextmanager
def streamed(world: Any, text: str) -> Iterator[httpx.Response]:
    """A streamed Responses request for `text`, open for reading."""
    body = {"model": world.openai_model, "stream": True, "input": text}
    with world.http() as client, client.stream("POST", "/v1/responses", json=body) as response:
        yield response


# --- exact cost, normal end ---------------------------------------------------------------


def test_non_stream_charges_tariff_times_usage_and_tells_the_cost(world):
    text = "Say hello [mock:tokens=7]"
    raw = world.openai().responses.with_raw_response.create(model=world.openai_model, input=text)
    response = raw.parse()
    request_id = raw.headers["x-request-id"]
    cost = expected_cost(Usage(input_tokens=prompt(text), output_tokens=7))
    assert response.output_text == completion_text(7)
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt(text), 7)
    assert Decimal(response.usage.model_extra["cost"]) == cost
    assert Decimal(raw.headers["x-request-cost"]) == cost
    assert charged(request_id) == cost
    assert balance(world.account) == (START - cost, 0)
    record = usage_record(request_id)
    assert (record.estimated, record.outcome, record.stream) == (False, "completed", False)
    assert LedgerTransaction.objects.get(request_id=request_id).model_alias == world.openai_model
    assert_clean(world.account)


def test_stream_true_relays_the_typed_events_and_reports_the_cost_in_response_completed(world):
    text = "Count [mock:tokens=5]"
    raw = world.openai().responses.with_raw_response.create(
        model=world.openai_model, input=text, stream=True
    )
    request_id = raw.headers["x-request-id"]
    events = list(raw.parse())
    cost = expected_cost(Usage(input_tokens=prompt(text), output_tokens=5))
    types = [event.type for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-1] == "response.completed" and types.count("response.completed") == 1
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas == list(COMPLETION_WORDS[:5])
    usage = events[-1].response.usage
    assert usage.output_tokens == 5
    assert Decimal(usage.model_extra["cost"]) == cost
    assert usage.model_extra["estimated"] is False
    # The stream's end was sent after the settle committed: no waiting needed.
    assert charged(request_id) == cost
    assert balance(world.account) == (START - cost, 0)
    assert usage_record(request_id).stream is True
    assert_clean(world.account)


def test_sdk_stream_helper_gets_the_final_response_with_its_cost(world):
    items = [
        {"role": "user", "content": "an earlier turn"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "input_text", "text": "go on [mock:tokens=6]"}]},
    ]
    with world.openai().responses.stream(
        model=world.openai_model, input=items, instructions="Be terse.", max_output_tokens=64
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    # The helper does not show the HTTP response: the account's one hold names the request.
    request_id = Hold.objects.get(account=world.account).request_id
    cost = expected_cost(Usage(input_tokens=prompt(items, "Be terse."), output_tokens=6))
    assert text == final.output_text == completion_text(6)
    assert final.usage is not None
    assert Decimal(final.usage.model_extra["cost"]) == cost
    assert charged(request_id) == cost
    assert_clean(world.account)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non_stream"])
def test_cached_and_reasoning_tokens_are_priced_by_their_class(world, stream):
    text = "Think [mock:tokens=10] [mock:cached_tokens=5] [mock:reasoning_tokens=4]"
    with world.http() as client:
        response = client.post(
            "/v1/responses", json={"model": world.openai_model, "input": text, "stream": stream}
        )
        events = sse(response) if stream else []
    assert response.status_code == 200
    # OpenAI counts cached tokens inside input_tokens and reasoning inside output_tokens.
    usage = Usage(
        input_tokens=prompt(text) - 5, cached_input_tokens=5, output_tokens=14, reasoning_tokens=4
    )
    cost = expected_cost(usage)
    reported = events[-1][1]["response"]["usage"] if stream else response.json()["usage"]
    assert reported["input_tokens_details"] == {"cached_tokens": 5}
    assert reported["output_tokens_details"] == {"reasoning_tokens": 4}
    assert Decimal(reported["cost"]) == cost
    request_id = response.headers["x-request-id"]
    assert charged(request_id) == cost
    record = usage_record(request_id)
    assert (record.cached_input_tokens, record.reasoning_tokens, record.output_tokens) == (5, 4, 14)
    assert_clean(world.account)


@pytest.mark.parametrize(
    ("limit", "held_output"), [(100, 100), (None, ROUTE_MAX_OUTPUT)], ids=["given", "route"]
)
def test_the_hold_covers_the_input_estimate_and_max_output_tokens_or_the_routes(
    world, limit, held_output
):
    text = "Hold [mock:tokens=3]"
    body: dict[str, Any] = {"model": world.openai_model, "input": text}
    if limit is not None:
        body["max_output_tokens"] = limit
    with world.http() as client:
        response = client.post("/v1/responses", json=body)
    assert response.status_code == 200
    hold = Hold.objects.get(request_id=response.headers["x-request-id"])
    assert hold.amount == PRICE.worst_case(
        prompt_tokens=with_margin(prompt(text)), max_output_tokens=held_output
    )
    assert hold.state == Hold.State.SETTLED
    assert_clean(world.account)


def test_max_output_tokens_reached_is_an_incomplete_response_billed_as_reported(world):
    text = "Long [mock:tokens=40]"
    with world.http() as client:
        response = client.post(
            "/v1/responses",
            json={
                "model": world.openai_model,
                "input": text,
                "max_output_tokens": 16,
                "stream": True,
            },
        )
        events = sse(response)
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["status"] == "incomplete"
    cost = expected_cost(Usage(input_tokens=prompt(text), output_tokens=16))
    assert Decimal(events[-1][1]["response"]["usage"]["cost"]) == cost
    assert charged(response.headers["x-request-id"]) == cost
    assert usage_record(response.headers["x-request-id"]).estimated is False


# --- failures before the first event: full release ----------------------------------------


@pytest.mark.parametrize(
    ("directive", "status"),
    [
        ("[mock:fail=before_first_chunk]", 502),
        ("[mock:status=503]", 502),
        ("[mock:status=429]", 429),
        ("[mock:status=400]", 400),
    ],
    ids=["fail_before_first_chunk", "upstream_503", "upstream_429", "upstream_400"],
)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non_stream"])
def test_upstream_failure_before_the_first_event_releases_the_whole_hold(
    world, directive, status, stream
):
    with world.http() as client:
        response = client.post(
            "/v1/responses",
            json={"model": world.openai_model, "stream": stream, "input": f"x {directive}"},
        )
    assert_released_whole(world, response, status=status)


def test_sdk_sees_a_failure_before_the_first_event_as_its_provider_error(world):
    with pytest.raises(openai.InternalServerError) as excinfo:
        world.openai().responses.create(
            model=world.openai_model, input="[mock:fail=before_first_chunk]", stream=True
        )
    assert excinfo.value.status_code == 502
    with pytest.raises(openai.RateLimitError):
        world.openai().responses.create(model=world.openai_model, input="[mock:status=429]")
    assert balance(world.account) == (START, 0)
    assert_clean(world.account)


def test_a_dropped_connection_on_a_non_stream_response_releases_the_hold(world):
    with world.http() as client:
        response = client.post(
            "/v1/responses",
            json={"model": world.openai_model, "input": "[mock:fail=mid_stream]"},
        )
    assert response.status_code == 502
    hold = Hold.objects.get(request_id=response.headers["x-request-id"])
    assert hold.state == Hold.State.RELEASED
    assert balance(world.account) == (START, 0)


# --- mid-stream failure, disconnect, missing usage: billed as the other endpoints ---------


def test_mid_stream_failure_settles_what_was_generated_then_sends_the_error_event(world):
    text = "Go [mock:tokens=10] [mock:fail=mid_stream]"
    with streamed(world, text) as response:
        request_id = response.headers["x-request-id"]
        events = sse(response)
    names = [name for name, _ in events]
    generated = "".join(p["delta"] for n, p in events if n == "response.output_text.delta")
    assert names[-1] == "error" and "response.completed" not in names
    error = events[-1][1]
    assert error["type"] == "error" and error["message"]
    # The gateway's event continues the stream's numbering.
    assert error["sequence_number"] == events[-2][1]["sequence_number"] + 1
    assert generated == completion_text(5)
    record = usage_record(request_id)
    assert (record.estimated, record.output_tokens) == (True, text_tokens(generated))
    assert record.outcome.startswith("upstream_")
    cost = expected_cost(Usage(input_tokens=prompt(text), output_tokens=5))
    assert charged(request_id) == cost > 0
    assert Hold.objects.get(request_id=request_id).state == Hold.State.SETTLED
    assert balance(world.account) == (START - cost, 0)
    assert_clean(world.account)


def test_client_disconnect_settles_what_was_generated(world):
    text = "Slow [mock:tokens=40] [mock:delay_ms=50]"
    with streamed(world, text) as response:
        request_id = response.headers["x-request-id"]
        deltas = 0
        for line in response.iter_lines():
            deltas += line == "event: response.output_text.delta"
            if deltas >= 4:
                break  # leaving the block closes the connection mid-stream
    hold = wait_for_hold_resolution(request_id)
    full = expected_cost(Usage(input_tokens=prompt(text), output_tokens=40))
    paid = charged(request_id)
    assert hold.state == Hold.State.SETTLED
    assert 0 < paid < full, "a disconnect is billed for what was generated, never free"
    record = usage_record(request_id)
    assert (record.outcome, record.estimated) == ("client_disconnected", True)
    assert paid == expected_cost(
        Usage(input_tokens=prompt(text), output_tokens=record.output_tokens)
    )
    assert_clean(world.account)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non_stream"])
@pytest.mark.parametrize("report", ["no_usage", "bad_usage", "partial_usage"])
def test_usage_missing_or_unreadable_bills_our_count_marked_estimated(world, stream, report):
    text = f"Quiet [mock:tokens=8] [mock:{report}]"
    with world.http() as client:
        response = client.post(
            "/v1/responses", json={"model": world.openai_model, "stream": stream, "input": text}
        )
        events = sse(response) if stream else []
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    # Our tokenizer is the mock's, so the estimate is exact here; it is still flagged.
    cost = expected_cost(Usage(input_tokens=prompt(text), output_tokens=8))
    reported = events[-1][1]["response"]["usage"] if stream else response.json()["usage"]
    assert (Decimal(reported["cost"]), reported["estimated"]) == (cost, True)
    assert charged(request_id) == cost
    assert usage_record(request_id).estimated is True
    assert balance(world.account) == (START - cost, 0)
    assert_clean(world.account)


# --- bad input: the error, no balance change, no hold ---------------------------------------


def _body(world, **fields: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {"model": world.openai_model, "input": "hi", **fields}


BAD_INPUT = [
    *openai_bad_input(_body),
    ("empty_input", lambda w: _body(w, input=""), 400, "invalid_value", "input"),
    ("input_wrong_type", lambda w: _body(w, input=5), 400, "invalid_value", "input"),
    ("input_empty_list", lambda w: _body(w, input=[]), 400, "invalid_value", "input"),
    ("item_not_object", lambda w: _body(w, input=["hi"]), 400, "invalid_value", "input[0]"),
    (
        "item_without_role_or_type",
        lambda w: _body(w, input=[{"content": "hi"}]),
        400,
        "invalid_value",
        "input[0]",
    ),
    (
        "item_content_wrong_type",
        lambda w: _body(w, input=[{"role": "user", "content": 5}]),
        400,
        "invalid_value",
        "input[0].content",
    ),
    (
        "instructions_wrong_type",
        lambda w: _body(w, instructions=[1]),
        400,
        "invalid_value",
        "instructions",
    ),
    ("stream_wrong_type", lambda w: _body(w, stream="yes"), 400, "invalid_value", "stream"),
    (
        "max_output_below_16",
        lambda w: _body(w, max_output_tokens=15),
        400,
        "invalid_value",
        "max_output_tokens",
    ),
    (
        "max_output_not_int",
        lambda w: _body(w, max_output_tokens="64"),
        400,
        "invalid_value",
        "max_output_tokens",
    ),
    (
        "max_output_above_route",
        lambda w: _body(w, max_output_tokens=5000),
        400,
        "invalid_value",
        "max_output_tokens",
    ),
    ("store_true", lambda w: _body(w, store=True), 400, "unsupported_parameter", "store"),
    ("store_not_bool", lambda w: _body(w, store="no"), 400, "invalid_value", "store"),
    (
        "previous_response_id",
        lambda w: _body(w, previous_response_id="resp_123"),
        400,
        "unsupported_parameter",
        "previous_response_id",
    ),
    (
        "conversation",
        lambda w: _body(w, conversation="conv_1"),
        400,
        "unsupported_parameter",
        "conversation",
    ),
    ("background", lambda w: _body(w, background=True), 400, "unsupported_parameter", "background"),
]


@pytest.mark.parametrize(
    ("build", "status", "code", "param"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_is_refused_without_a_trace(world, build, status, code, param):
    response = post_raw(world, "/v1/responses", build(world))
    assert_openai_error(response, status=status, code=code, param=param)
    assert_no_trace(world)


def test_null_store_and_previous_response_id_are_absent_and_store_false_is_served(world):
    body = _body(world, store=False, previous_response_id=None, input="x [mock:tokens=2]")
    with world.http() as client:
        response = client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    assert charged(response.headers["x-request-id"]) > 0


def test_sdk_sees_store_refused_as_a_bad_request_naming_it(world):
    with pytest.raises(openai.BadRequestError) as excinfo:
        world.openai().responses.create(model=world.openai_model, input="hi", store=True)
    assert excinfo.value.param == "store"  # type: ignore[attr-defined]
    assert_no_trace(world)


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("GET", "/input_items")],
    ids=["retrieve", "delete", "cancel", "input_items"],
)
def test_stored_responses_are_not_served_and_bill_nothing(world, method, suffix):
    with world.http() as client:
        response = client.request(method, f"/v1/responses/resp_mock1{suffix}")
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == OPENAI_FIELDS
    assert (error["code"], error["param"]) == ("unsupported_parameter", "response_id")
    assert response.headers["x-request-id"].startswith("req_")
    assert_no_trace(world)


def test_sdk_retrieve_gets_a_bad_request(world):
    with pytest.raises(openai.BadRequestError):
        world.openai().responses.retrieve("resp_mock1")
    assert_no_trace(world)


# --- concurrency ------------------------------------------------------------------------------


def test_64_concurrent_streams_never_overspend_an_account_that_affords_about_10(world):
    poor = make_account(credits=Decimal("0.2"), now=timezone.now())
    key = make_key(account=poor, now=timezone.now()).secret
    # Worst case ~ 1000 output tokens at the dearest output rate (reasoning, $20/Mtok) =
    # $0.02 a request: about 10 fit at once.
    body = {
        "model": world.openai_model,
        "stream": True,
        "max_output_tokens": 1000,
        "input": "go [mock:tokens=20] [mock:delay_ms=10]",
    }

    async def one(client: httpx.AsyncClient) -> tuple[int, str, str]:
        async with client.stream("POST", "/v1/responses", json=body) as response:
            text = "".join([line async for line in response.aiter_lines()])
            return response.status_code, response.headers["x-request-id"], text

    async def all_of_them() -> list[tuple[int, str, str]]:
        async with httpx.AsyncClient(
            base_url=world.gateway.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
            limits=httpx.Limits(max_connections=64),
        ) as client:
            return await asyncio.gather(*(one(client) for _ in range(64)))

    results = asyncio.run(all_of_them())
    statuses = [status for status, _, _ in results]
    # 402: refused by the hold. 503: a loaded machine made the request queue for a database
    # connection longer than the pool allows; it was refused before any hold.
    assert set(statuses) <= {200, 402, 503}
    assert 8 <= statuses.count(200) < 64, statuses
    served = [(request_id, text) for status, request_id, text in results if status == 200]
    assert all("response.completed" in text for _, text in served)
    refused = [request_id for status, request_id, _ in results if status != 200]
    assert not Hold.objects.filter(request_id__in=refused, state=Hold.State.ACTIVE).exists()
    poor.refresh_from_db()
    assert poor.balance >= -poor.overdraft
    assert poor.held == 0
    each = expected_cost(Usage(input_tokens=prompt(body["input"]), output_tokens=20))
    assert {charged(request_id) for request_id, _ in served} == {each}
    assert poor.balance == Decimal("0.2") - each * len(served)
    assert not Hold.objects.filter(account=poor, state=Hold.State.ACTIVE).exists()
    assert ledger_audit().clean


# --- the stream's bookkeeping, without a server ------------------------------------------


def _state() -> Any:
    parsed = OpenAIResponses.parse({"model": "m", "input": "hi", "stream": True})
    return OpenAIResponses.stream_state(parsed)


def test_deltas_relay_unparsed_and_the_terminal_event_is_held_back_for_its_cost() -> None:
    state = _state()
    created = sse_event({"type": "response.created", "response": {"id": "r"}}, "response.created")
    deltas = [
        sse_event(
            {"type": "response.output_text.delta", "delta": word}, "response.output_text.delta"
        )
        for word in ("Hi", ' "usage" and "error"')
    ]
    usage = {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 2},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 1},
    }
    completed = sse_event(
        {
            "type": "response.completed",
            "response": {"id": "r", "usage": usage},
            "sequence_number": 3,
        },
        "response.completed",
    )

    relayed = [state.feed(event) for event in (created, *deltas, completed)]

    assert relayed == [created, *deltas, None]
    assert state.finished and len(state.unparsed) == 2
    assert state.usage == Usage(
        input_tokens=7, cached_input_tokens=2, output_tokens=5, reasoning_tokens=1
    )
    assert state.generated_texts() == ["Hi", ' "usage" and "error"']
    closing = state.closing(usage=state.usage, cost=Decimal("0.0000123"))
    assert closing.startswith(b"event: response.completed\n")
    payload = json.loads(closing.split(b"data: ", 1)[1])
    assert payload["sequence_number"] == 3 and payload["response"]["id"] == "r"
    assert Decimal(payload["response"]["usage"]["cost"]) == Decimal("0.0000123")
    assert payload["response"]["usage"]["input_tokens"] == 9


@pytest.mark.parametrize("kind", ["error", "response.failed"])
def test_an_error_or_failed_event_is_a_mid_stream_failure(kind: str) -> None:
    from gateway.upstreams.client import UpstreamFailure

    state = _state()
    state.feed(sse_event({"type": "response.created", "response": {}}, "response.created"))
    with pytest.raises(UpstreamFailure):
        state.feed(sse_event({"type": kind, "message": "boom"}, kind))
    failure = state.failure_event("billed")
    assert failure is not None
    # The upstream's failure event is not relayed: the gateway's error event takes its number.
    assert json.loads(failure.split(b"data: ", 1)[1])["sequence_number"] == 1


# --- the OpenAPI schema ---------------------------------------------------------------------


def test_both_endpoints_and_the_refused_stored_responses_are_in_the_schema(live_gateway):
    schema = httpx.get(f"{live_gateway.url}/v1/openapi.json", timeout=30).json()
    components = schema["components"]["schemas"]
    for path, fields in (
        ("/v1/responses", {"model", "input", "instructions", "max_output_tokens", "stream"}),
        ("/v1/embeddings", {"model", "input", "encoding_format", "dimensions"}),
    ):
        operation = schema["paths"][path]["post"]
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert fields <= set(components[ref.rsplit("/", 1)[1]]["properties"])
        assert {"200", "400", "402", "404", "502"} <= set(operation["responses"])
    stored = schema["paths"]["/v1/responses/{response_id}"]
    assert set(stored) >= {"get", "delete"}
    assert "200" not in stored["get"]["responses"] and "400" in stored["get"]["responses"]
    assert "post" in schema["paths"]["/v1/responses/{response_id}/cancel"]
