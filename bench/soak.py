"""Soak: a bounded run of mixed traffic with faults injected, then a full money check.

    .venv/bin/python -m bench.soak [--minutes 10] [--concurrency 16] [--accounts 50]
        [--hold-ttl 60] [--drain-timeout 360] [--seed N]

Not a test, not run in CI (issue 14, "proof beyond the tests"). It starts, each in a process of
its own:

- a TCP proxy in front of PostgreSQL (this file, `--proxy-child`: the proxy of
  bench/tcp_proxy.py, shared with the tests), which every server process
  goes through, so the faults below hit the gateway, the worker and beat alike;
- the shipped mock upstream;
- uvicorn serving config.asgi:application with 2 worker processes (uvicorn's supervisor
  restarts a worker that dies: uvicorn/supervisors/multiprocess.py, keep_subprocess_alive);
- a real Celery worker (-P solo) and Celery beat (django-celery-beat's DatabaseScheduler, with
  the schedules migration reconciliation/0003 installs: the expiry sweep every minute),
  on Redis (SOAK_REDIS_URL, default redis://127.0.0.1:6379/7) and a queue of their own;

against a database of its own (SOAK_DATABASE_URL, default
postgres://postgres@127.0.0.1:5432/billing_soak, dropped, created and migrated at the start;
only a name starting with billing_soak is ever dropped). Holds live BILLING_HOLD_TTL_SECONDS
(--hold-ttl, 60 s: the upstream deadline is the TTL minus 30 s, so 30 s would cut every stream
after one second), so they expire within the run.

Traffic: --concurrency clients for --minutes, each request from one of --accounts accounts
(most with plenty of credit, a fifth with a small daily key budget, a tenth with little credit,
so refusals happen), on /v1/chat/completions and /v1/messages, streaming and not, short and
long answers, some with upstream failures (mock directives), some with a bad key; clients leave
at random points (mid-stream, or before the answer). Faults, at fixed fractions of the run:
the database cut for 8 s (12%), with the Celery worker SIGKILLed 5 s into it, while it holds
the settles handed off so far, and restarted 3 s after the restore; stalled for 6 s (35%); one
gateway worker process SIGKILLed (55%: uvicorn's supervisor starts another); cut again for 8 s
(75%). The worker's pool gives up on a connection after 3 s (DB_POOL_TIMEOUT_SECONDS), so a
settle meeting an outage fails and is retried with its backoff (capped at 5 s here).

Every client request records its x-request-id (when the response head arrived), whether it got
an answer and the cost it was told. At the end, once every hold has expired or resolved and
the Celery queue is drained (bounded by --drain-timeout), it prints totals and these checks,
and exits 1 if any fails:

1. every request that got a hold is charged exactly once, or released with nothing to charge,
   or in the reconciliation queue charged from a checkpoint, or queued with a documented reason
   (the client never got an answer; the gateway worker serving it was killed; the retries ran
   out); a hold no client request accounts for is counted against the requests that never saw
   their response head;
2. no request has more than one usage / write-off posting;
3. no hold is active at the end, none stayed active longer than two sweep periods + 30 s past
   its expiry during the run (sampled every few seconds), none expired before its expiry;
4. the ledger audit (billing.selectors.ledger_audit) is clean, and no key still has budget held;
5. every cost a client was told (usage.cost, x-request-cost, a stream's final usage) equals what
   was posted for the request; mismatches of requests whose settle was handed to the retry
   task are listed, not failed.

Logs and a JSON summary go to bench/results/soak-<stamp>/ and bench/results/soak-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402
from bench.tcp_proxy import TcpProxy  # noqa: E402

PYTHON = sys.executable
CELERY = str(Path(PYTHON).with_name("celery"))
DATABASE_URL = os.environ.get(
    "SOAK_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/billing_soak"
)
REDIS_URL = os.environ.get("SOAK_REDIS_URL", "redis://127.0.0.1:6379/7")
QUEUE = "billing-soak"
OPENAI_MODEL = "soak-gpt"
ANTHROPIC_MODEL = "soak-claude"
UNITS = Decimal(10) ** -10  # the engine's bigint units of 1e-10 USD
REQUEST_TIMEOUT_SECONDS = 90.0
KILL_WINDOW_SECONDS = 3.0  # a request ending this close after a gateway kill may have died with it


# --- the TCP proxy (bench/tcp_proxy.py), run as a child process ---------------------------


def proxy_child(target: str) -> None:
    """`--proxy-child host:port`: print `port N`, then obey cut / stall / restore / quit lines
    on stdin, answering each with one line. Ends when stdin closes (the soak died)."""
    host, _, port = target.rpartition(":")
    proxy = TcpProxy((host, int(port)))
    print(f"port {proxy.port}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command in ("cut", "stall", "restore"):
            touched = getattr(proxy, command)()
            print(f"ok {command} connections={touched} accepted={proxy.accepted}", flush=True)
        elif command == "quit":
            break
    proxy.close()


def _readline_within(process: subprocess.Popen[str], timeout: float) -> str:
    """One line of a child's stdout, or the child is killed after `timeout` seconds."""
    assert process.stdout is not None
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    try:
        return process.stdout.readline()
    finally:
        timer.cancel()


