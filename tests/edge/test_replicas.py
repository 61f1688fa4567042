"""Replicas (`edge.replicas`, `edge.failover.ServerPool`) with two real verification servers
and one edge in-process on loopback: new sessions go by reported load (a loaded replica gets
fewer, a burst spreads over idle ones), a replica marked not serving (draining) gets none, a
replica stopped under its sessions moves them to the other with exactly the tokens of an
uninterrupted run and no error; the edge's per-replica metrics say so. Also: the server's
Load call (its executor's sessions and queue, the busy fraction of its busy-time counter), a
host name's replicas following its resolution, and the pure parts (targets, scores, order)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, aclosing
from typing import Any, cast

import grpc
import pytest

from specedge.core.generation import GenerationRequest, GenerationStats
from specedge.core.limits import TreeShape
from specedge.core.sampling import SamplingParams
from specedge.edge.app import Edge
from specedge.edge.client import ClientIdentity, RemoteSession, ServerConnection
from specedge.edge.failover import ServerPool
from specedge.edge.replicas import (
    Replica,
    ReplicaHealth,
    ReplicaPolicy,
    ServerTarget,
    placement_order,
    resolve,
)
from specedge.model.loader import LoadedModel, tokenizer_fingerprint
from specedge.rpc.codec import (
    PROTOCOL_VERSION,
    ServerInfo,
    ServerLoad,
    SessionOpened,
    VerifierClient,
    add_verifier_service,
)
from specedge.server.app import BackgroundServer
from specedge.server.health import BusyWindow
from tests.support.models import TARGET_SEED, TINY_VOCAB, tiny_model
from tests.support.observe import async_wait_for, metric
from tests.support.reference import reference_tokens
from tests.support.scripted_edge import channel, open_message
from tests.support.servers import edge_config, edge_generate, start_server, with_edge

PROMPTS = [[1, 2, 3, 4, 5], [200, 17, 93], [7] * 12, [9, 8, 7, 6]]
MAX_TOKENS = 40
# Long enough that a burst of sessions opens between two polls (placement then rests on the
# reports and this edge's own count); short where a test waits for what a poll sees.
SLOW_POLL_S = 5.0
FAST_POLL_S = 0.05


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model(TARGET_SEED)


@pytest.fixture(scope="module")
def references(target: LoadedModel) -> list[list[int]]:
    return [reference_tokens(target, prompt, MAX_TOKENS) for prompt in PROMPTS]


def address(server: BackgroundServer) -> str:
    return f"127.0.0.1:{server.port}"


def edge_sample(edge: Edge, name: str, server: BackgroundServer, **labels: str) -> float:
    """One per-replica sample of the edge's own metrics (0 when absent)."""
    value = edge.metrics.registry.get_sample_value(name, {"replica": address(server), **labels})
    return 0.0 if value is None else value


def health_is(edge: Edge, server: BackgroundServer, state: ReplicaHealth) -> bool:
    name = "specedge_edge_replica_health"
    return edge_sample(edge, name, server, specedge_edge_replica_health=state.value) == 1.0


def opened_on(edge: Edge, server: BackgroundServer) -> int:
    return int(edge_sample(edge, "specedge_edge_replica_sessions_opened_total", server))


async def hold_sessions(
    stack: AsyncExitStack, target: LoadedModel, server: BackgroundServer, count: int
) -> None:
    """`count` sessions opened on `server` by another client and left idle (load)."""
    chan = await stack.enter_async_context(channel(server.port))
    for _ in range(count):
        call = VerifierClient(chan).session()
        await call.send(open_message(target, PROMPTS[0], MAX_TOKENS))
        assert isinstance(await call.receive(), SessionOpened)
        stack.callback(call.cancel)


async def burst(edge: Edge) -> list[list[int]]:
    """One generation per prompt, all at once; their tokens."""
    runs = [edge_generate(edge, prompt, MAX_TOKENS) for prompt in PROMPTS]
    return [tokens for tokens, _ in await asyncio.gather(*runs)]


async def polled(edge: Edge, *servers: BackgroundServer) -> None:
    """Wait for the edge's first poll of each server."""
    await edge.runtime.connection.wait_ready(5.0)
    await async_wait_for(lambda: all(health_is(edge, s, ReplicaHealth.SERVING) for s in servers))


