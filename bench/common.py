"""Shared plumbing for the benchmarks: the dedicated database, Django setup, live processes,
/proc readings, tables and JSON results. Not a benchmark itself.

Every benchmark uses its own PostgreSQL database (BENCH_DATABASE_URL, default
postgres://postgres@127.0.0.1:5432/billing_bench; bench/paired.py adds billing_bench_base for
the other commit), dropped, recreated and migrated at the start of a run, so numbers never
depend on what an earlier run or the test suite left behind. A database whose name does not
start with billing_bench is never dropped: the test suite's (test_billing*) and the embedded
server's (billing) are out of reach.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import side

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
PYTHON = sys.executable
BENCH_DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/billing_bench"
)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --- environment --------------------------------------------------------------------------


def production_env(database_url: str = BENCH_DATABASE_URL, **extra: str) -> dict[str, str]:
    """The environment of every process we start: production settings, quiet logs."""
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_DEBUG", "REDIS_URL")}
    env.update(
        DATABASE_URL=database_url,
        DJANGO_SETTINGS_MODULE="config.settings",
        LOG_LEVEL="WARNING",
        **extra,
    )
    return env


def _admin_dsn(database_url: str) -> tuple[str, str]:
    """(DSN of the maintenance database, name of the bench database)."""
    base, _, name = database_url.rpartition("/")
    return f"{base}/postgres", name


def database_name(database_url: str = BENCH_DATABASE_URL) -> str:
    return _admin_dsn(database_url)[1]


def database_reset(database_url: str = BENCH_DATABASE_URL, *, source: Path = ROOT) -> float:
    """Drop, create and migrate a bench database with the migrations of the checkout in
    `source` (another commit's, for bench/paired.py); returns the seconds it took."""
    import psycopg

    started = time.perf_counter()
    admin, name = _admin_dsn(database_url)
    if not name.startswith("billing_bench"):
        raise SystemExit(f"refusing to drop database {name!r}: a bench database is billing_bench*")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    subprocess.run(
        [PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=source,
        env=production_env(database_url),
        check=True,
    )
    return time.perf_counter() - started


def django_setup(database_url: str = BENCH_DATABASE_URL) -> None:
    """Configure this process for the bench database (call before importing models)."""
    os.environ.update(production_env(database_url))
    os.environ.pop("DJANGO_DEBUG", None)
    import django

    django.setup()


def raw_connect(database_url: str = BENCH_DATABASE_URL, *, autocommit: bool = True) -> Any:
    import psycopg

    return psycopg.connect(database_url, autocommit=autocommit)


# --- machine ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    pg = ""
    try:
        with raw_connect(_admin_dsn(BENCH_DATABASE_URL)[0]) as conn:
            pg = conn.execute("SHOW server_version").fetchone()[0]
    except Exception:
        pg = "unknown"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "postgresql": pg,
        "kernel": platform.release(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        # This machine is shared: a high load average means other processes competed for
        # the two cores during the run, and the numbers are pessimistic.
        "loadavg_1_5_15": list(os.getloadavg()),
        "git_head": _git("rev-parse", "--short", "HEAD"),
        # Other engineers commit into the same tree: uncommitted changes to app code count.
        "git_dirty_app_files": _git(
            "status", "--porcelain", "--", "billing", "gateway", "reconciliation", "config"
        ).count("\n")
        + 1
        if _git("status", "--porcelain", "--", "billing", "gateway", "reconciliation", "config")
        else 0,
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return ""


# --- /proc --------------------------------------------------------------------------------


def proc_rss_bytes(pid: int) -> int:
    """Current resident set size of a process."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE


def proc_peak_rss_bytes(pid: int) -> int:
    """VmHWM: the highest RSS the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants (uvicorn's worker processes)."""
    total = proc_cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # the thread ended since the listing (a pool thread retiring)
            continue
        for child in children:
            total += proc_tree_cpu_seconds(int(child))
    return total


def postgres_backends_cpu(database_url: str = BENCH_DATABASE_URL) -> dict[int, float]:
    """CPU seconds so far of each PostgreSQL backend connected to this database (read from
    /proc: the server runs on this machine). Only this database's backends: other databases
    on the same server (other people's test suites) and the server's own background processes
    (WAL writer, checkpointer) are not counted."""
    admin, name = _admin_dsn(database_url)
    with raw_connect(admin) as conn:  # its own backend is in another database
        pids = [
            int(row[0])
            for row in conn.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = %s AND backend_type = 'client backend'",
                (name,),
            )
        ]
    cpu = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            cpu[pid] = proc_cpu_seconds(pid)
    return cpu


def postgres_cpu_since(before: dict[int, float], database_url: str = BENCH_DATABASE_URL) -> float:
    """CPU seconds this database's backends used since `before` (postgres_backends_cpu): a
    backend that connected since counts whole, one that disconnected since is missed (a lower
    bound; the gateway's pool keeps its connections open)."""
    after = postgres_backends_cpu(database_url)
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def proc_threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """Samples a process's RSS in a background thread; `peak` is the highest seen."""

    def __init__(self, pid: int | None = None, interval: float = 0.05) -> None:
        self.pid = pid or os.getpid()
        self.interval = interval
        self.start_rss = proc_rss_bytes(self.pid)
        self.peak = self.start_rss
        self.max_threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, proc_rss_bytes(self.pid))
                self.max_threads = max(self.max_threads, proc_threads(self.pid))
            except OSError:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.peak = max(self.peak, proc_rss_bytes(self.pid))


def self_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- live processes -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_gateway(
    database_url: str = BENCH_DATABASE_URL,
    workers: int = 1,
    source: Path = ROOT,
    **extra_env: str,
) -> Gateway:
    """uvicorn with `workers` worker processes (uvloop, httptools, no access log) on a free
    port, serving the code in `source` (another checkout: bench/paired.py). With one worker,
    uvicorn serves in the process it starts (the pid to profile)."""
    port = free_port()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    log_path = RESULTS_DIR / f"gateway-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "uvicorn",
                "config.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
                "--backlog",
                "4096",
                "--timeout-keep-alive",
                "30",
            ],
            cwd=source,
            env=production_env(database_url, **extra_env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:  # noqa: S310
                if resp.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"gateway did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return Gateway(url=url, process=process, log_path=log_path)


def start_mock() -> Any:
    """The shipped mock upstream in its own process."""
    from gateway.mock.launch import start_mock_upstream_process

    return start_mock_upstream_process(port=0)


def run_load(config: dict[str, Any]) -> dict[str, Any]:
    """Run bench/loadgen.py in its own process with `config`; returns its JSON result."""
    completed = subprocess.run(
        [PYTHON, "-m", "bench.loadgen"],
        cwd=ROOT,
        input=json.dumps(config).encode(),
        capture_output=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{completed.stderr.decode()[-3000:]}")
    return json.loads(completed.stdout)


# --- gateway fixtures ---------------------------------------------------------------------

BENCH_MODEL = side.BENCH_MODEL
BENCH_ANTHROPIC_MODEL = side.BENCH_ANTHROPIC_MODEL


def gateway_seed(
    *, mock: Any, accounts: int, budgeted_accounts: int = 0, credits: str = "1000000"
) -> dict[str, list[list[str]]]:
    """bench/side.py's seed in this process (django_setup() first): routes and prices, then
    `accounts` customers with an unbudgeted key each and `budgeted_accounts` with a budgeted
    one. Returns {"plain": [[account_id, secret], ...], "budgeted": [...]}."""
    return side.gateway_seed(
        openai_base_url=mock.openai_base_url,
        anthropic_base_url=mock.anthropic_base_url,
        accounts=accounts,
        budgeted_accounts=budgeted_accounts,
        credits=credits,
    )


def billing_check(*, expected_usage: int) -> dict[str, Any]:
    """bench/side.py's check in this process: usage postings == `expected_usage`, no active
    hold, ledger audit clean."""
    return side.billing_check(expected_usage=expected_usage)


def side_run(task: str, *, source: Path, database_url: str, **kwargs: Any) -> dict[str, Any]:
    """bench/side.py's `task` (seed, check) run by the code of the checkout in `source`
    against `database_url`, in a process of its own."""
    completed = subprocess.run(
        [PYTHON, "-c", (ROOT / "bench" / "side.py").read_text(), task],
        cwd=source,
        env=production_env(database_url),
        input=json.dumps(kwargs).encode(),
        capture_output=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"side task {task} failed in {source}:\n{completed.stderr.decode()[-3000:]}"
        )
    return json.loads(completed.stdout)


# --- numbers and output -------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.fmean(values) if values else 0.0


def mb(n_bytes: float) -> float:
    return round(n_bytes / 1024 / 1024, 1)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_results(name: str, data: dict[str, Any]) -> Path:
    """bench/results/<name>-<utc stamp>.json and <name>-latest.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    payload = json.dumps(data, indent=2, default=str)
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(payload)
    (RESULTS_DIR / f"{name}-latest.json").write_text(payload)
    print(f"\nresults: {path.relative_to(ROOT)}")
    return path


# --- bulk seeding in SQL ------------------------------------------------------------------

UNITS_PER_USD = 10**10  # MoneyField stores units of 1e-10 USD


def accounts_bulk_create(
    conn: Any,
    *,
    count: int,
    credits_usd: int,
    tag: str = "bench",
    budget_limit_usd: int | None = None,
    budget_period: str = "month",
) -> list[tuple[int, int]]:
    """`count` customer accounts, each with an opening grant posted as account_create posts
    it (customer leg +credits, promotions leg -credits, its key and content hash as the
    engine computes them) so the ledger audit stays clean, and one API key each, budgeted
    (`budget_limit_usd` per `budget_period`) when a limit is given. One statement, one
    transaction: the deferred triggers (balanced legs, at least two legs per transaction)
    check every posting at commit. Returns [(account_id, api_key_id), ...] in account order."""
    units = credits_usd * UNITS_PER_USD
    limit = None if budget_limit_usd is None else budget_limit_usd * UNITS_PER_USD
    with conn.transaction():
        rows = conn.execute(
            """
            WITH new AS (
                INSERT INTO billing_account (name, kind, currency, status, balance, held,
                    overdraft, created_at, billing_email, low_balance_armed, depleted_armed,
                    webhook_url, webhook_secret, auto_topup_enabled, auto_topup_armed,
                    payment_customer_id, payment_method_id)
                SELECT %(tag)s || '-' || g, 'customer', 'USD', 'active', %(units)s, 0, 0, now(),
                       '', true, true, '', '', false, true, '', ''  -- no alerts, no top-up
                FROM generate_series(1, %(count)s::integer) g
                RETURNING id
            ), txn AS (
                INSERT INTO billing_ledgertransaction (kind, idempotency_key, content_hash,
                    request_id, memo, occurred_at, posted_at, model_alias, is_overrun, is_late)
                SELECT 'grant', 'account:' || id || ':opening-credits',
                       billing_engine.posting_hash('grant', ARRAY[id, -2],
                           ARRAY[%(units)s, -%(units)s]::bigint[], '', NULL),
                       '', 'opening credits', now(), now(), '', false, false
                FROM new
                RETURNING id, split_part(idempotency_key, ':', 2)::bigint AS account_id
            ), legs AS (
                INSERT INTO billing_ledgerleg (transaction_id, account_id, amount)
                SELECT id, account_id, %(units)s FROM txn
                UNION ALL
                SELECT id, -2, -%(units)s FROM txn
            )
            INSERT INTO billing_apikey (account_id, name, prefix, secret_hash, purpose,
                completion_window, status, created_at, budget_limit, budget_period,
                budget_spent, budget_held, scope)
            SELECT id, '', 'bk-' || id, md5(id::text) || md5('k' || id::text), 'realtime', '',
                   'active', now(), %(limit)s::bigint,
                   CASE WHEN %(limit)s::bigint IS NULL THEN '' ELSE %(period)s END, 0, 0,
                   'inference'
            FROM new
            RETURNING account_id, id
            """,
            {
                "tag": tag,
                "units": units,
                "count": count,
                "limit": limit,
                "period": budget_period,
            },
        ).fetchall()
    return sorted((int(account_id), int(key_id)) for account_id, key_id in rows)