class ProxyProcess:
    def __init__(self, target: tuple[str, int], log_path: Path) -> None:
        self.log = log_path.open("w")
        self.process = subprocess.Popen(
            [PYTHON, "-m", "bench.soak", "--proxy-child", f"{target[0]}:{target[1]}"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            bufsize=1,
        )
        line = _readline_within(self.process, 20)
        if not line.startswith("port "):
            raise RuntimeError(f"the proxy did not start: {line!r}")
        self.port = int(line.split()[1])

    def command(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return _readline_within(self.process, 20).strip()

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.command("quit")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# --- database and Redis ----------------------------------------------------------------------


def url_with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{port}" if auth else f"127.0.0.1:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def database_reset(database_url: str) -> None:
    """Drop, create and migrate the soak's database (as bench/common.py does for its own)."""
    import psycopg

    base, _, name = database_url.rpartition("/")
    if not name.startswith("billing_soak"):
        raise SystemExit(f"refusing to drop database {name!r}: the soak's is billing_soak*")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    subprocess.run(
        [PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=common.production_env(database_url, DB_POOL_MAX_SIZE="2"),
        check=True,
    )


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=5)


def redis_clear(url: str) -> int:
    """Remove what an earlier soak left on its queue (only this queue's and kombu's keys)."""
    client = redis_client(url)
    keys = [
        *client.keys(f"{QUEUE}*"),
        *client.keys("unacked*"),
        *client.keys(f"_kombu.binding.{QUEUE}*"),
    ]
    if keys:
        client.delete(*keys)
    return len(keys)


def redis_backlog(url: str) -> tuple[int, int]:
    """(messages waiting on the queue, messages delivered and not yet acknowledged)."""
    client = redis_client(url)
    waiting = sum(
        client.llen(key) for key in client.keys(f"{QUEUE}*") if client.type(key) == b"list"
    )
    return waiting, int(client.hlen("unacked"))


# --- server processes -------------------------------------------------------------------------


@dataclass
class Settings:
    proxied_url: str
    redis_url: str
    hold_ttl: int
    log_dir: Path
    pool_size: int
    async_connections: int
    checkpoint_tokens: int
    checkpoint_seconds: float
    retry_backoff_max: int

    def env(self, **extra: str) -> dict[str, str]:
        env = common.production_env(
            self.proxied_url,
            REDIS_URL=self.redis_url,
            CELERY_TASK_DEFAULT_QUEUE=QUEUE,
            BILLING_HOLD_TTL_SECONDS=str(self.hold_ttl),
            DB_CONNECT_TIMEOUT_SECONDS="2",
            DB_POOL_MIN_SIZE="1",
            PYTHONUNBUFFERED="1",
        )
        for name in ("PROMETHEUS_MULTIPROC_DIR", "SENTRY_DSN", "CELERY_TASK_ALWAYS_EAGER"):
            env.pop(name, None)
        env.update(extra)
        return env


class Gateway:
    """uvicorn --workers 2 through the proxy."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = common.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = settings.log_dir / "gateway.log"
        env = settings.env(
            DB_POOL_MAX_SIZE=str(settings.pool_size),
            GATEWAY_ASYNC_DB_CONNECTIONS=str(settings.async_connections),
            GATEWAY_CHECKPOINT_TOKENS=str(settings.checkpoint_tokens),
            GATEWAY_CHECKPOINT_SECONDS=str(settings.checkpoint_seconds),
            LOG_LEVEL="WARNING",
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "uvicorn",
                    "config.asgi:application",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "2",
                    "--loop",
                    "uvloop",
                    "--http",
                    "httptools",
                    "--no-access-log",
                    "--log-level",
                    "info",
                    "--backlog",
                    "4096",
                    "--timeout-keep-alive",
                    "30",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_healthy(timeout=60)

    def wait_healthy(self, *, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:  # noqa: S310
                    if resp.status == 200 and len(self.workers()) == 2:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway not healthy:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    def workers(self) -> list[int]:
        """The pids of uvicorn's worker processes (spawned children running spawn_main)."""
        pids = []
        try:
            tasks = list(Path(f"/proc/{self.process.pid}/task").iterdir())
        except FileNotFoundError:
            return []
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except FileNotFoundError:
                continue
            for child in children:
                try:
                    cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                except FileNotFoundError:
                    continue
                if b"spawn_main" in cmdline:
                    pids.append(int(child))
        return sorted(pids)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class CeleryProcess:
    """A Celery worker (-P solo) or beat, restartable; each start logs to a file of its own."""

    def __init__(self, kind: str, settings: Settings) -> None:
        self.kind = kind
        self.settings = settings
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_paths: list[Path] = []

    def start(self) -> None:
        log_path = self.settings.log_dir / f"{self.kind}-{self.starts}.log"
        self.log_paths.append(log_path)
        self.starts += 1
        if self.kind == "worker":
            argv = [
                CELERY,
                "-A",
                "config",
                "worker",
                "-P",
                "solo",
                "-Q",
                QUEUE,
                "-n",
                f"soak-{self.starts}@%h",
                "-l",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                f"--logfile={log_path}",
            ]
            ready = "ready."
        else:
            argv = [
                CELERY,
                "-A",
                "config",
                "beat",
                "-l",
                "INFO",
                f"--logfile={log_path}",
                "-s",
                str(self.settings.log_dir / "beat-schedule"),
            ]
            ready = "beat: Starting"
        env = self.settings.env(
            DB_POOL_MAX_SIZE="2",
            # A settle meeting an outage fails within seconds and is retried with its backoff,
            # rather than waiting out the pool's 30 s for the database to come back.
            DB_POOL_TIMEOUT_SECONDS="3",
            # Redelivery of a killed worker's tasks after 30 s, not an hour; above every retry
            # countdown (BILLING_SETTLE_RETRY_BACKOFF_MAX).
            CELERY_VISIBILITY_TIMEOUT="30",
            BILLING_SETTLE_RETRY_BACKOFF_MAX=str(self.settings.retry_backoff_max),
            LOG_LEVEL="INFO",
            PGAPPNAME=f"soak-{self.kind}",
        )
        self.process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while ready not in (log_path.read_text(errors="replace") if log_path.exists() else ""):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery {self.kind} did not start: see {log_path}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.log_paths if p.exists())


# --- seed ---------------------------------------------------------------------------------------


@dataclass
class Customer:
    account_id: int
    group: str  # plain | budgeted | low
    secret: str


def seed(*, mock: Any, accounts: int) -> list[Customer]:
    """Routes and prices for both endpoints, then the customers: a fifth with a small daily key
    budget, a tenth with little credit, the rest with plenty."""
    from django.utils import timezone

    from billing.services.accounts import account_create
    from billing.services.keys import api_key_issue
    from billing.services.tariffs import tariff_set
    from gateway.services import model_route_set, upstream_add

    now = timezone.now()
    upstream_add(name="mock-openai", kind="openai", base_url=mock.openai_base_url)
    upstream_add(name="mock-anthropic", kind="anthropic", base_url=mock.anthropic_base_url)
    for alias, upstream in ((OPENAI_MODEL, "mock-openai"), (ANTHROPIC_MODEL, "mock-anthropic")):
        model_route_set(
            alias=alias, upstream_name=upstream, upstream_model="mock-model", max_output_tokens=1024
        )
        tariff_set(
            model_alias=alias,
            input_per_mtok=Decimal("2.5"),
            output_per_mtok=Decimal("10"),
            valid_from=datetime(2020, 1, 1, tzinfo=UTC),
        )
    budgeted = max(1, accounts // 5)
    low = max(1, accounts // 10)
    customers = []
    for i in range(accounts):
        group = "budgeted" if i < budgeted else "low" if i < budgeted + low else "plain"
        credits = Decimal("0.05") if group == "low" else Decimal("1000")
        account = account_create(name=f"soak-{group}-{i}", now=now, credits=credits)
        budget: dict[str, Any] = (
            {"budget_limit": Decimal("0.15"), "budget_period": "day"} if group == "budgeted" else {}
        )
        issued = api_key_issue(account_id=account.pk, now=now, name=f"soak-{i}", **budget)
        customers.append(Customer(account_id=account.pk, group=group, secret=issued.secret))
    return customers


# --- traffic -------------------------------------------------------------------------------------


@dataclass
class Plan:
    endpoint: str  # chat | messages
    stream: bool
    include_usage: bool
    tokens: int
    delay_ms: int
    max_tokens: int | None
    directive: str  # "" or a mock directive's body (fail=..., status=429, no_usage, ...)
    client: str  # normal | leave_mid_stream | leave_before_answer
    leave_after_chunks: int = 0
    leave_after_seconds: float = 0.0
    bad_key: bool = False


def plan_make(rng: random.Random) -> Plan:
    endpoint = rng.choice(("chat", "messages"))
    stream = rng.random() < 0.55
    long_stream = stream and rng.random() < 0.2
    if long_stream:
        tokens, delay = rng.randint(120, 360), rng.randint(8, 20)
    else:
        tokens = rng.randint(1, 80)
        delay = 0 if rng.random() < 0.5 else rng.randint(1, 15)
    draw = rng.random()
    directive = ""
    for name, share in (
        ("fail=before_first_chunk", 0.03),
        ("fail=mid_stream", 0.03),
        ("status=429", 0.02),
        ("no_usage", 0.02),
        ("partial_usage", 0.01),
        ("bad_usage", 0.01),
    ):
        if draw < share:
            directive = name
            break
        draw -= share
    client, leave_chunks, leave_seconds = "normal", 0, 0.0
    draw = rng.random()
    if stream and draw < 0.10:
        client, leave_chunks = "leave_mid_stream", rng.randint(1, max(1, min(tokens, 40)))
    elif draw < 0.16:
        client, leave_seconds = "leave_before_answer", rng.uniform(0.02, 1.2)
        if not stream:
            delay = max(delay, rng.randint(5, 25))  # an answer slow enough to leave before
    if long_stream:
        max_tokens: int | None = tokens + rng.randint(0, 64)
    elif endpoint == "chat" and rng.random() < 0.2:
        max_tokens = None  # held for the route's maximum (1024)
    else:
        max_tokens = rng.randint(16, 400)
    return Plan(
        endpoint=endpoint,
        stream=stream,
        include_usage=endpoint == "messages" or rng.random() < 0.85,
        tokens=tokens,
        delay_ms=delay,
        max_tokens=max_tokens,
        directive=directive,
        client=client,
        leave_after_chunks=leave_chunks,
        leave_after_seconds=leave_seconds,
        bad_key=rng.random() < 0.01,
    )


def request_build(plan: Plan, customer: Customer, n: int) -> tuple[str, dict[str, str], bytes]:
    directives = f"[mock:tokens={plan.tokens}]"
    if plan.delay_ms:
        directives += f" [mock:delay_ms={plan.delay_ms}]"
    if plan.directive:
        directives += f" [mock:{plan.directive}]"
    text = f"soak request {n}: say something. {directives}"
    secret = "sk-gw-not-a-key" if plan.bad_key else customer.secret
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text}]}
    if plan.endpoint == "chat":
        path = "/v1/chat/completions"
        headers = {"Authorization": f"Bearer {secret}"}
        body["model"] = OPENAI_MODEL
        if plan.stream and plan.include_usage:
            body["stream_options"] = {"include_usage": True}
    else:
        path = "/v1/messages"
        headers = {"x-api-key": secret, "anthropic-version": "2023-06-01"}
        body["model"] = ANTHROPIC_MODEL
    if plan.max_tokens is not None:
        body["max_tokens"] = plan.max_tokens
    if plan.stream:
        body["stream"] = True
    headers["content-type"] = "application/json"
    return path, headers, json.dumps(body).encode()


