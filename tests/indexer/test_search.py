"""Search with safety modes, the model fingerprint check, and the Index contract the service uses."""

from __future__ import annotations

import pytest
import torch

from indexer.builder import index_record, schema_for
from indexer.errors import IndexNotFoundError, ModelMismatchError
from indexer.generations import LocalGenerations
from indexer.index import open_index
from indexer.search import search
from tests.helpers.indexer import fill, hyperboloid, make_artifact, row
from training import lorentz
from training.errors import InputError

K = 6


def synthetic_index(root, art, x: torch.Tensor, name: str = "gal", kind: str = "image") -> str:
    """An index of points ``x`` with the pipeline's payloads, made the way a build makes one."""
    gens = LocalGenerations(name, root)
    gen = gens.new_name()
    meta = index_record(art, name=name, generation=gen, sources="test")
    store = gens.create_store(gen, schema_for(art), meta)
    fill(store, art, x, kind=kind)
    store.optimize()
    meta.update(state="complete", points=store.count())
    store.close()
    gens.write_meta(gen, meta)
    gens.switch(gen)
    return gen


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, art):
    """80 images along 8 directions at d0 from 0.4 to 2.4: the outer ones are unsafe (rule: d0 > 1.5)."""
    c, dim = art.curvature, art.encoder.arch.embed_dim
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(8, dim, generator=g), dim=-1)
    radii = torch.linspace(0.4, 2.4, 10)
    x = lorentz.move_to_dist0(dirs.repeat_interleave(10, 0), radii.repeat(8), c)
    root = tmp_path_factory.mktemp("gallery")
    synthetic_index(root, art, x)
    return root, x, dirs


def unsafe_rows(x, art) -> set[int]:
    return set(torch.nonzero(lorentz.dist0(x, art.curvature) > art.unsafe_threshold("image")).flatten().tolist())


def test_safety_modes(gallery, art):
    root, x, dirs = gallery
    c = art.curvature
    bad = unsafe_rows(x, art)
    query = lorentz.move_to_dist0(dirs[2], 2.3, c)  # an unsafe text query, out where unsafe images live
    with open_index("gal", root=root) as idx:
        off = search(idx, art, query, query_modality="text", k=K, safety="off")
        assert off.query["unsafe"] is True and not off.query["redirected"]
        assert {row(h.id) for h in off.hits} & bad and all(h.unsafe == (row(h.id) in bad) for h in off.hits)

        filt = search(idx, art, query, query_modality="text", k=K, safety="filter")
        assert len(filt.hits) == K and not any(h.unsafe for h in filt.hits)
        assert not {row(h.id) for h in filt.hits} & bad

        trav = search(idx, art, query, query_modality="text", k=K, safety="traverse")
        assert trav.query["redirected"] and trav.query["distance_to_origin"] == pytest.approx(2.3, abs=1e-4)
        # moved to the safe-image median (bounds V.p50 = 1.0) along the same geodesic
        assert trav.query["distance_to_origin_after"] == pytest.approx(1.0, abs=1e-4)
        moved = lorentz.move_to_dist0(dirs[2], 1.0, c)
        want = lorentz.pairwise_dist(moved[None], x, c)[0].argsort()[:K].tolist()
        assert [row(h.id) for h in trav.hits] == want
        assert [row(h.id) for h in trav.hits] != [row(h.id) for h in off.hits]

        for q in (query, lorentz.move_to_dist0(dirs[5], 1.45, c), lorentz.move_to_dist0(dirs[7], 0.5, c)):
            strict = search(idx, art, q, query_modality="text", k=K)  # the default mode
            assert len(strict.hits) == K and not any(h.unsafe for h in strict.hits)
            assert not {row(h.id) for h in strict.hits} & bad

        safe_q = lorentz.move_to_dist0(dirs[1], 0.9, c)
        rep = search(idx, art, safe_q, query_modality="image", k=K, safety="strict").query
        assert rep["unsafe"] is False and not rep["redirected"] and rep["threshold"] == 1.5


