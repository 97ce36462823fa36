"""Property-based fuzzing of every operation in /openapi.json (schemathesis): no input makes a 5xx.

Valid and invalid requests (both generation modes) are generated from the live server's own schema
and sent to the real server over HTTP; admin calls carry random tokens, so they exercise the auth
errors, never a job. (schemathesis' pytest plugin does not load under pytest 9, so the operations'
hypothesis strategies are driven directly.)
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from tests.service.test_api import assert_no_trace

EXAMPLES = 12  # per operation and generation mode


def test_no_input_makes_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    calls: dict[str, int] = {}
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            label = f"{operation.label} {mode.value}"

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:
                response = case.call(timeout=30)
                case.validate_response(response, checks=[not_a_server_error])
                assert_no_trace(response)
                calls[label] = calls.get(label, 0) + 1

            try:
                fuzz()
            except Unsatisfiable:
                # an operation without parameters or body has no invalid form
                assert mode is schemathesis.GenerationMode.NEGATIVE and not operation.label.startswith("POST"), label
    assert calls["POST /v1/search negative"] > 0 and calls["POST /v1/search positive"] > 0
    assert calls["POST /v1/search/upload negative"] > 0
