"""Failover (`edge.failover`) against real verification servers in-process over loopback gRPC:
a server stopped in the middle of a generation, and the generation goes on on the next listed
server (or on the same one, restarted) with exactly the tokens of an uninterrupted run, greedy
or seeded, concurrent sessions included, and usage that counts every round; a draining or dead
first server sends new sessions to the next; a round in flight is cut to a smaller server's
node cap; with no server back within the failover timeout, a typed error; the backoff between
tries grows, is jittered and stays bounded; the server list (commas or a YAML list, host names,
dns:/// targets) is validated."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path

import pytest

from specedge.core.generation import GenerationRequest, GenerationStats
from specedge.core.sampling import SamplingParams
from specedge.edge.app import Edge
from specedge.edge.client import ServerUnavailableError
from specedge.edge.config import EdgeConfigError, load_edge_config
from specedge.edge.failover import FailoverPolicy
from specedge.edge.replicas import ServerTarget
from specedge.model.loader import LoadedModel
from specedge.server.app import BackgroundServer
from tests.support.models import TARGET_SEED, tiny_model
from tests.support.observe import metric, wait_for
from tests.support.reference import reference_tokens
from tests.support.servers import EDGE_CONFIG, edge_config, start_server, with_edge

PROMPT = [1, 2, 3, 4, 5]
MAX_TOKENS = 40
SEEDED = SamplingParams(temperature=0.8, seed=7)


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model(TARGET_SEED)


async def generate_with_fault(
    edge: Edge,
    fault: Callable[[], None],
    params: SamplingParams | None = None,
    prompt: list[int] = PROMPT,
) -> tuple[list[int], GenerationStats]:
    """One generation; `fault` runs (in a thread) once the first round's tokens are out."""
    request = GenerationRequest(list(prompt), params or SamplingParams(), MAX_TOKENS)
    stats = GenerationStats()
    tokens: list[int] = []
    async with aclosing(edge.runtime.generate(request, stats)) as rounds:
        async for emitted in rounds:
            if not tokens:
                assert len(emitted) < MAX_TOKENS  # the fault comes mid-generation
                await asyncio.to_thread(fault)
            tokens.extend(emitted)
    return tokens, stats


