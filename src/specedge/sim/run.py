"""`specedge simulate`: every run of the grid as a discrete-event simulation (SimPy), written in
`specedge bench`'s results schema, report and plots (`bench.results`, `bench.report`,
`bench.plots`), so a simulated run and a measured one read the same way.

A run builds M server replicas (`sim.server`), the edges or users of its system
(`sim.edge`; for the server-only systems, users whose requests reach the server's own API over
their link), and the arrival process:

- closed: each edge sends `warmup_per_edge` unmeasured requests, then (after every edge is
  done, as the benchmark's warm-up is) `requests_per_edge` measured ones, back to back;
- poisson: each edge's requests arrive at `rate` per second for `duration_s` seconds;
- bursts: every `burst_interval_s`, `burst_size` requests arrive at every edge at once;

open-loop arrivals before `warmup_s` are not measured. The metrics are the benchmark's own
(`bench.metrics.compute_run_metrics`) over the measured requests, the server's busy seconds
summed over replicas, and, with several replicas, the servers' price times their number.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import simpy
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from specedge.bench.metrics import (
    RequestRecord,
    ServerUsage,
    compute_run_metrics,
    engaged_times,
    run_window,
)
from specedge.bench.report import write_report
from specedge.bench.results import (
    EDGE_SYSTEMS,
    SERVER_AR,
    SERVER_SPEC,
    SPECEDGE_NO_PROACTIVE,
    BenchMeta,
    RunResult,
    RunSpec,
)
from specedge.sim.acceptance import AcceptanceModel, RequestSample
from specedge.sim.config import SimConfig
from specedge.sim.devices import Device, StepBatcher
from specedge.sim.edge import EdgeSettings, SimEdge, edge_request
from specedge.sim.network import DOWN, REPLY_BYTES, REPLY_TOKEN_BYTES, UP, Link, LinkSpec
from specedge.sim.profile import DeviceProfile
from specedge.sim.server import SimExecutor, SimServer, Verdict, least_loaded, local_session

MAX_CHUNK_RECORDS = 20_000  # requests whose chunk times are kept (requests.jsonl stays small)


@dataclass
class _World:
    env: simpy.Environment
    config: SimConfig
    spec: RunSpec
    servers: list[SimServer]
    server_profile: DeviceProfile
    edge_profile: DeviceProfile
    acceptance: AcceptanceModel | None
    rng: random.Random
    edges: list[SimEdge]
    users: list[Link]  # server-only systems: each user's link to the server
    keep_chunks: bool

    def sample(self) -> RequestSample:
        if self.acceptance is None:  # server-ar alone: any request of max tokens
            return RequestSample(64, self.config.max_tokens, 0.0, 0.0)
        return self.acceptance.draw(self.spec.temperature, self.rng, self.spec.system)


def simulate_run(
    spec: RunSpec,
    config: SimConfig,
    server_profile: DeviceProfile,
    edge_profile: DeviceProfile,
    acceptance: AcceptanceModel | None,
    on_request: Callable[[], None] | None = None,
) -> RunResult:
    """One point of the grid (see the module docstring)."""
    env = simpy.Environment()
    rng = random.Random(
        f"{config.seed}/{spec.system}/{spec.clients}/{spec.rtt_ms}/{spec.temperature}"
    )
    servers = []
    for index in range(config.servers):
        device = Device(env, rng, config.noise)
        executor = SimExecutor(
            env,
            device,
            server_profile,
            config.policy,
            rng,
            host_s_per_token=config.host_costs.get(spec.system, 0.0),
        )
        server = SimServer(env, executor, f"server{index}")
        if spec.system == SERVER_SPEC:  # drafting on the server's device, between batches
            server.drafting = StepBatcher(
                device, server_profile.draft_step_cost, executor.draft_busy
            )
        servers.append(server)
    link_spec = LinkSpec(
        spec.rtt_ms / 1000, spec.jitter_ms / 1000, config.loss, config.rto_ms / 1000
    )
    edge_count = (
        0
        if spec.system not in EDGE_SYSTEMS
        else 1
        if config.edge_mode == "shared"
        else spec.clients
    )
    edges = [
        SimEdge(env, Device(env, rng, config.noise), edge_profile, link_spec)
        for _ in range(edge_count)
    ]
    users = [] if edge_count else [Link(env, link_spec, rng) for _ in range(spec.clients)]
    world = _World(
        env,
        config,
        spec,
        servers,
        server_profile,
        edge_profile,
        acceptance,
        rng,
        edges,
        users,
        keep_chunks=spec.clients * config.requests_per_edge <= MAX_CHUNK_RECORDS,
    )
    measured: list[RequestRecord] = []
    window: dict[str, float] = {}

    def sink(record: RequestRecord) -> None:
        measured.append(record)
        if on_request is not None:
            on_request()

    if config.arrival == "closed":
        env.process(_closed_loop(world, sink, window))
    else:
        env.process(_open_loop(world, sink, window))
    env.run()
    return _result(world, measured, window)


def _request(
    world: _World, client: int, sink: Callable[[RequestRecord], None]
) -> Generator[Any, Any, None]:
    """One request of user `client`, through its edge or to the server's API."""
    config, spec = world.config, world.spec
    sample = world.sample()
    if spec.system in EDGE_SYSTEMS:
        edge = world.edges[client % len(world.edges)]
        settings = EdgeSettings(
            budget=config.budget_cap,
            adaptive=config.adaptive,
            depth=config.depth,
            proactive=spec.system != SPECEDGE_NO_PROACTIVE,
            proactive_depth=config.proactive_depth,
            server_decoding=config.server_decoding,
            max_tokens=config.max_tokens,
        )
        yield from edge_request(
            edge, world.servers, sample, spec.temperature, settings, client, sink, world.keep_chunks
        )
        return
    yield from _api_request(world, world.users[client], sample, client, sink)


