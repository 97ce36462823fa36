"""The store schema and both backends: exact hyperbolic ranking, identical rankings, filters.

The server backend runs against qdrant-client's local mode (``QdrantClient(":memory:")``): no Qdrant
server binary can be installed here, and local mode speaks the same API (collections, named vectors,
prefetch + rescoring, filters, aliases, collection metadata) with an exact brute-force engine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from qdrant_client import QdrantClient

from indexer.edge_store import EdgeStore
from indexer.errors import StoreUnavailableError
from indexer.server_store import ServerStore, connect
from indexer.store import LORENTZ, Match, Schema, VectorQuery, content_id
from tests.helpers.indexer import fill, hyperboloid, row
from training import lorentz

C = 0.7
DIM = 16


@pytest.fixture()
def lorentz_data():
    return hyperboloid(300, DIM, C, seed=3), hyperboloid(8, DIM, C, seed=4)


def exact_order(x: torch.Tensor, q: torch.Tensor) -> list[int]:
    return lorentz.pairwise_dist(q[None], x, C)[0].argsort().tolist()


def test_dot_product_on_the_lorentz_vector_is_the_lorentz_inner_product(lorentz_data):
    x, queries = lorentz_data
    schema = Schema("lorentz", DIM, C)
    stored = schema.point_vectors(x.numpy())[LORENTZ].astype(np.float64)
    for q in queries:
        rescore = schema.query(q.numpy(), k=5).vector.astype(np.float64)
        inner = lorentz.pairwise_inner(q[None].double(), x.double(), C)[0].numpy()
        assert np.allclose(stored @ rescore, inner, atol=1e-4)
        dist = np.array([schema.distance(s) for s in stored @ rescore])
        assert np.allclose(dist, lorentz.pairwise_dist(q[None].double(), x.double(), C)[0].numpy(), atol=2e-3)


def test_prefetch_and_rescore_order_equals_exact_lorentz_order(tmp_path, art, lorentz_data):
    x, queries = lorentz_data
    schema = Schema("lorentz", DIM, C)
    with EdgeStore.create(tmp_path / "s", schema) as store:
        fill(store, art, x)
        store.optimize()
        for q in queries:
            want = exact_order(x, q)[:20]
            # a prefetch as large as the gallery: the final order is decided by the rescoring alone
            full = store.query(schema.query(q.numpy(), k=20, oversample=len(x)))
            assert [row(h.id) for h in full] == want
            scan = store.query(schema.query(q.numpy(), k=20, exact=True))
            assert [row(h.id) for h in scan] == want
            d = lorentz.pairwise_dist(q[None], x, C)[0]
            assert [schema.distance(h.score) for h in scan] == pytest.approx(d[want].tolist(), abs=2e-3)
            # the default oversample only changes which candidates are rescored, never their order
            top = [row(h.id) for h in store.query(schema.query(q.numpy(), k=10))]
            assert top == sorted(top, key=lambda i: float(d[i]))


def test_lorentz_vector_has_no_hnsw_graph_and_space_has_one(tmp_path, art):
    """With a graph on `lorentz` (stored-vs-stored dot products) a direct search there loses most
    neighbours; without one (m=0) it is a scan and exact. Segments are forced to index at 1 KB."""
    schema = Schema("lorentz", DIM, C)
    x, queries = hyperboloid(1500, DIM, C, seed=5), hyperboloid(10, DIM, C, seed=6)
    with EdgeStore.create(tmp_path / "s", schema, indexing_threshold_kb=1) as store:
        fill(store, art, x)
        store.optimize()
        assert store.indexed_vectors() > 0  # space got its graph
        for q in queries:
            direct = store.query(VectorQuery(schema.query(q.numpy(), k=10).vector, LORENTZ, 10))
            assert [row(h.id) for h in direct] == exact_order(x, q)[:10]
            # through the `space` graph: the same as an exact Euclidean prefetch + exact rescoring
            cand = torch.cdist(q[None], x)[0].argsort()[:80]
            want = cand[lorentz.pairwise_dist(q[None], x[cand], C)[0].argsort()[:10]].tolist()
            hits = store.query(schema.query(q.numpy(), k=10, oversample=8))
            assert len({row(h.id) for h in hits} & set(want)) >= 9


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_both_backends_return_identical_rankings(tmp_path, art, geometry):
    if geometry == "lorentz":
        schema, x, queries = Schema("lorentz", DIM, C), hyperboloid(150, DIM, C, seed=7), hyperboloid(4, DIM, C, seed=8)
    else:
        g = torch.Generator().manual_seed(9)
        x = torch.nn.functional.normalize(torch.randn(150, DIM, generator=g), dim=-1)
        queries = torch.nn.functional.normalize(torch.randn(4, DIM, generator=g), dim=-1)
        schema = Schema("euclidean", DIM)
    tags = [["even"] if i % 2 == 0 else ["odd"] for i in range(len(x))]
    edge = EdgeStore.create(tmp_path / "s", schema)
    server = ServerStore.create(QdrantClient(":memory:"), "c@1", schema)
    for s in (edge, server):
        fill(s, art, x, tags=tags)
        s.optimize()
    try:
        for q in queries:
            for match in (Match(), Match(exclude_unsafe=True), Match(tags_any=("odd",)), Match(kinds=("text",))):
                a = edge.query(schema.query(q.numpy(), k=8, match=match))
                b = server.query(schema.query(q.numpy(), k=8, match=match))
                assert [h.id for h in a] == [h.id for h in b]
                assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)
        assert edge.count() == server.count() == len(x)
        assert sorted(edge.iter_ids(batch=64)) == sorted(server.iter_ids(batch=64))
    finally:
        edge.close()


def test_unsafe_filter_and_delete_work_on_edge(tmp_path, art):
    """qdrant-edge-py 0.9.0 reads a Python bool in MatchValue as an int; the store must still filter."""
    schema = Schema("lorentz", DIM, C)
    x = hyperboloid(100, DIM, art.curvature, radii=(0.5, 2.5), seed=10)
    with EdgeStore.create(tmp_path / "s", schema) as store:
        fill(store, art, x)
        unsafe = int((lorentz.dist0(x, art.curvature) > art.unsafe_threshold("image")).sum())
        assert 0 < unsafe < len(x)
        assert store.count(Match(exclude_unsafe=True)) == len(x) - unsafe
        store.delete_where(Match(uris=("p0.png", "p1.png")))
        store.delete(["00000000-0000-0000-0000-000000000002", "00000000-0000-0000-0000-000000009999"])
        assert store.count() == len(x) - 3
        got = store.retrieve(["00000000-0000-0000-0000-000000000003"], with_vectors=True)
        assert got[0].payload["uri"] == "p3.png" and len(got[0].vectors[LORENTZ]) == DIM + 1


def test_content_ids_are_deterministic_uuids():
    a = content_id(b"same bytes")
    assert a == content_id(b"same bytes") != content_id(b"other bytes")
    assert content_id("a caption") == content_id("a caption".encode())
    assert len(a) == 36 and a.count("-") == 4


def test_unreachable_server_fails_after_bounded_retries_naming_the_url():
    url = "http://127.0.0.1:9"  # discard port: nothing listens
    with pytest.raises(StoreUnavailableError, match=r"127\.0\.0\.1:9.*after 2 attempts"):
        connect(url, prefer_grpc=False, timeout_s=1, retries=2, backoff_s=0.01)


def test_a_collection_created_over_shards_and_replicas_ranks_like_one_shard(art, lorentz_data):
    """The cluster's create call (3 shards, 2 replicas) through the real client; local mode keeps one
    shard, so this checks that the call is accepted and the collection behaves the same, not placement."""
    x, queries = lorentz_data
    schema = Schema("lorentz", DIM, C)
    plain = ServerStore.create(QdrantClient(":memory:"), "c@1", schema)
    spread = ServerStore.create(QdrantClient(":memory:"), "c@1", schema, shard_number=3, replication_factor=2)
    for s in (plain, spread):
        fill(s, art, x)
    for q in queries:
        a = plain.query(schema.query(q.numpy(), k=10, match=Match()))
        b = spread.query(schema.query(q.numpy(), k=10, match=Match()))
        assert [h.id for h in a] == [h.id for h in b] and len(a) == 10
    assert spread.count() == len(x)
