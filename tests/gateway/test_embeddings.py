"""POST /v1/embeddings through the one pipeline: billed on input tokens only, at the model's
input price, with the official `openai` SDK against a real uvicorn and the shipped mock."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import openai
import pytest

from billing.models import Hold
from billing.pricing import Usage
from gateway.mock.server import DEFAULT_EMBEDDING_DIMENSIONS, embedding_vector
from gateway.tokens import embedding_input_tokens, with_margin
from tests.gateway.conftest import INPUT_PER_MTOK
from tests.gateway.ledger import (
    PRICE,
    assert_clean,
    balance,
    charged,
    expected_cost,
    usage_record,
)
from tests.gateway.refusals import (
    assert_no_trace,
    assert_openai_error,
    assert_released_whole,
    openai_bad_input,
    post_raw,
)

START = Decimal("10")


@pytest.mark.parametrize(
    "inputs",
    ["one short text", ["two", "texts to embed"], [11, 22, 33], [[1, 2], [3, 4, 5]]],
    ids=["string", "strings", "token_array", "token_arrays"],
)
def test_sdk_embeddings_cost_input_tokens_times_the_input_price(world, inputs):
    raw = world.openai().embeddings.with_raw_response.create(model=world.openai_model, input=inputs)
    result = raw.parse()
    request_id = raw.headers["x-request-id"]
    tokens = embedding_input_tokens(inputs)
    cost = expected_cost(Usage(input_tokens=tokens))
    assert cost == tokens * INPUT_PER_MTOK / 1_000_000  # no output, and exact
    # The SDK asked for base64 and decoded it: the vectors came through untouched.
    assert result.data[0].embedding == embedding_vector(0, DEFAULT_EMBEDDING_DIMENSIONS)
    assert result.usage.prompt_tokens == tokens
    assert Decimal(result.usage.model_extra["cost"]) == cost
    assert Decimal(raw.headers["x-request-cost"]) == cost
    assert charged(request_id) == cost
    assert balance(world.account) == (START - cost, 0)
    record = usage_record(request_id)
    assert (record.input_tokens, record.output_tokens, record.estimated) == (tokens, 0, False)
    assert (record.outcome, record.stream) == ("completed", False)
    assert_clean(world.account)


def test_the_hold_is_our_count_of_the_input_at_the_input_price(world):
    text = "hold exactly this"
    with world.http() as client:
        response = client.post(
            "/v1/embeddings",
            json={"model": world.openai_model, "input": text, "encoding_format": "float"},
        )
    assert response.status_code == 200
    assert response.json()["data"][0]["embedding"] == embedding_vector(0, 8)
    hold = Hold.objects.get(request_id=response.headers["x-request-id"])
    # No output is held for: the worst case is the (margined) input alone.
    assert hold.amount == PRICE.worst_case(
        prompt_tokens=with_margin(embedding_input_tokens(text)), max_output_tokens=0
    )
    assert (hold.state, hold.amount > charged(hold.request_id)) == (Hold.State.SETTLED, True)
    assert_clean(world.account)


@pytest.mark.parametrize(
    ("directive", "status"),
    [
        ("[mock:fail=before_first_chunk]", 502),
        ("[mock:fail=mid_stream]", 502),
        ("[mock:status=503]", 502),
        ("[mock:status=429]", 429),
        ("[mock:status=400]", 400),
    ],
    ids=["fail_before_first_chunk", "connection_dropped", "upstream_503", "429", "400"],
)
def test_upstream_failure_releases_the_whole_hold(world, directive, status):
    with world.http() as client:
        response = client.post(
            "/v1/embeddings", json={"model": world.openai_model, "input": f"x {directive}"}
        )
    assert_released_whole(world, response, status=status)


def test_sdk_sees_upstream_failure_as_its_provider_error(world):
    with pytest.raises(openai.InternalServerError):
        world.openai().embeddings.create(model=world.openai_model, input="[mock:status=500]")
    with pytest.raises(openai.RateLimitError):
        world.openai().embeddings.create(model=world.openai_model, input="[mock:status=429]")
    assert balance(world.account) == (START, 0)


@pytest.mark.parametrize("report", ["no_usage", "bad_usage", "partial_usage"])
def test_usage_missing_or_unreadable_bills_our_count_marked_estimated(world, report):
    text = f"quiet words [mock:{report}]"
    with world.http() as client:
        response = client.post("/v1/embeddings", json={"model": world.openai_model, "input": text})
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    # Our tokenizer is the mock's, so the estimate is exact here; it is still flagged.
    cost = expected_cost(Usage(input_tokens=embedding_input_tokens(text)))
    usage = response.json()["usage"]
    assert (Decimal(usage["cost"]), usage["estimated"]) == (cost, True)
    assert Decimal(response.headers["x-request-cost"]) == cost
    assert charged(request_id) == cost
    assert usage_record(request_id).estimated is True
    assert_clean(world.account)


def _body(world, **fields: Any) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {"model": world.openai_model, "input": "hi", **fields}


BAD_INPUT = [
    *openai_bad_input(_body),
    ("empty_string", lambda w: _body(w, input=""), 400, "invalid_value", "input"),
    ("empty_list", lambda w: _body(w, input=[]), 400, "invalid_value", "input"),
    ("input_wrong_type", lambda w: _body(w, input={"text": "hi"}), 400, "invalid_value", "input"),
    ("empty_string_item", lambda w: _body(w, input=["a", ""]), 400, "invalid_value", "input[1]"),
    ("mixed_items", lambda w: _body(w, input=["a", 5]), 400, "invalid_value", "input[1]"),
    ("negative_token", lambda w: _body(w, input=[[1, -2]]), 400, "invalid_value", "input[0]"),
    ("too_many", lambda w: _body(w, input=["a"] * 2049), 400, "invalid_value", "input"),
    (
        "encoding_format",
        lambda w: _body(w, encoding_format="int8"),
        400,
        "invalid_value",
        "encoding_format",
    ),
    ("dimensions_zero", lambda w: _body(w, dimensions=0), 400, "invalid_value", "dimensions"),
]


@pytest.mark.parametrize(
    ("build", "status", "code", "param"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_is_refused_without_a_trace(world, build, status, code, param):
    response = post_raw(world, "/v1/embeddings", build(world))
    assert_openai_error(response, status=status, code=code, param=param)
    assert_no_trace(world)
