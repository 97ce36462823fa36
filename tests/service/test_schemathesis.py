"""Property-based fuzzing of every operation in /openapi.json (schemathesis): no input makes a 5xx.

Valid and invalid requests (both generation modes) are generated from the live server's own schema
and sent to the real server over HTTP. The first test sends admin calls with random tokens, so they
exercise the auth errors; the second sends them with the admin token, on a server of its own, with
path-like strings (``..``, absolute, over-long components, NUL, symlink loops and escapes) in every
path field of reindex, retrain, forget and item adds (the item writes are fuzzed there too), and accepts only the
status codes the schema documents.
(schemathesis' pytest plugin does not load under pytest 9, so the operations' hypothesis strategies
are driven directly.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import unregister_string_format
from schemathesis.specs.openapi.checks import status_code_conformance

from tests.helpers.service import ADMIN, LiveServer, assert_no_trace, copy_index, live, settings_for

EXAMPLES = 12  # per operation and generation mode
ADMIN_EXAMPLES = 8  # per admin operation and mode, with the admin token
PATH_EXAMPLES = 80  # reindex, retrain and forget, valid mode: the path fields' cases
PATH_FIELDS = ("images", "manifest", "visu", "texts", "media_root", "data", "path")


def run_fuzz(operation, mode, examples: int, call) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case) -> None:
        call(case)

    try:
        fuzz()
    except Unsatisfiable:
        # an operation without parameters or body has no invalid form
        assert mode is schemathesis.GenerationMode.NEGATIVE and not operation.label.startswith("POST"), operation.label


def test_no_input_makes_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    calls: dict[str, int] = {}
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            label = f"{operation.label} {mode.value}"

            def call(case, label=label) -> None:
                response = case.call(timeout=30)
                case.validate_response(response, checks=[not_a_server_error])
                assert_no_trace(response)
                calls[label] = calls.get(label, 0) + 1

            run_fuzz(operation, mode, EXAMPLES, call)
    assert calls["POST /v1/search negative"] > 0 and calls["POST /v1/search positive"] > 0
    assert calls["POST /v1/search/upload negative"] > 0


# ------------------------------------------------------------------ admin routes with the admin token
def data_root(base: Path) -> Path:
    """A data root holding what path tricks need: a folder, a file, a symlink loop, a link out and one in."""
    root = base / "data"
    (root / "set").mkdir(parents=True)
    (root / "set" / "a.txt").write_text("not an image\n")
    (root / "list.csv").write_text("image\n")
    (root / "loop").symlink_to(root / "loop")
    (root / "escape").symlink_to(base)
    (root / "inside").symlink_to(root / "set")
    return root


def path_like(root: Path) -> st.SearchStrategy[str]:
    long = "a" * 256  # one byte over the longest file name most file systems take
    fixed = [
        "set", ".", "./set", "set/", "set//a.txt", "list.csv", "inside", "inside/a.txt",
        "../", "..", "../../etc/passwd", "set/../../outside", "..\\..\\windows", "%2e%2e/x",
        "/", "/etc", "/proc/self/root", str(root), str(root / "set"), f"{root}/../x", str(root / "escape"),
        long, f"set/{long}", f"{long}/{long}", "/".join(["b" * 255] * 16), f"{root}/{long}", "c" * 4096, "c" * 4097,
        "set\x00", "\x00", "set/\x00/a",
        "loop", "loop/inner", "loop/loop/loop", "escape", "escape/data", str(root / "loop"),
        "~", "~root", "$HOME", " ", "\n", "é/ü", "con", "set/a.txt/",
    ]
    parts = st.sampled_from(["..", ".", "", "set", "loop", "escape", "inside", long, "\x00", "~", str(root)])
    return st.one_of(st.sampled_from(fixed), st.lists(parts, min_size=1, max_size=5).map("/".join),
                     st.text(min_size=1, max_size=40))


@pytest.fixture(scope="module")
def admin_server(world, tmp_path_factory) -> Iterator[tuple[LiveServer, Path]]:
    """A server of its own: jobs the fuzz starts must not touch the shared one."""
    tmp = tmp_path_factory.mktemp("admin-fuzz")
    root = data_root(tmp / "roots")
    (tmp / "media").mkdir()  # item uploads land under it, never in the shared world's data
    settings = settings_for(world, tmp, index_root=copy_index(world, tmp / "idx"), data_roots=[root],
                            media_root=tmp / "media")
    with live(settings) as s:
        yield s, root


def _paths_in(body: Any) -> list[str]:
    if not isinstance(body, dict):
        return []
    found = [body[f] for f in PATH_FIELDS if isinstance(body.get(f), str)]
    return found + _paths_in(body.get("source"))


def test_admin_routes_with_the_admin_token_give_documented_statuses_only(admin_server):
    server, root = admin_server
    schemathesis.openapi.format("path", path_like(root))
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        writes = ("/v1/items", "/v1/items/upload", "/v1/items/{item_id}")
        operations = [r.ok() for r in schema.get_all_operations()
                      if r.ok().path.startswith("/v1/admin") or (r.ok().path in writes and r.ok().method != "get")]
        assert {op.path for op in operations} >= {"/v1/admin/reindex", "/v1/admin/retrain", "/v1/admin/jobs",
                                                 "/v1/admin/jobs/{job_id}", "/v1/admin/jobs/{job_id}/cancel",
                                                 "/v1/admin/reload", "/v1/admin/audit", "/v1/admin/forget",
                                                 *writes}
        statuses: dict[str, set[int]] = {}
        sent: list[str] = []
        for operation in operations:
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
                jobs = operation.path in ("/v1/admin/reindex", "/v1/admin/retrain", "/v1/admin/forget", "/v1/items")
                examples = PATH_EXAMPLES if jobs and mode is schemathesis.GenerationMode.POSITIVE else ADMIN_EXAMPLES

                def call(case, label=f"{operation.label} {mode.value}") -> None:
                    response = case.call(headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
                    case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
                    assert_no_trace(response)
                    statuses.setdefault(label, set()).add(response.status_code)
                    sent.extend(_paths_in(case.body))

                run_fuzz(operation, mode, examples, call)
    finally:
        unregister_string_format("path")
        running = server.services.jobs.running()
        if running is not None:
            server.services.jobs.cancel(running.id)
    # the token was honoured, and the path tricks reached the path checks
    assert all(400 in statuses[f"POST /v1/admin/{route} positive"] for route in ("reindex", "retrain", "forget"))
    assert 400 in statuses["POST /v1/items positive"]
    # (invalid cases may also break the Authorization header on purpose)
    assert 401 not in set().union(*(codes for label, codes in statuses.items() if label.endswith("positive")))
    assert any(".." in p for p in sent) and any(p.startswith("/") for p in sent) and any("\x00" in p for p in sent)
    assert any(any(len(part.encode()) > 255 for part in p.split("/")) for p in sent)
    assert any(p.split("/")[0] in ("loop", "escape") for p in sent)
    assert len(sent) >= PATH_EXAMPLES