# ---- must show: placement by load, not serving, a replica stopped ----------------------------
def test_a_loaded_replica_gets_fewer_new_sessions(
    target: LoadedModel, references: list[list[int]]
) -> None:
    loaded, idle = start_server(target), start_server(target)

    async def body(edge: Edge) -> list[list[int]]:
        async with AsyncExitStack() as stack:
            await hold_sessions(stack, target, loaded, 4)  # 4 of its 6 slots
            await polled(edge, loaded, idle)
            name = "specedge_edge_replica_active_sessions"
            assert edge_sample(edge, name, loaded) == 4 and edge_sample(edge, name, idle) == 0
            return await burst(edge)

    try:
        config = edge_config([loaded, idle], load_poll_interval=SLOW_POLL_S)
        edge_box: list[Edge] = []
        tokens = asyncio.run(with_edge(config, tiny_model(12), remember(edge_box, body)))
        assert tokens == references
        (edge,) = edge_box
        on_loaded, on_idle = opened_on(edge, loaded), opened_on(edge, idle)
        assert on_loaded + on_idle == len(PROMPTS)
        assert on_loaded < on_idle
        finished = {"outcome": "finished"}
        assert metric(idle.metrics_port, "specedge_server_sessions_total", finished) == on_idle
    finally:
        loaded.stop()
        idle.stop()


def test_a_burst_spreads_over_idle_replicas(
    target: LoadedModel, references: list[list[int]]
) -> None:
    """Between two polls the reports say nothing new: this edge's own count of the sessions
    it opened since spreads a burst."""
    first, second = start_server(target), start_server(target)

    async def body(edge: Edge) -> list[list[int]]:
        await polled(edge, first, second)
        return await burst(edge)

    try:
        config = edge_config([first, second], load_poll_interval=SLOW_POLL_S)
        edge_box: list[Edge] = []
        tokens = asyncio.run(with_edge(config, tiny_model(12), remember(edge_box, body)))
        assert tokens == references
        (edge,) = edge_box
        assert opened_on(edge, first) == opened_on(edge, second) == len(PROMPTS) // 2
    finally:
        first.stop()
        second.stop()


def test_a_not_serving_replica_gets_no_new_sessions(
    target: LoadedModel, references: list[list[int]]
) -> None:
    draining, serving = start_server(target), start_server(target)

    async def body(edge: Edge) -> list[list[int]]:
        await polled(edge, draining, serving)
        await asyncio.to_thread(draining.drain)  # gRPC health NOT_SERVING, refuses sessions
        await async_wait_for(lambda: health_is(edge, draining, ReplicaHealth.NOT_SERVING))
        return await burst(edge)

    try:
        config = edge_config([draining, serving], load_poll_interval=FAST_POLL_S)
        edge_box: list[Edge] = []
        tokens = asyncio.run(with_edge(config, tiny_model(12), remember(edge_box, body)))
        assert tokens == references
        (edge,) = edge_box
        assert opened_on(edge, draining) == 0 and opened_on(edge, serving) == len(PROMPTS)
        # Not even tried: a draining server would have refused the Open.
        refused = {"outcome": "refused"}
        assert metric(draining.metrics_port, "specedge_server_sessions_total", refused) == 0
    finally:
        draining.stop()
        serving.stop()


def test_stopping_a_replica_moves_its_sessions_without_errors(
    target: LoadedModel, references: list[list[int]]
) -> None:
    """Every session pauses after its first tokens; one replica is stopped under them; each
    completes on the other with exactly its reference tokens and no error reaches it."""
    doomed, survivor = start_server(target), start_server(target)
    paused: list[None] = []
    resume = asyncio.Event()

    async def generate(edge: Edge, prompt: list[int]) -> list[int]:
        request = GenerationRequest(list(prompt), SamplingParams(), MAX_TOKENS)
        tokens: list[int] = []
        async with aclosing(edge.runtime.generate(request, GenerationStats())) as rounds:
            async for emitted in rounds:
                if not tokens:
                    assert len(emitted) < MAX_TOKENS  # the stop comes mid-generation
                    paused.append(None)
                    await resume.wait()
                tokens.extend(emitted)
        return tokens

    async def body(edge: Edge) -> list[list[int]]:
        await polled(edge, doomed, survivor)
        runs = asyncio.gather(*(generate(edge, prompt) for prompt in PROMPTS))
        await async_wait_for(lambda: len(paused) == len(PROMPTS))
        on_doomed = metric(doomed.metrics_port, "specedge_server_active_sessions")
        assert on_doomed == opened_on(edge, doomed) == len(PROMPTS) // 2
        await asyncio.to_thread(doomed.stop)
        resume.set()
        return await runs

    try:
        config = edge_config([doomed, survivor], load_poll_interval=SLOW_POLL_S)
        edge_box: list[Edge] = []
        tokens = asyncio.run(with_edge(config, tiny_model(12), remember(edge_box, body)))
        assert tokens == references
        (edge, moved) = edge_box[0], len(PROMPTS) // 2
        assert edge_sample(edge, "specedge_edge_replica_failovers_total", doomed) == moved
        assert edge.metrics.registry.get_sample_value("specedge_edge_failovers_total") == moved
        assert opened_on(edge, survivor) == len(PROMPTS) // 2 + moved
        assert metric(survivor.metrics_port, "specedge_server_emitted_tokens_total") > 0
    finally:
        survivor.stop()


