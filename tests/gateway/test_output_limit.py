"""The output limit through the official SDKs and a real uvicorn: a null field is an absent
one, and the one limit held for is the one limit the upstream gets."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import httpx2
import openai

from billing.models import Hold
from gateway.mock.server import BOTH_LIMITS_MESSAGE, completion_text
from gateway.tokens import messages_tokens, with_margin
from tests.gateway.ledger import PRICE, assert_clean, charged


def user(text: str) -> Any:
    return [{"role": "user", "content": text}]


def held_for(messages: Any, *, output_tokens: int) -> Decimal:
    """The hold of a prompt and `output_tokens` of output at the test tariff."""
    return PRICE.worst_case(
        prompt_tokens=with_margin(messages_tokens(messages)), max_output_tokens=output_tokens
    )


def test_the_sdks_null_max_completion_tokens_leaves_max_tokens_the_limit(world):
    sent: list[dict[str, Any]] = []

    def record(request: httpx2.Request) -> None:
        sent.append(json.loads(request.content))

    client = openai.OpenAI(
        base_url=f"{world.gateway.url}/v1",
        api_key=world.key,
        max_retries=0,
        http_client=httpx2.Client(event_hooks={"request": [record]}),
    )
    messages = user("Say a lot [mock:tokens=10]")
    raw = client.chat.completions.with_raw_response.create(
        model=world.openai_model, messages=messages, max_tokens=1, max_completion_tokens=None
    )
    completion = raw.parse()

    # What the SDK sends: the null beside the limit.
    assert (sent[0]["max_tokens"], sent[0]["max_completion_tokens"]) == (1, None)
    # The mock refuses two limits (as OpenAI does), so one reached it, and it was 1.
    assert completion.choices[0].message.content == completion_text(1)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 1
    request_id = raw.headers["x-request-id"]
    hold = Hold.objects.get(request_id=request_id)
    assert hold.amount == held_for(messages, output_tokens=1)
    assert hold.state == Hold.State.SETTLED
    assert charged(request_id) == Decimal((completion.usage.model_extra or {})["cost"])
    assert_clean(world.account)


def test_both_limits_hold_and_forward_the_smaller(world):
    messages = user("Say a lot [mock:tokens=10]")
    stream = world.openai().chat.completions.create(
        model=world.openai_model,
        messages=messages,
        max_tokens=50,
        max_completion_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion_text(3)
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 3
    hold = Hold.objects.get(account=world.account)
    assert hold.amount == held_for(messages, output_tokens=3)


def test_anthropic_null_max_tokens_is_the_400_of_a_missing_one(world):
    with world.http() as client:
        response = client.post(
            "/v1/messages",
            json={"model": world.anthropic_model, "max_tokens": None, "messages": user("hi")},
        )
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "'max_tokens' is required."},
    }
    assert not Hold.objects.filter(account=world.account).exists()


def test_the_mock_refuses_two_limits_as_openai_does(mock_upstream):
    response = httpx.post(
        f"{mock_upstream.openai_base_url}/chat/completions",
        json={
            "model": "mock-model",
            "messages": user("hi"),
            "max_tokens": 1,
            "max_completion_tokens": 4096,
        },
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["message"], error["param"]) == (BOTH_LIMITS_MESSAGE, "max_tokens")
    # A null beside a limit is no second limit.
    response = httpx.post(
        f"{mock_upstream.openai_base_url}/chat/completions",
        json={
            "model": "mock-model",
            "messages": user("hi"),
            "max_tokens": 1,
            "max_completion_tokens": None,
        },
    )
    assert response.status_code == 200
