"""The HTTP API end to end: the real app under uvicorn, a real tiny model, a real Qdrant Edge index."""

from __future__ import annotations

import base64
import uuid

import pytest

from tests.helpers.service import (
    MODERATOR,
    assert_no_trace,
    copy_index,
    live,
    png_with_size,
    settings_for,
    unsafe_caption,
)


def jpeg_bytes(world, name="coco/val2017") -> bytes:
    path = next((world.data / name).glob("*.jpg"))
    return path.read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------ health, metrics, docs
def test_health_and_readiness(server):
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["ready"] is True and body["reason"] is None
        assert body["index"]["model"] == server.services.state.current.artifact.fingerprint
        assert body["index"]["generation"].startswith("gallery@")
        # what the served index costs: the default storage, its points, its shard's bytes, this process's memory
        store = body["store"]
        assert store["storage"] == "compact" and store["points"] == server.services.state.current.index.store.count() > 0
        shard = server.settings.index_root / "gallery" / body["index"]["generation"]
        assert 0 < store["disk_bytes"] <= sum(f.stat().st_size for f in shard.rglob("*") if f.is_file())
        assert 0 < store["memory_anonymous_bytes"] < store["memory_resident_bytes"]


def test_openapi_docs_and_page(server):
    with server.client() as c:
        spec = c.get("/openapi.json").json()
        for path in ("/v1/search", "/v1/search/upload", "/v1/embed", "/v1/items/{item_id}", "/v1/media/{item_id}",
                     "/healthz", "/readyz", "/metrics", "/v1/admin/reindex", "/v1/admin/retrain", "/v1/admin/jobs",
                     "/v1/admin/jobs/{job_id}", "/v1/admin/jobs/{job_id}/cancel", "/v1/admin/reload"):
            assert path in spec["paths"], path
        assert c.get("/docs").status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and 'id="query"' in page.text
        assert c.get("/static/app.js").status_code == 200


