"""Live servers for gateway tests: the shipped mock upstream and a real uvicorn process
serving config.asgi:application against the test database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from itertools import count
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from django.conf import settings
from django.utils import timezone

from billing.models import Account
from billing.services.keys import IssuedKey
from billing.services.tariffs import tariff_set
from gateway.mock.launch import MockUpstreamThread, start_mock_upstream_in_thread
from gateway.services import model_route_set, upstream_add
from tests.factories import EPOCH, make_account, make_key

ROOT = Path(__file__).resolve().parents[2]
_aliases = count(1)

INPUT_PER_MTOK = Decimal("2.5")
OUTPUT_PER_MTOK = Decimal("10")
CACHED_INPUT_PER_MTOK = Decimal("1.25")
CACHE_WRITE_PER_MTOK = Decimal("3.75")
REASONING_PER_MTOK = Decimal("20")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_database_url() -> str:
    db = settings.DATABASES["default"]
    user = db.get("USER") or "postgres"
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}@{host}:{port}/{db['NAME']}"


@dataclass
class LiveGateway:
    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[MockUpstreamThread]:
    with start_mock_upstream_in_thread() as mock:
        yield mock


def start_gateway(log_path: Path, **env_overrides: str) -> LiveGateway:
    """uvicorn serving config.asgi:application against the test database."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": test_database_url(),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "BILLING_HOLD_TTL_SECONDS": "900",
        "LOG_LEVEL": "INFO",
        **env_overrides,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "config.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "info",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"gateway did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return LiveGateway(url=url, log_path=log_path, process=process)


def stop_gateway(gateway: LiveGateway) -> None:
    gateway.process.terminate()
    try:
        gateway.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        gateway.process.kill()


@pytest.fixture(scope="session")
def live_gateway(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[LiveGateway]:  # type: ignore[no-untyped-def]
    gateway = start_gateway(tmp_path_factory.mktemp("gateway") / "uvicorn.log")
    yield gateway
    stop_gateway(gateway)


@dataclass
class World:
    """One customer with a key, priced models on both endpoints, behind the live gateway."""

    gateway: LiveGateway
    account: Account
    issued: IssuedKey
    openai_model: str
    anthropic_model: str

    @property
    def key(self) -> str:
        return self.issued.secret

    def openai(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.gateway.url}/v1", api_key=key or self.key, max_retries=0
        )

    def anthropic(self, key: str | None = None) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            base_url=self.gateway.url, api_key=key or self.key, max_retries=0
        )

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.gateway.url, timeout=30, headers={"Authorization": f"Bearer {self.key}"}
        )


def priced_models(mock: MockUpstreamThread, *, max_output_tokens: int = 4096) -> tuple[str, str]:
    """Fresh aliases per test: the gateway caches routes and tariffs for a second."""
    n = next(_aliases)
    upstream_add(name="mock-openai", kind="openai", base_url=mock.openai_base_url)
    upstream_add(name="mock-anthropic", kind="anthropic", base_url=mock.anthropic_base_url)
    aliases = (f"gpt-test-{n}", f"claude-test-{n}")
    for alias, upstream in zip(aliases, ("mock-openai", "mock-anthropic"), strict=True):
        model_route_set(alias=alias, upstream_name=upstream, max_output_tokens=max_output_tokens)
        tariff_set(
            model_alias=alias,
            input_per_mtok=INPUT_PER_MTOK,
            output_per_mtok=OUTPUT_PER_MTOK,
            cached_input_per_mtok=CACHED_INPUT_PER_MTOK,
            cache_write_per_mtok=CACHE_WRITE_PER_MTOK,
            reasoning_per_mtok=REASONING_PER_MTOK,
            valid_from=EPOCH,
        )
    return aliases


@pytest.fixture
def world(live_gateway, mock_upstream, transactional_db) -> World:  # type: ignore[no-untyped-def]
    openai_model, anthropic_model = priced_models(mock_upstream)
    account = make_account(credits=Decimal("10"), now=timezone.now())
    return World(
        gateway=live_gateway,
        account=account,
        issued=make_key(account=account, now=timezone.now()),
        openai_model=openai_model,
        anthropic_model=anthropic_model,
    )