def remember(
    box: list[Edge], body: Callable[[Edge], Awaitable[Any]]
) -> Callable[[Edge], Awaitable[Any]]:
    """`body`, keeping its edge in `box` for checks after the run."""

    async def run(edge: Edge) -> Any:
        box.append(edge)
        return await body(edge)

    return run


# ---- the Load call ------------------------------------------------------------------------------
def test_load_reports_sessions_slots_and_health(target: LoadedModel) -> None:
    server = start_server(target)

    async def body() -> None:
        async with AsyncExitStack() as stack:
            await hold_sessions(stack, target, server, 2)
            async with channel(server.port) as chan:
                load = await VerifierClient(chan).load(timeout=5)
            assert load.active_sessions == 2 and load.max_sessions == 6
            assert load.queued_rounds == 0 and 0.0 <= load.busy_fraction <= 1.0
            connection = ServerConnection(address(server), identity(target))
            try:
                status = await connection.poll(5.0)
                assert status.serving and status.load is not None
                assert status.load.active_sessions == 2 and status.load.max_sessions == 6
                await asyncio.to_thread(server.drain)
                assert not (await connection.poll(5.0)).serving
            finally:
                await connection.close()

    try:
        asyncio.run(body())
    finally:
        server.stop()


def test_a_server_without_load_or_health_counts_as_serving(target: LoadedModel) -> None:
    """A server from before the Load call (and without a health service) is polled as
    serving with no load: placement then counts this edge's sessions alone."""

    async def body() -> None:
        server = grpc.aio.server()

        async def info(context: object) -> ServerInfo:
            fingerprint = tokenizer_fingerprint(target.tokenizer)
            return ServerInfo(PROTOCOL_VERSION, "old", fingerprint, TINY_VOCAB, 16, 6, 256)

        async def session(*args: object) -> Any:
            raise AssertionError("no session expected")
            yield  # a generator

        add_verifier_service(server, info, session)  # no load handler
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        connection = ServerConnection(f"127.0.0.1:{port}", identity(target))
        try:
            status = await connection.poll(5.0)
            assert status.serving and status.load is None
        finally:
            await connection.close()
            await server.stop(0)

    asyncio.run(body())


def test_busy_fraction_spans_the_recent_window() -> None:
    now, busy = [0.0], [0.0]
    window = BusyWindow(lambda: busy[0], window_s=10.0, clock=lambda: now[0])
    assert window.fraction() == 0.0  # one sample: no span yet
    for _ in range(10):  # busy half of each second
        now[0] += 1.0
        busy[0] += 0.5
        assert window.fraction() == pytest.approx(0.5)
    for _ in range(12):  # then idle: the busy part leaves the window
        now[0] += 1.0
        window.fraction()
    assert window.fraction() == 0.0
    now[0] += 1.0
    busy[0] += 2.0  # measured in the thread, a little over the wall time: capped
    assert window.fraction() <= 1.0


# ---- a host name's replicas ---------------------------------------------------------------------
def identity(target: LoadedModel) -> ClientIdentity:
    shape = TreeShape(budget=8, depth=4)
    return ClientIdentity(tokenizer_fingerprint(target.tokenizer), TINY_VOCAB, shape)


