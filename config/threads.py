"""Each request's thread for its thread-sensitive sync work, as an ASGI middleware.

Django runs a request's thread-sensitive sync work (sync views, sync middleware, DRF's
authentication of a key the cache does not know, and always `response.close()` with its
request_finished signal) in one thread per request. Left to itself it creates that thread and
joins it for every request. `RequestThreads` gives each request a `RequestExecutor` through
asgiref's public `ThreadSensitiveContext(executor=...)` instead:

- the thread is taken from a free list the first time the request needs one, and given back
  when the request ends (asgiref lets later blocks reuse an executor, never two at once);
- a request that never needed one, once its response has been sent, runs what is left (only
  `response.close()`) on the event loop, at once. Such a request did no sync work, so no thread
  holds a database connection of its to close, and its request_finished receivers have nothing
  to block on: Django's close_old_connections finds none on the loop (the ORM never connects
  there) and the caches are in-process. A completion whose key is cached is such a request:
  without this, its close alone cost a thread hop, about 0.3 ms of CPU per request here.

A request that did use its thread, or whose response never ended (a client that left
mid-stream: closing the stream settles it, which needs the loop free), keeps using the thread.
A request_finished receiver that does database or other blocking work must not be added.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

from asgiref.sync import ThreadSensitiveContext

T = TypeVar("T")

# Idle request threads kept for reuse; a burst beyond this creates (and later drops) more.
IDLE_REQUEST_THREADS = 64


class RequestExecutor(Executor):
    """One request's thread-sensitive executor (module docstring). Only the event loop's
    thread submits to it and reads its flags."""

    def __init__(self, idle: list[ThreadPoolExecutor]) -> None:
        self.idle = idle
        self.thread: ThreadPoolExecutor | None = None
        self.response_sent = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if self.thread is None and self.response_sent:
            return _run_now(fn, *args, **kwargs)
        if self.thread is None:
            self.thread = (
                self.idle.pop()
                if self.idle
                else ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")
            )
        return self.thread.submit(fn, *args, **kwargs)

    def release(self) -> None:
        """Give the request's thread, if it took one, back to the free list."""
        thread, self.thread = self.thread, None
        if thread is None:
            return
        if len(self.idle) < IDLE_REQUEST_THREADS:
            self.idle.append(thread)
        else:
            thread.shutdown(wait=False)


def _run_now(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
    """`fn` run in the calling thread, as a finished future (what an executor's worker does)."""
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # as concurrent.futures' workers do: the awaiting side raises
        future.set_exception(exc)
    else:
        future.set_result(result)
    return future


class RequestThreads:
    """ASGI middleware: each request's thread-sensitive work goes to its RequestExecutor."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.idle: list[ThreadPoolExecutor] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        executor = RequestExecutor(self.idle)

        async def tracked_send(message: dict[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                executor.response_sent = True

        try:
            # Django's own (inner) ThreadSensitiveContext then uses this one.
            async with ThreadSensitiveContext(executor=executor):
                await self.app(scope, receive, tracked_send)
        finally:
            executor.release()