@dataclass
class Record:
    n: int
    account_id: int
    group: str
    plan: Plan
    t0: float = 0.0
    t1: float = 0.0
    status: int | None = None
    request_id: str | None = None
    outcome: str = ""  # answered | http_error | stream_error | stream_incomplete |
    #                    client_left_mid_stream | client_left_before_answer | transport_error |
    #                    timeout
    answer: str = "none"  # full | partial | none
    told_cost: str | None = None
    header_cost: str | None = None
    chunks: int = 0
    error: str = ""
    error_code: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "account_id": self.account_id,
            "group": self.group,
            "endpoint": self.plan.endpoint,
            "stream": self.plan.stream,
            "client": self.plan.client,
            "directive": self.plan.directive,
            "t0": round(self.t0, 3),
            "t1": round(self.t1, 3),
            "status": self.status,
            "request_id": self.request_id,
            "outcome": self.outcome,
            "answer": self.answer,
            "told_cost": self.told_cost,
            "header_cost": self.header_cost,
            "chunks": self.chunks,
            "error": self.error,
            "error_code": self.error_code,
        }


def _stream_event(record: Record, data: bytes) -> bool:
    """Read one SSE data line; True once the stream's end was seen."""
    if data == b"[DONE]":
        return True
    try:
        event = json.loads(data)
    except ValueError:
        record.error = "unparsable event"
        return False
    if not isinstance(event, dict):
        return False
    if "error" in event or event.get("type") == "error":
        record.outcome = "stream_error"
        return False
    usage = event.get("usage")
    if isinstance(usage, dict) and "cost" in usage:
        record.told_cost = str(usage["cost"])
    if event.get("type") == "message_stop":
        return True
    if event.get("choices") or event.get("type") == "content_block_delta":
        record.chunks += 1
    return False


async def request_send(session: Any, base_url: str, record: Record, body: tuple) -> None:
    path, headers, payload = body
    plan = record.plan
    async with session.post(base_url + path, data=payload, headers=headers) as resp:
        record.status = resp.status
        record.request_id = resp.headers.get("x-request-id")
        record.header_cost = resp.headers.get("x-request-cost")
        if resp.status != 200 or not plan.stream:
            raw = await resp.read()
            try:
                answer = json.loads(raw)
            except ValueError:
                answer = {}
            if resp.status == 200:
                usage = answer.get("usage") if isinstance(answer, dict) else None
                if isinstance(usage, dict) and "cost" in usage:
                    record.told_cost = str(usage["cost"])
                record.outcome, record.answer = "answered", "full"
            else:
                error = answer.get("error") if isinstance(answer, dict) else None
                if isinstance(error, dict):
                    record.error_code = str(error.get("code") or error.get("type") or "")
                record.outcome = "http_error"
            return
        ended = False
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            if _stream_event(record, line[6:].strip()):
                ended = True
                break
            if plan.client == "leave_mid_stream" and record.chunks >= plan.leave_after_chunks:
                resp.close()  # the connection goes with it: the gateway sees the client leave
                record.outcome, record.answer = "client_left_mid_stream", "partial"
                return
        if record.outcome == "stream_error":
            record.answer = "partial" if record.chunks else "none"
        elif ended:
            record.outcome, record.answer = "answered", "full"
        else:
            record.outcome = "stream_incomplete"
            record.answer = "partial" if record.chunks else "none"


