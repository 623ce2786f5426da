"""The read endpoints' query parameters: a bad one is the client's 400 naming it (or DRF's
404 for a cursor it never issued), never a 500, through the live gateway."""

from __future__ import annotations

import base64

import pytest

OPENAI_FIELDS = {"message", "type", "param", "code"}


def assert_invalid(response, param: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == OPENAI_FIELDS
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_value",
        param,
    )
    assert f"'{param}'" in error["message"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        # end + 1 day (the inclusive end) overflowed datetime: an OverflowError and a 500.
        ({"start": "0001-01-01", "end": "9999-12-31"}, "end"),
        ({"end": "9999-12-31"}, "end"),
        ({"start": "9999-12-31"}, "start"),
        ({"start": "2026-11-22", "end": "2026-11-21"}, "end"),
        ({"start": "not-a-date"}, "start"),
        ({"end": "2026-13-01"}, "end"),
        ({"start": "2026-11-01\x00"}, "start"),
    ],
    ids=[
        "whole_calendar",
        "end_year_9999",
        "start_year_9999",
        "start_after_end",
        "start_not_a_date",
        "end_not_a_date",
        "start_with_nul",
    ],
)
def test_a_bad_usage_date_range_is_a_400_naming_the_parameter(world, params, param):
    with world.http() as client:
        response = client.get("/v1/billing/usage", params=params)
    assert_invalid(response, param)


@pytest.mark.parametrize(
    "params",
    [
        {"start": "2026-11-22", "end": "2026-11-22"},
        {"start": "0001-01-01", "end": "2026-11-22"},
        {"start": "2026-11-01", "end": "9999-12-30"},
    ],
    ids=["one_day", "from_year_1", "to_the_last_day_that_fits"],
)
def test_a_usage_range_within_the_calendar_is_answered(world, params):
    with world.http() as client:
        response = client.get("/v1/billing/usage", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["start"], body["end"]) == (params["start"], params["end"])


def cursor(query: str) -> str:
    return base64.b64encode(query.encode()).decode()


@pytest.mark.parametrize(
    "position", ["abc", "%00", "1.5", ""], ids=["letters", "nul", "fraction", "empty"]
)
def test_a_ledger_cursor_with_a_position_we_never_issued_is_not_a_500(world, position):
    with world.http() as client:
        response = client.get("/v1/billing/ledger", params={"cursor": cursor(f"p={position}")})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert set(error) == OPENAI_FIELDS
    assert error["message"] == "Invalid cursor"


@pytest.mark.parametrize("position", ["9" * 30, "-" + "9" * 30], ids=["huge", "huge_negative"])
def test_a_ledger_cursor_beyond_every_id_is_answered(world, position):
    with world.http() as client:
        response = client.get("/v1/billing/ledger", params={"cursor": cursor(f"p={position}")})
    assert response.status_code == 200, response.text
