"""The storage modes (``indexer.store.STORAGE_MODES``): a compact store ranks as the exact scan does.

A compact lorentz store keeps ``space`` as one-byte codes and the originals only in ``lorentz``; a compact
euclidean one keeps an int8 copy of ``vector`` in memory and the originals on disk. A settings change that
broke the rescoring (codes fed to the final order, a prefetch not encoded like the points, a range lost on
reopening) shows here as a recall under 1.0 at oversample 16 against the exact ranking, on a few thousand
clustered points, for both backends (the server through qdrant-client's local mode).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from qdrant_client import QdrantClient

from indexer import builder, sources
from indexer.edge_store import QUANTIZER_FILE, EdgeStore, edge_config
from indexer.errors import StoreFullError, StoreUnavailableError
from indexer.generations import LocalGenerations
from indexer.index import open_index, schema_of
from indexer.server_store import ServerStore
from indexer.sources import Item
from indexer.store import FULL_SCAN_KB, INDEXING_KB, SPACE, Quantizer, Schema, content_id
from training import lorentz
from training.errors import InputError

C, DIM, N, K = 0.1, 64, 3000, 10


def clusters(n: int, seed: int) -> torch.Tensor:
    """Clustered hyperboloid points (space components): 30 centres at tangent radius 1.5-3, as benchmarks/search.py."""
    g = torch.Generator().manual_seed(0)
    radii = 1.5 + 1.5 * torch.rand(30, 1, generator=g)
    centres = torch.nn.functional.normalize(torch.randn(30, DIM, generator=g), dim=1) * radii
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, 30, (n,), generator=g)
    v = centres[which] * (0.7 + 0.5 * torch.rand(n, 1, generator=g)) + torch.randn(n, DIM, generator=g) * 0.3 / DIM ** 0.5 * 2
    return lorentz.exp_map0(v, C)


def ids_of(n: int) -> list[str]:
    return [content_id(f"point {i}") for i in range(n)]


def fill(store, x: np.ndarray, chunk: int = 500) -> None:
    ids = ids_of(len(x))
    for i in range(0, len(x), chunk):
        store.upsert(ids[i:i + chunk], store.schema.point_vectors(x[i:i + chunk]), [{"kind": "image"}] * len(x[i:i + chunk]))


def truth(geometry: str, x: torch.Tensor, q: torch.Tensor) -> list[list[str]]:
    ids = ids_of(len(x))
    if geometry == "lorentz":
        order = lorentz.pairwise_dist(q, x, C).argsort(dim=1)
    else:
        order = (-(torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(x, dim=1).T)).argsort(dim=1)
    return [[ids[i] for i in row[:K].tolist()] for row in order]


def recall(store, x: torch.Tensor, q: torch.Tensor, oversample: int) -> float:
    want = truth(store.schema.geometry, x, q)
    got = [[h.id for h in store.query(store.schema.query(v, k=K, oversample=oversample))] for v in q.numpy()]
    return float(np.mean([len(set(g) & set(w)) / K for g, w in zip(got, want, strict=True)]))


def open_store(backend: str, tmp_path, schema: Schema, *, create: bool):
    if backend == "edge":
        return (EdgeStore.create(tmp_path / "shard", schema, indexing_threshold_kb=20) if create
                else EdgeStore.open(tmp_path / "shard", schema))
    return ServerStore.create(CLIENT, "c", schema) if create else ServerStore(CLIENT, "c", schema)


CLIENT = QdrantClient(":memory:")


@pytest.fixture(autouse=True)
def _fresh_client():
    for c in CLIENT.get_collections().collections:
        CLIENT.delete_collection(c.name)


@pytest.mark.parametrize("backend", ["edge", "server"])
@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_a_compact_store_ranks_as_the_exact_scan_at_oversample_16(tmp_path, backend, geometry):
    x, q = clusters(N, seed=1), clusters(40, seed=2)
    schema = Schema(geometry, DIM, C if geometry == "lorentz" else 0.0, "compact")
    store = open_store(backend, tmp_path, schema, create=True)
    fill(store, x.numpy())
    store.optimize()
    store.close()
    store = open_store(backend, tmp_path, schema, create=False)  # the range comes back from where it was kept
    if backend == "edge":
        assert store.indexed_vectors() >= N  # the graph is searched, not a scan
    assert recall(store, x, q, oversample=16) == 1.0
    # what a caller reads back is the encoder's embedding, not the codes
    back = store.retrieve(ids_of(3), with_vectors=True)
    name = SPACE if geometry == "lorentz" else "vector"
    got = {p.id: np.array(p.vectors[name]) for p in back}
    for i, pid in enumerate(ids_of(3)):
        want = x[i].numpy() if geometry == "lorentz" else (x[i] / x[i].norm()).numpy()
        assert np.allclose(got[pid], want, atol=1e-5)
    store.close()


def test_a_compact_lorentz_shard_keeps_codes_in_space_and_the_originals_in_lorentz(tmp_path):
    x = clusters(600, seed=3).numpy()
    schema = Schema("lorentz", DIM, C, "compact")
    with EdgeStore.create(tmp_path / "shard", schema) as store:
        fill(store, x)
        saved = Quantizer.from_dict(json.loads((tmp_path / "shard" / QUANTIZER_FILE).read_text()))
        assert saved == store.quantizer
        raw = store.shard.retrieve(point_ids=ids_of(1), with_payload=False, with_vector=True)[0].vector
        codes = np.array(raw[SPACE])
        assert codes.min() >= 0 and codes.max() <= 255 and np.allclose(codes, np.round(codes))
        assert np.allclose(codes, saved.encode(x[:1])[0])
        assert np.allclose(np.array(raw["lorentz"])[:DIM], x[0], atol=1e-6)
    # most values inside the range: codes use the byte's width, few are clipped
    enc = saved.encode(x)
    assert 0.5 < (enc.max() - enc.min()) / 255 and float(((enc == 0) | (enc == 255)).mean()) < 0.001


def test_a_compact_shard_without_its_range_is_refused_on_opening(tmp_path):
    schema = Schema("lorentz", DIM, C, "compact")
    with EdgeStore.create(tmp_path / "shard", schema) as store:
        fill(store, clusters(100, seed=4).numpy())
    (tmp_path / "shard" / QUANTIZER_FILE).unlink()
    with pytest.raises(StoreUnavailableError, match="no quantizer.json.*rebuild"):
        EdgeStore.open(tmp_path / "shard", schema)


def test_an_unknown_storage_mode_is_refused_with_the_modes_named():
    with pytest.raises(InputError, match="compact, fast"):
        Schema("lorentz", DIM, C, "tiny")


def test_builds_record_their_storage_and_keep_it_on_the_next_build(tmp_path, art, images):
    gens = LocalGenerations("col", tmp_path)
    items = [Item(kind="image", path=p) for p in sorted(images.rglob("*.png"))]
    assert len(items) > 2
    first = builder.build(gens, art, items, workers=0, progress=False, storage="fast")
    assert gens.read_meta(first.generation)["storage"] == "fast"
    assert schema_of(gens.read_meta(first.generation)).storage == "fast"
    second = builder.build(gens, art, items[:-1], workers=0, progress=False)  # not asked: the current one's
    assert gens.read_meta(second.generation)["storage"] == "fast"
    third = builder.build(gens, art, items, workers=0, progress=False, storage="compact")
    assert gens.read_meta(third.generation)["storage"] == "compact"
    assert schema_of({"geometry": "lorentz", "dim": 4, "curvature": 1.0}).storage == "fast"  # records before storage


def test_qdrant_thresholds_count_points_not_bytes_for_one_byte_codes():
    """Qdrant's full-scan and indexing thresholds are KB of vectors. Codes are a quarter of float32's bytes, so unscaled
    a filtered search on a compact store scanned where a fast one walked the graph: at 100,000 x 128 with the service's
    filter (images, unsafe excluded), 16-18 ms against 2.6 ms (benchmarks/RESULTS.md, "A million items")."""
    fast, compact = (Schema("lorentz", DIM, C, s) for s in ("fast", "compact"))
    for kb in (FULL_SCAN_KB, INDEXING_KB, 20):
        assert (compact.threshold_kb(kb), fast.threshold_kb(kb)) == (kb // 4, kb)
    cf, cc = edge_config(fast), edge_config(compact)
    assert cc.hnsw_config.full_scan_threshold * 4 == cf.hnsw_config.full_scan_threshold == FULL_SCAN_KB
    assert cc.optimizers.indexing_threshold * 4 == cf.optimizers.indexing_threshold == INDEXING_KB
    ServerStore.create(CLIENT, "t", compact)
    # local mode keeps the vectors' parameters as given (not the optimizer's): the graph vector's threshold is scaled
    assert CLIENT.get_collection("t").config.params.vectors[SPACE].hnsw_config.full_scan_threshold == FULL_SCAN_KB // 4


def test_a_build_that_runs_out_of_disk_stops_with_a_clear_error_and_the_served_generation_is_untouched(tmp_path, art):
    """The engine writes through memory maps: on a full disk that is a SIGBUS killing the process (seen on a 3 MB
    tmpfs), so the store checks the room before each write. 200 MB holds one small generation and not a second."""
    from tests.helpers.indexer import write_images
    from tests.helpers.service import small_tmpfs

    few, many = tmp_path / "few", tmp_path / "many"
    few.mkdir()
    many.mkdir()
    write_images(few, 12)
    write_images(many, 400)
    with small_tmpfs(tmp_path / "idx", "200M") as root:
        gens = LocalGenerations("col", root)
        first = builder.build(gens, art, sources.folder_items(few), workers=0, progress=False)
        with pytest.raises(StoreFullError, match=r"MB free on the disk of .* so it was not started.*larger disk"):
            builder.build(gens, art, sources.folder_items(many), workers=0, progress=False)
        assert gens.current() == first.generation
        with open_index("col", root=root) as index:
            assert index.store.count() == 12