def test_a_names_replicas_follow_its_resolution(target: LoadedModel) -> None:
    """Addresses that appear become replicas; one that disappears gets no new sessions while
    its session goes on; a failed resolution keeps the replicas."""
    first, second = start_server(target), start_server(target)
    answers: list[list[str] | OSError] = [[address(first)]]

    async def resolver(name: ServerTarget) -> list[str]:
        assert name == ServerTarget("replicas.example", 7000)
        answer = answers[-1]
        if isinstance(answer, OSError):
            raise answer
        return answer

    def live() -> list[str]:
        return [replica.address for replica in pool.replicas]

    async def open_one() -> RemoteSession:
        session = await pool.open_session(open_message(target, PROMPTS[0], MAX_TOKENS))
        await session.opened()
        return session

    policy = ReplicaPolicy(poll_interval_s=FAST_POLL_S, resolve_interval_s=FAST_POLL_S)
    pool = ServerPool(
        [ServerTarget.parse("dns:///replicas.example:7000")],
        lambda address, _: ServerConnection(address, identity(target)),
        replica_policy=policy,
        resolver=resolver,
    )

    async def body() -> None:
        try:
            held = await open_one()
            assert live() == [address(first)] and held.address == address(first)
            answers.append([address(first), address(second)])
            await async_wait_for(lambda: live() == [address(first), address(second)])
            answers.append([address(second)])
            await async_wait_for(lambda: live() == [address(second)])
            assert pool.metrics.registry.get_sample_value(
                "specedge_edge_replica_sessions_opened_total", {"replica": address(first)}
            ) is None  # fmt: skip
            assert metric(first.metrics_port, "specedge_server_active_sessions") == 1  # held
            answers.append(socket.gaierror("no such name"))
            await asyncio.sleep(5 * FAST_POLL_S)
            assert live() == [address(second)]
            sessions = [await open_one() for _ in range(2)]
            assert [session.address for session in sessions] == [address(second)] * 2
            for session in [held, *sessions]:
                session.cancel()
        finally:
            await pool.close()

    try:
        asyncio.run(body())
    finally:
        first.stop()
        second.stop()


# ---- the pure parts -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "host", "port", "is_name"),
    [
        ("10.0.0.7:50051", "10.0.0.7", 50051, False),
        (" [::1]:8 ", "::1", 8, False),
        ("verifier:50051", "verifier", 50051, True),
        ("dns:///verifier.svc.cluster.local:50051", "verifier.svc.cluster.local", 50051, True),
        ("dns:verifier:1", "verifier", 1, True),
    ],
)
def test_targets_parse(text: str, host: str, port: int, is_name: bool) -> None:
    target = ServerTarget.parse(text)
    assert (target.host, target.port, target.is_name) == (host, port, is_name)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("verifier", "not HOST:PORT"),
        ("verifier:0", "not HOST:PORT"),
        ("::1:8", "IPv6 address in brackets"),
        ("dns://8.8.8.8/verifier:1", "names a DNS server"),
    ],
)
def test_bad_targets_say_why(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ServerTarget.parse(text)


def test_a_name_resolves_to_one_family() -> None:
    """localhost has an IPv4 and often an IPv6 address: one server, one replica."""
    assert asyncio.run(resolve(ServerTarget("localhost", 9))) == ["127.0.0.1:9"]
    assert asyncio.run(resolve(ServerTarget("::1", 9))) == ["[::1]:9"]


def fake_replica(name: str, health: ReplicaHealth, load: ServerLoad | None = None) -> Replica:
    connection = cast(ServerConnection, type("Connection", (), {"address": name})())
    return Replica(connection, ServerTarget(name, 1), health=health, load=load)


def test_placement_prefers_serving_replicas_by_score() -> None:
    def load(sessions: int, busy: float = 0.0) -> ServerLoad:
        return ServerLoad(sessions, 0, busy, max_sessions=8)

    busy = fake_replica("busy", ReplicaHealth.SERVING, load(2, busy=0.9))  # 0.25 + 0.9
    full = fake_replica("full", ReplicaHealth.SERVING, load(8))  # 1.0
    light = fake_replica("light", ReplicaHealth.SERVING, load(1))  # 0.125
    draining = fake_replica("draining", ReplicaHealth.NOT_SERVING, load(0))
    gone = fake_replica("gone", ReplicaHealth.UNREACHABLE)
    retired = fake_replica("retired", ReplicaHealth.SERVING, load(0))
    retired.retired = True
    order = placement_order([draining, gone, busy, full, light, retired], turn=0)
    assert [replica.address for replica in order] == ["light", "full", "busy", "gone", "draining"]
    light.opened = 8  # sessions opened here since its report: 9/8
    assert placement_order([light, full], turn=0)[0] is full
    light.counted = 8  # the next report includes them
    assert placement_order([light, full], turn=0)[0] is light


def test_replicas_alike_take_turns() -> None:
    replicas = [fake_replica(name, ReplicaHealth.UNKNOWN) for name in "abc"]
    firsts = [placement_order(replicas, turn)[0].address for turn in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
