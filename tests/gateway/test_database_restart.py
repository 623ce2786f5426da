"""The database drops every connection of a running gateway (a restart, a failover): the next
requests are still served and billed exactly, with no 5xx and no settle handed off."""

from __future__ import annotations

from typing import Any

import openai
from django.db import connection

from billing.engine import ASYNC_APPLICATION_NAME
from billing.pricing import Usage
from gateway.tokens import messages_tokens
from tests.gateway.conftest import start_gateway, stop_gateway
from tests.gateway.ledger import assert_clean, balance, charged, expected_cost

APP_NAME = "gateway-restart-test"


def _drop_gateway_connections() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name IN (%s, %s)",
            [APP_NAME, ASYNC_APPLICATION_NAME],
        )
        return int(cursor.fetchone()[0])


def test_requests_after_the_database_dropped_the_gateways_connections_are_served_and_billed(
    world, tmp_path
):
    # PGAPPNAME names the gateway's thread connections (its async ones have their own name).
    gateway = start_gateway(tmp_path / "gateway.log", PGAPPNAME=APP_NAME)
    messages: list[Any] = [{"role": "user", "content": "Hi [mock:tokens=7]"}]
    cost = expected_cost(Usage(input_tokens=messages_tokens(messages), output_tokens=7))
    request_ids = []
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=world.key, max_retries=0)

        def ask(*, stream: bool) -> None:
            raw = client.chat.completions.with_raw_response.create(
                model=world.openai_model, messages=messages, stream=stream
            )
            list(raw.parse()) if stream else raw.parse()
            request_ids.append(raw.headers["x-request-id"])

        for _ in range(3):  # the key, the route and both kinds of connection in use
            ask(stream=False)
        assert _drop_gateway_connections() >= 2
        for stream in (False, True, False, True, False, True):
            ask(stream=stream)
        log = gateway.log_text()
    finally:
        stop_gateway(gateway)
    assert "retrying on a fresh one" in log
    assert "handing it to the retry task" not in log
    assert [charged(request_id) for request_id in request_ids] == [cost] * 9
    assert balance(world.account) == (10 - 9 * cost, 0)
    assert_clean(world.account)
