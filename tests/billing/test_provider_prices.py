"""Provider prices (what a request costs us upstream): the catalogue import and finance's review
in the admin, the commands, the provider cost recorded once at settle (and by the sweep from a
checkpoint), never shown to the customer; negotiated per-account tariffs priced the same at the
hold and at the settle over the live gateway."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import Group, User
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from billing.engine import sql_async_pool_close
from billing.models import (
    Hold,
    LanguageModel,
    ProviderPrice,
    ProviderPriceProposal,
    Tariff,
    UsageRecord,
)
from billing.money import QUANTUM
from billing.pricing import Price, Usage
from billing.services.holds import RequestDetails, hold_checkpoint_async, hold_place
from billing.services.tariffs import provider_price_set
from gateway.services import model_route_set, upstream_add
from reconciliation.models import StaffAction
from reconciliation.services.sweeps import holds_expire_and_queue
from tests.factories import make_account, make_key
from tests.gateway.conftest import live_gateway, mock_upstream, world
from tests.gateway.ledger import assert_clean, charged

__all__ = ["live_gateway", "mock_upstream", "world"]

D = Decimal


def run_json(*args: str) -> dict[str, Any]:
    out = StringIO()
    call_command(*args, "--json", stdout=out)
    [line] = out.getvalue().splitlines()
    result: dict[str, Any] = json.loads(line)
    return result


def _routes() -> None:
    upstream_add(name="openai-prod", kind="openai", base_url="https://api.openai.com/v1")
    upstream_add(name="anthropic-prod", kind="anthropic", base_url="https://api.anthropic.com")
    model_route_set(alias="gpt-4o", upstream_name="openai-prod", upstream_model="gpt-4o")
    model_route_set(
        alias="haiku", upstream_name="anthropic-prod", upstream_model="claude-3-5-haiku-latest"
    )
    model_route_set(alias="house-model", upstream_name="openai-prod", upstream_model="ours-v1")


def _finance_client(username: str = "finance") -> tuple[Client, User]:
    user = User.objects.create_user(username, password="x", is_staff=True)
    user.groups.add(Group.objects.get(name="Finance"))
    client = Client()
    client.force_login(user)
    return client, user


@pytest.mark.django_db
def test_import_proposes_the_catalogue_prices_and_prices_nothing_by_itself() -> None:
    _routes()
    assert run_json("import_prices") == {
        "proposed": 2,
        "unchanged": 0,
        "unknown_models": ["house-model"],
    }
    assert not ProviderPrice.objects.exists()  # nothing changes without review
    gpt = ProviderPriceProposal.objects.get(model__alias="gpt-4o")
    assert (gpt.provider, gpt.status) == ("openai", "pending")
    assert gpt.price == Price(
        input_per_mtok=D("2.5"), output_per_mtok=D("10"), cached_input_per_mtok=D("1.25")
    )
    haiku = ProviderPriceProposal.objects.get(model__alias="haiku")
    assert (haiku.provider, haiku.catalogue_model) == ("anthropic", "claude-3-5-haiku-latest")
    assert (haiku.cache_write_per_mtok, haiku.reasoning_per_mtok) == (D("1"), None)

    # The same catalogue again: the pending proposals already say so.
    assert run_json("import_prices") == {
        "proposed": 0,
        "unchanged": 2,
        "unknown_models": ["house-model"],
    }
    # One provider for every route: the OpenAI routes are unknown at Anthropic.
    assert run_json("import_prices", "--provider", "anthropic")["unknown_models"] == [
        "gpt-4o",
        "house-model",
    ]


@pytest.mark.django_db
def test_finance_reviews_each_proposal_seeing_the_difference_and_each_decision_is_recorded() -> (
    None
):
    _routes()
    # What we pay today, set by hand: the import's price for gpt-4o differs from it.
    run_json("set_provider_price", "gpt-4o", "--input-per-mtok", "3", "--output-per-mtok", "12")
    run_json("import_prices")
    gpt = ProviderPriceProposal.objects.get(model__alias="gpt-4o")
    haiku = ProviderPriceProposal.objects.get(model__alias="haiku")
    client, user = _finance_client()

    listing = client.get("/admin/billing/providerpriceproposal/")
    assert listing.status_code == 200
    assert "(-16.67%)" in listing.content.decode()  # input 3 -> 2.5
    assert "&lt;span" not in listing.content.decode()  # amounts as markup, not escaped

    chosen = client.post(
        "/admin/billing/providerpriceproposal/",
        {"action": "accept", "_selected_action": [str(gpt.pk)]},
    )
    assert chosen.status_code == 302
    confirm = client.get(chosen["Location"])
    page = confirm.content.decode()
    assert confirm.status_code == 200
    assert "3.0000000000" in page and "2.5000000000" in page and "-16.67%" in page
    assert ProviderPrice.objects.filter(model__alias="gpt-4o").count() == 1  # not yet

    done = client.post(chosen["Location"], {"ids": str(gpt.pk), "memo": "catalogue update"})
    assert done.status_code == 302
    gpt.refresh_from_db()
    assert (gpt.status, gpt.decided_by) == ("accepted", user)
    current = ProviderPrice.objects.filter(model__alias="gpt-4o").latest("valid_from")
    assert current.pk == gpt.accepted_price_id and current.price == gpt.price
    accepted = StaffAction.objects.get(action="provider_price_accept")
    assert (accepted.user, accepted.memo) == (user, "catalogue update")
    assert accepted.details["previous"]["input_per_mtok"] == "3.0000000000"
    assert accepted.details["proposed"]["input_per_mtok"] == "2.5000000000"

    reject_url = f"/admin/billing/providerpriceproposal/decide/reject/?ids={haiku.pk}"
    client.post(reject_url, {"ids": str(haiku.pk), "memo": "not our contract price"})
    haiku.refresh_from_db()
    assert haiku.status == "rejected"
    assert not ProviderPrice.objects.filter(model__alias="haiku").exists()
    assert StaffAction.objects.filter(action="provider_price_reject").count() == 1

    # A decided proposal cannot be decided again: nothing changes, nothing is recorded.
    client.post(reject_url.replace(str(haiku.pk), str(gpt.pk)), {"ids": str(gpt.pk), "memo": "x"})
    gpt.refresh_from_db()
    assert gpt.status == "accepted"
    assert StaffAction.objects.filter(action__startswith="provider_price_").count() == 2


@pytest.mark.django_db
def test_staff_outside_finance_cannot_decide_or_see_provider_prices() -> None:
    _routes()
    run_json("import_prices")
    proposal = ProviderPriceProposal.objects.get(model__alias="gpt-4o")
    User.objects.create_user("staff", password="x", is_staff=True)
    client = Client()
    client.login(username="staff", password="x")
    url = f"/admin/billing/providerpriceproposal/decide/accept/?ids={proposal.pk}"
    assert client.get(url).status_code == 403
    assert client.post(url, {"ids": str(proposal.pk), "memo": "me"}).status_code == 403
    assert client.get("/admin/billing/providerpriceproposal/").status_code == 403
    assert client.get("/admin/billing/providerprice/").status_code == 403
    proposal.refresh_from_db()
    assert proposal.status == "pending" and not ProviderPrice.objects.exists()


@pytest.mark.django_db
def test_set_tariff_markup_derives_sell_prices_from_the_provider_price() -> None:
    run_json(
        "set_provider_price",
        "m",
        "--input-per-mtok",
        "2",
        "--output-per-mtok",
        "8",
        "--cached-input-per-mtok",
        "1",
    )
    result = run_json("set_tariff", "m", "--markup-percent", "25")
    assert (result["input_per_mtok"], result["output_per_mtok"]) == (
        "2.5000000000",
        "10.0000000000",
    )
    assert result["cached_input_per_mtok"] == "1.2500000000"
    assert result["reasoning_per_mtok"] is None and result["account_id"] is None
    tariff = Tariff.objects.get(pk=result["tariff_id"])
    assert tariff.price == Price(
        input_per_mtok=D("2.5"), output_per_mtok=D("10"), cached_input_per_mtok=D("1.25")
    )
    with pytest.raises(CommandError, match="no provider price"):
        run_json("set_tariff", "unpriced", "--markup-percent", "25")
    with pytest.raises(CommandError, match="drop --input-per-mtok"):
        run_json("set_tariff", "m", "--markup-percent", "25", "--input-per-mtok", "1")
    with pytest.raises(CommandError, match="above -100"):
        run_json("set_tariff", "m", "--markup-percent", "-100")
    with pytest.raises(CommandError, match="--output-per-mtok is required"):
        run_json("set_tariff", "m", "--input-per-mtok", "1")


@pytest.mark.django_db
def test_set_tariff_for_one_account_only() -> None:
    account = make_account()
    result = run_json(
        "set_tariff",
        "m",
        "--input-per-mtok",
        "1",
        "--output-per-mtok",
        "2",
        "--account",
        str(account.pk),
    )
    assert result["account_id"] == account.pk
    assert Tariff.objects.get(pk=result["tariff_id"]).account_id == account.pk
    with pytest.raises(CommandError, match="no customer account"):
        run_json(
            "set_tariff", "m", "--input-per-mtok", "1", "--output-per-mtok", "2", "--account", "-1"
        )


def test_settle_records_the_provider_cost_and_the_customer_never_sees_it(world) -> None:  # type: ignore[no-untyped-def]
    ours = Price(input_per_mtok=D("1"), output_per_mtok=D("4"), cached_input_per_mtok=D("0.5"))
    provider_price_set(
        model_alias=world.openai_model, price=ours, valid_from=timezone.now() - timedelta(hours=1)
    )
    with world.http() as http:
        priced = http.post(
            "/v1/chat/completions",
            json={
                "model": world.openai_model,
                "messages": [
                    {"role": "user", "content": "hi [mock:tokens=30] [mock:cached_tokens=4]"}
                ],
            },
        )
        unpriced = http.post(
            "/v1/messages",
            json={
                "model": world.anthropic_model,
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "hi [mock:tokens=12]"}],
            },
        )
        usage_report = http.get("/v1/billing/usage")
    assert priced.status_code == unpriced.status_code == usage_report.status_code == 200
    record = UsageRecord.objects.get(request_id=priced.headers["x-request-id"])
    usage = Usage(
        input_tokens=record.input_tokens,
        cached_input_tokens=record.cached_input_tokens,
        output_tokens=record.output_tokens,
        reasoning_tokens=record.reasoning_tokens,
    )
    assert record.cached_input_tokens == 4 and record.output_tokens == 30
    assert record.provider_cost == ours.cost(usage) > 0
    assert record.cost == charged(record.request_id) != record.provider_cost
    # No provider price: unknown, not free.
    assert (
        UsageRecord.objects.get(request_id=unpriced.headers["x-request-id"]).provider_cost is None
    )
    for answer in (priced, unpriced, usage_report):
        assert "provider" not in answer.text
    assert_clean(world.account)


def _on_a_loop(step: Any, **kwargs: Any) -> Any:
    async def run() -> Any:
        try:
            return await step(**kwargs)
        finally:
            await sql_async_pool_close()

    return asyncio.run(run())


@pytest.mark.django_db(transaction=True)
def test_the_sweep_charges_a_checkpoint_with_its_provider_cost() -> None:
    account = make_account(now=timezone.now())
    key = make_key(account=account, now=timezone.now()).api_key
    now = timezone.now()
    for request_id, provider_cost in (("lost-priced", D("0.0421")), ("lost-unpriced", None)):
        hold_place(api_key=key, request_id=request_id, amount=D("1"), now=now, model_alias="m")
        assert _on_a_loop(
            hold_checkpoint_async,
            request_id=request_id,
            cost=D("0.2"),
            usage=Usage(input_tokens=10, output_tokens=20, estimated=True),
            details=RequestDetails(
                endpoint="chat.completions",
                started_at=now,
                stream=True,
                outcome="checkpoint",
                provider_cost=provider_cost,
            ),
            now=now,
        )
    expires = Hold.objects.get(request_id="lost-priced").expires_at
    assert holds_expire_and_queue(now=expires)["expired"] == 2
    priced = UsageRecord.objects.get(request_id="lost-priced")
    assert (priced.outcome, priced.cost, priced.provider_cost) == (
        "gateway_lost",
        D("0.2"),
        D("0.0421"),
    )
    assert UsageRecord.objects.get(request_id="lost-unpriced").provider_cost is None


def test_a_negotiated_price_prices_both_the_hold_and_the_settle(world) -> None:  # type: ignore[no-untyped-def]
    from tests.gateway.conftest import (
        CACHE_WRITE_PER_MTOK,
        CACHED_INPUT_PER_MTOK,
        INPUT_PER_MTOK,
        OUTPUT_PER_MTOK,
        REASONING_PER_MTOK,
    )

    # The world's account gets every rate at half the general tariff; another pays list.
    run_json(
        "set_tariff",
        world.openai_model,
        "--input-per-mtok",
        str(INPUT_PER_MTOK / 2),
        "--output-per-mtok",
        str(OUTPUT_PER_MTOK / 2),
        "--cached-input-per-mtok",
        str(CACHED_INPUT_PER_MTOK / 2),
        "--cache-write-per-mtok",
        str(CACHE_WRITE_PER_MTOK / 2),
        "--reasoning-per-mtok",
        str(REASONING_PER_MTOK / 2),
        "--valid-from",
        "2020-01-01",
        "--account",
        str(world.account.pk),
    )
    list_price = make_account(credits=D("10"), now=timezone.now())
    list_key = make_key(account=list_price, now=timezone.now()).secret
    body = {
        "model": world.openai_model,
        "max_tokens": 300,
        "messages": [{"role": "user", "content": "same question [mock:tokens=120]"}],
    }
    ids = []
    for secret in (world.key, list_key):
        answer = httpx.post(
            f"{world.gateway.url}/v1/chat/completions",
            json=body,
            timeout=30,
            headers={"Authorization": f"Bearer {secret}"},
        )
        assert answer.status_code == 200, answer.text
        ids.append(answer.headers["x-request-id"])
    negotiated, general = (Hold.objects.get(request_id=request_id) for request_id in ids)
    # Half of every rate: half the worst case held, half the cost settled (to the unit,
    # each rounded once).
    assert abs(negotiated.amount * 2 - general.amount) <= 2 * QUANTUM
    assert abs(charged(ids[0]) * 2 - charged(ids[1])) <= 2 * QUANTUM
    assert charged(ids[0]) < charged(ids[1])
    assert_clean(world.account)


@pytest.mark.django_db
def test_the_tariff_admin_gives_one_customer_a_negotiated_price() -> None:
    from tests.reconciliation.test_tariff_admin import ADD_URL, client_for, tariff_form

    account = make_account()
    admin_user = User.objects.create_superuser("root", password="x")
    model = LanguageModel.objects.create(alias="gpt-negotiated")
    response = client_for(admin_user).post(
        ADD_URL, tariff_form(model, account=str(account.pk), memo="contract 2026-12")
    )
    assert response.status_code == 302
    tariff = Tariff.objects.get(model=model)
    assert tariff.account_id == account.pk
    action = StaffAction.objects.get(action="tariff_set")
    assert (action.memo, action.details["account_id"]) == ("contract 2026-12", account.pk)
    listing = client_for(admin_user).get("/admin/billing/tariff/", {"account__isempty": "0"})
    assert "gpt-negotiated" in listing.content.decode()
