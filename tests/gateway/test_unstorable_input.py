"""A string the database cannot store (a NUL character, a model name longer than its column)
is the client's 400 naming the parameter, decided before any database work: never the 503 of
a billing outage (which anyone could fake with one request), never a warning in the log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest

from billing.models import Hold, LanguageModel, LedgerTransaction, UsageRecord
from gateway.errors import GatewayError
from gateway.http import CompletionRequest, request_json
from gateway.upstreams.anthropic import AnthropicMessages
from gateway.upstreams.base import MODEL_MAX_LENGTH
from gateway.upstreams.openai import OpenAIChat
from tests.gateway.conftest import LiveGateway, start_gateway, stop_gateway

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def quiet_gateway(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[LiveGateway]:  # type: ignore[no-untyped-def]
    """A gateway of this module's own, so its log holds only what these requests caused."""
    gateway = start_gateway(tmp_path_factory.mktemp("unstorable") / "uvicorn.log")
    yield gateway
    stop_gateway(gateway)


def unstorable_models(world) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        "\x00",
        f"{world.openai_model}\x00",
        f"\x00{world.anthropic_model}",
        "x" * (MODEL_MAX_LENGTH + 1),
        world.openai_model + "x" * MODEL_MAX_LENGTH,
    ]


CASES = ["nul_alone", "nul_after_a_known_model", "nul_before_a_known_model", "long", "long_known"]


def post(gateway: LiveGateway, key: str, path: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": HI, "max_tokens": 5}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(f"{gateway.url}{path}", content=json.dumps(body), headers=headers, timeout=30)


def log_lines_after(gateway: LiveGateway, offset: int) -> list[str]:
    return gateway.log_text()[offset:].splitlines()


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASES)
def test_an_unstorable_model_is_a_400_naming_model_on_chat_completions(world, quiet_gateway, case):
    model = unstorable_models(world)[case]
    offset = len(quiet_gateway.log_text())
    response = post(quiet_gateway, world.key, "/v1/chat/completions", model)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_value",
        "model",
    )
    assert "'model'" in error["message"]
    assert "\x00" not in error["message"]
    _assert_no_trace(world)
    assert [line for line in log_lines_after(quiet_gateway, offset) if " WARNING " in line] == []


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASES)
def test_an_unstorable_model_is_a_400_naming_model_on_messages(world, quiet_gateway, case):
    model = unstorable_models(world)[case]
    offset = len(quiet_gateway.log_text())
    response = post(quiet_gateway, world.key, "/v1/messages", model)

    assert response.status_code == 400, response.text
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    assert "'model'" in payload["error"]["message"]
    _assert_no_trace(world)
    assert [line for line in log_lines_after(quiet_gateway, offset) if " WARNING " in line] == []


def test_a_model_of_the_longest_storable_name_is_an_unknown_model(world, quiet_gateway):
    response = post(quiet_gateway, world.key, "/v1/chat/completions", "m" * MODEL_MAX_LENGTH)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    _assert_no_trace(world)


@pytest.mark.parametrize("adapter", [OpenAIChat, AnthropicMessages])
@pytest.mark.parametrize("model", ["a\x00b", "x" * (MODEL_MAX_LENGTH + 1)], ids=["nul", "too_long"])
def test_parse_refuses_a_model_the_database_cannot_store(adapter, model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GatewayError) as raised:
        adapter.parse({"model": model, "messages": HI, "max_tokens": 5})
    assert (raised.value.status, raised.value.param) == (400, "model")


def test_the_limit_is_the_model_columns_width() -> None:
    columns = [
        LanguageModel._meta.get_field("alias"),
        Hold._meta.get_field("model_alias"),
        UsageRecord._meta.get_field("model_alias"),
        LedgerTransaction._meta.get_field("model_alias"),
    ]
    assert {column.max_length for column in columns} == {MODEL_MAX_LENGTH}


@pytest.mark.parametrize(
    "raw", [rb'"\ud800"', rb'"\udc00"', b'"\xed\xa0\x80"'], ids=["high", "low", "utf8_encoded"]
)
def test_a_lone_surrogate_never_gets_past_the_json_parser(raw: bytes) -> None:
    body = b'{"model": ' + raw + b', "messages": [{"role": "user", "content": "hi"}]}'
    with pytest.raises(GatewayError) as raised:
        request_json(CompletionRequest(request_id="req-1", body=body, headers={}))
    assert (raised.value.status, raised.value.code) == (400, "invalid_json")


def _assert_no_trace(world) -> None:  # type: ignore[no-untyped-def]
    world.account.refresh_from_db()
    assert (world.account.balance, world.account.held) == (Decimal("10"), 0)
    assert not Hold.objects.filter(account=world.account).exists()
    assert not LedgerTransaction.objects.exclude(kind="grant").exists()
