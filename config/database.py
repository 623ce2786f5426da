"""Which database the platform runs on: PostgreSQL, always.

DATABASE_URL names a PostgreSQL database. Any other URL is refused by every entry point
(manage.py, uvicorn config.asgi:application, celery -A config: they all load the settings):
one line on stderr naming PostgreSQL and a non-zero exit, no traceback. Unset, the platform
uses the embedded PostgreSQL server under VAR_DIR (config/embedded_db.py), started if needed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import dj_database_url

from config import embedded_db

POSTGRESQL_ENGINE = "django.db.backends.postgresql"
# The embedded server's database (pytest-django creates test_billing next to it).
EMBEDDED_DATABASE = "billing"
REFUSED_EXIT_STATUS = 2


def refuse(message: str) -> NoReturn:
    """Stop the process with `message` as its only output: settings are loaded before
    logging is configured, and a traceback would bury the one line that matters."""
    sys.stderr.write(" ".join(message.split()) + "\n")
    sys.stderr.flush()
    raise SystemExit(REFUSED_EXIT_STATUS)


def _what(url: str) -> str:
    # Only the scheme is repeated back: the rest of the URL may hold a password.
    return f"a {url.split('://', 1)[0]!r} URL" if "://" in url else "not a URL"


def postgresql_settings(url: str) -> dict[str, Any]:
    """Django's DATABASES entry for a PostgreSQL `url`; any other URL stops the process."""
    try:
        db: dict[str, Any] = dict(dj_database_url.parse(url))
    except Exception:
        db = {}
    if db.get("ENGINE") != POSTGRESQL_ENGINE:
        refuse(
            f"DATABASE_URL is {_what(url)}, and PostgreSQL is the only database: set it to "
            f"postgres://user@host:5432/name, or unset it to use the embedded PostgreSQL server."
        )
    return db


def _needs_no_server() -> bool:
    """Processes that load the settings but never touch the database, so must not start the
    server: `manage.py embedded_db ...`, which manages it, and mypy (django-stubs' plugin
    loads the settings to type-check)."""
    argv = sys.argv
    if len(argv) > 1 and argv[1] == "embedded_db" and Path(argv[0]).name == "manage.py":
        return True
    return "mypy" in sys.modules


def database_url(environ_url: str, var_dir: Path) -> str:
    """DATABASE_URL if set, else the embedded server's URL (starting it if needed)."""
    if environ_url:
        return environ_url
    if _needs_no_server():
        port = embedded_db.configured_port(embedded_db.data_dir_of(var_dir))
        return embedded_db.url_of(port or 5432, EMBEDDED_DATABASE)
    try:
        return embedded_db.ensure_running(var_dir, EMBEDDED_DATABASE)
    except embedded_db.EmbeddedDatabaseError as exc:
        refuse(str(exc))
