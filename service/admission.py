"""Admission of query-image decodes against one memory budget shared by every request in flight.

A 116 kB PNG of 6300 x 6300 zeros is within the pixel and aspect limits, yet it decodes to 159 MB
and its RGB copy takes as much again: forty sent at once took a server past 6 GB, failed valid
requests with MemoryError and could kill the process. So each image's cost is estimated from its
header (:func:`training.images.decoding_cost`) and reserved here before anything is decoded:

- it fits: it is decoded at once;
- the budget is full: it waits, first come first served, at most ``max_wait_s``, then the request
  is a 503 with ``Retry-After`` (:class:`~service.errors.UnavailableError`);
- it alone exceeds the whole budget: a 400 (:class:`~training.errors.ImageError`) telling the client
  to downscale it, as no wait could help.

The reservation is held until decoding and preprocessing end, whatever their outcome. Waiting
requests hold no thread, so the few admitted decodes leave the threadpool and the batcher to the
text queries, which never pass here.

Memory given back: glibc serves blocks below its mmap threshold, which rises up to 32 MiB as large
blocks are freed, from per-thread arenas and keeps them after ``free``, so a burst's peak stayed
resident (5.2 GB of 6.5 GB after twenty such images). :func:`return_freed_memory` (``malloc_trim``)
runs after each large decode, on the decoding thread; setting ``M_MMAP_THRESHOLD`` instead would
also send the model's own 4-32 MiB tensors through mmap on every forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import sys
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from service.errors import UnavailableError
from service.metrics import Metrics
from training.errors import ImageError

MiB = 2**20
#: After a decode that reserved this much, the freed heap is given back to the OS.
TRIM_ABOVE_BYTES = 64 * MiB


@dataclass
class _Waiter:
    cost: int
    future: asyncio.Future[None]


class MemoryBudget:
    """``capacity`` bytes shared by the image decodes in flight; every method runs on the event loop."""

    def __init__(self, capacity: int, *, max_wait_s: float = 1.0, retry_after_s: float = 1.0,
                 metrics: Metrics | None = None):
        if capacity < 1:
            raise ValueError("a memory budget needs a positive capacity")
        self.capacity, self.max_wait_s, self.retry_after_s = capacity, max_wait_s, retry_after_s
        self.metrics = metrics
        self.in_use = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for room."""
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def admit(self, cost: int, *, what: str = "image") -> AsyncIterator[None]:
        """Hold ``cost`` bytes of the budget for the body of the ``async with`` (see :meth:`acquire`)."""
        await self.acquire(cost, what=what)
        try:
            yield
        finally:
            self.release(cost)

    async def acquire(self, cost: int, *, what: str = "image") -> None:
        """Reserve ``cost`` bytes: at once when they fit and nobody waits, else after those before it.

        ImageError when ``cost`` is over the whole capacity; UnavailableError (503, ``Retry-After``) when
        no room was made within ``max_wait_s``. A request cancelled while it waits reserves nothing.
        """
        if cost > self.capacity:
            self._refused("too_large")
            raise ImageError(f"{what} would take about {_mib(cost)} MiB of memory to decode, more than this server "
                             f"allows for all images together ({_mib(self.capacity)} MiB); downscale it")
        if not self._waiters and self.in_use + cost <= self.capacity:
            self._take(cost)
            return
        waiter = _Waiter(cost, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.max_wait_s)
        except BaseException as e:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(cost)  # granted just as the wait ended: hand the room on
            else:
                waiter.future.cancel()
                self._waiters.remove(waiter)
                self._grant()  # a large request leaving the head of the line may let smaller ones in
            if isinstance(e, asyncio.TimeoutError):
                self._refused("busy")
                raise UnavailableError(
                    f"the server is busy decoding other images (their memory budget is in use); retry this {what} "
                    f"after {self.retry_after_s:g} s, or send a smaller one", self.retry_after_s) from None
            raise

    def release(self, cost: int) -> None:
        """Give back what :meth:`acquire` reserved and admit the waiters that now fit, in order."""
        self.in_use -= cost
        assert self.in_use >= 0, "released more than was reserved"
        self._grant()
        self._publish()

    # ------------------------------------------------------------------ internals
    def _take(self, cost: int) -> None:
        self.in_use += cost
        self._publish()

    def _grant(self) -> None:
        # strictly first come, first served: a large image at the head is not overtaken by smaller ones
        while self._waiters and self.in_use + self._waiters[0].cost <= self.capacity:
            waiter = self._waiters.popleft()
            self._take(waiter.cost)
            waiter.future.set_result(None)

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.image_memory.set(self.in_use)

    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.images_refused.labels(reason).inc()


def _mib(n: int) -> int:
    return -(-n // MiB)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl and others have none
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``); False where the C library cannot.

    Blocking (a few ms, up to ~100 ms right after a large decode): call it from a worker thread.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
