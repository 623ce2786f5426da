"""The account's self-service API over real HTTP against the live gateway: its keys
(/v1/keys, a key of scope admin only) and its requests (/v1/billing/requests, JSON pages and
the CSV export)."""

from __future__ import annotations

import base64
import csv
import io
from datetime import datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing.models import ApiKey
from billing.pricing import Usage
from billing.selectors import account_requests_chunks
from billing.serializers import RequestSerializer
from billing.services.holds import RequestDetails, hold_place, hold_settle
from tests.billing.test_commands import run_json
from tests.factories import make_account, make_key
from tests.gateway.conftest import live_gateway, mock_upstream, world
from tests.gateway.ledger import assert_clean, charged

# The live gateway's fixtures (tests/gateway/conftest.py), for this directory's tests too.
__all__ = ["live_gateway", "mock_upstream", "world"]

KEY_FIELDS = {
    "id",
    "prefix",
    "name",
    "purpose",
    "scope",
    "status",
    "budget",
    "budget_period",
    "spent",
    "held",
    "rpm",
    "tpm",
    "created_at",
    "expires_at",
}
REQUEST_FIELDS = [
    "request_id",
    "started_at",
    "created_at",
    "key_prefix",
    "model",
    "endpoint",
    "stream",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "estimated",
    "cost",
    "outcome",
]


def client(world, secret: str) -> httpx.Client:  # type: ignore[no-untyped-def]
    return httpx.Client(
        base_url=world.gateway.url, timeout=30, headers={"Authorization": f"Bearer {secret}"}
    )


@pytest.fixture
def admin_key(world):  # type: ignore[no-untyped-def]
    return make_key(account=world.account, now=timezone.now(), scope="admin", name="admin")


def completion(world, secret: str, text: str = "hi") -> httpx.Response:  # type: ignore[no-untyped-def]
    with client(world, secret) as http:
        answer = http.post(
            "/v1/chat/completions",
            json={"model": world.openai_model, "messages": [{"role": "user", "content": text}]},
        )
    assert answer.status_code == 200, answer.text
    return answer


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/keys"),
        ("POST", "/v1/keys"),
        ("GET", "/v1/keys/{id}"),
        ("PATCH", "/v1/keys/{id}"),
        ("POST", "/v1/keys/{id}/revoke"),
    ],
)
def test_an_inference_key_is_refused_the_key_endpoints_with_a_403(world, method, path):
    with client(world, world.key) as http:
        answer = http.request(
            method, path.format(id=world.issued.api_key.pk), json={} if method != "GET" else None
        )
    assert answer.status_code == 403, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("permission_error", "insufficient_scope")
    world.issued.api_key.refresh_from_db()
    assert world.issued.api_key.status == ApiKey.Status.ACTIVE


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/keys/{id}"),
        ("PATCH", "/v1/keys/{id}"),
        ("POST", "/v1/keys/{id}/revoke"),
    ],
)
def test_another_account_s_key_is_a_404(world, admin_key, method, path):
    other = make_key(account=make_account(now=timezone.now()), now=timezone.now())
    with client(world, admin_key.secret) as http:
        answer = http.request(
            method,
            path.format(id=other.api_key.pk),
            json={"name": "mine"} if method != "GET" else None,
        )
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "key_not_found"
    other.api_key.refresh_from_db()
    assert (other.api_key.status, other.api_key.name) == (ApiKey.Status.ACTIVE, "")


def test_a_key_id_beyond_any_integer_is_a_404_not_a_database_error(world, admin_key):
    with client(world, admin_key.secret) as http:
        for answer in (
            http.get(f"/v1/keys/{10**20}"),
            http.patch(f"/v1/keys/{10**20}", json={"name": "x"}),
            http.post(f"/v1/keys/{10**20}/revoke"),
        ):
            assert answer.status_code == 404, answer.text