async def request_run(session: Any, base_url: str, record: Record, customer: Customer) -> None:
    import aiohttp

    body = request_build(record.plan, customer, record.n)
    try:
        if record.plan.client == "leave_before_answer":
            await asyncio.wait_for(
                request_send(session, base_url, record, body), record.plan.leave_after_seconds
            )
        else:
            await asyncio.wait_for(
                request_send(session, base_url, record, body), REQUEST_TIMEOUT_SECONDS
            )
    except TimeoutError:
        if record.plan.client == "leave_before_answer" and not record.outcome:
            if record.chunks:
                record.outcome, record.answer = "client_left_mid_stream", "partial"
            else:
                record.outcome = "client_left_before_answer"
        elif not record.outcome:
            record.outcome = "timeout"
    except (aiohttp.ClientError, OSError) as exc:
        record.outcome = "transport_error"
        record.error = type(exc).__name__
        if record.chunks:
            record.answer = "partial"


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Run:
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    events: list[dict[str, Any]] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    max_lag: float = 0.0
    max_lag_at: float = 0.0
    samples: int = 0
    sample_errors: int = 0
    unplanned: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    planned_down: set[str] = field(default_factory=set)
    gateway_kills: list[float] = field(default_factory=list)
    killed_pids: set[int] = field(default_factory=set)

    def now(self) -> float:
        return time.monotonic() - self.started

    def event(self, name: str, **detail: Any) -> None:
        entry = {"t": round(self.now(), 1), "event": name, **detail}
        self.events.append(entry)
        print(f"  [{entry['t']:7.1f}s] {name} {json.dumps(detail) if detail else ''}", flush=True)


async def traffic(
    *,
    run: Run,
    base_url: str,
    customers: list[Customer],
    seconds: float,
    concurrency: int,
    seed_value: int,
) -> None:
    import aiohttp

    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))
    max_per_client = int(seconds * 100) + 100  # a bound on each loop, whatever happens

    async def client(index: int) -> None:
        rng = random.Random(seed_value * 1000 + index)
        connector = aiohttp.TCPConnector(limit=4)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for _ in range(max_per_client):
                if time.monotonic() >= deadline:
                    return
                customer = rng.choice(customers)
                record = Record(
                    n=next(counter),
                    account_id=customer.account_id,
                    group=customer.group,
                    plan=plan_make(rng),
                )
                record.t0 = run.now()
                run.records.append(record)
                await request_run(session, base_url, record, customer)
                record.t1 = run.now()
                await asyncio.sleep(rng.uniform(0, 0.05))

    await asyncio.gather(*(client(i) for i in range(concurrency)))


async def chaos(
    *,
    run: Run,
    seconds: float,
    proxy: ProxyProcess,
    gateway: Gateway,
    worker: CeleryProcess,
    redis_url: str,
) -> None:
    """The faults, at fixed fractions of the traffic's duration. The Celery worker is killed
    in the middle of the first outage, while it holds the settles handed off so far (failing
    and waiting out their retry countdowns, unacknowledged), so Redis must hand them back."""

    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, fraction * seconds - run.now()))

    async def db_outage(mode: str, length: float) -> None:
        answer = await asyncio.to_thread(proxy.command, mode)
        run.event(f"db_{mode}", proxy=answer)
        await asyncio.sleep(length)
        answer = await asyncio.to_thread(proxy.command, "restore")
        run.event("db_restore", proxy=answer)

    await at(0.12)
    answer = await asyncio.to_thread(proxy.command, "cut")
    run.event("db_cut", proxy=answer)
    await asyncio.sleep(5)
    with run.lock:
        run.planned_down.add("worker")
    waiting, unacked = await asyncio.to_thread(redis_backlog, redis_url)
    await asyncio.to_thread(worker.kill)
    run.event("celery_worker_sigkill", queue_waiting=waiting, queue_unacked=unacked)
    await asyncio.sleep(3)
    answer = await asyncio.to_thread(proxy.command, "restore")
    run.event("db_restore", proxy=answer)
    await asyncio.sleep(3)
    await asyncio.to_thread(worker.start)
    with run.lock:
        run.planned_down.discard("worker")
    run.event("celery_worker_restarted")

    await at(0.35)
    await db_outage("stall", 6)

    await at(0.55)
    pids = gateway.workers()
    if not pids:
        run.event("gateway_worker_sigkill_skipped", reason="no worker pids found")
        return
    victim = random.Random(len(run.records)).choice(pids)
    with run.lock:
        run.planned_down.add("gateway")
    with run.lock:
        run.killed_pids.add(victim)
    os.kill(victim, signal.SIGKILL)
    run.gateway_kills.append(run.now())
    run.event("gateway_worker_sigkill", pid=victim, workers=pids)
    for _ in range(300):
        now_pids = gateway.workers()
        if len(now_pids) == 2 and victim not in now_pids:
            break
        await asyncio.sleep(0.1)
    await asyncio.to_thread(gateway.wait_healthy, timeout=60)
    with run.lock:
        run.planned_down.discard("gateway")
    run.event("gateway_worker_replaced", workers=gateway.workers())

    await at(0.75)
    await db_outage("cut", 8)