def test_distances_offset_tags_exact_and_target(gallery, art):
    root, x, dirs = gallery
    q = lorentz.move_to_dist0(dirs[4], 1.2, art.curvature)
    d = lorentz.pairwise_dist(q[None], x, art.curvature)[0]
    with open_index("gal", root=root) as idx:
        exact = search(idx, art, q, query_modality="image", k=10, safety="off", exact=True)
        assert [h.distance for h in exact.hits] == pytest.approx(sorted(d.tolist())[:10], abs=2e-3)
        # a prefetch that covers the gallery (8 x 10 = 80 candidates) gives the exact answer
        res = search(idx, art, q, query_modality="image", k=10, safety="off", oversample=8)
        assert [h.id for h in res.hits] == [h.id for h in exact.hits]
        page2 = search(idx, art, q, query_modality="image", k=5, offset=5, safety="off", oversample=16)
        assert [h.id for h in page2.hits] == [h.id for h in res.hits[5:]]
        default = search(idx, art, q, query_modality="image", k=10, safety="off")
        assert [h.distance for h in default.hits] == sorted(h.distance for h in default.hits)
        assert search(idx, art, q, query_modality="image", target="text", safety="off").hits == []
        assert search(idx, art, q, query_modality="image", safety="off", tags=["nope"]).hits == []
        h = res.hits[0]
        assert h.uri == f"p{row(h.id)}.png" and h.kind == "image" and h.payload["model"] == art.fingerprint


def test_index_contract_and_fingerprint_check(gallery, art, other_art):
    root, x, dirs = gallery
    with open_index("gal", root=root) as idx:
        info = idx.info
        assert info["points"] == len(x) and info["geometry"] == "lorentz"
        assert info["fingerprint"] == art.fingerprint and info["thresholds"] == {"text": 1.5, "image": 1.5}
        assert info["curvature"] == pytest.approx(art.curvature) and info["bounds"]["V"]["p50"] == 1.0
        got = idx.retrieve("00000000-0000-0000-0000-000000000003", with_vector=True)
        assert got["uri"] == "p3.png" and torch.allclose(torch.tensor(got["vector"]), x[3], atol=1e-5)
        assert idx.retrieve("00000000-0000-0000-0000-000000000999") is None
        with pytest.raises(InputError, match="not a point id"):
            idx.retrieve("../etc")
        with pytest.raises(ModelMismatchError, match="reindex with this model"):
            search(idx, other_art, x[0], query_modality="image")
        with pytest.raises(InputError, match="safety"):
            search(idx, art, x[0], query_modality="image", safety="loose")
    with pytest.raises(IndexNotFoundError, match="does not exist"):
        open_index("missing", root=root)


def test_uncalibrated_and_euclidean_models(tmp_path, art):
    raw = make_artifact(tmp_path / "raw", calibrated=False)
    x = hyperboloid(30, 128, raw.curvature, seed=1)
    synthetic_index(tmp_path / "r", raw, x)
    with open_index("gal", root=tmp_path / "r") as idx:
        res = search(idx, raw, x[0], query_modality="image", k=3)  # strict: nothing to decide with, filter holds
        assert res.query["unsafe"] is None and not res.query["redirected"] and len(res.hits) == 3
        assert all(h.unsafe is None for h in res.hits)
        with pytest.raises(InputError, match="calibrate"):
            search(idx, raw, x[0], query_modality="image", safety="traverse")
    euc = make_artifact(tmp_path / "euc", geometry="euclidean")
    e = torch.nn.functional.normalize(torch.randn(20, 128, generator=torch.Generator().manual_seed(2)), dim=-1)
    synthetic_index(tmp_path / "e", euc, e)
    with open_index("gal", root=tmp_path / "e") as idx:
        res = search(idx, euc, e[4], query_modality="image", k=3)
        assert row(res.hits[0].id) == 4 and res.hits[0].distance == pytest.approx(0.0, abs=1e-5)
        assert res.hits[0].payload["unsafe_score"] is None and res.query["distance_to_origin"] is None
        with pytest.raises(InputError, match="lorentz"):
            search(idx, euc, e[0], query_modality="image", safety="traverse")


def test_a_distance_carried_with_the_embedding_decides_and_is_reported(gallery, art):
    root, x, dirs = gallery
    query = lorentz.move_to_dist0(dirs[2], 2.3, art.curvature)
    with open_index("gal", root=root) as idx:
        own = search(idx, art, query, query_modality="text", k=K, safety="traverse")
        same = search(idx, art, query, query_modality="text", k=K, safety="traverse",
                      distance_to_origin=own.query.distance_to_origin)
        assert same.query == own.query and [h.id for h in same.hits] == [h.id for h in own.hits]
        # the search trusts the carried d0 rather than computing it again: a safe one is not moved
        told = search(idx, art, query, query_modality="text", k=K, safety="traverse", distance_to_origin=0.5)
        assert told.query.unsafe is False and not told.query.redirected
        assert told.query.distance_to_origin == pytest.approx(0.5)
        assert own.to_dict()["query"] == {"unsafe": True, "distance_to_origin": pytest.approx(2.3, abs=1e-4),
                                          "threshold": own.query.threshold, "redirected": True,
                                          "distance_to_origin_after": pytest.approx(1.0, abs=1e-4)}
