"""A stream through the completion view (adrf's APIView returning Django's StreamingHttpResponse
over the pipeline's async generator) reaches the client chunk by chunk, as the upstream
produces it, over real HTTP and a real uvicorn: adrf's issue #58 (an async generator consumed
synchronously, so the whole stream arrives at its end) does not happen here.

The upstream is a socket the test steps: it sends its next event only when the test allows, and
the test allows it only after it has read the previous one from the gateway. A gateway that
buffered the stream would never hand the client the first event (the upstream waits for the
client before it ends), and the test would fail on its read timeout."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal

import pytest

from billing.models import Hold
from billing.services.tariffs import tariff_set
from gateway.services import model_route_set, upstream_add
from tests.factories import EPOCH
from tests.gateway.conftest import World
from tests.gateway.ledger import assert_clean, wait_for_hold_resolution

WORDS = ["Hello", " stepped", " world"]


def _chunk(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _events() -> list[bytes]:
    head = {"id": "chatcmpl-step", "object": "chat.completion.chunk", "model": "m", "created": 0}
    events = [
        _chunk({**head, "choices": [{"index": 0, "delta": {"content": word}}]}) for word in WORDS
    ]
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    events.append(_chunk({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    events.append(_chunk({**head, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


class SteppedUpstream:
    """An OpenAI-style upstream that sends event i of its stream once `allow(i)` was called."""

    def __init__(self) -> None:
        self.events = _events()
        self.allowed = [threading.Event() for _ in self.events]
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def allow(self, index: int) -> None:
        self.allowed[index].set()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
            )
            for allowed, event in zip(self.allowed, self.events, strict=True):
                if not allowed.wait(timeout=60):
                    return
                conn.sendall(event)

    def close(self) -> None:
        for allowed in self.allowed:
            allowed.set()
        self.thread.join(timeout=10)
        self.server.close()


@pytest.fixture
def stepped_upstream() -> Iterator[SteppedUpstream]:
    upstream = SteppedUpstream()
    yield upstream
    upstream.close()


def _stepped_model(upstream: SteppedUpstream) -> str:
    upstream_add(
        name=f"stepped-{upstream.port}",
        kind="openai",
        base_url=f"http://127.0.0.1:{upstream.port}/v1",
    )
    alias = f"gpt-stepped-{upstream.port}"
    model_route_set(alias=alias, upstream_name=f"stepped-{upstream.port}", max_output_tokens=64)
    tariff_set(
        model_alias=alias,
        input_per_mtok=Decimal("1"),
        output_per_mtok=Decimal("2"),
        valid_from=EPOCH,
    )
    return alias


def _content(line: str) -> str:
    payload = json.loads(line.removeprefix("data: "))
    return "".join(choice["delta"].get("content") or "" for choice in payload["choices"])


def test_a_stream_reaches_the_client_event_by_event_as_the_upstream_sends_it(
    world: World, stepped_upstream: SteppedUpstream
) -> None:
    model = _stepped_model(stepped_upstream)
    stepped_upstream.allow(0)  # the gateway answers once the upstream's first event is in
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with (
        world.http() as http,
        http.stream("POST", "/v1/chat/completions", json=body, timeout=30) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"].startswith("req_")
        # The pipeline's own headers on its stream reach the client too.
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        lines = (line for line in response.iter_lines() if line)
        for index, word in enumerate(WORDS):
            # Event `index` reached us while the upstream still holds back every later one.
            assert _content(next(lines)) == word
            assert not any(allowed.is_set() for allowed in stepped_upstream.allowed[index + 1 :])
            stepped_upstream.allow(index + 1)
        for index in range(len(WORDS) + 1, len(stepped_upstream.events)):
            stepped_upstream.allow(index)
        rest = list(lines)

    usage = json.loads(rest[-2].removeprefix("data: "))["usage"]
    assert usage["total_tokens"] == 8 and Decimal(usage["cost"]) > 0
    assert rest[-1] == "data: [DONE]"
    hold = wait_for_hold_resolution(response.headers["x-request-id"])
    assert hold.state == Hold.State.SETTLED
    assert_clean(world.account)
