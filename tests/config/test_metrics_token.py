"""/metrics shows revenue and refusal counts: with METRICS_TOKEN set it needs
`Authorization: Bearer <token>` (compared in constant time) and is a 401 without; unset, it is
open (the quickstart, on loopback)."""

from __future__ import annotations

import hmac
from pathlib import Path

import httpx
import pytest
from django.test import Client, override_settings

TOKEN = "metrics-s3cret-token"
METRIC = "# TYPE billing_settlements"


def get(client: Client, authorization: str | None = None) -> tuple[int, str, str | None]:
    headers = {} if authorization is None else {"HTTP_AUTHORIZATION": authorization}
    response = client.get("/metrics", **headers)  # type: ignore[arg-type]
    return response.status_code, response.content.decode(), response.get("WWW-Authenticate")


@pytest.mark.django_db
@override_settings(METRICS_TOKEN=TOKEN)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-token",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN} extra",
    ],
    ids=[
        "no_header",
        "empty",
        "scheme_only",
        "empty_token",
        "wrong",
        "longer",
        "shorter",
        "other_scheme",
        "no_scheme",
        "trailing_words",
    ],
)
def test_without_the_token_metrics_are_a_401(client: Client, authorization: str | None) -> None:
    status, body, challenge = get(client, authorization)
    assert status == 401
    assert METRIC not in body
    assert challenge == 'Bearer realm="metrics"'


@pytest.mark.django_db
@override_settings(METRICS_TOKEN=TOKEN)
@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_with_the_token_metrics_are_served(client: Client, scheme: str) -> None:
    status, body, _ = get(client, f"{scheme} {TOKEN}")
    assert status == 200
    assert METRIC in body


@pytest.mark.django_db
@override_settings(METRICS_TOKEN=TOKEN)
def test_the_token_is_compared_in_constant_time(client: Client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    compared: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def spy(given: bytes, expected: bytes) -> bool:
        compared.append((given, expected))
        return compare_digest(given, expected)

    monkeypatch.setattr("config.metrics.hmac.compare_digest", spy)
    assert get(client, "Bearer nope")[0] == 401
    assert get(client, f"Bearer {TOKEN}")[0] == 200
    assert compared == [(b"nope", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


@pytest.mark.django_db
@override_settings(METRICS_TOKEN="")
@pytest.mark.parametrize("authorization", [None, "Bearer anything"], ids=["none", "any"])
def test_without_a_token_set_metrics_are_open(client: Client, authorization: str | None) -> None:
    status, body, _ = get(client, authorization)
    assert status == 200
    assert METRIC in body


def test_the_setting_defaults_to_unset() -> None:
    from django.conf import settings

    assert settings.METRICS_TOKEN == ""


def test_metrics_need_the_token_on_the_api_port(django_db_setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Through uvicorn serving config.asgi:application, as the gateway runs."""
    from tests.gateway.conftest import start_gateway, stop_gateway

    gateway = start_gateway(tmp_path / "uvicorn.log", METRICS_TOKEN=TOKEN)
    try:
        anonymous = httpx.get(f"{gateway.url}/metrics", timeout=10)
        wrong = httpx.get(
            f"{gateway.url}/metrics", headers={"Authorization": "Bearer no"}, timeout=10
        )
        right = httpx.get(
            f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
        )
    finally:
        stop_gateway(gateway)
    assert (anonymous.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert METRIC not in anonymous.text
    assert METRIC in right.text
