"""Assertions for a refused request on the OpenAI-style endpoints: the provider's error shape,
and no trace in the ledger or the holds."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx

from billing.models import Hold, LedgerTransaction
from billing.selectors import ledger_audit
from tests.gateway.ledger import balance, charged

OPENAI_FIELDS = {"message", "type", "param", "code"}


def post_raw(world: Any, path: str, body: dict[str, Any] | bytes) -> httpx.Response:
    """POST `body` (a JSON object, or bytes sent as they are) as application/json."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with world.http() as client:
        return client.post(path, content=content, headers={"Content-Type": "application/json"})


def assert_openai_error(
    response: httpx.Response, *, status: int, code: str | None, param: str | None
) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == OPENAI_FIELDS and error["message"]
    if code is not None:
        assert error["code"] == code
    assert error["param"] == param


def assert_no_trace(world: Any, *, start: Decimal = Decimal("10")) -> None:
    """The account is as the world made it: no balance change, no hold, no posting."""
    world.account.refresh_from_db()
    assert (world.account.balance, world.account.held) == (start, 0)
    assert not Hold.objects.filter(account=world.account).exists()
    assert not LedgerTransaction.objects.exclude(kind="grant").exists()


def openai_bad_input(valid: Callable[..., dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The bad-input cases every OpenAI-style endpoint shares: (id, body builder, status, code,
    param), where `valid(world, **fields)` builds the endpoint's valid body with `fields`."""
    return [
        ("malformed_json", lambda w: b"{not json", 400, "invalid_json", None),
        ("body_not_object", lambda w: b"[1, 2]", 400, None, None),
        ("missing_model", lambda w: _without(valid(w), "model"), 400, "invalid_value", "model"),
        ("missing_input", lambda w: _without(valid(w), "input"), 400, "invalid_value", "input"),
        (
            "unknown_model",
            lambda w: valid(w, model="no-such-model"),
            404,
            "model_not_found",
            "model",
        ),
        # Served for OpenAI upstreams only.
        (
            "anthropic_route",
            lambda w: valid(w, model=w.anthropic_model),
            400,
            "invalid_value",
            "model",
        ),
    ]


def _without(body: dict[str, Any], field: str) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != field}


def assert_released_whole(world: Any, response: httpx.Response, *, status: int) -> None:
    """The upstream failed before anything reached the client: its provider-shaped error, and
    the whole hold released (nothing charged, the balance as it was)."""
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == OPENAI_FIELDS
    hold = Hold.objects.get(request_id=response.headers["x-request-id"])
    assert hold.state == Hold.State.RELEASED
    assert charged(hold.request_id) == 0
    assert (balance(world.account), held_open(world)) == ((Decimal("10"), 0), False)
    assert ledger_audit().clean


def held_open(world: Any) -> bool:
    return Hold.objects.filter(account=world.account, state=Hold.State.ACTIVE).exists()
