"""PostgreSQL is the only database: other DATABASE_URLs stop every entry point in one line, and
with DATABASE_URL unset the platform starts (and reuses) its embedded PostgreSQL server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from config import embedded_db
from tests.workers import ROOT, wait_until

ENTRY_POINTS = {
    "manage.py": [sys.executable, "manage.py", "check"],
    "import config.asgi": [sys.executable, "-c", "import config.asgi"],
    "uvicorn": [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", "0"],
    "celery worker": [sys.executable, "-m", "celery", "-A", "config", "worker", "--pool", "solo"],
    "celery beat": [sys.executable, "-m", "celery", "-A", "config", "beat"],
}


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _env(**overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    return env | {"DJANGO_SETTINGS_MODULE": "config.settings"} | overrides


# --- refusal --------------------------------------------------------------------------------


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_every_entry_point_refuses_a_sqlite_url_in_one_line(entry_point: str) -> None:
    done = _run(ENTRY_POINTS[entry_point], _env(DATABASE_URL="sqlite:///var/billing.sqlite3"))

    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "PostgreSQL" in lines[0]
    assert "'sqlite'" in lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize(
    "url",
    ["mysql://billing:s3cret@db:3306/billing", "oracle://billing:s3cret@db/xe", "s3cret-not-a-url"],
)
def test_other_urls_are_refused_without_repeating_them(url: str) -> None:
    done = _run(ENTRY_POINTS["manage.py"], _env(DATABASE_URL=url))

    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "PostgreSQL" in lines[0]
    assert "Traceback" not in done.stderr
    assert "s3cret" not in done.stderr  # a password stays out of logs


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_postgresql_urls_are_accepted(scheme: str) -> None:
    # `check` loads the settings without connecting: nothing needs to listen there.
    done = _run(ENTRY_POINTS["manage.py"], _env(DATABASE_URL=f"{scheme}://u@127.0.0.1:1/db"))

    assert done.returncode == 0, done.stderr


# --- the embedded server --------------------------------------------------------------------


def test_a_stale_postmaster_pid_is_not_a_running_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "postgres"
    data_dir.mkdir()
    # A killed server's file: pid and port of nothing that answers.
    (data_dir / "postmaster.pid").write_text(
        f"{2**22 + 1}\n{data_dir}\n1700000000\n1\n\n127.0.0.1\n  1 2\nready   \n"
    )

    assert embedded_db.running_port(data_dir) is None
    assert not embedded_db.status(tmp_path, "billing").running


@pytest.fixture
def var_dir() -> Iterator[Path]:
    """A VAR_DIR the server's own system user can reach when the tests run as root (pytest's
    tmp_path sits under a directory only root may enter)."""
    path = Path(tempfile.mkdtemp(prefix="billing-embedded-test-"))
    path.chmod(0o755)
    yield path
    embedded_db.stop(path)
    shutil.rmtree(path, ignore_errors=True)


def _gone(pid: int) -> bool:
    """The process exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def _manage_json(env: dict[str, str], *args: str) -> dict[str, object]:
    done = _run([sys.executable, "manage.py", *args, "--json"], env)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.slow
def test_with_database_url_unset_migrate_starts_the_embedded_server_which_stays_up(
    var_dir: Path,
) -> None:
    env = _env(BILLING_VAR_DIR=str(var_dir))

    done = _run([sys.executable, "manage.py", "migrate", "--verbosity", "0"], env)
    assert done.returncode == 0, done.stderr

    status = _manage_json(env, "embedded_db", "status")
    assert status["running"] is True
    assert status["data_dir"] == str(var_dir / "postgres")
    url = str(status["url"])
    assert url == f"postgres://postgres@127.0.0.1:{status['port']}/billing"
    with psycopg.connect(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        assert version is not None
        assert str(version[0]).startswith("18.")
        triggers = {
            row[0]
            for row in conn.execute("SELECT tgname FROM pg_trigger WHERE tgname LIKE 'billing_%'")
        }
        # The ledger's invariants, enforced by the database (migration 0002) ...
        assert triggers >= {
            "billing_ledgerleg_balanced",
            "billing_ledgerleg_immutable",
            "billing_ledgertransaction_immutable",
        }
        # ... and the system accounts billing's post_migrate creates.
        assert conn.execute("SELECT count(*) FROM billing_account").fetchone() != (0,)

    # A process that finds the server up pays a file read and a TCP connect.
    embedded_db.ensure_running(var_dir, "billing")
    started = time.perf_counter()
    assert embedded_db.ensure_running(var_dir, "billing") == url
    assert time.perf_counter() - started < 0.02

    stopped = _manage_json(env, "embedded_db", "stop")
    assert stopped["stopped"] is True
    assert stopped["running"] is False
    wait_until(lambda: _gone(int(str(status["pid"]))), timeout=10)

    # Started again (by the command, as bin/test and bin/quickstart do): same data, same port.
    restarted = _manage_json(env, "embedded_db", "start")
    assert restarted["started"] is True
    assert restarted["url"] == url
    done = _run([sys.executable, "manage.py", "migrate", "--check", "--verbosity", "0"], env)
    assert done.returncode == 0, done.stderr + done.stdout

    assert _manage_json(env, "embedded_db", "stop")["stopped"] is True
    assert _manage_json(env, "embedded_db", "stop")["stopped"] is False