def _api_request(
    world: _World,
    link: Link,
    sample: RequestSample,
    client: int,
    sink: Callable[[RequestRecord], None],
) -> Generator[Any, Any, None]:
    """A server-only system's request: up the user's link, the server's own round loop, each
    round's tokens down the link."""
    env, config = world.env, world.config
    start = env.now
    arrived = env.event()
    link.send(UP, lambda: arrived.succeed(), REPLY_BYTES + 4 * sample.prompt_tokens)
    yield arrived
    server = least_loaded(world.servers)
    chunks: list[float] = []
    counts = {"rounds": 0, "accepted": 0, "tokens": 0}

    def on_round(verdict: Verdict) -> None:
        counts["rounds"] += 1
        counts["accepted"] += verdict.accepted
        counts["tokens"] += verdict.emitted
        if verdict.emitted:
            size = REPLY_BYTES + REPLY_TOKEN_BYTES * verdict.emitted
            chunks.append(link.send(DOWN, lambda: None, size))

    length = min(sample.tokens, config.max_tokens)
    yield from local_session(
        server,
        sample,
        length,
        config.depth,
        server.drafting,
        world.server_profile,
        config.budget_cap,
        config.adaptive,
        on_round,
    )
    end = chunks[-1] if chunks else env.now
    yield env.timeout(max(0.0, end - env.now))
    sink(
        RequestRecord(
            client=client,
            prompt_id=sample.category or "simulated",
            category=sample.category,
            start_s=start,
            first_token_s=chunks[0] if chunks else None,
            end_s=end,
            tokens=counts["tokens"],
            prompt_tokens=sample.prompt_tokens,
            rounds=counts["rounds"],
            accepted=counts["accepted"],
            finish_reason="length" if counts["tokens"] >= sample.tokens else "stop",
            chunk_times_s=tuple(chunks) if world.keep_chunks else (),
        )
    )


def _closed_loop(
    world: _World, sink: Callable[[RequestRecord], None], window: dict[str, float]
) -> Generator[Any, Any, None]:
    env, config = world.env, world.config

    def client(number: int, count: int, to: Callable[[RequestRecord], None]) -> Generator:
        for _ in range(count):
            yield from _request(world, number, to)

    clients = range(world.spec.clients)
    if config.warmup_per_edge:
        yield env.all_of([env.process(client(i, config.warmup_per_edge, _drop)) for i in clients])
    window["busy_start"] = _busy(world)
    yield env.all_of([env.process(client(i, config.requests_per_edge, sink)) for i in clients])
    window["busy_end"] = _busy(world)


def _open_loop(
    world: _World, sink: Callable[[RequestRecord], None], window: dict[str, float]
) -> Generator[Any, Any, None]:
    env, config, rng = world.env, world.config, world.rng
    requests: list[simpy.Process] = []

    def arrive(number: int) -> None:
        measured = env.now >= config.warmup_s
        requests.append(env.process(_request(world, number, sink if measured else _drop)))

    def poisson(number: int) -> Generator:
        while True:
            yield env.timeout(rng.expovariate(config.rate))
            if env.now >= config.duration_s:
                return
            arrive(number)

    def bursts() -> Generator:
        while env.now < config.duration_s:
            for number in range(world.spec.clients):
                for _ in range(config.burst_size):
                    arrive(number)
            yield env.timeout(config.burst_interval_s)

    if config.arrival == "poisson":
        arrivals = [env.process(poisson(i)) for i in range(world.spec.clients)]
    else:
        arrivals = [env.process(bursts())]
    yield env.timeout(config.warmup_s)
    window["busy_start"] = _busy(world)
    yield env.all_of(arrivals)
    yield env.all_of(list(requests))
    window["busy_end"] = _busy(world)


def _drop(record: RequestRecord) -> None:
    """Where unmeasured requests' records go."""


def _busy(world: _World) -> float:
    return sum(server.executor.device.busy_s for server in world.servers)


