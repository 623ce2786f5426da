"""Calling the ASGI application in-process, as uvicorn calls it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from config.asgi import application


def http_scope(
    path: str, *, method: str = "POST", extra_headers: tuple[tuple[bytes, bytes], ...] = ()
) -> dict[str, Any]:
    """An HTTP request's scope with a JSON content type (and `extra_headers`)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"host", b"testserver"),
            *extra_headers,
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def asgi_call(
    method: str,
    path: str,
    body: bytes | list[bytes] = b"",
    extra_headers: tuple[tuple[bytes, bytes], ...] = (),
) -> tuple[int, dict[str, str], Any, int]:
    """(status, headers, JSON body, body length in bytes); a list body arrives in those chunks.
    The client stays until the response is complete, then leaves."""
    chunks = body if isinstance(body, list) else [body]
    messages = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]
    response_done = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await response_done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            response_done.set()

    await application(http_scope(path, method=method, extra_headers=extra_headers), receive, send)
    start = sent[0]
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], headers, json.loads(payload), len(payload)
