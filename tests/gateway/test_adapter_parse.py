"""What the adapters read from a client's body and what they forward: a null field is an
absent field, and exactly one output limit, the one the hold covered, goes upstream."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import GatewayError
from gateway.upstreams.anthropic import AnthropicMessages
from gateway.upstreams.base import UpstreamTarget
from gateway.upstreams.openai import OpenAIChat

LIMITS = ("max_tokens", "max_completion_tokens")
HI = [{"role": "user", "content": "hi"}]
TARGET = UpstreamTarget(
    kind="openai",
    base_url="http://upstream.test/v1",
    api_key="",
    upstream_model="upstream-model",
    connect_timeout=1.0,
    read_timeout=5.0,
)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt", "messages": HI, **fields}


def forwarded(adapter: Any, body: dict[str, Any], *, limit: int) -> dict[str, Any]:
    parsed = adapter.parse(body)
    _, _, sent = adapter.upstream_request(
        parsed, TARGET, max_output_tokens=limit, anthropic_version=None
    )
    assert isinstance(sent, dict)
    return sent


# (id, the client's limit fields, the limit it asked for, the field that carries it upstream)
OPENAI_LIMITS = [
    # The official SDK's max_tokens=1, max_completion_tokens=None.
    ("sdk_null_completion", {"max_completion_tokens": None, "max_tokens": 1}, 1, "max_tokens"),
    (
        "null_max_tokens",
        {"max_tokens": None, "max_completion_tokens": 7},
        7,
        "max_completion_tokens",
    ),
    ("both_null", {"max_tokens": None, "max_completion_tokens": None}, None, "max_tokens"),
    ("one_null", {"max_completion_tokens": None}, None, "max_tokens"),
    ("neither", {}, None, "max_tokens"),
    ("max_tokens_only", {"max_tokens": 9}, 9, "max_tokens"),
    ("completion_only", {"max_completion_tokens": 9}, 9, "max_completion_tokens"),
    ("both_smaller_max_tokens", {"max_tokens": 3, "max_completion_tokens": 50}, 3, "max_tokens"),
    (
        "both_smaller_completion",
        {"max_tokens": 50, "max_completion_tokens": 3},
        3,
        "max_completion_tokens",
    ),
    ("both_equal", {"max_tokens": 4, "max_completion_tokens": 4}, 4, "max_completion_tokens"),
]


@pytest.mark.parametrize(
    ("fields", "asked", "param"), [c[1:] for c in OPENAI_LIMITS], ids=[c[0] for c in OPENAI_LIMITS]
)
def test_openai_reads_the_smaller_of_the_limits_given_and_null_as_absent(
    fields: dict[str, Any], asked: int | None, param: str
) -> None:
    parsed = OpenAIChat.parse(chat(**fields))
    assert (parsed.max_output_tokens, parsed.max_tokens_param) == (asked, param)


@pytest.mark.parametrize(
    ("fields", "asked", "param"), [c[1:] for c in OPENAI_LIMITS], ids=[c[0] for c in OPENAI_LIMITS]
)
def test_openai_forwards_exactly_one_limit_the_one_held(
    fields: dict[str, Any], asked: int | None, param: str
) -> None:
    held = asked or 4096  # the pipeline holds for the route's maximum when none was asked
    sent = forwarded(OpenAIChat, chat(**fields), limit=held)
    assert {name: sent[name] for name in LIMITS if name in sent} == {param: held}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 1, "max_completion_tokens": "x"}, "max_completion_tokens"),
        ({"max_tokens": 0, "max_completion_tokens": 5}, "max_tokens"),
        ({"max_tokens": None, "max_completion_tokens": -1}, "max_completion_tokens"),
        ({"max_tokens": True}, "max_tokens"),
    ],
    ids=["bad_completion_beside_good", "zero_beside_good", "negative_beside_null", "boolean"],
)
def test_openai_checks_every_limit_given(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as raised:
        OpenAIChat.parse(chat(**fields))
    assert (raised.value.status, raised.value.param) == (400, param)


# (id, a nullable field sent as null, what parse makes of it)
OPENAI_NULLS = [
    ("n", {"n": None}, lambda p: p.n == 1),
    ("stream", {"stream": None}, lambda p: p.stream is False),
    ("stream_options", {"stream_options": None}, lambda p: p.include_usage is False),
    (
        "include_usage",
        {"stream": True, "stream_options": {"include_usage": None}},
        lambda p: p.stream and p.include_usage is False,
    ),
]


@pytest.mark.parametrize(
    ("fields", "check"), [c[1:] for c in OPENAI_NULLS], ids=[c[0] for c in OPENAI_NULLS]
)
def test_openai_null_fields_are_absent_and_not_forwarded_as_null(
    fields: dict[str, Any], check: Any
) -> None:
    assert check(OpenAIChat.parse(chat(**fields)))
    sent = forwarded(OpenAIChat, chat(**fields), limit=10)
    assert None not in (sent.get(name, 0) for name in ("n", "stream", "stream_options", *LIMITS))


def test_openai_forwards_n_and_stream_as_read() -> None:
    sent = forwarded(OpenAIChat, chat(n=3, stream=True), limit=10)
    assert (sent["n"], sent["stream"], sent["stream_options"]) == (3, True, {"include_usage": True})
    assert sent["model"] == "upstream-model"


def anthropic_body(**fields: Any) -> dict[str, Any]:
    return {"model": "claude", "messages": HI, **fields}


@pytest.mark.parametrize(
    "fields",
    [{}, {"max_tokens": None}],
    ids=["missing", "null"],
)
def test_anthropic_max_tokens_null_is_the_400_of_a_missing_one(fields: dict[str, Any]) -> None:
    with pytest.raises(GatewayError) as raised:
        AnthropicMessages.parse(anthropic_body(**fields))
    error = raised.value
    assert (error.status, error.param, error.message) == (
        400,
        "max_tokens",
        "'max_tokens' is required.",
    )


# (id, a nullable field sent as null, what parse makes of it)
ANTHROPIC_NULLS = [
    ("stream", {"stream": None}, lambda p: p.stream is False),
    ("system", {"system": None}, lambda p: p.system is None),
]


@pytest.mark.parametrize(
    ("fields", "check"), [c[1:] for c in ANTHROPIC_NULLS], ids=[c[0] for c in ANTHROPIC_NULLS]
)
def test_anthropic_null_fields_are_absent_and_not_forwarded_as_null(
    fields: dict[str, Any], check: Any
) -> None:
    body = anthropic_body(max_tokens=5, **fields)
    assert check(AnthropicMessages.parse(body))
    sent = forwarded(AnthropicMessages, body, limit=5)
    assert None not in (sent.get(name, 0) for name in ("stream", "system", "max_tokens"))
    assert sent["max_tokens"] == 5


def test_parse_leaves_the_clients_body_as_it_was() -> None:
    body = chat(max_completion_tokens=None, max_tokens=1, n=None)
    snapshot = dict(body)
    forwarded(OpenAIChat, body, limit=1)
    assert body == snapshot