def monitor(
    *,
    run: Run,
    stop: threading.Event,
    gateway: Gateway,
    worker: CeleryProcess,
    beat: CeleryProcess,
    interval: float = 3.0,
) -> None:
    """Every few seconds, from a direct connection: how long past its expiry the oldest active
    hold is; and which server processes died unplanned (restarted and recorded)."""
    import psycopg

    conn = None
    known_workers = set(gateway.workers())
    while not stop.wait(interval):
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(DATABASE_URL, autocommit=True, connect_timeout=5)
            row = conn.execute(
                "SELECT count(*), EXTRACT(EPOCH FROM clock_timestamp() - min(expires_at)) "
                "FROM billing_hold WHERE state = 'active'"
            ).fetchone()
            run.samples += 1
            lag = float(row[1] or 0.0) if row else 0.0
            if lag > run.max_lag:
                run.max_lag, run.max_lag_at = lag, run.now()
        except psycopg.Error:
            run.sample_errors += 1
            conn = None
        with run.lock:
            planned = set(run.planned_down)
        pids = set(gateway.workers())
        with run.lock:
            gone = known_workers - pids - run.killed_pids
        if gone and "gateway" not in planned:
            entry = {"t": round(run.now(), 1), "what": "gateway worker died", "pids": sorted(gone)}
            run.unplanned.append(entry)
            run.gateway_kills.append(run.now())
        known_workers = pids
        if "worker" not in planned and not worker.alive():
            run.unplanned.append({"t": round(run.now(), 1), "what": "celery worker died"})
            with contextlib.suppress(RuntimeError):
                worker.start()
        if not beat.alive():
            run.unplanned.append({"t": round(run.now(), 1), "what": "celery beat died"})
            with contextlib.suppress(RuntimeError):
                beat.start()
    if conn is not None:
        conn.close()


def drain(*, run: Run, redis_url: str, timeout: float) -> dict[str, Any]:
    """Wait, bounded, until no hold is active and the Celery queue has nothing waiting or
    unacknowledged, twice in a row."""
    import psycopg

    deadline = time.monotonic() + timeout
    stable = 0
    active = waiting = unacked = -1
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM billing_hold WHERE state = 'active'"
            ).fetchone()
            active = int(row[0]) if row else -1
            try:
                waiting, unacked = redis_backlog(redis_url)
            except Exception:
                waiting = unacked = -1
            stable = stable + 1 if (active, waiting, unacked) == (0, 0, 0) else 0
            if stable >= 2:
                break
            time.sleep(2)
    drained = stable >= 2
    run.event(
        "drained" if drained else "drain_timeout",
        active_holds=active,
        queue_waiting=waiting,
        queue_unacked=unacked,
    )
    return {"drained": drained, "active_holds": active, "waiting": waiting, "unacked": unacked}


# --- the checks ----------------------------------------------------------------------------------

HANDED_OFF = re.compile(r"settle of (req_[0-9a-f]+) failed \(.*?\); handing it to the retry task")
HANDOFF_FAILED = re.compile(r"settle hand-off failed for request (req_[0-9a-f]+)")
RETRY_RESULT = re.compile(
    r"Task reconciliation\.settlement_retry\[[^\]]+\] succeeded in [\d.]+s: '(\w+)'"
)
RETRY_ATTEMPT = re.compile(r"settle of request (req_[0-9a-f]+) failed \(attempt (\d+)\)")
SWEEP_RESULT = re.compile(
    r"Task reconciliation\.expire_holds\[[^\]]+\] succeeded in [\d.]+s: "
    r"\{'expired': (\d+), 'queued': (\d+)\}"
)


def usd(units: int | None) -> Decimal:
    return (Decimal(units or 0) * UNITS).normalize() if units else Decimal(0)


def fmt_usd(value: Decimal) -> str:
    return f"${value:.10f}".rstrip("0").rstrip(".") if value else "$0"


def database_rows() -> dict[str, Any]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(DATABASE_URL, autocommit=True, row_factory=dict_row) as conn:
        holds = conn.execute(
            "SELECT h.request_id, h.account_id, h.model_alias, h.amount, h.state, h.expires_at, "
            "h.resolved_at, h.settled_amount, h.transaction_id, h.checkpoint_cost, h.is_late, "
            "h.is_overrun, h.created_at FROM billing_hold AS h"
        ).fetchall()
        postings = conn.execute(
            "SELECT t.id, t.request_id, t.kind, t.is_late, t.is_overrun, "
            "COALESCE(-SUM(l.amount) FILTER (WHERE l.account_id > 0), 0)::bigint AS charged "
            "FROM billing_ledgertransaction AS t JOIN billing_ledgerleg AS l "
            "ON l.transaction_id = t.id WHERE t.kind IN ('usage', 'write_off') GROUP BY t.id"
        ).fetchall()
        items = conn.execute(
            "SELECT kind, status, request_id, cost, details, transaction_id, attempts, error "
            "FROM reconciliation_reconciliationitem"
        ).fetchall()
        usage = conn.execute(
            "SELECT request_id, outcome, status, estimated, cost, stream, endpoint "
            "FROM billing_usagerecord"
        ).fetchall()
        keys = conn.execute(
            "SELECT id, account_id, budget_limit, budget_spent, budget_held FROM billing_apikey"
        ).fetchall()
        period = conn.execute(
            "SELECT i.every, i.period FROM django_celery_beat_periodictask AS t "
            "JOIN django_celery_beat_intervalschedule AS i ON i.id = t.interval_id "
            "WHERE t.task = 'reconciliation.expire_holds' AND t.enabled"
        ).fetchone()
    return {
        "holds": holds,
        "postings": postings,
        "items": items,
        "usage": usage,
        "keys": keys,
        "sweep_period": period,
    }


