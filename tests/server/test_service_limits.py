"""Limits and faults over real gRPC: capacity, cancellation, silent edges, isolation, and the
/metrics + /health endpoint (the bearer token: tests/rpc/test_security.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from specedge.model.loader import LoadedModel
from specedge.rpc.codec import (
    CloseSession,
    SessionOpened,
    TreeVerified,
    VerifierClient,
    VerifyTree,
)
from specedge.server.app import BackgroundServer
from tests.support.models import tiny_model
from tests.support.observe import health, http_get, metric, wait_for
from tests.support.reference import reference_tokens
from tests.support.scripted_edge import (
    SessionResult,
    channel,
    expect_status,
    open_message,
    run,
    run_session,
)
from tests.support.servers import start_server
from tests.support.trees import empty_tree, junk_tree

PROMPT = [9, 8, 7, 6, 5, 4, 3, 2, 1, 100, 101, 102]
SESSION_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model()


@pytest.fixture(scope="module")
def small_server(target: LoadedModel) -> Iterator[BackgroundServer]:
    """Two sessions at most; silent edges evicted after SESSION_TIMEOUT."""
    background = start_server(target, max_sessions=2, session_timeout=SESSION_TIMEOUT)
    yield background
    background.stop()


def active(server: BackgroundServer) -> float:
    return metric(server.metrics_port, "specedge_server_active_sessions")


async def open_session(port: int, target: LoadedModel, chan: grpc.aio.Channel) -> object:
    call = VerifierClient(chan).session()
    await call.send(open_message(target, PROMPT, 64))
    assert isinstance(await call.receive(), SessionOpened)
    return call


def test_full_server_refuses_with_resource_exhausted(
    small_server: BackgroundServer, target: LoadedModel
) -> None:
    async def main() -> None:
        async with channel(small_server.port) as chan:
            first = await open_session(small_server.port, target, chan)
            await open_session(small_server.port, target, chan)
            third = VerifierClient(chan).session()
            await third.send(open_message(target, PROMPT, 8))
            error = await expect_status(third.receive())
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "full" in (error.details() or "")
            first.cancel()  # type: ignore[attr-defined]
            # The freed slot serves a new session.
            await asyncio.sleep(0)
            deadline = time.monotonic() + 5
            while True:
                retry = VerifierClient(chan).session()
                await retry.send(open_message(target, PROMPT, 8))
                try:
                    assert isinstance(await retry.receive(), SessionOpened)
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)

    run(main())
    wait_for(lambda: active(small_server) == 0)


def test_client_cancel_mid_session_frees_the_slot(
    small_server: BackgroundServer, target: LoadedModel
) -> None:
    async def main() -> None:
        async with channel(small_server.port) as chan:
            call = await open_session(small_server.port, target, chan)
            await call.send(VerifyTree(1, [1, 2], [-1, 0]))  # type: ignore[attr-defined]
            assert isinstance(await call.receive(), TreeVerified)  # type: ignore[attr-defined]
            assert active(small_server) == 1
            await call.send(VerifyTree(2, [3], [-1]))  # type: ignore[attr-defined]
            call.cancel()  # type: ignore[attr-defined]  # gone while its round is queued

    ended_before = client_ended(small_server)
    run(main())
    wait_for(lambda: active(small_server) == 0)
    # A cancel reaches the server as a cancelled call or as the end of its request stream.
    wait_for(lambda: client_ended(small_server) >= ended_before + 1)


def client_ended(server: BackgroundServer) -> float:
    return sum(
        metric(server.metrics_port, "specedge_server_sessions_total", {"outcome": outcome})
        for outcome in ("cancelled", "closed")
    )


def test_silent_edge_is_evicted_and_its_slot_freed(
    small_server: BackgroundServer, target: LoadedModel
) -> None:
    async def main() -> float:
        async with channel(small_server.port) as chan:
            call = await open_session(small_server.port, target, chan)
            await call.send(VerifyTree(1, [], []))  # type: ignore[attr-defined]
            await call.receive()  # type: ignore[attr-defined]
            start = time.monotonic()
            error = await expect_status(call.receive())  # type: ignore[attr-defined]
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "evicted" in (error.details() or "")
            return time.monotonic() - start

    waited = run(main())
    assert SESSION_TIMEOUT * 0.9 <= waited < SESSION_TIMEOUT + 5
    wait_for(lambda: active(small_server) == 0)
    assert (
        metric(small_server.metrics_port, "specedge_server_sessions_total", {"outcome": "evicted"})
        >= 1
    )


def test_edge_that_never_opens_is_evicted(small_server: BackgroundServer) -> None:
    async def main() -> grpc.aio.AioRpcError:
        async with channel(small_server.port) as chan:
            call = VerifierClient(chan).session()
            return await expect_status(call.receive())

    assert run(main()).code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_other_sessions_stay_correct_while_one_misbehaves(target: LoadedModel) -> None:
    server = start_server(target, max_sessions=8)
    prompts = [PROMPT, PROMPT[3:], PROMPT[::-1]]
    references = [reference_tokens(target, prompt, 30) for prompt in prompts]

    async def misbehave(kind: str) -> None:
        async with channel(server.port) as chan:
            call = VerifierClient(chan).session()
            await call.send(open_message(target, PROMPT, 64))
            await call.receive()
            for round_number in range(1, 4):
                await call.send(VerifyTree(round_number, [4, 5], [-1, -1]))
                await call.receive()
            if kind == "bad tree":
                await call.send(VerifyTree(9, [1, 2], [1, -1]))
                error = await expect_status(call.receive())
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            else:
                await call.send(VerifyTree(9, [1], [-1]))
                call.cancel()

    async def main() -> list[SessionResult]:
        good = [
            run_session(server.port, open_message(target, prompt, 30), tree)
            for prompt, tree in zip(prompts, [empty_tree, junk_tree, empty_tree], strict=True)
        ]
        results = await asyncio.gather(*good, misbehave("bad tree"), misbehave("cancel"))
        return [r for r in results if isinstance(r, SessionResult)]

    try:
        assert [r.tokens for r in run(main())] == references
        wait_for(lambda: active(server) == 0)
    finally:
        server.stop()


# ---- HTTP endpoint ----------------------------------------------------------------------------
def test_metrics_endpoint_exposes_every_metric(small_server: BackgroundServer) -> None:
    status, text = http_get(small_server.metrics_port, "/metrics")
    assert status == 200
    for name in [
        "specedge_server_active_sessions",
        "specedge_server_queued_requests",
        "specedge_server_verify_batch_size_bucket",
        "specedge_server_verify_seconds_bucket",
        "specedge_server_emitted_tokens_total",
        "specedge_server_accepted_tokens_total",
        "specedge_server_draft_nodes_total",
        "specedge_server_rounds_total",
        "specedge_server_busy_seconds_total",
        "specedge_server_prefill_tokens_total",
        "specedge_server_received_bytes_total",
        "specedge_server_sent_bytes_total",
    ]:
        assert f"\n{name}" in text, name
    assert http_get(small_server.metrics_port, "/nothing")[0] == 404


def test_counters_follow_a_session(small_server: BackgroundServer, target: LoadedModel) -> None:
    port = small_server.metrics_port
    names = ["rounds", "emitted_tokens", "prefill_tokens", "received_bytes", "sent_bytes"]
    before = {n: metric(port, f"specedge_server_{n}_total") for n in names}
    busy_before = metric(port, "specedge_server_busy_seconds_total")
    result = run(run_session(small_server.port, open_message(target, PROMPT, 6), junk_tree))
    delta = {n: metric(port, f"specedge_server_{n}_total") - before[n] for n in names}
    assert delta["rounds"] == len(result.replies)
    assert delta["emitted_tokens"] == 6
    assert delta["prefill_tokens"] == len(PROMPT) - 1  # the last prompt token is the root
    assert delta["received_bytes"] > sum(result.bytes_sent)  # trees + open + close
    assert delta["sent_bytes"] > 0
    assert metric(port, "specedge_server_busy_seconds_total") > busy_before


def test_health_reports_status_model_and_sessions(
    small_server: BackgroundServer, target: LoadedModel
) -> None:
    async def main() -> dict[str, object]:
        async with channel(small_server.port) as chan:
            await open_session(small_server.port, target, chan)
            return await asyncio.to_thread(health, small_server.metrics_port)

    during = run(main())
    assert during == {
        "status": "ok",
        "model": target.name,
        "active_sessions": 1,
        "max_sessions": 2,
    }
    wait_for(lambda: health(small_server.metrics_port)["active_sessions"] == 0)


def test_stop_ends_running_sessions_and_closes_ports(target: LoadedModel) -> None:
    server = start_server(target)

    async def main() -> grpc.aio.AioRpcError:
        async with channel(server.port) as chan:
            call = await open_session(server.port, target, chan)
            await asyncio.to_thread(server.stop)
            return await expect_status(call.receive())  # type: ignore[attr-defined]

    error = run(main())
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    with pytest.raises(OSError):
        http_get(server.metrics_port, "/health")


def test_drain_refuses_new_sessions_and_lets_running_ones_finish(target: LoadedModel) -> None:
    server = start_server(target)

    async def main() -> None:
        async with channel(server.port) as chan:
            call = await open_session(server.port, target, chan)
            stopping = asyncio.ensure_future(asyncio.to_thread(server.stop, 10.0))
            await asyncio.sleep(0.2)
            assert (await asyncio.to_thread(health, server.metrics_port))["status"] == "draining"
            refused = VerifierClient(chan).session()

            async def try_open() -> None:
                await refused.send(open_message(target, PROMPT, 4))
                await refused.receive()

            assert (await expect_status(try_open())).code() == grpc.StatusCode.UNAVAILABLE
            for round_number in range(1, 4):  # the running session goes on
                await call.send(VerifyTree(round_number, [], []))  # type: ignore[attr-defined]
                assert isinstance(await call.receive(), TreeVerified)  # type: ignore[attr-defined]
            await call.send(CloseSession())  # type: ignore[attr-defined]
            await call.done_writing()  # type: ignore[attr-defined]
            assert await call.receive() is None  # type: ignore[attr-defined]
            await stopping

    run(main())
