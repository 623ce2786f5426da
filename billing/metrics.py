"""Every Prometheus metric the platform exports, in one place.

Web processes and Celery workers share them through prometheus_client's multiprocess mode
when PROMETHEUS_MULTIPROC_DIR is set (see config/metrics docs in docs/architecture.md).
Labels never carry prompts, completions or key secrets.
"""

from prometheus_client import Counter, Histogram

MONEY_BUCKETS = (0.0001, 0.001, 0.01, 0.1, 1, 10, 100)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
STREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

SETTLEMENTS = Counter(
    "billing_settlements_total",
    "Settlement attempts by outcome (settled, replayed, overrun, late, failed, handed_off).",
    ["outcome"],
)
SETTLED_USD = Counter("billing_settled_usd_total", "USD charged by settlements.")
SETTLE_LATENCY = Histogram(
    "billing_settle_seconds", "Time to commit a settlement.", buckets=LATENCY_BUCKETS
)
SETTLEMENT_RETRIES = Counter(
    "billing_settlement_retries_total", "Settlement retries run by the worker.", ["outcome"]
)
MISSED_DEDUCTIONS = Counter(
    "billing_missed_deductions_total", "Settlements that exhausted their retries."
)
MISSED_DEDUCTIONS_USD = Counter(
    "billing_missed_deductions_usd_total", "USD of settlements that exhausted their retries."
)
HOLDS = Counter(
    "billing_holds_total", "Hold transitions (placed, settled, released, expired).", ["event"]
)
HOLD_REFUSALS = Counter("billing_hold_refusals_total", "Holds refused, by reason.", ["reason"])
OUTCOMES = Counter(
    "gateway_request_outcomes_total",
    "Billed requests by how they ended (the usage record's outcome: completed, "
    "client_disconnected, upstream_<kind>, gateway_error, ...).",
    ["endpoint", "outcome"],
)
ESTIMATED_USAGE = Counter(
    "billing_estimated_usage_total", "Requests billed from an estimate (no upstream usage)."
)
DEFAULT_PRICE_USED = Counter(
    "billing_default_price_used_total", "Requests priced with the default price (unpriced model)."
)
TOKENS = Counter(
    "gateway_tokens_total", "Tokens billed, by model alias and token class.", ["model", "kind"]
)
STREAM_DURATION = Histogram(
    "gateway_stream_duration_seconds",
    "Whole duration of streamed responses, until the last byte.",
    ["endpoint"],
    buckets=STREAM_BUCKETS,
)
TIME_TO_FIRST_BYTE = Histogram(
    "gateway_time_to_first_byte_seconds",
    "Time from request start to the first upstream byte relayed.",
    ["endpoint"],
    buckets=(*LATENCY_BUCKETS, 5, 10, 30),
)
REQUESTS = Counter(
    "gateway_requests_total", "Gateway requests by route and status.", ["route", "status"]
)
REQUEST_LATENCY = Histogram(
    "gateway_request_seconds",
    "Time until the response object is ready (for a stream: its first event).",
    ["route"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors_total", "Upstream failures by stage and kind.", ["stage", "kind"]
)
RATELIMIT_REFUSALS = Counter(
    "gateway_ratelimit_refusals_total", "Requests refused by their key's rate limit.", ["limit"]
)
RATELIMIT_UNAVAILABLE = Counter(
    "gateway_ratelimit_unavailable_total",
    "Rate-limit checks and token counts let through unchecked (fail open) because the store "
    "(Redis) failed, did not answer, or was resting after a failure.",
    ["step"],
)
AUDIT_MISMATCHES = Counter(
    "billing_audit_mismatches_total", "Accounts whose cached balance differed from the ledger."
)
