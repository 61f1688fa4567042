"""The real verification server and edge in-process on loopback (free ports, in threads), with
the small configurations the tests share, and one generation through an edge's round loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from specedge.core.generation import GenerationRequest, GenerationStats
from specedge.core.sampling import SamplingParams
from specedge.edge.app import Edge, build_edge
from specedge.edge.config import EdgeConfig
from specedge.model.loader import LoadedModel
from specedge.server.app import BackgroundServer
from specedge.server.config import ServerConfig

# Small caps, so that tests can reach them; the edge's trees (EDGE_CONFIG) fit within them.
SERVER_CONFIG = ServerConfig(
    model="tiny",
    port=0,
    metrics_port=0,
    max_batch=8,
    max_sessions=6,
    max_tree_nodes=16,
    max_tree_depth=6,
    max_context=256,
    prefill_chunk=16,
    session_timeout=30.0,
    drain_timeout=0.0,
)
EDGE_CONFIG = EdgeConfig(
    model="tiny-draft",
    server="127.0.0.1:1",  # replaced by `edge_config`
    port=0,
    budget=12,
    depth=4,
    width=3,
    beams=3,
    proactive_budget=6,
    proactive_depth=2,
    max_sessions=4,
    max_context=256,
    connect_timeout=2.0,
    reply_timeout=20.0,
    failover_timeout=1.0,  # a test without a server to fail over to fails within a second
    startup_timeout=5.0,
)


def start_server(target: LoadedModel, **overrides: Any) -> BackgroundServer:
    """The real `specedge serve` server on loopback (free ports), in a thread."""
    return BackgroundServer(replace(SERVER_CONFIG, **overrides).validate(), target).start()


def edge_config(
    server: BackgroundServer | int | Sequence[BackgroundServer | int], **overrides: Any
) -> EdgeConfig:
    """EDGE_CONFIG pointed at `server` (or at a port, e.g. a delay proxy's), or at several in
    order (failover)."""
    servers = server if isinstance(server, Sequence) else [server]
    ports = [each if isinstance(each, int) else each.port for each in servers]
    addresses = ",".join(f"127.0.0.1:{port}" for port in ports)
    return replace(EDGE_CONFIG, server=addresses, **overrides).validate()


async def edge_generate(
    edge: Edge,
    prompt: Sequence[int],
    max_tokens: int,
    params: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
) -> tuple[list[int], GenerationStats]:
    """One generation through the edge's round loop: (tokens, stats)."""
    request = GenerationRequest(list(prompt), params or SamplingParams(), max_tokens,
                                tuple(stop_token_ids))  # fmt: skip
    stats = GenerationStats()
    tokens: list[int] = []
    async with aclosing(edge.runtime.generate(request, stats)) as rounds:
        async for emitted in rounds:
            tokens.extend(emitted)
    return tokens, stats


async def with_edge(config: EdgeConfig, draft: LoadedModel, body: Callable[[Edge], Any]) -> Any:
    """Run `body(edge)` (a coroutine function) on a fresh edge, closing it afterwards."""
    edge = build_edge(config, draft)
    try:
        return await body(edge)
    finally:
        await edge.close()