@pytest.mark.parametrize("params", [None, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("server_decoding", [True, False])
def test_generation_continues_on_the_next_server(
    target: LoadedModel, params: SamplingParams | None, server_decoding: bool
) -> None:
    first, second = start_server(target), start_server(target)
    try:
        config = edge_config([first, second], server_decoding=server_decoding)
        tokens, stats = asyncio.run(
            with_edge(config, tiny_model(12), lambda e: generate_with_fault(e, first.stop, params))
        )
        assert tokens == reference_tokens(target, PROMPT, MAX_TOKENS, params)
        assert stats.emitted == len(tokens) == MAX_TOKENS
        assert stats.finish_reason == "length"
        # Rounds count both servers' rounds (the first had at least one).
        assert stats.rounds > metric(second.metrics_port, "specedge_server_rounds_total") >= 0
        assert metric(second.metrics_port, "specedge_server_emitted_tokens_total") > 0
    finally:
        second.stop()


def test_a_round_is_cut_to_the_next_servers_smaller_node_cap(target: LoadedModel) -> None:
    """Trees sized to the first server's cap (`--budget auto`) are sent to the second, which
    takes fewer nodes, as their longest prefix that fits."""
    first, second = start_server(target), start_server(target, max_tree_nodes=2)
    try:
        config = edge_config([first, second], budget="auto")
        draft = tiny_model(TARGET_SEED)  # agrees with the target: its trees are big
        tokens, stats = asyncio.run(
            with_edge(config, draft, lambda e: generate_with_fault(e, first.stop))
        )
        assert tokens == reference_tokens(target, PROMPT, MAX_TOKENS)
        assert stats.emitted == MAX_TOKENS
        assert metric(second.metrics_port, "specedge_server_emitted_tokens_total") > 0
    finally:
        second.stop()


def test_concurrent_sessions_all_fail_over(target: LoadedModel) -> None:
    prompts = [PROMPT, [200, 17, 93], [7] * 12]
    first, second = start_server(target), start_server(target)
    stopped = threading.Lock()

    def stop_once() -> None:
        if stopped.acquire(blocking=False):
            first.stop()

    async def body(edge: Edge) -> list[tuple[list[int], GenerationStats]]:
        runs = [generate_with_fault(edge, stop_once, prompt=prompt) for prompt in prompts]
        return await asyncio.gather(*runs)

    try:
        results = asyncio.run(with_edge(edge_config([first, second]), tiny_model(12), body))
        for (tokens, stats), prompt in zip(results, prompts, strict=True):
            assert tokens == reference_tokens(target, prompt, MAX_TOKENS)
            assert stats.emitted == MAX_TOKENS
        wait_for(lambda: metric(second.metrics_port, "specedge_server_active_sessions") == 0)
    finally:
        second.stop()


def test_generation_continues_on_the_same_server_restarted(target: LoadedModel) -> None:
    server = start_server(target)
    port = server.port
    restarted: list[BackgroundServer] = []

    def restart() -> None:
        server.stop()
        restarted.append(start_server(target, port=port))

    try:
        config = edge_config(port, failover_timeout=10.0)
        tokens, stats = asyncio.run(
            with_edge(config, tiny_model(12), lambda e: generate_with_fault(e, restart))
        )
        assert tokens == reference_tokens(target, PROMPT, MAX_TOKENS)
        assert stats.emitted == MAX_TOKENS
    finally:
        for each in restarted:
            each.stop()


def test_no_server_within_the_failover_timeout_is_a_clean_error(target: LoadedModel) -> None:
    first, second = start_server(target), start_server(target)

    def stop_both() -> None:
        first.stop()
        second.stop()

    config = edge_config([first, second], failover_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="failover timeout of 0.5 s"):
        asyncio.run(with_edge(config, tiny_model(12), lambda e: generate_with_fault(e, stop_both)))
    assert time.monotonic() - started < 5.0


def test_a_draining_server_sends_new_sessions_to_the_next(target: LoadedModel) -> None:
    """A draining server refuses the Open with UNAVAILABLE: the session opens on the next."""
    first, second = start_server(target), start_server(target)
    try:
        assert first.server.executor is not None
        first.server.executor.drain()  # refuses new sessions from now on
        config = edge_config([first, second])
        tokens, stats = asyncio.run(
            with_edge(config, tiny_model(12), lambda e: generate_with_fault(e, lambda: None))
        )
        assert tokens == reference_tokens(target, PROMPT, MAX_TOKENS)
        assert stats.emitted == MAX_TOKENS
        assert metric(first.metrics_port, "specedge_server_emitted_tokens_total") == 0
    finally:
        first.stop()
        second.stop()


def test_a_new_session_skips_a_dead_first_server(target: LoadedModel) -> None:
    server = start_server(target)
    try:
        config = edge_config([1, server])  # nothing listens on port 1
        tokens, _ = asyncio.run(
            with_edge(config, tiny_model(12), lambda e: generate_with_fault(e, lambda: None))
        )
        assert tokens == reference_tokens(target, PROMPT, MAX_TOKENS)
    finally:
        server.stop()


def test_backoff_grows_with_jitter_and_stays_bounded() -> None:
    policy = FailoverPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, jitter=0.5)
    rng = random.Random(0)
    assert policy.backoff(0, rng) == 0.0
    for attempt, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (10, 0.5)]:
        waits = {policy.backoff(attempt, rng) for _ in range(20)}
        assert all(base * 0.5 <= wait <= base for wait in waits)
        assert len(waits) > 1  # jittered


def test_server_list_is_validated() -> None:
    config = edge_config([1, 2])
    assert config.servers == ("127.0.0.1:1", "127.0.0.1:2")
    assert edge_config(3).servers == ("127.0.0.1:3",)
    with pytest.raises(EdgeConfigError, match="lists a server twice"):
        edge_config([1, 1])
    with pytest.raises(EdgeConfigError, match="HOST:PORT"):
        edge_config([1, 0])
    named = replace(EDGE_CONFIG, server="dns:///verifier.example:7000, [::1]:8").validate()
    assert named.targets == (ServerTarget("verifier.example", 7000), ServerTarget("::1", 8))
    with pytest.raises(EdgeConfigError, match="names a DNS server"):
        replace(EDGE_CONFIG, server="dns://10.0.0.53/verifier:7000").validate()


def test_the_config_file_lists_servers_as_a_yaml_list(tmp_path: Path) -> None:
    config_file = tmp_path / "edge.yaml"
    config_file.write_text("model: tiny\nserver:\n  - 10.0.0.1:7000\n  - dns:///verifier:7000\n")
    config = load_edge_config(config_file)
    assert config.server == "10.0.0.1:7000,dns:///verifier:7000"
    assert [str(target) for target in config.targets] == ["10.0.0.1:7000", "verifier:7000"]
    config_file.write_text("model: tiny\nserver: [10.0.0.1:7000, 7]\n")
    with pytest.raises(EdgeConfigError, match="list of non-empty strings"):
        load_edge_config(config_file)