def _result(world: _World, records: list[RequestRecord], window: dict[str, float]) -> RunResult:
    config, spec = world.config, world.spec
    records = _rebase(records)
    if world.edges:
        shared = config.edge_mode == "shared"
        engaged = (run_window(records),) if shared else engaged_times(records)
        wire = sum(edge.wire_bytes for edge in world.edges)
    else:
        engaged, wire = (), sum(link.bytes for link in world.users)
    usage = ServerUsage(
        wall_s=run_window(records),
        busy_s=window.get("busy_end", 0.0) - window.get("busy_start", 0.0),
        edge_engaged_s=engaged,
        wire_bytes=wire,
    )
    prices = config.price_table
    prices = replace(prices, server_per_hour=prices.server_per_hour * config.servers)
    metrics = compute_run_metrics(records, usage, prices)
    notes = f"simulated, {config.servers} servers" if config.servers > 1 else "simulated"
    return RunResult(spec, metrics, tuple(records), notes)


def _rebase(records: list[RequestRecord]) -> list[RequestRecord]:
    """Times from the run's first request start (`bench.runner.rebase`'s convention)."""
    from specedge.bench.runner import rebase

    return rebase(records)


# ---- the grid ------------------------------------------------------------------------------------


def plan(config: SimConfig) -> list[RunSpec]:
    specs = []
    for system in config.systems:
        drafts = system != SERVER_AR
        for temperature in config.temperatures:
            for edges in config.edges:
                for rtt in config.rtt_ms:
                    specs.append(
                        RunSpec(
                            system=system,
                            clients=edges,
                            rtt_ms=rtt,
                            temperature=temperature,
                            jitter_ms=config.jitter_ms if rtt > 0 else 0.0,
                            depth=config.depth if drafts else None,
                            budget=config.budget if drafts else None,
                        )
                    )
    return specs


def run_simulation(config: SimConfig, console: Console | None = None) -> Path:
    """Simulate the whole grid; returns the path of report.md."""
    import datetime
    import time

    console = console or Console(stderr=True)
    started = time.monotonic()
    server_profile = DeviceProfile.load(Path(config.profile))
    edge_profile = (
        DeviceProfile.load(Path(config.edge_profile)) if config.edge_profile else server_profile
    )
    acceptance = None
    if config.acceptance is not None:
        acceptance = AcceptanceModel.from_bench(Path(config.acceptance), config.depth)
    specs = plan(config)
    meta = BenchMeta(
        config=_summary(config, server_profile, edge_profile, acceptance),
        machine={"simulated": "yes (specedge simulate)", **server_profile.machine},
        placement=[f"{config.servers} server replica(s), edges: {config.edge_mode}"],
        notes=list(server_profile.notes),
        started_at=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    runs: list[RunResult] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        overall = progress.add_task("simulated runs", total=len(specs))
        for spec in specs:
            total = _measured_requests(config, spec)
            task = progress.add_task(
                f"{spec.system}: {spec.clients} edges, {spec.rtt_ms:g} ms, T={spec.temperature:g}",
                total=total,
            )
            runs.append(
                simulate_run(
                    spec,
                    config,
                    server_profile,
                    edge_profile,
                    acceptance,
                    on_request=partial(progress.advance, task),
                )
            )
            progress.remove_task(task)
            progress.advance(overall)
    meta.duration_s = time.monotonic() - started
    return write_report(Path(config.out), runs, meta)


def _measured_requests(config: SimConfig, spec: RunSpec) -> int | None:
    if config.arrival == "closed":
        return spec.clients * config.requests_per_edge
    return None


def _summary(
    config: SimConfig,
    server: DeviceProfile,
    edge: DeviceProfile,
    acceptance: AcceptanceModel | None,
) -> dict[str, Any]:
    arrival = {
        "closed": f"closed loop, {config.warmup_per_edge} warm-up + {config.requests_per_edge} "
        "measured requests per edge",
        "poisson": f"Poisson, {config.rate:g}/s per edge for {config.duration_s:g} s",
        "bursts": f"bursts of {config.burst_size} per edge every {config.burst_interval_s:g} s "
        f"for {config.duration_s:g} s",
    }[config.arrival]
    return {
        "simulated": "yes: discrete-event simulation from device profiles (specedge simulate)",
        "server profile": f"{config.profile} ({server.device}{_estimate(server)})",
        "edge profile": f"{config.edge_profile or config.profile} ({edge.device})",
        "acceptance from": acceptance.source if acceptance else "none",
        "server host ms per token": config.host_ms_per_token or "none",
        "target": server.target,
        "draft": edge.draft,
        "systems": ", ".join(config.systems),
        "edges": ", ".join(map(str, config.edges)),
        "server replicas": config.servers,
        "RTTs (ms)": ", ".join(f"{r:g}" for r in config.rtt_ms),
        "jitter (ms)": f"{config.jitter_ms:g}",
        "loss": f"{config.loss:g} (resent after {config.rto_ms:g} ms)",
        "temperatures": ", ".join(f"{t:g}" for t in config.temperatures),
        "arrivals": arrival,
        "max tokens per request": config.max_tokens,
        "draft tree": f"budget {config.budget}, depth {config.depth}, proactive {config.proactive}",
        "prices ($/h)": config.prices,
    }


def _estimate(profile: DeviceProfile) -> str:
    return ", an estimate from published figures" if profile.estimate else ""