def sweep_period_seconds(period: dict[str, Any] | None) -> float:
    if not period:
        return 60.0
    scale = {"seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}.get(period["period"], 60)
    return float(period["every"] * scale)


@dataclass
class Check:
    name: str
    ok: bool
    detail: list[str]


def analyse(
    *, run: Run, rows: dict[str, Any], gateway_log: str, worker_log: str, drained: dict[str, Any]
) -> tuple[list[Check], dict[str, Any]]:
    from billing.selectors import ledger_audit

    records = run.records
    by_id: dict[str, Record] = {r.request_id: r for r in records if r.request_id}
    holds = {h["request_id"]: h for h in rows["holds"]}
    postings: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for p in rows["postings"]:
        postings[p["request_id"]].append(p)
    items = {(i["kind"], i["request_id"]): i for i in rows["items"]}
    handed_off = set(HANDED_OFF.findall(gateway_log))
    handoff_failed = set(HANDOFF_FAILED.findall(gateway_log))
    checks: list[Check] = []

    def near_kill(record: Record) -> bool:
        return any(record.t0 <= k <= record.t1 + KILL_WINDOW_SECONDS for k in run.gateway_kills)

    # Wall-clock windows, for holds whose client never learnt their id: a hold placed at most a
    # request's lifetime before a gateway kill, or living through a database outage (plus the
    # step deadline and a reconnection's worth of slack).
    lifetime = 40.0  # the upstream deadline (TTL - 30 s) plus slack
    kills = [run.started_wall + k for k in run.gateway_kills]
    outages: list[tuple[float, float]] = []
    opened: float | None = None
    for event in run.events:
        if event["event"] in ("db_cut", "db_stall"):
            opened = run.started_wall + event["t"]
        elif event["event"] == "db_restore" and opened is not None:
            outages.append((opened, run.started_wall + event["t"] + 10))
            opened = None

    def hold_context(hold: dict[str, Any]) -> set[str]:
        placed = hold["created_at"].timestamp()
        context = set()
        if any(placed - 1 <= k <= placed + lifetime for k in kills):
            context.add("kill")
        if any(start - 1 <= placed + lifetime and placed <= end for start, end in outages):
            context.add("outage")
        return context

    # 1. every hold: charged once, released, charged from a checkpoint, or queued with a reason.
    fate: Counter[str] = Counter()
    queued_reasons: Counter[str] = Counter()
    problems: list[str] = []
    charged_total = Decimal(0)
    checkpoint_total = Decimal(0)
    unmatched: Counter[tuple[int, str]] = Counter()
    queued: list[str] = []
    for request_id, hold in holds.items():
        posts = postings.get(request_id, [])
        record = by_id.get(request_id)
        endpoint = "chat" if hold["model_alias"] == OPENAI_MODEL else "messages"
        if record is None:
            unmatched[(hold["account_id"], endpoint)] += 1
        state = hold["state"]
        if len(posts) > 1:
            continue  # check 2 reports it
        post = posts[0] if posts else None
        if post is not None and post["id"] != hold["transaction_id"]:
            problems.append(
                f"{request_id}: posting {post['id']} is not the hold's ({hold['transaction_id']})"
            )
            continue
        if post is not None and record is not None and (record.status or 0) >= 400:
            problems.append(
                f"{request_id}: charged {usd(post['charged'])} though the client was answered "
                f"{record.status} ({record_text(record)})"
            )
        if state == "settled":
            if post is None and hold["settled_amount"]:
                problems.append(
                    f"{request_id}: settled at {usd(hold['settled_amount'])} with "
                    "no posting (lost charge)"
                )
            elif post is None:
                fate["settled at zero (nothing to post)"] += 1
            else:
                fate["charged late (settle after expiry)" if post["is_late"] else "charged"] += 1
                charged_total += usd(post["charged"])
        elif state == "released":
            if post is not None:
                problems.append(f"{request_id}: released and charged {usd(post['charged'])}")
            elif record is not None and (record.told_cost is not None or record.answer != "none"):
                problems.append(
                    f"{request_id}: released, but the client got an answer ({record.answer}, "
                    f"told {record.told_cost}) (lost charge: {record_text(record)})"
                )
            else:
                fate["released (nothing delivered to bill)"] += 1
        elif state == "expired":
            item = items.get(("expired_hold", request_id))
            if item is None:
                problems.append(f"{request_id}: expired with no expired-hold item")
                continue
            if post is not None:
                charged_total += usd(post["charged"])
                if (item.get("details") or {}).get("charged_from_checkpoint"):
                    fate["charged from a checkpoint at expiry"] += 1
                    checkpoint_total += usd(post["charged"])
                else:
                    fate["charged late (settle after expiry)"] += 1
                continue
            reason = queued_reason(record, hold, items, near_kill, hold_context(hold))
            if reason is None:
                problems.append(
                    f"{request_id}: expired uncharged (item {item['status']}) though its client "
                    f"{record_text(record)} (lost charge)"
                )
            else:
                fate["queued for finance"] += 1
                queued_reasons[reason] += 1
                queued.append(f"    {request_id} ({record_text(record)})")
        else:
            problems.append(f"{request_id}: still {state} at the end")
    # Holds whose response head never reached a client, against the requests that never saw one.
    no_head: Counter[tuple[int, str]] = Counter(
        (r.account_id, r.plan.endpoint)
        for r in records
        if r.request_id is None and not r.plan.bad_key
    )
    for group, count in unmatched.items():
        if count > no_head[group]:
            problems.append(
                f"account {group[0]} {group[1]}: {count} holds no client request accounts for, "
                f"but only {no_head[group]} requests never saw their response head"
            )
    # A request the client was answered (in full or in part) had a hold.
    for record in records:
        if record.request_id and record.answer != "none" and record.request_id not in holds:
            problems.append(f"{record.request_id}: answered ({record.answer}) without a hold")
    detail = [f"{name}: {count:,}" for name, count in fate.most_common()]
    detail += [
        f"  queued because {reason}: {count:,}" for reason, count in queued_reasons.most_common()
    ]
    detail += [
        f"holds no client saw the id of: {sum(unmatched.values()):,} "
        f"(requests that never saw a response head: {sum(no_head.values()):,})"
    ]
    detail += ["queued for finance:", *queued[:30]] if queued else []
    detail += [f"    ... {len(queued) - 30} more"] if len(queued) > 30 else []
    checks.append(
        Check(
            "every held request charged once, released, or queued with a cost or a reason",
            not problems,
            detail
            + problems[:40]
            + ([f"... {len(problems) - 40} more"] if len(problems) > 40 else []),
        )
    )

    # 2. at most one usage / write-off posting per request.
    doubles = {rid: posts for rid, posts in postings.items() if len(posts) > 1}
    orphan = [rid for rid in postings if rid not in holds]
    checks.append(
        Check(
            "no request charged twice",
            not doubles and not orphan,
            [f"{len(rows['postings']):,} usage/write-off postings for {len(postings):,} requests"]
            + [
                f"{rid}: {len(p)} postings {[x['id'] for x in p]}"
                for rid, p in list(doubles.items())[:20]
            ]
            + [f"{rid}: a posting with no hold" for rid in orphan[:20]],
        )
    )

    # 3. no hold active past its expiry.
    period = sweep_period_seconds(rows["sweep_period"])
    allowed_lag = 2 * period + 30
    active = [h for h in holds.values() if h["state"] == "active"]
    early = [
        h["request_id"]
        for h in holds.values()
        if h["state"] == "expired" and h["resolved_at"] < h["expires_at"]
    ]
    checks.append(
        Check(
            "no hold active past its expiry",
            not active and not early and run.max_lag <= allowed_lag and drained["drained"],
            [
                f"active at the end: {len(active)}; expired before their expiry: {len(early)}",
                f"longest an active hold was seen past its expiry: {run.max_lag:.1f} s at "
                f"t={run.max_lag_at:.0f}s (allowed: 2 sweep periods of {period:.0f} s + 30 s; "
                f"{run.samples} samples, {run.sample_errors} failed)",
                f"drained: {drained}",
            ]
            + [f"{h['request_id']} active, expires {h['expires_at']}" for h in active[:20]]
            + [f"{rid} expired early" for rid in early[:20]],
        )
    )

    # 4. the ledger audit; no budget left held.
    report = ledger_audit()
    budget_held = [k for k in rows["keys"] if k["budget_held"]]
    checks.append(
        Check(
            "ledger audit clean",
            report.clean and not budget_held,
            [
                f"accounts checked: {report.accounts_checked}; "
                f"mismatches: {len(report.mismatches)}; "
                f"unbalanced transactions: {len(report.unbalanced_transactions)}; "
                f"keys with budget still held: {len(budget_held)}",
                *(json.dumps(m) for m in report.mismatches[:20]),
                *(f"transaction {t} unbalanced" for t in report.unbalanced_transactions[:20]),
                *(f"key {k['id']}: budget_held {usd(k['budget_held'])}" for k in budget_held[:20]),
            ],
        )
    )

    # 5. what each client was told equals what was posted.
    told = mismatched = 0
    failing: list[str] = []
    excused: list[str] = []
    for record in records:
        if record.told_cost is None and record.header_cost is None:
            continue
        told += 1
        posted = sum(
            (usd(p["charged"]) for p in postings.get(record.request_id or "", [])), Decimal(0)
        )
        claims = {c for c in (record.told_cost, record.header_cost) if c is not None}
        if all(Decimal(c) == posted for c in claims):
            continue
        mismatched += 1
        line = (
            f"{record.request_id}: told {' / '.join(sorted(claims))}, posted {posted} "
            f"({record_text(record)})"
        )
        if record.request_id in handed_off:
            hold = holds.get(record.request_id or "")
            excused.append(line + f"; handed off; hold {hold['state'] if hold else 'missing'}")
        else:
            failing.append(line)
    checks.append(
        Check(
            "every cost a client was told was posted",
            not failing,
            [
                f"requests told a cost: {told:,}; mismatches: {mismatched} "
                f"(of requests handed to the retry task, not failed: {len(excused)})",
                *failing[:40],
                *excused[:20],
            ],
        )
    )

    retry_results = Counter(RETRY_RESULT.findall(worker_log))
    attempts = RETRY_ATTEMPT.findall(worker_log)
    sweeps = [(int(e), int(q)) for e, q in SWEEP_RESULT.findall(worker_log)]
    pending = Counter(i["kind"] for i in rows["items"] if i["status"] == "pending")
    totals = {
        "charged_requests": fate["charged"]
        + fate["charged late (settle after expiry)"]
        + fate["charged from a checkpoint at expiry"],
        "charged_usd": str(charged_total),
        "charged_late": fate["charged late (settle after expiry)"],
        "charged_from_checkpoints": fate["charged from a checkpoint at expiry"],
        "charged_from_checkpoints_usd": str(checkpoint_total),
        "released": fate["released (nothing delivered to bill)"],
        "handed_off": len(handed_off),
        "handoff_failed": len(handoff_failed),
        "retry_task_results": dict(retry_results),
        "retry_attempts_failed": len(attempts),
        "sweeps": len(sweeps),
        "swept_expired": sum(e for e, _ in sweeps),
        "swept_queued": sum(q for _, q in sweeps),
        "queued_for_finance": dict(pending),
        "queued_reasons": dict(queued_reasons),
        "holds": dict(Counter(h["state"] for h in holds.values())),
        "usage_outcomes": dict(Counter(u["outcome"] for u in rows["usage"])),
        "overruns": sum(1 for h in holds.values() if h["is_overrun"]),
    }
    return checks, totals


def queued_reason(
    record: Record | None,
    hold: dict[str, Any],
    items: dict[tuple[str, str], Any],
    near_kill: Any,
    context: set[str],
) -> str | None:
    """Why an expired hold was queued uncharged, if the reason is one the design documents
    (None: a lost charge). The reasons with "left to the sweeper" are allowed (nothing was
    delivered, so nothing is owed) but break the rule that a hold whose client left is given
    back by the gateway: they are worth a look."""
    request_id = hold["request_id"]
    if ("deduction_failure", request_id) in items:
        return "its settle exhausted its retries (queued with its cost)"
    if record is None:
        if "kill" in context:
            return (
                "its client never saw the response head: in flight on the gateway worker that "
                "was killed (nothing checkpointed)"
            )
        if "outage" in context:
            return (
                "its client never saw the response head (left before the answer); its release "
                "was lost to a database outage"
            )
        return (
            "its client never saw the response head (left before the answer); no outage or "
            "kill near it: left to the sweeper"
        )
    if record.answer == "none":
        if record.status is not None and record.status >= 400:
            why = "during a database outage" if "outage" in context else "left to the sweeper"
            return f"the client got {record.status} and no answer ({why})"
        if near_kill(record) or "kill" in context:
            return f"the client got no answer ({record.outcome}): its gateway worker was killed"
        why = "lost to a database outage" if "outage" in context else "left to the sweeper"
        return f"the client got no answer ({record.outcome}; its release {why})"
    if near_kill(record):
        return "its gateway worker was killed mid-stream, before any checkpoint"
    return None


def record_text(record: Record | None) -> str:
    if record is None:
        return "never saw the response head"
    return (
        f"{record.plan.endpoint} stream={record.plan.stream} client={record.plan.client} "
        f"directive={record.plan.directive or '-'} status={record.status} "
        f"outcome={record.outcome} answer={record.answer} t={record.t0:.1f}-{record.t1:.1f}s"
    )


# --- output ------------------------------------------------------------------------------------


def report(
    *, run: Run, checks: list[Check], totals: dict[str, Any], minutes: float, args: Any
) -> None:
    records = run.records
    print(
        f"\n=== soak: {minutes:g} min of traffic, {len(records):,} requests, "
        f"{args.concurrency} clients, {args.accounts} accounts, hold TTL {args.hold_ttl} s"
    )
    table: Counter[tuple[str, str, str]] = Counter(
        (r.plan.endpoint, "stream" if r.plan.stream else "json", r.outcome) for r in records
    )
    common.print_table(
        "requests by endpoint / mode / client outcome",
        ["endpoint", "mode", "outcome", "requests"],
        [[e, m, o, n] for (e, m, o), n in sorted(table.items())],
    )
    statuses = Counter(str(r.status) if r.status else "no response head" for r in records)
    common.print_table(
        "HTTP statuses", ["status", "requests"], [[s, n] for s, n in sorted(statuses.items())]
    )
    answers = Counter(r.answer for r in records)
    print(
        f"\nanswers: {dict(answers)}; told a cost: "
        f"{sum(1 for r in records if r.told_cost or r.header_cost):,}"
    )
    print("\nmoney:")
    for label, value in (
        ("holds by state", json.dumps(totals["holds"])),
        ("charged (requests)", f"{totals['charged_requests']:,}"),
        ("charged (USD)", totals["charged_usd"]),
        ("  of which late (a settle after the expiry)", totals["charged_late"]),
        ("  of which from checkpoints at expiry", totals["charged_from_checkpoints"]),
        ("  charged from checkpoints (USD)", totals["charged_from_checkpoints_usd"]),
        ("released (nothing to charge)", f"{totals['released']:,}"),
        ("overruns (flagged)", totals["overruns"]),
        ("settles handed off to the retry task", totals["handed_off"]),
        ("hand-offs that failed", totals["handoff_failed"]),
        ("retry task results", json.dumps(totals["retry_task_results"])),
        ("retry attempts that failed and were retried", totals["retry_attempts_failed"]),
        (
            "sweeps run / holds expired / queued",
            f"{totals['sweeps']} / {totals['swept_expired']} / {totals['swept_queued']}",
        ),
        ("queued for finance (pending items)", json.dumps(totals["queued_for_finance"])),
        ("queued for finance, by reason", json.dumps(totals["queued_reasons"])),
        ("gateway usage records by outcome", json.dumps(totals["usage_outcomes"])),
    ):
        print(f"  {label:<46} {value}")
    print("\nfaults injected:")
    for event in run.events:
        print(
            f"  t={event['t']:7.1f}s  {event['event']}  "
            + json.dumps({k: v for k, v in event.items() if k not in ("t", "event")})
        )
    print(f"unplanned process deaths: {run.unplanned or 'none'}")
    print("\nchecks:")
    for check in checks:
        print(f"  [{'PASS' if check.ok else 'FAIL'}] {check.name}")
        for line in check.detail:
            print(f"         {line}")


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--hold-ttl", type=int, default=60)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=0.0,
        help="seconds to wait for every hold and task to end (default: TTL + 300)",
    )
    parser.add_argument(
        "--pool-size", type=int, default=5, help="DB_POOL_MAX_SIZE per gateway worker"
    )
    parser.add_argument(
        "--async-connections",
        type=int,
        default=4,
        help="GATEWAY_ASYNC_DB_CONNECTIONS per gateway worker",
    )
    parser.add_argument("--checkpoint-tokens", type=int, default=32)
    parser.add_argument("--checkpoint-seconds", type=float, default=2.0)
    parser.add_argument("--retry-backoff-max", type=int, default=5)
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--proxy-child", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy_child:
        proxy_child(args.proxy_child)
        return 0

    seconds = args.minutes * 60
    drain_timeout = args.drain_timeout or args.hold_ttl + 300
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log_dir = common.RESULTS_DIR / f"soak-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"soak: seed {args.seed}, logs in {log_dir.relative_to(ROOT)}", flush=True)

    database_reset(DATABASE_URL)
    cleared = redis_clear(REDIS_URL)
    os.environ["DB_POOL_MAX_SIZE"] = "2"
    common.django_setup(DATABASE_URL)
    from django.db import connections

    parts = urlsplit(DATABASE_URL)
    proxy = ProxyProcess((parts.hostname or "127.0.0.1", parts.port or 5432), log_dir / "proxy.log")
    settings = Settings(
        proxied_url=url_with_port(DATABASE_URL, proxy.port),
        redis_url=REDIS_URL,
        hold_ttl=args.hold_ttl,
        log_dir=log_dir,
        pool_size=args.pool_size,
        async_connections=args.async_connections,
        checkpoint_tokens=args.checkpoint_tokens,
        checkpoint_seconds=args.checkpoint_seconds,
        retry_backoff_max=args.retry_backoff_max,
    )
    mock = common.start_mock()
    gateway = worker = beat = None
    run = Run()
    stop = threading.Event()
    monitor_thread = None
    try:
        customers = seed(mock=mock, accounts=args.accounts)
        connections.close_all()
        gateway = Gateway(settings)
        worker = CeleryProcess("worker", settings)
        worker.start()
        beat = CeleryProcess("beat", settings)
        beat.start()
        print(
            f"started: proxy :{proxy.port}, mock {mock.url}, gateway {gateway.url} workers "
            f"{gateway.workers()}, celery worker and beat (redis keys cleared: {cleared})",
            flush=True,
        )
        run = Run()
        monitor_thread = threading.Thread(
            target=monitor,
            kwargs={"run": run, "stop": stop, "gateway": gateway, "worker": worker, "beat": beat},
            daemon=True,
        )
        monitor_thread.start()
        run.event("traffic_start", minutes=args.minutes, concurrency=args.concurrency)

        async def both() -> None:
            load = asyncio.create_task(
                traffic(
                    run=run,
                    base_url=gateway.url,
                    customers=customers,
                    seconds=seconds,
                    concurrency=args.concurrency,
                    seed_value=args.seed,
                )
            )
            faults = asyncio.create_task(
                chaos(
                    run=run,
                    seconds=seconds,
                    proxy=proxy,
                    gateway=gateway,
                    worker=worker,
                    redis_url=REDIS_URL,
                )
            )
            await asyncio.gather(load, faults)

        asyncio.run(both())
        run.event("traffic_end", requests=len(run.records))
        drained = drain(run=run, redis_url=REDIS_URL, timeout=drain_timeout)
    finally:
        stop.set()
        if monitor_thread is not None:
            monitor_thread.join(timeout=15)
        for process in (beat, worker):
            if process is not None:
                process.stop()
        if gateway is not None:
            gateway.stop()
        mock.stop()
        proxy.close()

    rows = database_rows()
    checks, totals = analyse(
        run=run,
        rows=rows,
        gateway_log=gateway.log_text(),
        worker_log=worker.log_text(),
        drained=drained,
    )
    report(run=run, checks=checks, totals=totals, minutes=args.minutes, args=args)
    (log_dir / "requests.jsonl").write_text(
        "".join(json.dumps(r.summary()) + "\n" for r in run.records)
    )
    common.write_results(
        "soak",
        {
            "args": vars(args),
            "machine": common.machine_info(),
            "requests": len(run.records),
            "events": run.events,
            "unplanned": run.unplanned,
            "totals": totals,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
            "logs": str(log_dir.relative_to(ROOT)),
        },
    )
    ok = all(c.ok for c in checks)
    print(f"\nsoak {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
