"""``service.admission``: the image memory budget admits, makes wait in order, refuses, and always gives back."""

from __future__ import annotations

import asyncio

import pytest

from service.admission import MemoryBudget, return_freed_memory
from service.errors import UnavailableError
from service.metrics import Metrics
from service.settings import Settings
from training.errors import ImageError, InputError
from training.images import max_decoding_cost


def run(coro):
    return asyncio.run(coro)


def refused(metrics: Metrics, reason: str) -> float:
    return metrics.images_refused.labels(reason)._value.get()


def test_admits_what_fits_at_once_and_gives_it_back():
    async def go():
        budget = MemoryBudget(100, max_wait_s=0)
        async with budget.admit(60):
            assert budget.in_use == 60
            async with budget.admit(40):
                assert budget.in_use == 100
        assert budget.in_use == 0

    run(go())


def test_waiters_are_admitted_in_order_as_room_is_made():
    async def go():
        budget, order = MemoryBudget(100, max_wait_s=5), []
        await budget.acquire(100)

        async def ask(name: str, cost: int):
            async with budget.admit(cost):
                order.append(name)
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(ask(n, c)) for n, c in (("big", 90), ("small", 10), ("next", 50))]
        await asyncio.sleep(0.05)
        assert (order, budget.waiting) == ([], 3)  # nothing fits while the 100 are held
        budget.release(100)
        await asyncio.gather(*tasks)
        # "small" fits beside "big" and follows it; "next" waits for room, it never jumps the line
        assert order == ["big", "small", "next"] and budget.in_use == 0 and budget.waiting == 0

    run(go())


def test_a_full_budget_is_a_503_after_the_wait_and_the_waiter_leaves_no_trace():
    async def go():
        metrics = Metrics()
        budget = MemoryBudget(100, max_wait_s=0.05, retry_after_s=2, metrics=metrics)
        await budget.acquire(80)
        with pytest.raises(UnavailableError) as e:
            await budget.acquire(30)
        assert e.value.retry_after == 2 and "retry" in str(e.value)
        assert (budget.in_use, budget.waiting, refused(metrics, "busy")) == (80, 0, 1)
        assert metrics.image_memory._value.get() == 80
        budget.release(80)
        await budget.acquire(100)  # the refused request holds nothing

    run(go())


def test_an_image_over_the_whole_budget_is_a_400_at_once():
    async def go():
        metrics = Metrics()
        budget = MemoryBudget(100 * 2**20, max_wait_s=10, metrics=metrics)
        with pytest.raises(ImageError, match=r"about 101 MiB.*\(100 MiB\); downscale it"):
            await budget.acquire(100 * 2**20 + 1)
        assert (budget.in_use, refused(metrics, "too_large")) == (0, 1)

    run(go())


def test_the_reservation_is_released_when_decoding_fails_or_the_request_is_cancelled():
    async def go():
        budget = MemoryBudget(100, max_wait_s=5)
        with pytest.raises(ImageError):
            async with budget.admit(70):
                raise ImageError("truncated")
        assert budget.in_use == 0
        await budget.acquire(70)
        waiting = asyncio.create_task(budget.acquire(50))  # a client that disconnects while it waits
        await asyncio.sleep(0.02)
        behind = asyncio.create_task(budget.acquire(30))
        await asyncio.sleep(0.02)
        assert budget.waiting == 2
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await asyncio.wait_for(behind, 1)  # the head left the line: the 30 behind it fit at once
        assert (budget.in_use, budget.waiting) == (100, 0)

    run(go())


def test_the_budget_must_hold_one_image_of_the_pixel_limit():
    need = max_decoding_cost(40_000_000, 50.0)
    assert Settings(image_memory_budget_bytes=need).image_memory_budget_bytes == need
    assert Settings().image_memory_budget_bytes >= need  # the defaults agree
    with pytest.raises(InputError, match="IMAGE_MEMORY_BUDGET_BYTES=.*raise the budget to at least"):
        Settings(image_memory_budget_bytes=need - 1)
    smaller = max_decoding_cost(10_000_000, 50.0)
    assert smaller < need // 2
    Settings(image_memory_budget_bytes=smaller, max_image_pixels=10_000_000)  # or lower the pixel limit


def test_freed_memory_can_be_returned_anywhere():
    assert return_freed_memory() in (True, False)  # False on C libraries without malloc_trim, never an error
