"""Bad input: the provider's error shape and status, no trace in the ledger, no hold."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.utils import timezone

from billing.models import Hold, LedgerTransaction
from billing.services.keys import api_key_revoke
from billing.services.tariffs import tariff_set
from gateway.services import model_route_set
from tests.factories import EPOCH, make_key

OPENAI_FIELDS = {"message", "type", "param", "code"}


def _chat(world, **overrides):  # type: ignore[no-untyped-def]
    body = {"model": world.openai_model, "messages": [{"role": "user", "content": "hi"}]}
    body.update(overrides)
    return body


def _chat_raw(world, member: bytes):  # type: ignore[no-untyped-def]
    """A valid chat body as bytes, with one more raw member written in."""
    return json.dumps(_chat(world)).encode().replace(b"{", b"{" + member + b", ", 1)


CASES = [
    # id, body builder, status, code, param
    ("malformed_json", lambda w: b"{not json", 400, "invalid_json", None),
    # JSON has no NaN or Infinity, and a prompt is UTF-8 text, so none of these is a request.
    ("nan_in_json", lambda w: _chat_raw(w, b'"temperature": NaN'), 400, "invalid_json", None),
    ("infinity", lambda w: _chat_raw(w, b'"temperature": -Infinity'), 400, "invalid_json", None),
    ("invalid_utf8", lambda w: _chat_raw(w, b'"user": "\xff"'), 400, "invalid_json", None),
    ("body_not_object", lambda w: b"[1, 2]", 400, None, None),
    (
        "missing_model",
        lambda w: {"messages": [{"role": "user", "content": "hi"}]},
        400,
        "invalid_value",
        "model",
    ),
    ("model_wrong_type", lambda w: _chat(w, model=42), 400, "invalid_value", "model"),
    ("missing_messages", lambda w: {"model": w.openai_model}, 400, "invalid_value", "messages"),
    ("messages_wrong_type", lambda w: _chat(w, messages="hi"), 400, "invalid_value", "messages"),
    (
        "message_without_role",
        lambda w: _chat(w, messages=[{"content": "hi"}]),
        400,
        "invalid_value",
        "messages[0]",
    ),
    (
        "content_wrong_type",
        lambda w: _chat(w, messages=[{"role": "user", "content": 5}]),
        400,
        "invalid_value",
        "messages[0].content",
    ),
    ("stream_wrong_type", lambda w: _chat(w, stream="yes"), 400, "invalid_value", "stream"),
    ("max_tokens_zero", lambda w: _chat(w, max_tokens=0), 400, "invalid_value", "max_tokens"),
    (
        "max_tokens_negative",
        lambda w: _chat(w, max_completion_tokens=-5),
        400,
        "invalid_value",
        "max_completion_tokens",
    ),
    (
        "max_tokens_absurd",
        lambda w: _chat(w, max_tokens=10**12),
        400,
        "invalid_value",
        "max_tokens",
    ),
    (
        "max_tokens_above_route",
        lambda w: _chat(w, max_tokens=5000),
        400,
        "invalid_value",
        "max_tokens",
    ),
    ("max_tokens_not_int", lambda w: _chat(w, max_tokens="10"), 400, "invalid_value", "max_tokens"),
    ("n_zero", lambda w: _chat(w, n=0), 400, "invalid_value", "n"),
    ("unknown_model", lambda w: _chat(w, model="no-such-model"), 404, "model_not_found", "model"),
]


@pytest.mark.parametrize(
    ("build", "status", "code", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_chat_request_is_refused_without_a_trace(world, build, status, code, param):
    body = build(world)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with world.http() as client:
        response = client.post(
            "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
        )
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == OPENAI_FIELDS
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert error["param"] == param
    _assert_no_trace(world)


ANTHROPIC_CASES = [
    ("missing_max_tokens", {"messages": [{"role": "user", "content": "hi"}]}, 400),
    ("max_tokens_zero", {"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("empty_messages", {"max_tokens": 5, "messages": []}, 400),
    (
        "system_wrong_type",
        {"max_tokens": 5, "system": 3, "messages": [{"role": "user", "content": "hi"}]},
        400,
    ),
]


@pytest.mark.parametrize(
    ("body", "status"), [c[1:] for c in ANTHROPIC_CASES], ids=[c[0] for c in ANTHROPIC_CASES]
)
def test_bad_messages_request_gets_anthropic_error_shape(world, body, status):
    with world.http() as client:
        response = client.post(
            "/v1/messages",
            json={"model": world.anthropic_model, **body},
            headers={"x-api-key": world.key, "Authorization": ""},
        )
    assert response.status_code == status
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    _assert_no_trace(world)


def test_unpriced_model_is_refused_with_400(world, mock_upstream):
    model_route_set(alias="unpriced-model", upstream_name="mock-openai")
    with world.http() as client:
        response = client.post("/v1/chat/completions", json=_chat(world, model="unpriced-model"))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_priced"
    _assert_no_trace(world)


def test_future_tariff_does_not_price_a_model_today(world):
    model_route_set(alias="future-model", upstream_name="mock-openai")
    tariff_set(
        model_alias="future-model",
        input_per_mtok=Decimal(1),
        output_per_mtok=Decimal(1),
        valid_from=timezone.now() + timedelta(days=1),
    )
    with world.http() as client:
        response = client.post("/v1/chat/completions", json=_chat(world, model="future-model"))
    assert response.status_code == 400
    _assert_no_trace(world)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_oversized_body_gets_413_in_provider_shape(world, path):
    big = {
        "model": world.openai_model,
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x" * (10 * 1024 * 1024 + 10)}],
    }
    with world.http() as client:
        response = client.post(path, json=big)
    assert response.status_code == 413
    payload = response.json()
    assert ("error" in payload) and (payload.get("type") == "error") == (path == "/v1/messages")
    _assert_no_trace(world)


def _key_cases(world):  # type: ignore[no-untyped-def]
    now = timezone.now()
    revoked = make_key(account=world.account, now=now)
    api_key_revoke(key_id=revoked.api_key.pk, now=now)
    expired = make_key(account=world.account, now=EPOCH, expires_at=EPOCH + timedelta(days=1))
    return {
        "missing": None,
        "invalid": "sk-gw-not-a-real-key",
        "revoked": revoked.secret,
        "expired": expired.secret,
    }


@pytest.mark.parametrize("case", ["missing", "invalid", "revoked", "expired"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_bad_key_gets_401(world, case, path):
    secret = _key_cases(world)[case]
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    body = {
        "model": world.openai_model,
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    }
    response = httpx.post(world.gateway.url + path, json=body, headers=headers, timeout=10)
    assert response.status_code == 401
    payload = response.json()
    if path == "/v1/messages":
        assert payload["error"]["type"] == "authentication_error"
    else:
        assert payload["error"]["code"] in {"invalid_api_key", "missing_api_key"}
    _assert_no_trace(world)


def test_revoked_key_is_refused_at_once_on_every_endpoint(world):
    """The gateway caches keys for completions, but the hold re-checks the key in its own
    statement, and the read endpoints look it up uncached: no grace period after a revoke."""
    with world.http() as client:
        assert client.post("/v1/chat/completions", json=_chat(world)).status_code == 200
        assert client.get("/v1/billing/balance").status_code == 200
        charged = LedgerTransaction.objects.filter(kind="usage").count()
        api_key_revoke(key_id=world.issued.api_key.pk, now=timezone.now())

        completion = client.post("/v1/chat/completions", json=_chat(world))
        balance = client.get("/v1/billing/balance")

    assert completion.status_code == 401
    assert completion.json()["error"]["code"] == "invalid_api_key"
    assert balance.status_code == 401
    assert LedgerTransaction.objects.filter(kind="usage").count() == charged
    assert not Hold.objects.filter(account=world.account, state=Hold.State.ACTIVE).exists()
    world.account.refresh_from_db()
    assert world.account.held == 0


def test_insufficient_credit_gets_402_and_leaves_no_hold(world):
    with world.http() as client:
        response = client.post("/v1/chat/completions", json=_chat(world, max_tokens=4096, n=128))
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_quota"
    _assert_no_trace(world)


def test_exhausted_key_budget_gets_403(world):
    tight = make_key(
        account=world.account,
        now=timezone.now(),
        budget_limit=Decimal("0.00001"),
        budget_period="day",
    )
    response = httpx.post(
        world.gateway.url + "/v1/chat/completions",
        json=_chat(world),
        headers={"Authorization": f"Bearer {tight.secret}"},
        timeout=10,
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "budget_exceeded"
    _assert_no_trace(world)


def _assert_no_trace(world) -> None:  # type: ignore[no-untyped-def]
    world.account.refresh_from_db()
    assert world.account.balance == Decimal("10")
    assert world.account.held == 0
    assert not Hold.objects.filter(account=world.account).exists()
    assert not LedgerTransaction.objects.exclude(kind="grant").exists()
