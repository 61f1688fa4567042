"""Fuzzing the Verifier service of a real server on loopback (hypothesis,
`tests.support.fuzz_messages`). Session calls of random and malformed messages in any order
(Opens with bad sampling, versions, fingerprints, prompts; trees with bad tokens, parents,
cycles, depths and sizes, past gRPC's message size; empty messages, unknown fields, raw
garbage bytes; Open twice, trees before Open, Resume and Close anywhere; calls cancelled
midway) end with the status their first bad message calls for (never UNKNOWN or INTERNAL),
their replies are well-formed, and greedy sessions on the same server meanwhile produce
exactly the target's reference tokens; afterwards the server is healthy with every KV slot
free. Unary calls (Info, Load, the health check) of arbitrary request bytes get an answer or
INVALID_ARGUMENT. The long run is `benchmarks/fuzz.py`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from specedge.model.loader import LoadedModel
from specedge.server.app import BackgroundServer
from tests.support.fuzz import (
    GOOD_PROMPT,
    GOOD_TOKENS,
    GoodSessions,
    fuzz_settings,
    good_grpc_session,
    start_grpc_target,
)
from tests.support.fuzz_messages import (
    INVALID,
    UNARY_REQUESTS,
    FuzzMessage,
    FuzzSession,
    ServerLimits,
    bad,
    check_grpc_call,
    check_unary_call,
    fuzz_sessions,
    garbage,
)
from tests.support.observe import http_get, metric, wait_for
from tests.support.reference import reference_tokens
from tests.support.scripted_edge import run
from tests.support.wire import CLOSE_BYTES, open_bytes

EXAMPLES = 200  # ~5 s on one idle core
UNARY_EXAMPLES = 60


@pytest.fixture(scope="module")
def grpc_target() -> Iterator[tuple[LoadedModel, BackgroundServer, ServerLimits]]:
    target, server, limits = start_grpc_target()
    yield target, server, limits
    server.stop()


def test_fuzzed_sessions_end_cleanly_while_good_sessions_are_exact(
    grpc_target: tuple[LoadedModel, BackgroundServer, ServerLimits],
) -> None:
    target, server, limits = grpc_target
    reference = reference_tokens(target, GOOD_PROMPT, GOOD_TOKENS)
    good_open = open_bytes(prompt=GOOD_PROMPT, fingerprint=limits.fingerprint, max_tokens=4)

    with GoodSessions(good_grpc_session(target, server.port)) as traffic:

        @fuzz_settings(EXAMPLES)
        @given(session=fuzz_sessions(limits))
        # Found by this fuzzer: bytes that are no EdgeMessage ended the call with UNKNOWN.
        @example(FuzzSession((bad("garbage", b"\xff\xff\xff", INVALID, undecodable=True),)))
        @example(
            FuzzSession(
                (
                    FuzzMessage("open", good_open, True),
                    bad("garbage", b"\x12\x05\x0a", INVALID, undecodable=True),
                    FuzzMessage("close", CLOSE_BYTES, True),
                )
            )
        )
        def fuzz(session: FuzzSession) -> None:
            check_grpc_call(traffic.run, server.port, limits, session)

        fuzz()

    assert not traffic.failures, traffic.failures
    assert len(traffic.outputs) >= 2  # they ran all along
    assert all(output == reference for output in traffic.outputs)
    wait_for(lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 0)
    kv = server.server.executor.engine.runner.kv  # type: ignore[union-attr]
    assert kv.num_free == kv.num_slots
    assert http_get(server.metrics_port, "/health")[0] == 200


def test_unary_calls_of_any_bytes_get_an_answer_or_invalid_argument(
    grpc_target: tuple[LoadedModel, BackgroundServer, ServerLimits],
) -> None:
    """Found by this fuzzer: Info, Load and the health check answered UNKNOWN to request bytes
    that are no message (gRPC parses a unary request before any handler)."""
    _, server, _ = grpc_target

    @fuzz_settings(UNARY_EXAMPLES)
    @given(method=st.sampled_from(sorted(UNARY_REQUESTS)), data=garbage)
    @example(method="/specedge.v1.Verifier/Info", data=b"\xff\xff")
    def fuzz(method: str, data: bytes) -> None:
        check_unary_call(run, server.port, method, data)

    fuzz()
    assert http_get(server.metrics_port, "/health")[0] == 200
