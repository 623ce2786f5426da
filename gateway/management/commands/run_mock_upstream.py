"""`manage.py run_mock_upstream`: the mock LLM upstream for development, tests and benchmarks."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from gateway.mock.launch import bound_port, ready_line, serve


class Command(BaseCommand):
    help = (
        "Serve a mock OpenAI (/v1/chat/completions) and Anthropic (/v1/messages) upstream "
        "with deterministic output, exact usage and [mock:...] directives."
    )
    # It touches no database, so it must start even when none is reachable.
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=9100, help="0 picks a free port")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            import uvloop
        except ImportError:  # the standard loop is only slower
            asyncio.run(self._serve(host=options["host"], port=options["port"]))
        else:
            uvloop.run(self._serve(host=options["host"], port=options["port"]))

    async def _serve(self, *, host: str, port: int) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        runner = await serve(host=host, port=port)
        try:
            print(ready_line(host=host, port=bound_port(runner)), file=sys.stderr, flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()
