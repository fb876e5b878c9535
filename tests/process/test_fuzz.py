"""Schemathesis against the service's own OpenAPI document, on a real server process: generated requests
(valid and invalid) to every operation must never get a 5xx, and every response must be one the document
declares, with the declared content type and body schema.

Bounded and deterministic: FUZZ_MAX_EXAMPLES per operation (default 15), Hypothesis derandomized.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from tests.support import LIMITS, MODEL, VERSION, Server, make_settings, running_server

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "15"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The repository API off (403, documented): a generated unload of the served model would leave every
    # later operation nothing to answer with.
    with running_server(tmp_path_factory.mktemp("fuzz"), **LIMITS, repository_api="false") as server:
        yield server


# The document is built from the app in-process at collection time (no model is loaded for that), so that
# pytest sees one test per operation; the first test checks that the server serves this same document.
# (schemathesis.pytest.from_fixture, the lazy alternative, fails on pytest 9: it sets Function._nodeid.)
DOCUMENT = create_app(make_settings()).openapi()
schema = schemathesis.openapi.from_dict(DOCUMENT)
# Array uploads are bytes on the wire like any binary body: send them so rather than skip them.
schemathesis.serializer.alias(["application/x-npy", "application/x-npz"], "application/octet-stream")


@schema.hook
def before_generate_path_parameters(context: schemathesis.HookContext, strategy: SearchStrategy) -> SearchStrategy:
    """As often as not, the served model's real name and version: random names stop every request at
    404, and the body and query checks behind them would go untested."""

    def served(parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        real = {"name": MODEL, "version": VERSION}
        return {key: real.get(key, value) for key, value in parameters.items()} if parameters else parameters

    return st.one_of(strategy, strategy.map(served))


def test_server_serves_the_document_under_test(fuzz_server: Server) -> None:
    served = httpx.get(fuzz_server.url + "/openapi.json", timeout=10).json()
    assert served == json.loads(json.dumps(DOCUMENT))


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,  # the same examples every run
    deadline=None,  # a busy machine is no failure; the per-request timeout below bounds each call
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found, in bounded time
)
def test_openapi_conformance(case: schemathesis.Case, fuzz_server: Server) -> None:
    case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=30)


# The statuses the middleware can answer anywhere (service.middleware.MIDDLEWARE_RESPONSES) are declared on
# every operation, so status_code_conformance holds for 401 (API key on), 431, 503 (shed) and 504 (timeout).
UNDECLARED = sorted(
    f"{method.upper()} {path}"
    for path, operations in DOCUMENT["paths"].items()
    for method, operation in operations.items()
    if not {"401", "431", "503", "504"} <= set(operation.get("responses", {}))
)


def test_middleware_statuses_are_declared() -> None:
    assert not UNDECLARED


def test_fuzzing_left_no_server_error_in_the_log(fuzz_server: Server) -> None:
    records = fuzz_server.access_log()
    assert len(records) > 50, "the fuzzing test did not run"
    errors = [r for r in records if (r["status"] or 0) >= 500]
    assert not errors, errors[:5]
    assert fuzz_server.process.poll() is None
