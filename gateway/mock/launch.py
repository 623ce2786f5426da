"""Ways to run the mock upstream: in a background thread (tests) or as a process (benchmarks)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from aiohttp import web

from gateway.mock.server import create_app

MANAGE_PY = Path(__file__).resolve().parents[2] / "manage.py"
READY_LINE = re.compile(r"mock upstream listening on (http://(\S+):(\d+))")
START_TIMEOUT_SECONDS = 20.0


def ready_line(*, host: str, port: int) -> str:
    url = f"http://{host}:{port}"
    return f"mock upstream listening on {url} (OpenAI base {url}/v1, Anthropic base {url})"


async def serve(*, host: str, port: int) -> web.AppRunner:
    """Start the app on host:port (0 picks a free port); the caller cleans the runner up."""
    # No access log: the benchmarks push thousands of requests a second through this.
    runner = web.AppRunner(create_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


class _Base:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """An OpenAI upstream's base URL: the gateway calls {base}/chat/completions."""
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """An Anthropic upstream's base URL: the gateway calls {base}/v1/messages."""
        return self.url

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class MockUpstreamThread(_Base):
    host: str
    port: int
    _loop: asyncio.AbstractEventLoop = field(repr=False)
    _runner: web.AppRunner = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        future.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def start_mock_upstream_in_thread(*, host: str = "127.0.0.1", port: int = 0) -> MockUpstreamThread:
    """Serve the mock from a daemon thread with its own event loop; returns once it accepts."""
    loop = asyncio.new_event_loop()
    started: dict[str, web.AppRunner | BaseException] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["runner"] = loop.run_until_complete(serve(host=host, port=port))
        except BaseException as exc:  # reported to the caller below
            started["error"] = exc
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="mock-upstream", daemon=True)
    thread.start()
    if not ready.wait(START_TIMEOUT_SECONDS):
        raise RuntimeError("mock upstream did not start in time")
    if "error" in started:
        raise RuntimeError("mock upstream failed to start") from started["error"]  # type: ignore[misc]
    runner = started["runner"]
    assert isinstance(runner, web.AppRunner)
    return MockUpstreamThread(
        host=host, port=bound_port(runner), _loop=loop, _runner=runner, _thread=thread
    )


@dataclass
class MockUpstreamProcess(_Base):
    host: str
    port: int
    process: subprocess.Popen[str] = field(repr=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _drain(stream: IO[str]) -> None:
    # Keep reading so the child never blocks on a full stderr pipe.
    for _ in stream:
        pass


def start_mock_upstream_process(
    *, host: str = "127.0.0.1", port: int = 0, python: str = sys.executable
) -> MockUpstreamProcess:
    """Run `manage.py run_mock_upstream` as a child process; returns once it accepts.

    Uses the current environment (DJANGO_SETTINGS_MODULE etc.). With port 0 the child picks a
    free port and reports it on its ready line, so there is no race for the port.
    """
    process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        [python, str(MANAGE_PY), "run_mock_upstream", "--host", host, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    seen: list[str] = []
    timer = threading.Timer(START_TIMEOUT_SECONDS, process.kill)
    timer.start()
    try:
        for line in process.stderr:
            seen.append(line)
            match = READY_LINE.search(line)
            if match:
                threading.Thread(target=_drain, args=(process.stderr,), daemon=True).start()
                return MockUpstreamProcess(host=match[2], port=int(match[3]), process=process)
    finally:
        timer.cancel()
    process.wait()
    raise RuntimeError(f"mock upstream exited with {process.returncode}: {''.join(seen)[-2000:]}")
