"""Schema-driven fuzzing of the OpenAI-compatible HTTP APIs, the server's (`serve --api-port`)
and the edge's, from their own /openapi.json (schemathesis, real HTTP on loopback;
`tests.support.fuzz`): schema-valid requests to every operation and invalid bodies to the
generation endpoints. No answer is a 5xx (nor an in-band error in a stream); each has a
documented status, content type and body (OpenAI's error JSON for the errors); a 200 is a
whole answer; a method an endpoint does not serve gets 405 with Allow. Greedy completions
through the same API meanwhile give exactly the target's text, and the API stays healthy.
The long run is `benchmarks/fuzz.py`."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given

from tests.support.fuzz import (
    GOOD_PROMPT,
    GoodSessions,
    HttpApis,
    check_http_case,
    fuzz_settings,
    http_cases,
)

EXAMPLES = 80  # per API: ~5-10 s each on one idle core


@pytest.fixture(scope="module")
def apis() -> Iterator[HttpApis]:
    stack = HttpApis.start()
    yield stack
    stack.stop()


@pytest.mark.parametrize("role", ["server", "edge"])
def test_schema_cases_get_documented_answers_while_good_completions_are_exact(
    apis: HttpApis, role: str
) -> None:
    base = apis.url(role)
    expected = apis.expected_text()

    with GoodSessions(apis.good_completion(role)) as traffic:

        @fuzz_settings(EXAMPLES)
        @given(case=http_cases(base))
        def fuzz(case: object) -> None:
            check_http_case(case, base)  # type: ignore[arg-type]

        fuzz()

    assert not traffic.failures, traffic.failures
    assert len(traffic.outputs) >= 2  # they ran all along
    assert all(output == expected for output in traffic.outputs)
    health = httpx.get(f"{base}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("role", ["server", "edge"])
def test_a_method_an_endpoint_does_not_serve_gets_405_with_allow(apis: HttpApis, role: str) -> None:
    """Found by the fuzzing: the error handler dropped the Allow header of a 405."""
    base = apis.url(role)
    paths = httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"]
    for path, operations in paths.items():
        served = {method.upper() for method in operations}
        for method in {"GET", "POST", "PUT", "DELETE", "PATCH"} - served:
            response = httpx.request(method, f"{base}{path}", timeout=10)
            assert response.status_code == 405, (method, path)
            assert set(response.headers["allow"].split(", ")) >= served, (method, path)
            assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("role", ["server", "edge"])
def test_values_past_the_wires_fields_are_a_400_or_fit(apis: HttpApis, role: str) -> None:
    """Found by the long fuzzing run: the edge answered 500 to a top_k of 2^32 or more (its
    Open carries top_k as uint32). The largest values of each bounded field are served."""
    url = f"{apis.url(role)}/v1/completions"
    body = {"prompt": GOOD_PROMPT, "max_tokens": 2, "temperature": 1.0}
    assert httpx.post(url, json=body | {"top_k": 2**32}, timeout=30).status_code == 400
    largest = {"top_k": 2**32 - 1, "seed": 2**64 - 1, "max_tokens": 2**40}
    answer = httpx.post(url, json=body | largest, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["finish_reason"] == "length"
