"""Health that tells the truth: `ModelHealth` on a fake clock (failures in a row, a success
clearing them, a stuck job against its floor and its modelled cost), then a
real server on loopback whose forwards fail or hang: `/health` (metrics port and API port)
answers 503 and the standard gRPC health service NOT_SERVING, and both recover once the model
works again."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from specedge.model.loader import LoadedModel
from specedge.rpc.codec import SERVICE_NAME, health_status
from specedge.server.app import BackgroundServer
from specedge.server.health import STUCK_FACTOR, ModelHealth
from tests.support.models import tiny_model
from tests.support.observe import http_get, wait_for
from tests.support.reference import reference_tokens
from tests.support.scripted_edge import channel, expect_status, open_message, run, run_session
from tests.support.servers import start_server
from tests.support.trees import empty_tree

PROMPT = [9, 8, 7, 6, 5, 4, 3, 2, 1, 100, 101, 102]


# ---- ModelHealth ---------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fail() -> None:
    raise RuntimeError("CUDA error: device-side assert (simulated)")


def test_failures_in_a_row_degrade_and_one_verification_clears() -> None:
    health = ModelHealth(max_failures=3, clock=Clock())
    for _ in range(2):
        with pytest.raises(RuntimeError):
            health.watch(fail)
    assert health.problem() is None
    health.watch(lambda: None)  # a verification batch that works resets the count
    with pytest.raises(RuntimeError):
        health.watch(fail, kind="prefill")  # a prefill's failure counts too
    health.watch(lambda: None, kind="prefill")  # ... its success does not clear
    for _ in range(2):
        with pytest.raises(RuntimeError):
            health.watch(fail)
    assert health.problem() == (
        "3 model forwards failed in a row (latest: RuntimeError: CUDA error: device-side "
        "assert (simulated))"
    )
    assert health.watch(lambda: 7) == 7
    assert health.problem() is None


def test_draft_jobs_neither_fail_nor_clear() -> None:
    health = ModelHealth(max_failures=1, clock=Clock())
    with pytest.raises(RuntimeError):
        health.watch(fail, kind="draft")  # the draft model: not the target's forward
    assert health.problem() is None
    with pytest.raises(RuntimeError):
        health.watch(fail)
    health.watch(lambda: None, kind="draft")
    assert health.problem() is not None


def test_a_job_is_stuck_past_its_floor_or_its_modelled_cost() -> None:
    clock = Clock()
    health = ModelHealth(stuck_after=5.0, clock=clock)
    seen: list[str | None] = []

    def hang(advance: float) -> Any:
        def job() -> None:
            clock.now += advance
            seen.append(health.problem())

        return job

    health.watch(hang(4.9))  # under the floor
    health.watch(hang(5.1))  # over it
    modelled = 0.2  # 100 x 0.2 s = 20 s > the floor
    health.watch(hang(STUCK_FACTOR * modelled - 0.1), modelled)
    health.watch(hang(STUCK_FACTOR * modelled + 0.1), modelled)
    assert seen[0] is None and seen[2] is None
    assert seen[1] == "the model thread is stuck: one job has run for 5.1 s"
    assert (seen[3] or "").startswith("the model thread is stuck: one job has run for 20.1 s")
    assert health.problem() is None  # nothing runs now


# ---- a real server -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model()


@pytest.fixture(scope="module")
def server(target: LoadedModel) -> Iterator[BackgroundServer]:
    background = start_server(target, max_failed_forwards=2, stuck_timeout=0.3, api_port=0)
    yield background
    background.stop()


def grpc_health(port: int) -> tuple[str, str]:
    async def main() -> tuple[str, str]:
        async with channel(port) as chan:
            return await health_status(chan, "", 5), await health_status(chan, SERVICE_NAME, 5)

    return tuple(run(main()))  # type: ignore[return-value]


HEALTHY = (200, 200, "SERVING", "SERVING")
UNHEALTHY = (503, 503, "NOT_SERVING", "NOT_SERVING")


def health_state(server: BackgroundServer) -> tuple[object, ...]:
    """/health of the metrics port and the API port, then the gRPC health of the server and of
    the Verifier service (which follows within a poll interval)."""
    http = (http_get(server.metrics_port, "/health")[0], http_get(server.api_port, "/health")[0])
    return http + grpc_health(server.port)


def failed_round(server: BackgroundServer, target: LoadedModel) -> grpc.aio.AioRpcError:
    async def main() -> grpc.aio.AioRpcError:
        result = run_session(server.port, open_message(target, PROMPT, 8), empty_tree)
        return await expect_status(result)

    return run(main())  # type: ignore[no-any-return]


def test_failing_forwards_make_the_server_unhealthy_until_one_works(
    server: BackgroundServer, target: LoadedModel
) -> None:
    wait_for(lambda: health_state(server) == HEALTHY)
    engine = server.server.executor.engine  # type: ignore[union-attr]
    real_verify = engine.verify_each

    def broken(batch: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access (simulated)")

    engine.verify_each = broken  # type: ignore[method-assign]
    try:
        for _ in range(2):
            error = failed_round(server, target)
            assert error.code() == grpc.StatusCode.INTERNAL
            assert "illegal memory access" in (error.details() or "")
        wait_for(lambda: health_state(server) == UNHEALTHY)
        body = http_get(server.metrics_port, "/health")[1]
        assert '"status": "degraded"' in body and "2 model forwards failed in a row" in body
    finally:
        engine.verify_each = real_verify  # type: ignore[method-assign]
    result = run(run_session(server.port, open_message(target, PROMPT, 6), empty_tree))
    assert result.tokens == reference_tokens(target, PROMPT, 6)
    wait_for(lambda: health_state(server) == HEALTHY)


def test_a_stuck_model_thread_makes_the_server_unhealthy_until_it_ends(
    server: BackgroundServer, target: LoadedModel
) -> None:
    wait_for(lambda: health_state(server) == HEALTHY)
    engine = server.server.executor.engine  # type: ignore[union-attr]
    real_verify = engine.verify_each
    release = threading.Event()

    def hang(batch: Any) -> Any:
        release.wait(20)
        return real_verify(batch)

    engine.verify_each = hang  # type: ignore[method-assign]

    async def session() -> list[int]:
        result = await run_session(server.port, open_message(target, PROMPT, 6), empty_tree)
        return result.tokens

    async def main() -> list[int]:
        running = asyncio.ensure_future(session())
        try:
            await asyncio.to_thread(wait_for, lambda: health_state(server) == UNHEALTHY)
            body = await asyncio.to_thread(http_get, server.metrics_port, "/health")
            assert "the model thread is stuck" in body[1]
        finally:
            engine.verify_each = real_verify  # type: ignore[method-assign]
            release.set()
        return await running

    assert run(main()) == reference_tokens(target, PROMPT, 6)
    wait_for(lambda: health_state(server) == HEALTHY)
