"""A client that leaves after its hold was placed and before the upstream's first byte: the hold
is given back whole, and the request is recorded as client_disconnected (not a gateway error)
in its usage record and in the metrics."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from decimal import Decimal

import httpx
import orjson
import pytest

from billing.models import Hold, UsageRecord
from billing.services.tariffs import tariff_set
from gateway.services import model_route_set, upstream_add
from tests.factories import EPOCH
from tests.gateway.ledger import assert_clean, balance
from tests.workers import wait_until


class StallingUpstream:
    """Accepts the gateway's upstream call, tells the test it arrived, and answers nothing
    until the test lets it go (then closes the connection)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received = threading.Event()
        self.released = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.recv(65536)  # the request (headers and the small body)
            self.received.set()
            self.released.wait(timeout=60)

    def close(self) -> None:
        self.released.set()
        self.thread.join(timeout=10)
        self.server.close()


@pytest.fixture
def stalling_upstream() -> Iterator[StallingUpstream]:
    upstream = StallingUpstream()
    yield upstream
    upstream.close()


def _metric(gateway_url: str, name: str, **labels: str) -> float:
    """A counter's value as the gateway exposes it (0 before its first increment)."""
    for line in httpx.get(f"{gateway_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name}{{") and all(
            f'{key}="{value}"' in line for key, value in labels.items()
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_gone_before_the_first_upstream_byte_is_recorded_as_client_disconnected(
    world, stalling_upstream
):
    upstream_add(
        name="stalling", kind="openai", base_url=f"http://127.0.0.1:{stalling_upstream.port}/v1"
    )
    model_route_set(alias="gpt-stalling", upstream_name="stalling", max_output_tokens=64)
    tariff_set(
        model_alias="gpt-stalling",
        input_per_mtok=Decimal(1),
        output_per_mtok=Decimal(2),
        valid_from=EPOCH,
    )
    url = world.gateway.url
    before = _metric(
        url, "gateway_request_outcomes_total", endpoint="chat.completions",
        outcome="client_disconnected",
    )
    body = orjson.dumps(
        {"model": "gpt-stalling", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    host, port = url.removeprefix("http://").split(":")
    client = socket.create_connection((host, int(port)))
    client.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        + f"Authorization: Bearer {world.key}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    # The hold is placed before the upstream is called: once the call arrived, it is there.
    assert stalling_upstream.received.wait(timeout=30)
    hold = Hold.objects.get(account=world.account)
    assert hold.state == Hold.State.ACTIVE
    client.close()  # the client leaves; the upstream still has not sent a byte

    wait_until(lambda: Hold.objects.get(pk=hold.pk).state == Hold.State.RELEASED, timeout=30)
    record = UsageRecord.objects.get(request_id=hold.request_id)
    assert (record.outcome, record.cost) == ("client_disconnected", 0)
    assert balance(world.account) == (Decimal("10"), 0)
    assert_clean(world.account)
    after = _metric(
        url, "gateway_request_outcomes_total", endpoint="chat.completions",
        outcome="client_disconnected",
    )
    assert after == before + 1
