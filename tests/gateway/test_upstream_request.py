"""What the gateway asks the upstream for, from the client's request and the model's route."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.pricing import Price
from gateway.http import CompletionRequest
from gateway.pipeline import BilledRequest, _upstream_call
from gateway.selectors import ModelContext
from gateway.upstreams.anthropic import DEFAULT_VERSION, AnthropicMessages


@pytest.mark.parametrize(
    ("client_version", "forwarded"),
    [("2024-10-22", "2024-10-22"), (None, DEFAULT_VERSION)],
    ids=["the_clients", "none_sent"],
)
def test_the_anthropic_version_forwarded_is_the_clients(
    client_version: str | None, forwarded: str
) -> None:
    parsed = AnthropicMessages.parse(
        {"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    )
    billed = BilledRequest(
        request_id="req-1",
        account_id=1,
        adapter=AnthropicMessages,
        parsed=parsed,
        context=ModelContext(
            alias="claude",
            target_kind="anthropic",
            base_url="http://upstream.test",
            api_key_env="",
            upstream_model="claude-upstream",
            max_output_tokens=100,
            connect_timeout=1.0,
            read_timeout=5.0,
            tariffs=(),
        ),
        price=Price(input_per_mtok=Decimal(1), output_per_mtok=Decimal(1)),
        prompt_tokens=1,
        hold_amount=Decimal("0.01"),
        max_output_tokens=5,
        started_at=timezone.now(),
        started=time.monotonic(),
    )
    request = CompletionRequest(
        request_id="req-1",
        body=b"{}",
        headers={"anthropic-version": client_version} if client_version else {},
    )

    url, headers, body, _ = _upstream_call(request, billed)

    assert url == "http://upstream.test/v1/messages"
    assert headers["anthropic-version"] == forwarded
    assert (body["model"], body["max_tokens"]) == ("claude-upstream", 5)
