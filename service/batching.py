"""Dynamic batching of query encodes on one inference thread, with an LRU cache of query embeddings.

Requests put ``(artifact, modality, input)`` on a queue and await a future. The inference thread
takes the first waiting query, keeps gathering until ``max_batch`` queries are waiting or
``max_wait_ms`` has passed since the first arrived, and encodes each (artifact, modality) group in
one forward pass. The wait only happens under load (when the previous pass held more than one
query): a lone query is encoded at once, so batching adds no latency at one client, and under load
the queries that arrive during a forward pass form the next batch anyway. Batching pays because a
forward pass over B queries costs far less than B passes (the text tower is cut to the batch's
longest real query inside the encoder). The event loop only touches the cache and the queue; torch
runs on the inference thread alone.

Queries carry their artifact, so during a model swap the old and the new model are both served
correctly: each query is encoded by the model of the pair its request started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable, Literal

import torch
from torch import Tensor

from service.metrics import Metrics
from training.artifact import Artifact

Modality = Literal["text", "image"]


@dataclass(frozen=True)
class Encoded:
    """One query embedding: ``vector (D,)`` float32 on the CPU, and its distance to the origin (lorentz)."""

    vector: Tensor
    distance_to_origin: float | None


@dataclass
class _Pending:
    artifact: Artifact
    modality: Modality
    payload: Any  # str (text) or Tensor (3, H, W) (a preprocessed image)
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    cache_key: Hashable | None = None
    enqueued: float = field(default_factory=time.perf_counter)


class QueryCache:
    """A thread-safe LRU map ``(model fingerprint, modality, key) -> Encoded``."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, Encoded] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Encoded | None:
        if self.size <= 0:
            return None
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key: Hashable, value: Encoded) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


_STOP = object()


class Batcher:
    """Gathers concurrent encodes into batches and runs them on a dedicated inference thread."""

    def __init__(
        self,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        cache_size: int = 4096,
        dtype: Literal["fp32", "bf16"] = "fp32",
        torch_threads: int | None = None,
        metrics: Metrics | None = None,
    ):
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.cache = QueryCache(cache_size)
        self.dtype = dtype
        self.torch_threads = torch_threads
        self.metrics = metrics
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last_batch = 1

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------ event-loop side
    async def encode(self, artifact: Artifact, modality: Modality, payload: Any, *, key: Hashable | None = None) -> Encoded:
        """Embed one text (``str``) or preprocessed image (``(3, H, W)`` tensor) with ``artifact``.

        ``key`` (the text itself, or a hash of the image bytes) enables the cache.
        """
        cache_key = (artifact.fingerprint, modality, key) if key is not None else None
        if cache_key is not None:
            hit = self.cache.get(cache_key)
            if self.metrics is not None:
                self.metrics.cache.labels("hit" if hit is not None else "miss").inc()
            if hit is not None:
                return hit
        if self._thread is None:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Pending(artifact, modality, payload, future, loop, cache_key))
        return await future

    # ------------------------------------------------------------ inference thread
    def _run(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = self._gather(batch)
            self._last_batch = len(batch)
            groups: dict[tuple[int, str], list[_Pending]] = {}
            for p in batch:
                groups.setdefault((id(p.artifact), p.modality), []).append(p)
            for group in groups.values():
                self._encode_group(group)
            if stop:
                return

    def _gather(self, batch: list[_Pending]) -> bool:
        """Add waiting queries to ``batch`` until it is full or the wait is over; True if told to stop."""
        deadline = time.perf_counter() + (self.max_wait if self._last_batch > 1 else 0.0)
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            batch.append(item)
        return False

    def _encode_group(self, group: list[_Pending]) -> None:
        live = [p for p in group if not p.future.cancelled()]
        if not live:
            return
        try:
            results = self._forward(live[0].artifact, live[0].modality, [p.payload for p in live])
        except BaseException as e:  # noqa: BLE001 - delivered to the awaiting request, never raised here
            if len(live) > 1:  # one bad input must not fail its neighbours: retry one by one
                for p in live:
                    self._encode_group([p])
                return
            _deliver(live[0], error=e)
            return
        if self.metrics is not None:
            self.metrics.batch_size.labels(live[0].modality).observe(len(live))
        for p, result in zip(live, results, strict=True):
            if p.cache_key is not None:
                self.cache.put(p.cache_key, result)
            _deliver(p, value=result)

    def _forward(self, artifact: Artifact, modality: Modality, payloads: list[Any]) -> list[Encoded]:
        encoder = artifact.encoder
        autocast = (
            torch.autocast(encoder.device.type, dtype=torch.bfloat16)
            if self.dtype == "bf16"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            if modality == "text":
                unique = list(dict.fromkeys(payloads))  # the same query twice in one batch is encoded once
                rows = encoder.encode_text(unique, batch_size=max(len(unique), 1))
                where = {text: i for i, text in enumerate(unique)}
                vectors = rows[[where[t] for t in payloads]]
            else:
                vectors = encoder.encode_image(torch.stack(payloads), batch_size=max(len(payloads), 1))
            vectors = vectors.float().cpu()
            d0 = encoder.dist0(vectors).tolist() if artifact.geometry == "lorentz" else [None] * len(payloads)
        return [Encoded(vectors[i], d0[i]) for i in range(len(payloads))]


def _deliver(p: _Pending, *, value: Encoded | None = None, error: BaseException | None = None) -> None:
    def settle() -> None:
        if p.future.done():  # the request went away (client disconnected, timeout)
            return
        if error is not None:
            p.future.set_exception(error)
        else:
            p.future.set_result(value)

    with contextlib.suppress(RuntimeError):  # loop already closed during shutdown
        p.loop.call_soon_threadsafe(settle)
