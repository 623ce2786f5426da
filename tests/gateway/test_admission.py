"""Admission before the hold: a free slot is taken at once; with every slot taken a request
waits for one, and past GATEWAY_ADMISSION_TIMEOUT_SECONDS is refused with a 503, holding
nothing."""

from __future__ import annotations

import asyncio

import pytest
from django.test import override_settings

from gateway.errors import GatewayError
from gateway.pipeline import _admit


def test_a_free_slot_is_taken_at_once() -> None:
    async def scenario() -> int:
        admission = asyncio.Semaphore(2)
        await _admit(admission)
        return admission._value  # the slots left

    assert asyncio.run(scenario()) == 1


@override_settings(GATEWAY_ADMISSION_TIMEOUT_SECONDS=0.05)
def test_with_every_slot_taken_the_request_is_refused_after_the_timeout() -> None:
    async def scenario() -> GatewayError:
        admission = asyncio.Semaphore(1)
        await _admit(admission)
        with pytest.raises(GatewayError) as refused:
            await _admit(admission)
        assert admission.locked()  # the refused request took nothing
        return refused.value

    error = asyncio.run(scenario())
    assert (error.status, error.code) == (503, "overloaded")


@override_settings(GATEWAY_ADMISSION_TIMEOUT_SECONDS=5)
def test_a_waiting_request_gets_the_slot_given_back() -> None:
    async def scenario() -> bool:
        admission = asyncio.Semaphore(1)
        await _admit(admission)
        waiting = asyncio.ensure_future(_admit(admission))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        admission.release()
        await asyncio.wait_for(waiting, 1)
        return admission.locked()

    assert asyncio.run(scenario())  # the waiter holds it now
