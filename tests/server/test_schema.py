"""Property tests over the job server's OpenAPI schema (schemathesis) against a real server on
loopback: no request ever gets a 5xx, every response's status code, content type and JSON body
are the ones the schema declares, and every refusal is a JSON problem body.

Bounded: 25 requests per operation and mode (data that fits the schema, then data that does
not), a queue limit of 2, and workflows that are random text or an 8×8 noise picture: nothing
heavy runs. Job routes are called with real job ids half the time.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings

from .conftest import TINY, Running, start_server, stop_server

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("fuzzed")
    running = start_server(root, "--max-request-bytes", "200000", env={"DAGFUSION_SERVER_MAX_QUEUE": "2"})
    yield running
    stop_server(running)


def problems_are_json(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx or 5xx answer is an ``application/problem+json`` body with its own status."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith("application/problem+json"), f"{response.status_code} answered {content_type!r}"
    body = json.loads(response.content)
    assert isinstance(body, dict) and body.get("status") == response.status_code and body.get("title"), body
    return True


def fuzz(
    name: str, cases: Any, positive: bool, known: list[str], headers: dict[str, str], checks: list[Any],
    statuses: dict[str, set[int]],
) -> Any:
    """A Hypothesis test sending ``cases`` (real job ids and a tiny workflow half the time when
    ``positive``) and recording each answer's status code under ``name``."""
    from hypothesis import given
    from hypothesis import strategies as st

    @given(case=cases, real=st.sampled_from(known), use=st.booleans())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def one(case: Any, real: str, use: bool) -> None:
        if use and positive and "job_id" in (case.path_parameters or {}):
            case.path_parameters["job_id"] = real
        if use and positive and name == "POST /jobs" and isinstance(case.body, dict):
            case.body = {"workflow": TINY, "overrides": [f"n.seed={len(statuses.get(name, ()))}"]}
        response = case.call_and_validate(headers=headers, timeout=30, checks=checks)
        statuses.setdefault(name, set()).add(response.status_code)

    return one


def test_api_conforms_to_its_schema(fuzzed_server: Running) -> None:
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    headers = {"Authorization": f"Bearer {fuzzed_server.token}"}
    with fuzzed_server.client() as client:  # real jobs, so job routes answer more than 404
        known = [client.submit(TINY, overrides=[f"n.seed={seed}"]) for seed in (1, 2)]
        for job_id in known:
            client.wait(job_id, timeout=60)
    known.append("no-such-job")
    api = schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json", headers=headers, timeout=30)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              problems_are_json]
    operations = sorted((result.ok() for result in api.get_all_operations()), key=lambda o: o.method.upper() == "DELETE")
    assert len(operations) >= 10
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        name = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            one = fuzz(name, operation.as_strategy(generation_mode=mode), mode is GenerationMode.POSITIVE,
                       known, headers, checks, statuses)
            try:
                one()
            except Unsatisfiable:  # nothing to break in a request without parameters
                assert mode is GenerationMode.NEGATIVE, name
    assert "HEAD /health" in statuses and "POST /jobs/upload" in statuses
    seen = set().union(*statuses.values())
    assert {200, 201, 404, 422} <= seen, seen
    with fuzzed_server.client() as client:
        assert client.health()["status"] == "ok"