def test_the_key_api_round_trip(world, admin_key):
    expires = (timezone.now() + timedelta(days=30)).replace(microsecond=0)
    with client(world, admin_key.secret) as http:
        created = http.post(
            "/v1/keys",
            json={
                "name": "batch jobs",
                "purpose": "batch",
                "budget": "5.50",
                "budget_period": "day",
                "rpm": 100,
                "tpm": 20000,
                "expires_at": expires.isoformat(),
            },
        )
        assert created.status_code == 201, created.text
        body = created.json()
        secret = body.pop("api_key")
        assert set(body) == KEY_FIELDS
        assert body["prefix"] == secret[: len(body["prefix"])]
        assert (body["name"], body["purpose"], body["scope"], body["status"]) == (
            "batch jobs",
            "batch",
            "inference",
            "active",
        )
        assert (body["budget"], body["budget_period"], body["spent"], body["held"]) == (
            "5.5000000000",
            "day",
            "0.0000000000",
            "0.0000000000",
        )
        assert (body["rpm"], body["tpm"]) == (100, 20000)
        key_id = body["id"]

        # The new key works, and its period's spend is what it was charged.
        answer = completion(world, secret)
        spent = charged(answer.headers["x-request-id"])
        listed = http.get("/v1/keys").json()
        assert listed["object"] == "list"
        mine = next(key for key in listed["data"] if key["id"] == key_id)
        assert Decimal(mine["spent"]) == spent > 0
        assert mine["held"] == "0.0000000000"
        assert {key["id"] for key in listed["data"]} == set(
            ApiKey.objects.filter(account=world.account).values_list("pk", flat=True)
        )

        changed = http.patch(
            f"/v1/keys/{key_id}", json={"name": "nightly", "budget": "9", "rpm": None, "tpm": 5}
        )
        assert changed.status_code == 200, changed.text
        assert (changed.json()["name"], changed.json()["budget"]) == ("nightly", "9.0000000000")
        assert (changed.json()["rpm"], changed.json()["tpm"]) == (None, 5)
        assert changed.json()["budget_period"] == "day"
        unbudgeted = http.patch(f"/v1/keys/{key_id}", json={"budget": None})
        assert unbudgeted.json()["budget"] is None
        assert unbudgeted.json()["budget_period"] is None
        assert unbudgeted.json()["spent"] is None

        revoked = http.post(f"/v1/keys/{key_id}/revoke")
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["status"] == "revoked"
        assert http.get(f"/v1/keys/{key_id}").json()["status"] == "revoked"
    with client(world, secret) as http:
        assert http.get("/v1/models").status_code == 401
    assert_clean(world.account)


def test_a_secret_is_shown_once_and_never_a_hash(world, admin_key):
    with client(world, admin_key.secret) as http:
        created = http.post("/v1/keys", json={"scope": "admin"})
        secret = created.json()["api_key"]
        key = ApiKey.objects.get(pk=created.json()["id"])
        assert key.scope == ApiKey.Scope.ADMIN
        for answer in (
            http.get("/v1/keys"),
            http.get(f"/v1/keys/{key.pk}"),
            http.patch(f"/v1/keys/{key.pk}", json={"name": "renamed"}),
            http.post(f"/v1/keys/{key.pk}/revoke"),
        ):
            assert answer.status_code == 200, answer.text
            assert secret not in answer.text
            assert key.secret_hash not in answer.text
            assert "api_key" not in answer.text


