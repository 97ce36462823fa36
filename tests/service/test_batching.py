"""The dynamic batcher with the real tiny encoder: same vectors as one-at-a-time, real batches, cache."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from service.batching import Batcher, QueryCache
from service.metrics import Metrics
from training import artifact

TEXTS = [f"a photo of {n} {thing}" for n in ("one", "two", "three", "four") for thing in ("cat", "dog on a beach", "red car")]


@pytest.fixture(scope="module")
def art(world):
    return artifact.load(world.model, device="cpu")


def run(coro):
    return asyncio.run(coro)


def test_concurrent_encodes_are_batched_and_match_single_encodes(art):
    metrics = Metrics()
    batcher = Batcher(max_batch=16, max_wait_ms=50, cache_size=0, metrics=metrics)
    threads: set[str] = set()
    hook = art.encoder.clip.register_forward_pre_hook(lambda *a: threads.add(threading.current_thread().name))
    hook_text = art.encoder.clip.token_embedding.register_forward_pre_hook(
        lambda *a: threads.add(threading.current_thread().name))
    batcher.start()
    try:
        async def many():
            return await asyncio.gather(*(batcher.encode(art, "text", t) for t in TEXTS))

        results = run(many())
    finally:
        batcher.stop()
        hook.remove()
        hook_text.remove()
    alone = torch.stack([art.encoder.encode_text([t])[0] for t in TEXTS])
    got = torch.stack([r.vector for r in results])
    assert torch.allclose(got, alone, atol=1e-5)
    d0 = art.encoder.dist0(alone)
    assert [r.distance_to_origin for r in results] == pytest.approx(d0.tolist(), abs=1e-5)
    count = metrics.registry.get_sample_value("safe_retrieval_batch_size_count", {"modality": "text"})
    assert count < len(TEXTS)  # fewer forward passes than queries
    assert threads == {"inference"}  # torch ran on the inference thread only


def test_images_and_texts_in_one_gather(art, world):
    from training.images import open_image

    paths = sorted((world.data / "coco" / "val2017").glob("*.jpg"))[:4]
    pixels = [art.encoder.transform(open_image(p)) for p in paths]
    batcher = Batcher(max_batch=32, max_wait_ms=50, cache_size=0)
    batcher.start()
    try:
        async def mixed():
            return await asyncio.gather(*(batcher.encode(art, "image", px) for px in pixels),
                                        batcher.encode(art, "text", "a cat"))

        results = run(mixed())
    finally:
        batcher.stop()
    expected = art.encoder.encode_image(torch.stack(pixels))
    assert torch.allclose(torch.stack([r.vector for r in results[:4]]), expected, atol=1e-5)
    assert torch.allclose(results[4].vector, art.encoder.encode_text(["a cat"])[0], atol=1e-5)


def test_a_bad_query_fails_alone(art):
    batcher = Batcher(max_batch=8, max_wait_ms=50, cache_size=0)
    batcher.start()
    try:
        async def with_bad():
            return await asyncio.gather(batcher.encode(art, "text", "a cat"), batcher.encode(art, "text", "   "),
                                        return_exceptions=True)

        good, bad = run(with_bad())
    finally:
        batcher.stop()
    assert torch.allclose(good.vector, art.encoder.encode_text(["a cat"])[0], atol=1e-5)
    assert "empty" in str(bad)


def test_cache_hits_skip_the_encoder(art):
    metrics = Metrics()
    batcher = Batcher(max_batch=4, max_wait_ms=0, cache_size=8, metrics=metrics)
    batcher.start()
    try:
        async def twice():
            first = await batcher.encode(art, "text", "a dog", key="a dog")
            second = await batcher.encode(art, "text", "a dog", key="a dog")
            return first, second

        first, second = run(twice())
    finally:
        batcher.stop()
    assert second is first
    assert metrics.registry.get_sample_value("safe_retrieval_embedding_cache_total", {"result": "hit"}) == 1
    assert metrics.registry.get_sample_value("safe_retrieval_batch_size_count", {"modality": "text"}) == 1


def test_lru_cache_evicts_the_least_recently_used():
    cache = QueryCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    off = QueryCache(0)
    off.put("a", 1)
    assert off.get("a") is None
