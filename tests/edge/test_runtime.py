"""The edge's round loop against the real verification server in-process over loopback gRPC
(tiny random fp32 models sharing a tokenizer): greedy output equals the target's
autoregressive output token for token under every proactive policy and with concurrent
sessions; a draft that agrees with the target is accepted and its bets hit; server faults
surface as typed errors quickly; the edge reconnects after a server restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import replace

import grpc
import pytest

from specedge.bench.wan import DelayProxy
from specedge.core.generation import GenerationRequest, GenerationStats
from specedge.core.limits import TreeShape
from specedge.core.sampling import SamplingParams
from specedge.edge.app import Edge
from specedge.edge.client import (
    CHANNEL_OPTIONS,
    ClientIdentity,
    ServerConnection,
    ServerIncompatibleError,
    ServerUnavailableError,
)
from specedge.errors import InvalidRequestError
from specedge.model.loader import LoadedModel, tokenizer_fingerprint
from specedge.rpc.codec import (
    PROTOCOL_VERSION,
    EdgeRequest,
    ServerInfo,
    ServerReply,
    SessionOpened,
    add_verifier_service,
)
from specedge.server.app import BackgroundServer
from tests.support.models import TARGET_SEED, tiny_model
from tests.support.models import TINY_VOCAB as VOCAB
from tests.support.observe import async_wait_for, metric, wait_for
from tests.support.reference import reference_tokens
from tests.support.servers import (
    SERVER_CONFIG,
    edge_config,
    edge_generate,
    start_server,
    with_edge,
)

PROMPTS = [[1, 2, 3, 4, 5], [200, 17, 93], [7] * 12]
MAX_TOKENS = 40
RTT_MS = 20.0


def identity(target: LoadedModel) -> ClientIdentity:
    return ClientIdentity(
        tokenizer_fingerprint(target.tokenizer), VOCAB, TreeShape(budget=8, depth=4)
    )


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model(TARGET_SEED)


@pytest.fixture(scope="module")
def server(target: LoadedModel) -> Iterator[BackgroundServer]:
    background = start_server(target)
    yield background
    background.stop()


@pytest.fixture(scope="module")
def wan(server: BackgroundServer) -> Iterator[DelayProxy]:
    """Loopback with a round-trip time, so that the edge has time to draft proactively."""
    proxy = DelayProxy("127.0.0.1", server.port, rtt_ms=RTT_MS).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def references(target: LoadedModel) -> list[list[int]]:
    return [reference_tokens(target, prompt, MAX_TOKENS) for prompt in PROMPTS]


@pytest.mark.parametrize("policy", ["off", "keep-depth", "add-depth"])
@pytest.mark.parametrize("draft_seed", [TARGET_SEED, 12])
def test_greedy_output_equals_autoregressive(
    server: BackgroundServer,
    wan: DelayProxy,
    references: list[list[int]],
    policy: str,
    draft_seed: int,
) -> None:
    draft = tiny_model(draft_seed)

    async def body(edge: Edge) -> list[tuple[list[int], GenerationStats]]:
        runs = [edge_generate(edge, prompt, MAX_TOKENS) for prompt in PROMPTS]
        return await asyncio.gather(*runs)  # interleaved sessions on one model thread

    results = asyncio.run(with_edge(edge_config(wan.port, proactive=policy), draft, body))
    for (tokens, stats), reference in zip(results, references, strict=True):
        assert tokens == reference
        assert stats.rounds >= 1 and stats.emitted == len(tokens)
    # Bets are placed while replies are in flight (unless proactive drafting is off).
    attempts = sum(stats.proactive_attempts for _, stats in results)
    assert (attempts > 0) == (policy != "off")
    # Each finished session was closed on the server (the close crosses the delayed link).
    wait_for(lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 0)


@pytest.mark.parametrize("policy", ["keep-depth", "add-depth"])
def test_agreeing_draft_is_accepted_and_its_bets_hit(
    target: LoadedModel, references: list[list[int]], policy: str
) -> None:
    """A draft with the target's weights: its greedy path is accepted as deep as the tree
    holds it, and its bet is often the true outcome, so proactive subtrees are reused."""
    draft = tiny_model(TARGET_SEED)
    # Every node verified (`--verify all`): how much of a tree the goodput selection keeps
    # depends on measured times, which vary on a loaded machine; this test is about the draft.
    server = start_server(target, verify="all")
    wan = DelayProxy("127.0.0.1", server.port, rtt_ms=RTT_MS).start()
    # Server-side decoding off: with steps of a millisecond against a 20 ms round trip, the
    # server would (rightly) decode this session itself, and no bet would be placed.
    config = edge_config(wan.port, proactive=policy, server_decoding=False)

    async def body(edge: Edge) -> tuple[list[int], GenerationStats]:
        return await edge_generate(edge, PROMPTS[0], MAX_TOKENS)

    try:
        tokens, stats = asyncio.run(with_edge(config, draft, body))
    finally:
        wan.stop()
        server.stop()
    assert tokens == references[0]
    assert stats.acceptance_rate > 0.6 and stats.tokens_per_round > 2.5
    assert stats.proactive_hits > 0
    assert stats.bytes_sent > 0 and stats.bytes_received > 0


def test_the_targets_stop_token_ends_the_generation(target: LoadedModel) -> None:
    """The server stops at its target's stop tokens (the edge's own are not trusted)."""
    full = reference_tokens(target, PROMPTS[1], MAX_TOKENS)
    stop = full[len(full) // 2]
    expected = reference_tokens(target, PROMPTS[1], MAX_TOKENS, stop_token_ids=[stop])
    assert expected[-1] == stop and len(expected) < len(full)

    async def body(edge: Edge) -> tuple[list[int], GenerationStats]:
        return await edge_generate(edge, PROMPTS[1], MAX_TOKENS)

    server = start_server(replace(target, stop_token_ids=(stop,)))
    try:
        tokens, stats = asyncio.run(with_edge(edge_config(server), tiny_model(12), body))
    finally:
        server.stop()
    assert tokens == expected and stats.finish_reason == "stop"


def test_prompt_beyond_the_context_is_rejected(server: BackgroundServer) -> None:
    async def body(edge: Edge) -> object:
        return await edge_generate(edge, [1] * 300, 5)

    with pytest.raises(InvalidRequestError, match="context limit"):
        asyncio.run(with_edge(edge_config(server), tiny_model(12), body))


def test_unreachable_server_fails_fast() -> None:
    async def body(edge: Edge) -> object:
        return await edge_generate(edge, PROMPTS[0], 5)

    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="unavailable"):
        asyncio.run(with_edge(edge_config(1), tiny_model(12), body))  # nothing on port 1
    assert time.monotonic() - started < 3.0


def test_incompatible_server_is_refused_at_handshake(server: BackgroundServer) -> None:
    other_tokenizer = tiny_model(12, vocab=300)

    async def connect(edge: Edge) -> object:
        return await edge.runtime.connection.wait_ready(2.0)

    with pytest.raises(ServerIncompatibleError, match="tokenizer fingerprint"):
        asyncio.run(with_edge(edge_config(server), other_tokenizer, connect))
    with pytest.raises(ServerIncompatibleError, match="lower --depth"):
        asyncio.run(with_edge(edge_config(server, depth=13), tiny_model(12), connect))


def test_auth_token_is_sent(target: LoadedModel) -> None:
    server = start_server(target, auth_token="s3cret")
    try:

        async def body(edge: Edge) -> tuple[list[int], GenerationStats]:
            return await edge_generate(edge, PROMPTS[0], 8)

        tokens, _ = asyncio.run(
            with_edge(edge_config(server, auth_token="s3cret"), tiny_model(12), body)
        )
        assert tokens == reference_tokens(target, PROMPTS[0], 8)
        with pytest.raises(ServerUnavailableError, match="UNAUTHENTICATED"):
            asyncio.run(with_edge(edge_config(server, auth_token="wrong"), tiny_model(12), body))
    finally:
        server.stop()


def test_reconnects_after_the_server_restarts(target: LoadedModel) -> None:
    first = start_server(target)
    port = first.port
    second: BackgroundServer | None = None

    async def body(edge: Edge) -> None:
        nonlocal second
        tokens, _ = await edge_generate(edge, PROMPTS[0], 8)
        assert tokens == reference_tokens(target, PROMPTS[0], 8)
        await asyncio.to_thread(first.stop)
        started = time.monotonic()
        with pytest.raises(ServerUnavailableError):
            await edge_generate(edge, PROMPTS[0], 8)
        assert time.monotonic() - started < 3.0
        second = await asyncio.to_thread(start_server, target, port=port)
        tokens, _ = await edge_generate(edge, PROMPTS[0], 8)
        assert tokens == reference_tokens(target, PROMPTS[0], 8)

    try:
        asyncio.run(with_edge(edge_config(port), tiny_model(12), body))
    finally:
        if second is not None:
            second.stop()


def test_a_fresh_link_is_not_held_back_by_another_channels_backoff(target: LoadedModel) -> None:
    """While a server is down, any of the edge's channels still open to its address (a
    poll's, a retired link's still closing) keeps retrying with gRPC's reconnect backoff (up to
    2 s). A link made once the server is back must connect at once, not share that backoff
    (the restart test's flake: "connection refused" past its 1 s failover timeout)."""
    first = start_server(target)
    port = first.port
    first.stop()
    second: BackgroundServer | None = None

    async def body() -> None:
        nonlocal second
        lingering = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        try:
            for _ in range(8):  # about 2 s of failed connects: its backoff has grown
                lingering.get_state(try_to_connect=True)
                await asyncio.sleep(0.25)
            second = await asyncio.to_thread(start_server, target, port=port)
            connection = ServerConnection(f"127.0.0.1:{port}", identity(target))
            try:
                info = await connection.connect()  # one try, no retry
                assert info.max_context == SERVER_CONFIG.max_context
            finally:
                await connection.close()
        finally:
            await lingering.close()

    try:
        asyncio.run(body())
    finally:
        if second is not None:
            second.stop()


def test_abandoned_generation_frees_its_server_session(server: BackgroundServer) -> None:
    async def body(edge: Edge) -> None:
        request = GenerationRequest(PROMPTS[2], SamplingParams(), 200)
        async with aclosing(edge.runtime.generate(request, GenerationStats())) as rounds:
            await anext(rounds)
            assert metric(server.metrics_port, "specedge_server_active_sessions") == 1
        # The edge cancelled its stream: the server frees the session and its KV slot.
        await async_wait_for(
            lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 0
        )
        await async_wait_for(lambda: edge.runtime.active_sessions == 0)

    asyncio.run(with_edge(edge_config(server), tiny_model(12), body))
    wait_for(lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 0)


def test_silent_server_times_out_instead_of_hanging(target: LoadedModel) -> None:
    """A server that opens the session but never answers a tree: the round fails with a typed
    error after the reply timeout."""

    async def body() -> None:
        server = grpc.aio.server()

        async def info(context: object) -> ServerInfo:
            return ServerInfo(
                PROTOCOL_VERSION, "silent", tokenizer_fingerprint(target.tokenizer), VOCAB,
                32, 12, 256,
            )  # fmt: skip

        async def session(
            requests: AsyncIterator[EdgeRequest | None], context: object, traffic: object
        ) -> AsyncIterator[ServerReply]:
            await anext(requests)
            yield SessionOpened("s1", 8)
            await asyncio.Event().wait()  # never answers

        add_verifier_service(server, info, session)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            config = edge_config(port, reply_timeout=0.5)
            started = time.monotonic()
            with pytest.raises(
                ServerUnavailableError, match="no reply during a round within 0.5 s"
            ):
                await with_edge(config, tiny_model(12), lambda e: edge_generate(e, PROMPTS[0], 8))
            assert time.monotonic() - started < 3.0
        finally:
            await server.stop(0)

    asyncio.run(body())