@pytest.mark.parametrize(
    ("method", "body", "param"),
    [
        ("POST", {"budget": "-1", "budget_period": "day"}, "budget"),
        ("POST", {"budget": "0.12345678901", "budget_period": "day"}, "budget"),
        ("POST", {"budget": "lots", "budget_period": "day"}, "budget"),
        ("POST", {"budget": "5"}, "budget_period"),
        ("POST", {"budget_period": "day"}, "budget"),
        ("POST", {"budget": "5", "budget_period": "year"}, "budget_period"),
        ("POST", {"purpose": "nope"}, "purpose"),
        ("POST", {"scope": "root"}, "scope"),
        ("POST", {"rpm": 0}, "rpm"),
        ("POST", {"tpm": "many"}, "tpm"),
        ("POST", {"rpm": 2**31}, "rpm"),
        ("POST", {"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ("POST", {"name": "x" * 201}, "name"),
        ("POST", {"secret": "sk-gw-mine"}, "secret"),
        ("PATCH", {"budget": "-0.01"}, "budget"),
        ("PATCH", {"budget": "5"}, "budget_period"),
        ("PATCH", {"rpm": 0}, "rpm"),
        ("PATCH", {"scope": "admin"}, "scope"),
        ("PATCH", {"purpose": "batch"}, "purpose"),
    ],
)
def test_bad_key_input_is_a_400_naming_the_parameter(world, admin_key, method, body, param):
    path = "/v1/keys" if method == "POST" else f"/v1/keys/{world.issued.api_key.pk}"
    before = ApiKey.objects.filter(account=world.account).count()
    with client(world, admin_key.secret) as http:
        answer = http.request(method, path, json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param), error
    assert ApiKey.objects.filter(account=world.account).count() == before
    key = ApiKey.objects.get(pk=world.issued.api_key.pk)
    assert (key.budget_limit, key.rpm, key.scope) == (None, None, ApiKey.Scope.INFERENCE)


def test_requests_are_listed_newest_first_in_pages(world):
    ids = [completion(world, world.key).headers["x-request-id"] for _ in range(3)]
    with client(world, world.key) as http:  # an inference key may read /v1/billing/*
        first = http.get("/v1/billing/requests", params={"limit": 2})
        assert first.status_code == 200, first.text
        page = first.json()
        assert set(page) == {"next", "previous", "results"}
        assert [row["request_id"] for row in page["results"]] == ids[:0:-1]
        rest = http.get(page["next"]).json()
    assert [row["request_id"] for row in rest["results"]] == ids[:1]
    row = page["results"][0]
    assert list(row) == REQUEST_FIELDS  # never what the provider charged us
    assert row["key_prefix"] == world.issued.api_key.prefix
    assert (row["model"], row["endpoint"], row["stream"], row["outcome"]) == (
        world.openai_model,
        "chat.completions",
        False,
        "completed",
    )
    assert Decimal(row["cost"]) == charged(ids[2])
    assert row["cost"] == f"{charged(ids[2]):.10f}"


def test_a_bad_requests_cursor_or_date_is_the_client_s_error(world):
    with client(world, world.key) as http:
        # A cursor we never issued: its position is not a start time.
        forged = base64.b64encode(b"p=1 OR 1=1").decode()
        assert http.get("/v1/billing/requests", params={"cursor": forged}).status_code == 404
        bad = http.get("/v1/billing/requests", params={"start": "yesterday"})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "start"


def _settled_request(api_key: ApiKey, request_id: str, *, started: datetime, output: int) -> str:
    """One request billed through the engine, as the gateway bills it, started at `started`."""
    now = timezone.now()
    hold_place(api_key=api_key, request_id=request_id, amount=Decimal("0.001"), now=now)
    hold_settle(
        request_id=request_id,
        cost=Decimal("0.0000125"),
        now=now,
        usage=Usage(input_tokens=3, output_tokens=output),
        details=RequestDetails(
            endpoint="chat.completions", started_at=started, outcome="completed"
        ),
    )
    return request_id


def _settled_requests(api_key: ApiKey, count: int) -> list[str]:
    """`count` requests billed through the engine, a second apart, the last one just now."""
    now = timezone.now()
    return [
        _settled_request(
            api_key,
            f"req_csv_{api_key.pk}_{n}",
            started=now - timedelta(seconds=count - n),
            output=n % 7,
        )
        for n in range(count)
    ]


def test_start_and_end_keep_the_listing_and_the_export_to_their_days(world):
    api_key = world.issued.api_key
    noon_today = timezone.now().replace(hour=12, minute=0, second=0, microsecond=0)
    by_days_ago = {
        days: _settled_request(
            api_key, f"req_day_{days}", started=noon_today - timedelta(days=days), output=1
        )
        for days in (0, 1, 2, 5)
    }
    today = noon_today.date()
    window = {"start": str(today - timedelta(days=2)), "end": str(today - timedelta(days=1))}
    with client(world, world.key) as http:
        listed = http.get("/v1/billing/requests", params=window)
        exported = http.get("/v1/billing/requests", params={**window, "format": "csv"})
        one_day = http.get(
            "/v1/billing/requests",
            params={"start": str(today - timedelta(days=5)), "end": str(today - timedelta(days=5))},
        )
        defaults = http.get("/v1/billing/requests")
    assert listed.status_code == exported.status_code == one_day.status_code == 200, listed.text
    # Both ends are included, newest first; what lies outside the days is left out.
    assert [row["request_id"] for row in listed.json()["results"]] == [
        by_days_ago[1],
        by_days_ago[2],
    ]
    rows = list(csv.reader(io.StringIO(exported.text)))
    assert [row[0] for row in rows[1:]] == [by_days_ago[1], by_days_ago[2]]
    assert [row["request_id"] for row in one_day.json()["results"]] == [by_days_ago[5]]
    # Without a range: the last 30 days up to today.
    assert [row["request_id"] for row in defaults.json()["results"]] == [
        by_days_ago[days] for days in (0, 1, 2, 5)
    ]


def test_the_csv_export_streams_every_request_of_the_range(world):
    ids = _settled_requests(world.issued.api_key, 1500)  # two of the export's chunks
    with (
        client(world, world.key) as http,
        http.stream("GET", "/v1/billing/requests", params={"format": "csv"}) as answer,
    ):
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/csv")
        assert "content-length" not in answer.headers  # streamed, not built whole
        text = "".join(answer.iter_text())
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(RequestSerializer().fields) == REQUEST_FIELDS
    assert [row[0] for row in rows[1:]] == ids[::-1]
    last = dict(zip(rows[0], rows[-1], strict=True))
    assert (last["cost"], last["stream"], last["estimated"]) == ("0.0000125000", "false", "false")
    assert (last["input_tokens"], last["output_tokens"]) == ("3", "0")
    assert_clean(world.account)


def test_an_empty_csv_export_is_its_header(world):
    with client(world, world.key) as http:
        answer = http.get(
            "/v1/billing/requests",
            params={"format": "csv", "start": "2020-01-01", "end": "2020-01-01"},
        )
    assert answer.status_code == 200
    assert answer.text == ",".join(REQUEST_FIELDS) + "\n"


@pytest.mark.django_db
def test_the_export_reads_its_range_in_keyset_chunks(account, now):
    ids = _settled_requests(make_key(account=account, now=now).api_key, 20)
    today = timezone.now().date()
    with CaptureQueriesContext(connection) as queries:
        chunks = list(
            account_requests_chunks(account_id=account.pk, first=today, last=today, chunk_size=7)
        )
    assert [len(chunk) for chunk in chunks] == [7, 7, 6]
    assert len(queries) == 3  # one per chunk, each after the last one's start and id
    assert [row["request_id"] for chunk in chunks for row in chunk] == ids[::-1]


# --- issue_api_key: scope and rate limits ---------------------------------------------------


@pytest.mark.django_db
def test_issue_api_key_sets_scope_and_rate_limits_and_reports_them(account):
    data = run_json(
        "issue_api_key", str(account.pk), "--scope", "admin", "--rpm", "60", "--tpm", "90000"
    )
    assert (data["scope"], data["rpm"], data["tpm"]) == ("admin", 60, 90000)
    key = ApiKey.objects.get(pk=data["key_id"])
    assert (key.scope, key.rpm, key.tpm) == (ApiKey.Scope.ADMIN, 60, 90000)


@pytest.mark.django_db
def test_issue_api_key_defaults_to_inference_without_limits(account):
    data = run_json("issue_api_key", str(account.pk))
    assert (data["scope"], data["rpm"], data["tpm"]) == ("inference", None, None)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args",
    [
        ["--scope", "root"],
        ["--rpm", "0"],
        ["--tpm", "-5"],
        ["--rpm", "lots"],
        ["--tpm", "2147483648"],
    ],
    ids=["unknown-scope", "zero-rpm", "negative-tpm", "non-numeric-rpm", "tpm-too-large"],
)
def test_issue_api_key_refuses_a_bad_scope_or_limit_and_issues_nothing(account, args):
    with pytest.raises(CommandError):
        call_command(
            "issue_api_key",
            str(account.pk),
            *args,
            "--json",
            stdout=io.StringIO(),
            stderr=io.StringIO(),
        )
    assert not ApiKey.objects.filter(account=account).exists()
