"""config/threads.py: each request's thread-sensitive work goes to one reusable thread, taken
only if the request needs one; a request that never did runs its close on the event loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, reset_queries

from config.threads import RequestThreads
from tests.asgi import asgi_call, http_scope


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


class App:
    """An ASGI app shaped like Django's handler: maybe sync work for the view, the response,
    then the close as sync work (as Django's `sync_to_async(response.close)`)."""

    def __init__(self, *, sync_view: bool, response_ends: bool = True) -> None:
        self.sync_view = sync_view
        self.response_ends = response_ends
        self.threads: dict[str, int] = {}

    def record(self, step: str) -> None:
        self.threads[step] = threading.get_ident()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.sync_view:
            await sync_to_async(self.record)("view")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send(
            {"type": "http.response.body", "body": b"ok", "more_body": not self.response_ends}
        )
        await sync_to_async(self.record)("close")


async def _serve(threads: RequestThreads) -> None:
    async def send(message: dict[str, Any]) -> None:
        pass

    await threads(http_scope("/", method="GET"), _receive, send)


def test_a_request_without_sync_work_closes_on_the_loop_and_takes_no_thread() -> None:
    app = App(sync_view=False)
    threads = RequestThreads(app)

    asyncio.run(_serve(threads))

    assert app.threads["close"] == threading.get_ident()  # asyncio.run's loop: this thread
    assert threads.idle == []  # none was created


def test_a_request_with_sync_work_keeps_its_thread_and_gives_it_back() -> None:
    app = App(sync_view=True)
    threads = RequestThreads(app)

    async def two_requests() -> tuple[dict[str, int], dict[str, int]]:
        await _serve(threads)
        first = dict(app.threads)
        await _serve(threads)
        return first, dict(app.threads)

    first, second = asyncio.run(two_requests())

    # The view and the close in one thread (its connections are closed where they were
    # opened), not the loop's; the next request reuses it from the free list.
    assert first["view"] == first["close"] != threading.get_ident()
    assert second["view"] == second["close"] == first["view"]
    assert len(threads.idle) == 1


def test_a_response_that_never_ended_closes_in_a_thread() -> None:
    # A client that left mid-stream: closing the stream settles it on the loop, from the thread.
    app = App(sync_view=False, response_ends=False)

    asyncio.run(_serve(RequestThreads(app)))

    assert app.threads["close"] != threading.get_ident()


def test_what_runs_on_the_loop_raises_to_its_caller() -> None:
    class Failing(App):
        def record(self, step: str) -> None:
            raise LookupError(step)

    with pytest.raises(LookupError, match="close"):
        asyncio.run(_serve(RequestThreads(Failing(sync_view=False))))


@pytest.fixture
def finished_in() -> Any:
    seen: list[int] = []

    def finished(sender: Any, **_: Any) -> None:
        seen.append(threading.get_ident())

    request_finished.connect(finished)
    yield seen
    request_finished.disconnect(finished)


@pytest.fixture
def request_started_as_served() -> Any:
    """request_started as config/asgi.py leaves it in a server (Django's test client, used by
    other tests, connects close_old_connections again after each of its requests)."""
    connected = [
        receiver
        for receiver in (close_old_connections, reset_queries)
        if request_started.disconnect(receiver)
    ]
    yield
    for receiver in connected:
        request_started.connect(receiver)


def test_the_asgi_application_leaves_request_started_without_receivers() -> None:
    # In a fresh interpreter, as a server imports it (this one's signals are the tests').
    probe = (
        "import config.asgi; from django.core.signals import request_started; "
        "print(len(request_started.receivers))"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_DEBUG"}  # production settings
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "0"


@pytest.mark.django_db
@pytest.mark.usefixtures("request_started_as_served")
def test_djangos_close_runs_on_the_loop_only_for_a_request_without_sync_work(
    finished_in: list[int],
) -> None:
    # An unknown /v1/ path is answered on the loop: its close (request_finished) runs there.
    status, *_ = asyncio.run(asgi_call("GET", "/v1/no-such-endpoint"))
    assert status == 404
    # A sync view (its key is looked up in the request's thread): its close runs in that thread.
    status, *_ = asyncio.run(asgi_call("GET", "/v1/models"))
    assert status == 401

    loop_thread = threading.get_ident()
    assert finished_in[0] == loop_thread
    assert finished_in[1] != loop_thread