# ------------------------------------------------------------------ search
def test_text_search_shape_and_order(server):
    with server.client() as c:
        r = c.post("/v1/search", json={"text": "a red umbrella on a beach", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results", "query", "index", "timings_ms"}
    hits = body["results"]
    assert 1 <= len(hits) <= 5
    assert all(h["kind"] == "image" for h in hits)
    distances = [h["distance"] for h in hits]
    assert distances == sorted(distances)
    assert set(hits[0]) == {"id", "kind", "score", "distance", "uri", "caption", "tags", "unsafe"}
    assert set(body["query"]) == {"unsafe", "distance_to_origin", "threshold", "redirected", "distance_to_origin_after"}
    assert body["index"]["name"] == "gallery"
    assert body["timings_ms"]["total"] >= body["timings_ms"]["encode"]


def test_targets(server):
    with server.client(MODERATOR) as c:
        text = c.post("/v1/search", json={"text": "a dog in a park", "target": "text", "safety": "off", "k": 20}).json()
        both = c.post("/v1/search", json={"text": "a dog in a park", "target": "any", "safety": "off", "k": 24}).json()
    assert text["results"] and all(h["kind"] == "text" and h["caption"] for h in text["results"])
    assert {h["kind"] for h in both["results"]} == {"image", "text"}


def test_ordinary_callers_never_receive_unsafe_items(server, world):
    from training.data import visu

    queries = [q.nsfw for q in visu.load_split(world.data, "test").records]
    seen_unsafe_as_moderator = False
    with server.client() as c, server.client(MODERATOR) as m:
        for text in queries:
            for target in ("image", "text"):
                for safety in ("strict", "traverse", "filter"):
                    r = c.post("/v1/search", json={"text": text, "target": target, "safety": safety, "k": 24})
                    assert r.status_code == 200, r.text
                    assert all(h["unsafe"] is not True for h in r.json()["results"]), (text, target, safety)
                off = m.post("/v1/search", json={"text": text, "target": target, "safety": "off", "k": 24}).json()
                seen_unsafe_as_moderator |= any(h["unsafe"] is True for h in off["results"])
    # the check above means something only if the gallery does hold flagged items
    assert seen_unsafe_as_moderator


def test_ordinary_traverse_is_traverse_plus_filter(server, world):
    text = unsafe_caption(world, server)
    with server.client() as c, server.client(MODERATOR) as m:
        ordinary = c.post("/v1/search", json={"text": text, "safety": "traverse", "k": 12}).json()
        strict = m.post("/v1/search", json={"text": text, "safety": "strict", "k": 12}).json()
        moderated = m.post("/v1/search", json={"text": text, "safety": "traverse", "k": 12}).json()
    assert [h["id"] for h in ordinary["results"]] == [h["id"] for h in strict["results"]]
    assert ordinary["query"]["redirected"] is True
    assert moderated["query"]["redirected"] is True
    # the moderator's traverse keeps unsafe items: strict's list is the same ranking with them dropped
    safe_part = [h["id"] for h in moderated["results"] if h["unsafe"] is not True]
    assert safe_part == [h["id"] for h in strict["results"]][: len(safe_part)]


def test_unsafe_query_is_redirected_and_reported(server, world):
    text = unsafe_caption(world, server)
    with server.client() as c:
        strict = c.post("/v1/search", json={"text": text}).json()["query"]
        filtered = c.post("/v1/search", json={"text": text, "safety": "filter"}).json()["query"]
    thr = world.thresholds["text"]
    assert strict["unsafe"] is True and strict["distance_to_origin"] > thr == pytest.approx(strict["threshold"])
    assert strict["redirected"] is True
    assert strict["distance_to_origin_after"] < strict["distance_to_origin"]
    assert filtered["unsafe"] is True and filtered["redirected"] is False
    assert filtered["distance_to_origin_after"] == pytest.approx(filtered["distance_to_origin"])


def test_safety_off_needs_the_moderator_token(server):
    body = {"text": "a cat", "safety": "off"}
    with server.client() as c:
        missing = c.post("/v1/search", json=body)
    with server.client("not-the-token") as c:
        wrong = c.post("/v1/search", json=body)
    with server.client(MODERATOR) as c:
        ok = c.post("/v1/search", json=body)
    assert missing.status_code == 401 and "moderator" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert wrong.status_code == 401
    assert ok.status_code == 200


def test_safety_off_is_forbidden_without_a_configured_moderator_token(world, tmp_path):
    # a second server needs its own copy of the index: Qdrant Edge allows one open handle per directory
    settings = settings_for(world, tmp_path, moderator_token=None, index_root=copy_index(world, tmp_path / "idx"))
    with live(settings) as s, s.client("anything") as c:
        r = c.post("/v1/search", json={"text": "a cat", "safety": "off"})
        assert r.status_code == 403
        assert "SAFE_RETRIEVAL_MODERATOR_TOKEN" in r.json()["detail"]
        assert c.post("/v1/search", json={"text": "a cat"}).status_code == 200


def test_a_generation_of_another_storage_mode_is_not_served(world, tmp_path):
    # the gallery was built compact (the default); a service sized for fast ones refuses it and says what to do
    settings = settings_for(world, tmp_path, index_storage="fast", index_root=copy_index(world, tmp_path / "idx"))
    with live(settings) as s, s.client() as c:
        r = c.get("/readyz")
        assert r.status_code == 503, r.text
        reason = r.json()["reason"]
        assert "--storage compact" in reason and "expects fast" in reason and "SAFE_RETRIEVAL_INDEX_STORAGE" in reason
        assert c.post("/v1/search", json={"text": "a cat"}).status_code == 503


def test_tag_filter_and_paging(server):
    with server.client() as c:
        tagged = c.post("/v1/search", json={"text": "a scene", "filter": {"tags": ["weapons"]}, "k": 10}).json()
        page = c.post("/v1/search", json={"text": "a scene", "k": 6, "target": "any"}).json()["results"]
        tail = c.post("/v1/search", json={"text": "a scene", "k": 4, "offset": 2, "target": "any"}).json()["results"]
    assert tagged["results"] and all("weapons" in h["tags"] for h in tagged["results"])
    assert [h["id"] for h in tail] == [h["id"] for h in page[2:6]]


def test_image_search_base64_upload_and_item(server, world):
    safe = _items(server, False)  # a gallery image the model does not flag
    data = (world.data / safe["uri"]).read_bytes()
    opts = {"k": 5, "safety": "filter"}  # no traversal: the query stays where the image is
    with server.client() as c:
        by_b64 = c.post("/v1/search", json={"image": b64(data), **opts}).json()
        by_uri = c.post("/v1/search", json={"image": "data:image/jpeg;base64," + b64(data), **opts}).json()
        upload = c.post("/v1/search/upload", files={"image": ("q.jpg", data, "image/jpeg")},
                        data={"k": "5", "safety": "filter", "target": "image"}).json()
        like = c.post("/v1/search", json={"item_id": safe["id"], **opts}).json()
    ids = [h["id"] for h in by_b64["results"]]
    assert ids == [h["id"] for h in upload["results"]] == [h["id"] for h in by_uri["results"]]
    # the query image is in the gallery: it finds itself first, at distance ~0
    assert ids[0] == safe["id"]
    assert by_b64["results"][0]["distance"] == pytest.approx(0.0, abs=2e-3)
    assert [h["id"] for h in like["results"]] == ids


def test_embed(server):
    with server.client() as c:
        r = c.post("/v1/embed", json={"text": "a cat on a sofa"}).json()
        again = c.post("/v1/embed", json={"text": "a cat on a sofa"}).json()
    art = server.services.state.current.artifact
    expected = art.encoder.encode_text(["a cat on a sofa"])[0]
    assert r["geometry"] == "lorentz" and r["curvature"] == pytest.approx(art.curvature)
    assert r["vector"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert r["distance_to_origin"] == pytest.approx(float(art.encoder.dist0(expected[None])[0]), abs=1e-5)
    assert r["unsafe"] == (r["distance_to_origin"] > art.unsafe_threshold("text"))
    assert again == r  # the second one is a cache hit with the same answer


# ------------------------------------------------------------------ items and media
def _items(server, unsafe: bool, kind: str = "image") -> dict:
    with server.client(MODERATOR) as m:
        hits = m.post("/v1/search", json={"text": "a scene", "safety": "off", "k": 24, "target": kind}).json()["results"]
    return next(h for h in hits if h["unsafe"] is unsafe)


def test_items_and_vectors(server):
    safe = _items(server, False)
    with server.client() as c:
        r = c.get(f"/v1/items/{safe['id']}")
        v = c.get(f"/v1/items/{safe['id']}", params={"with_vector": "true"})
    assert r.status_code == 200
    assert r.json()["id"] == safe["id"] and r.json()["uri"] == safe["uri"] and r.json()["vector"] is None
    assert r.json()["payload"]["model"] == server.services.state.current.artifact.fingerprint
    assert len(v.json()["vector"]) == 128


def test_unsafe_items_and_media_need_the_moderator(server):
    flagged = _items(server, True)
    with server.client(MODERATOR) as m:
        assert m.get(f"/v1/items/{flagged['id']}").json()["unsafe"] is True
        assert m.get(f"/v1/media/{flagged['id']}").status_code == 200
        assert m.post("/v1/search", json={"item_id": flagged["id"], "safety": "off"}).status_code == 200


@pytest.mark.parametrize("token", [None, "a-wrong-token"])
def test_an_unsafe_item_looks_exactly_like_an_absent_one_to_ordinary_callers(server, token):
    """No existence oracle: an id computed from a guessed caption must not confirm that it is indexed."""
    flagged = _items(server, True)
    absent = str(uuid.UUID(int=uuid.UUID(flagged["id"]).int ^ 1))
    with server.client(token) as c:
        for ask in (lambda i: c.get(f"/v1/items/{i}"), lambda i: c.get(f"/v1/items/{i}?with_vector=true"),
                    lambda i: c.get(f"/v1/media/{i}"), lambda i: c.post("/v1/search", json={"item_id": i}),
                    lambda i: c.post("/v1/search", json={"item_id": i, "safety": "traverse"})):
            hidden, missing = ask(flagged["id"]), ask(absent)
            assert hidden.status_code == missing.status_code == 404, hidden.text
            assert hidden.json() == {k: v.replace(absent, flagged["id"]) for k, v in missing.json().items()}
            assert hidden.headers.keys() == missing.headers.keys()


def test_media_serves_the_file_from_the_media_root(server, world):
    safe = _items(server, False)
    text = _items(server, False, kind="text")
    with server.client() as c:
        r = c.get(f"/v1/media/{safe['id']}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert r.content == (world.data / safe["uri"]).read_bytes()
        assert c.get(f"/v1/media/{text['id']}").status_code == 404
        assert c.get("/v1/media/00000000-0000-0000-0000-000000000001").status_code == 404
        assert c.get("/v1/media/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_media_outside_the_media_root_is_refused(world):
    from service.errors import NotFoundError
    from service.routes.items import media_path

    with pytest.raises(NotFoundError):
        media_path(world.data / "coco", "../ViSU-Text_test.json")
    assert media_path(world.data, "ViSU-Text_test.json").is_file()


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "body",
    [
        {"text": "x" * 1001},
        {"text": "a", "k": 0},
        {"text": "a", "k": 101},
        {"text": "a", "offset": -1},
        {"text": "a", "colour": "red"},
        {"text": "a", "filter": {"tags": ["a"], "extra": 1}},
        {},
        {"k": 3},
        {"text": "a", "item_id": "00000000-0000-0000-0000-000000000000"},
        {"text": "a", "image": "AAAA"},
        {"text": "   "},
        {"text": "a", "safety": "none"},
        {"text": "a", "target": "video"},
    ],
)
def test_invalid_requests_are_422(server, body):
    with server.client() as c:
        r = c.post("/v1/search", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "ValidationError"
    assert_no_trace(r)


def test_invalid_json_is_422(server):
    with server.client() as c:
        r = c.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert_no_trace(r)


def test_integer_fields_are_strict(server, world):
    with server.client() as c:
        for body in ({"text": "a", "k": 67.0}, {"text": "a", "k": "5"}, {"text": "a", "offset": 1.0}, {"text": "a", "k": True}):
            r = c.post("/v1/search", json=body)
            assert r.status_code == 422, (body, r.text)
        assert c.post("/v1/search", json={"text": "a", "k": 67}).status_code == 200
        # the upload form's fields are text by nature: "5" stays a valid k there, "67.0" does not
        image = {"image": ("q.jpg", jpeg_bytes(world), "image/jpeg")}
        upload = c.post("/v1/search/upload", files=image, data={"k": "5"})
        assert upload.status_code == 200 and len(upload.json()["results"]) <= 5, upload.text
        for form in ({"k": "67.0"}, {"k": "5.5"}, {"offset": "1e2"}, {"k": " 5"}, {"k": "0x10"}, {"k": "true"}):
            r = c.post("/v1/search/upload", files=image, data=form)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] in form, (form, r.text)
        spec = c.get("/openapi.json").json()
    # JSON Schema counts 58.0 as an integer: every integer field of a request body says the API does not
    requests = [body for body in spec["components"]["schemas"].values() if body.get("additionalProperties") is False]
    said = [p for body in requests for p in (body.get("properties") or {}).values()
            if "integer" in str(p.get("type")) + str(p.get("anyOf"))]
    assert len(said) >= 10 and all("not 58.0" in p["description"] for p in said)
    form = spec["components"]["schemas"]["Body_search_upload_v1_search_upload_post"]["properties"]
    assert "not 58.0" in form["k"]["description"] and "not 58.0" in form["offset"]["description"]


def test_openapi_states_exactly_one_query_and_the_optional_token(server):
    import jsonschema_rs  # schemathesis' own validator

    with server.client() as c:
        spec = c.get("/openapi.json").json()

    def validator(name: str):
        return jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": spec["components"]})

    search = validator("SearchRequest")
    for body in ({"text": "a"}, {"image": "AAAA"}, {"item_id": "x"}, {"text": "a", "image": None, "k": 3}):
        assert search.is_valid(body), body
    for body in ({}, {"k": 3}, {"text": "a", "image": "AAAA"}, {"text": "a", "item_id": "x"}, {"text": None}):
        assert not search.is_valid(body), body
    embed = validator("EmbedRequest")
    assert embed.is_valid({"text": "a"}) and not embed.is_valid({"text": "a", "image": "AAAA"}) and not embed.is_valid({})
    source = validator("IndexSource")
    assert source.is_valid({"images": "x"}) and source.is_valid({"visu": "d", "split": "test"})
    for body in ({"images": "x", "visu": "d", "split": "test"}, {"visu": "d"}, {"images": "x", "split": "test"}, {}):
        assert not source.is_valid(body), body
    assert spec["components"]["schemas"]["SearchRequest"]["properties"]["k"]["type"] == "integer"
    # a token is optional where ordinary callers are served: the empty requirement means "anonymous is fine"
    for method, path in (("post", "/v1/search"), ("post", "/v1/search/upload"), ("post", "/v1/embed"),
                         ("get", "/v1/items/{item_id}"), ("get", "/v1/media/{item_id}")):
        security = spec["paths"][path][method]["security"]
        assert {} in security and {"HTTPBearer": []} in security, (path, security)
    for method, path in (("post", "/v1/admin/reindex"), ("get", "/v1/admin/audit")):
        assert spec["paths"][path][method]["security"] == [{"HTTPBearer": []}], path


@pytest.mark.parametrize(
    "image, words",
    [
        (b"this is not an image", "not a readable image"),
        (None, "truncated"),  # filled in below: a JPEG cut in half
        (png_with_size(7000, 7000), "over the limit"),  # 49 Mpx: over our 40 Mpx limit
        (png_with_size(20000, 20000), "not a readable image"),  # over PIL's own bomb limit
    ],
)
def test_bad_images_are_400(server, world, image, words):
    if image is None:
        full = jpeg_bytes(world)
        image = full[: len(full) // 2]
    with server.client() as c:
        for r in (
            c.post("/v1/search", json={"image": b64(image)}),
            c.post("/v1/search/upload", files={"image": ("q.png", image, "image/png")}),
            c.post("/v1/embed", json={"image": b64(image)}),
        ):
            assert r.status_code == 400, r.text
            assert words in r.json()["detail"]
            assert_no_trace(r)


def test_invalid_base64_is_400(server):
    with server.client() as c:
        r = c.post("/v1/search", json={"image": "not*base64!"})
    assert r.status_code == 400 and "base64" in r.json()["detail"]


def test_unknown_item_is_404(server):
    with server.client() as c:
        for r in (
            c.post("/v1/search", json={"item_id": "00000000-0000-0000-0000-000000000001"}),
            c.post("/v1/search", json={"item_id": "not-a-uuid"}),
            c.get("/v1/items/00000000-0000-0000-0000-000000000001"),
            c.get("/v1/items/whatever"),
        ):
            assert r.status_code == 404, r.text
            assert_no_trace(r)


def test_body_over_the_limit_is_413(server):
    limit = server.settings.max_body_bytes
    big = b"x" * (limit + 1)

    def chunks():  # no Content-Length: the limit must hold on the streamed bytes too
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    with server.client() as c:
        declared = c.post("/v1/search", content=big, headers={"content-type": "application/json"})
        streamed = c.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
        upload = c.post("/v1/search/upload", files={"image": ("big.jpg", big, "image/jpeg")})
    for r in (declared, streamed, upload):
        assert r.status_code == 413, r.text
        assert "SAFE_RETRIEVAL_MAX_BODY_BYTES" in r.json()["detail"]
    assert "content-length" not in streamed.request.headers  # really streamed (chunked)


def test_metrics_count_queries_batches_and_stages(server, world):
    text = unsafe_caption(world, server)
    with server.client() as c:
        c.post("/v1/search", json={"text": text})
        metrics = c.get("/metrics").text
    assert 'safe_retrieval_queries_total{modality="text",safety="strict"}' in metrics
    assert "safe_retrieval_unsafe_queries_total" in metrics and "safe_retrieval_redirected_queries_total" in metrics
    assert 'safe_retrieval_batch_size_count{modality="text"}' in metrics
    for stage in ("encode", "search", "total"):
        assert f'safe_retrieval_stage_seconds_count{{stage="{stage}"}}' in metrics
    assert 'safe_retrieval_jobs{state="running"} 0.0' in metrics
    assert "safe_retrieval_ready 1.0" in metrics
    disk = next(line for line in metrics.splitlines() if line.startswith('safe_retrieval_store_disk_bytes{storage="compact"}'))
    assert float(disk.split()[-1]) > 0
    for kind in ("anonymous", "resident"):
        assert float(next(line for line in metrics.splitlines()
                          if line.startswith(f'safe_retrieval_process_memory_bytes{{kind="{kind}"}}')).split()[-1]) > 0
    assert 'safe_retrieval_http_requests_total{route="/v1/search",status="200"}' in metrics
    redirected = next(line for line in metrics.splitlines() if line.startswith("safe_retrieval_redirected_queries_total "))
    assert float(redirected.split()[-1]) >= 1
