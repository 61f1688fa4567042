"""Soak test (issue 13, must-show 3): real processes under streaming load, a fault about every
minute, every request checked against its greedy reference.

Deployment (`soak_cluster`), all on loopback: two `specedge serve` processes (A and B, the
target in float32) each behind a `DelayProxy` of this process; `--edges` `specedge edge`
processes listing both proxies (`--server A,B`: a broken session fails over); `--clients`
streaming clients here (`soak_client`: httpx, OpenAI's chat API, or completions for a model
with no chat template), client i on edge i mod edges, each sending greedy requests back to
back. Placement is `Placement.plan()`'s: the servers on the first core; the edges, the
clients and the proxies on the others; torch with one thread everywhere.

Faults, one every `--fault-every` seconds, in rotation:

- server-kill: SIGKILL server A (its sessions fail over to B), restart it on its ports;
- edge-kill: SIGKILL edge 0 (its clients' streams break: the one fault a client may see),
  restart it; its clients wait for it meanwhile;
- partition: the link to the server with more sessions is cut, every other time as a black
  hole (`DelayProxy.partition`) for `--partition` seconds, then healed (its sessions time out
  after `--reply-timeout` and fail over), else by resetting every connection on it;
- client-disconnect: half the clients hang up mid-stream on their next request;
- slow-reader: half the clients read their next stream slowly, with a long pause in it.

Server B and edge 1 are never killed: their memory carries the growth check. Memory (RSS
from /proc) is sampled every `--sample-every` seconds; a process that dies without a fault
is recorded as a crash and restarted. After the clients stop, every server and edge must have
no open session, and every server must give all its slots at once (the slot probe).
`soak_report` judges and writes report.md, results.json and the memory plot.

    python -m benchmarks.soak --clients 8 --duration 1260   # the committed run (~30 minutes)
    python -m benchmarks.soak --duration 60 --out /tmp/soak  # a short run while developing
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.soak_client import NORMAL, Behaviour, SoakPrompt, probe_slots, send_request
from benchmarks.soak_cluster import (
    EDGE_SESSIONS,
    SERVER_QUEUE_TIMEOUT_S,
    SERVER_SESSIONS,
    Cluster,
    ClusterSpec,
    Role,
    count_failovers,
    deployed,
    gauge,
    rss_bytes,
    sessions_by_outcome,
    settle,
)
from benchmarks.soak_report import FaultRecord, MemorySample, Reference, SoakRequest, write_results
from specedge.bench.processes import Placement
from specedge.bench.prompts import load_prompts, sample_prompts

RESULTS = Path(__file__).resolve().parent / "results" / "soak"
FAULT_KINDS = ("server-kill", "edge-kill", "partition", "client-disconnect", "slow-reader")
KILLED_SERVER, KEPT_SERVER = "A", "B"
KILLED_EDGE = 0
REQUEST_TIMEOUT_S = 120.0  # a read this long without a byte (failover takes seconds)
SETTLE_TIMEOUT_S = 90.0  # for every session to close after the clients stop
PROBE_MAX_TOKENS = 400  # the probe's streams outlive the queue timeout
DISCONNECT = Behaviour("disconnect", disconnect_after=3)
SLOW = Behaviour("slow", read_delay_s=0.15, pause_after=4, pause_s=5.0)


@dataclass(frozen=True)
class SoakConfig:
    cluster: ClusterSpec
    duration_s: float
    fault_every_s: float
    faults: tuple[str, ...] = FAULT_KINDS
    warmup_s: float = 180.0
    sample_every_s: float = 5.0
    partition_s: float = 15.0
    down_s: float = 3.0  # a killed process stays down this long before its restart
    prompts: str = "specbench"
    num_prompts: int = 16
    max_prompt_chars: int = 300  # short prompts: the soak is about faults, not prefill
    max_tokens: int = 64
    out_dir: Path = RESULTS
    seed: int = 0
    tested_commit: str = ""
    rewrite: bool = False  # only judge `out_dir`'s results.json again and rewrite the report

    def __post_init__(self) -> None:
        unknown = sorted(set(self.faults) - set(FAULT_KINDS))
        if unknown:
            raise SystemExit(f"unknown faults {unknown}; choose from {', '.join(FAULT_KINDS)}")
        if self.cluster.edges < 2 or self.cluster.clients < self.cluster.edges:
            raise SystemExit("--edges must be at least 2 (one is never killed), --clients >= it")


# ---- prompts and their references --------------------------------------------------------------
def prepare_prompts(config: SoakConfig) -> tuple[list[SoakPrompt], list[Reference]]:
    """The soak's prompts (short ones of `config.prompts`, through the chat template when the
    target has one) and each one's greedy answer: autoregressive, float32, in this process."""
    import torch

    from specedge.core.local import LocalGenerator
    from specedge.core.sampling import SamplingParams
    from specedge.model.loader import load_model
    from specedge.text import encode_prompt

    torch.set_num_threads(1)
    target = load_model(config.cluster.target, "cpu", torch.float32)
    chat = bool(getattr(target.tokenizer, "chat_template", None))
    short = [p for p in load_prompts(config.prompts) if len(p.text) <= config.max_prompt_chars]
    prompts = [SoakPrompt(p.text, chat) for p in sample_prompts(short, config.num_prompts)]
    generator = LocalGenerator(target)
    references = []
    for prompt in prompts:
        ids = encode_prompt(target.tokenizer, prompt.text, chat=prompt.chat)
        out = generator.generate(ids, SamplingParams(), config.max_tokens, target.stop_token_ids)
        text = target.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        references.append(Reference(text, len(out.token_ids), out.finish_reason))
    return prompts, references


# ---- the run's shared state and its clients ----------------------------------------------------
@dataclass
class SoakState:
    """What the clients, the faults and the sampler share (one event loop)."""

    config: SoakConfig
    cluster: Cluster
    prompts: list[SoakPrompt]
    started: float = field(default_factory=time.monotonic)
    stopping: bool = False
    requests: list[SoakRequest] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    samples: list[MemorySample] = field(default_factory=list)
    crashes: list[dict[str, Any]] = field(default_factory=list)
    armed: dict[int, Behaviour] = field(default_factory=dict)  # client -> its next request's
    in_armed: set[int] = field(default_factory=set)  # clients running an armed request
    edge_up: list[asyncio.Event] = field(default_factory=list)
    recoveries: set[asyncio.Task[None]] = field(default_factory=set)

    def now(self) -> float:
        """Seconds since the clients started."""
        return time.monotonic() - self.started


async def client_loop(state: SoakState, number: int, http: httpx.AsyncClient) -> None:
    """Requests back to back on this client's edge (waiting while it is down), random
    prompts, until the soak stops."""
    edge = number % len(state.cluster.edges)
    rng = random.Random(state.config.seed * 1000 + number)
    while not state.stopping:
        await state.edge_up[edge].wait()
        behaviour = state.armed.pop(number, NORMAL)
        if behaviour is not NORMAL:
            state.in_armed.add(number)
        prompt = rng.randrange(len(state.prompts))
        start = state.now()
        url, max_tokens = state.cluster.edges[edge].url, state.config.max_tokens
        received = await send_request(http, url, state.prompts[prompt], max_tokens, behaviour)
        first = received.first_token_at
        state.requests.append(
            SoakRequest(
                client=number, edge=edge, prompt=prompt, behaviour=behaviour.name,
                start_s=start, end_s=state.now(),
                first_token_s=None if first is None else first - state.started,
                text=received.text, completion_tokens=received.completion_tokens,
                finish_reason=received.finish_reason, disconnected=received.disconnected,
                error_kind=received.error_kind, error=received.error,
            )
        )  # fmt: skip
        state.in_armed.discard(number)


# ---- faults ------------------------------------------------------------------------------------
async def _restart(state: SoakState, role: Role) -> None:
    await asyncio.to_thread(role.launch)
    await asyncio.to_thread(role.wait_ready, state.config.cluster.startup_timeout_s)


async def server_kill(state: SoakState) -> FaultRecord:
    role = state.cluster.servers[KILLED_SERVER]
    async with role.lock:
        start = state.now()
        sessions = await gauge(role, SERVER_SESSIONS)
        await asyncio.to_thread(role.kill)
        await asyncio.sleep(state.config.down_s)
        await _restart(state, role)
    detail = f"SIGKILL with {sessions} sessions open, restarted after {state.config.down_s:g} s"
    return FaultRecord("server-kill", role.name, start, state.now(), detail)


async def edge_kill(state: SoakState) -> FaultRecord:
    role = state.cluster.edges[KILLED_EDGE]
    async with role.lock:
        start = state.now()
        state.edge_up[KILLED_EDGE].clear()
        sessions = await gauge(role, EDGE_SESSIONS)
        await asyncio.to_thread(role.kill)
        await asyncio.sleep(state.config.down_s)
        await _restart(state, role)
        state.edge_up[KILLED_EDGE].set()
    detail = (
        f"SIGKILL with {sessions} requests in flight, restarted after {state.config.down_s:g} s"
    )
    return FaultRecord("edge-kill", role.name, start, state.now(), detail, edge=KILLED_EDGE)


async def partition(state: SoakState) -> FaultRecord:
    """Cut the link to the server with more sessions: every other time a black hole for
    `partition_s` (sessions time out and fail over; healing closes what lived through it),
    else a reset of every connection on it (a middlebox restart: they fail over at once)."""
    start = state.now()
    servers = state.cluster.servers
    sessions = {name: await gauge(role, SERVER_SESSIONS) or 0 for name, role in servers.items()}
    name = max(sessions, key=lambda server: sessions[server])
    proxy = state.cluster.proxies[name]
    dropped = proxy.counters.dropped_bytes
    black_hole = sum(fault.kind == "partition" for fault in state.faults) % 2 == 0
    if black_hole:
        await asyncio.to_thread(proxy.partition)
        await asyncio.sleep(state.config.partition_s)
        await asyncio.to_thread(proxy.heal)
        how = (
            f"black hole for {state.config.partition_s:g} s, "
            f"{proxy.counters.dropped_bytes - dropped} bytes dropped"
        )
    else:
        await asyncio.to_thread(proxy.drop_connections)
        how = "every connection reset"
    detail = f"{sessions[name]} sessions open on server {name}; {how}"
    return FaultRecord("partition", f"link to server {name}", start, state.now(), detail)


def client_fault(kind: str, behaviour: Behaviour) -> Callable[[SoakState], Awaitable[FaultRecord]]:
    """Half the clients (the other half each time) read their next request as `behaviour`
    says; recovered when those requests have ended."""

    async def inject(state: SoakState) -> FaultRecord:
        start = state.now()
        clients = state.config.cluster.clients
        chosen = [(len(state.faults) + 2 * i) % clients for i in range(max(1, clients // 2))]
        for client in chosen:
            state.armed[client] = behaviour
        deadline = start + state.config.fault_every_s
        while (state.in_armed or set(chosen) & set(state.armed)) and state.now() < deadline:
            await asyncio.sleep(0.2)
        for client in chosen:
            state.armed.pop(client, None)
        target = "clients " + ",".join(map(str, sorted(chosen)))
        return FaultRecord(kind, target, start, state.now(), _describe(behaviour))

    return inject


def _describe(behaviour: Behaviour) -> str:
    if behaviour.disconnect_after is not None:
        return f"each hangs up after {behaviour.disconnect_after} chunks of its next stream"
    return (
        f"each reads its next stream with {behaviour.read_delay_s:g} s after every chunk and a "
        f"{behaviour.pause_s:g} s pause after chunk {behaviour.pause_after}"
    )


FAULTS: dict[str, Callable[[SoakState], Awaitable[FaultRecord]]] = {
    "server-kill": server_kill,
    "edge-kill": edge_kill,
    "partition": partition,
    "client-disconnect": client_fault("client-disconnect", DISCONNECT),
    "slow-reader": client_fault("slow-reader", SLOW),
}


async def inject_faults(state: SoakState) -> None:
    """One fault every `fault_every_s` (or right after the previous one, if it took longer),
    in rotation; none starts in the second half of the last interval, so that each recovers
    before the clients stop."""
    kinds = itertools.cycle(state.config.faults)
    due = state.config.fault_every_s
    while due <= state.config.duration_s - state.config.fault_every_s / 2:
        await asyncio.sleep(max(0.0, due - state.now()))
        state.faults.append(await FAULTS[next(kinds)](state))
        due += state.config.fault_every_s


# ---- memory and crashes ------------------------------------------------------------------------
async def sample_memory(state: SoakState) -> None:
    """RSS of every live process (and of this one) every `sample_every_s`; a process that
    died without a fault is recorded as a crash and restarted."""
    while True:
        now = state.now()
        live = [(role.name, role.pid) for role in state.cluster.roles]
        for name, pid in [*live, ("soak driver", os.getpid())]:
            rss = None if pid is None else rss_bytes(pid)
            if pid is not None and rss is not None:
                state.samples.append(MemorySample(now, name, pid, rss))
        for role in state.cluster.roles:
            if role.crashed() and not role.lock.locked():
                task = asyncio.create_task(_recover(state, role))
                state.recoveries.add(task)
                task.add_done_callback(state.recoveries.discard)
        await asyncio.sleep(state.config.sample_every_s)


async def _recover(state: SoakState, role: Role) -> None:
    async with role.lock:
        if not role.crashed():
            return
        assert role.process is not None
        state.crashes.append({"process": role.name, "at_s": state.now(),
                              "returncode": role.process.process.returncode,
                              "log_tail": role.process.log_tail(30)})  # fmt: skip
        await _restart(state, role)


# ---- one soak ----------------------------------------------------------------------------------
async def drive(state: SoakState) -> dict[str, Any]:
    """Clients, faults and the memory sampler for `duration_s`; then, once every session has
    ended, the slot check of every server and edge."""
    config = state.config
    state.edge_up = [asyncio.Event() for _ in state.cluster.edges]
    for event in state.edge_up:
        event.set()
    state.started = time.monotonic()
    sampler = asyncio.create_task(sample_memory(state))
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=5.0)
    limits = httpx.Limits(max_connections=config.cluster.clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        clients = [asyncio.create_task(client_loop(state, number, http))
                   for number in range(config.cluster.clients)]  # fmt: skip
        injector = asyncio.create_task(inject_faults(state))
        await asyncio.sleep(config.duration_s)
        await injector
        state.stopping = True
        await asyncio.gather(*clients)
    sampler.cancel()  # memory counts under load only (the slot probe adds sessions)
    gauges = await settle(state.cluster, SETTLE_TIMEOUT_S)
    slots: dict[str, Any] = {}
    for name, role in state.cluster.servers.items():
        held = await probe_slots(state.cluster.api_urls[name], config.cluster.server_max_sessions,
                                 state.prompts[0], PROBE_MAX_TOKENS,
                                 timeout_s=SERVER_QUEUE_TIMEOUT_S + 60)  # fmt: skip
        slots[role.name] = {
            "open_sessions": gauges[role.name],
            "sessions_by_outcome": await asyncio.to_thread(sessions_by_outcome, role),
            "probe": {"held": held, "slots": config.cluster.server_max_sessions},
        }
    for role in state.cluster.edges:
        slots[role.name] = {"open_sessions": gauges[role.name]}
    return slots


def run_soak(config: SoakConfig, command: str) -> bool:
    """Deploy, drive, judge, write the report; True unless a check failed."""
    placement = Placement.plan()
    placement.pin_this_process()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_before = os.getloadavg()[0]
    with deployed(config.cluster, placement, config.out_dir / "logs") as cluster:
        prompts, references = prepare_prompts(config)  # while the servers and edges load
        for role in cluster.roles:
            role.wait_ready(config.cluster.startup_timeout_s)
        state = SoakState(config, cluster, prompts)
        slots = asyncio.run(drive(state))
    results = {
        "setup": _setup(config, command, started, placement, load_before),
        "references": [asdict(reference) for reference in references],
        "requests": [asdict(request) for request in state.requests],
        "faults": [asdict(fault) for fault in state.faults],
        "memory": [[s.t_s, s.process, s.pid, s.rss_bytes] for s in state.samples],
        "slots": slots,
        "crashes": state.crashes,
        "failovers": count_failovers(config.out_dir / "logs"),
    }
    verdicts = write_results(results, config.out_dir)
    return all(check.passed is not False for check in verdicts)


def _setup(
    config: SoakConfig, command: str, started: str, placement: Placement, load_before: float
) -> dict[str, Any]:
    spec = config.cluster
    long_lived = [f"server {KEPT_SERVER}"]
    long_lived += [f"edge {n}" for n in range(spec.edges) if n != KILLED_EDGE]
    return {
        "command": command, "started": started, "commit": config.tested_commit or _commit(),
        **asdict(spec), "duration_s": config.duration_s, "fault_every_s": config.fault_every_s,
        "faults": list(config.faults), "warmup_s": config.warmup_s,
        "partition_s": config.partition_s, "down_s": config.down_s,
        "max_tokens": config.max_tokens, "prompts": config.num_prompts,
        "long_lived": long_lived, "placement": placement.describe(),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, shared with other work: load "
                   f"average {load_before:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
    }  # fmt: skip


def _commit() -> str:
    command = ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"]
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (pass --tested-commit)"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


# ---- command line ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> SoakConfig:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0]
    )
    add = parser.add_argument
    add("--duration", type=float, default=1260.0, help="seconds of load (default 1260)")
    add("--clients", type=int, default=8)
    add("--edges", type=int, default=2)
    add("--fault-every", type=float, help="seconds between faults (default 60, or duration/6)")
    add("--faults", default=",".join(FAULT_KINDS), help="comma-separated, in rotation")
    add("--warmup", type=float, help="seconds before memory counts (default 180, or duration/4)")
    add("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    add("--partition", type=float, help="seconds of a partition (default 15, or interval/4)")
    add("--down", type=float, default=3.0, help="seconds a killed process stays down")
    add("--model", default="smollm2-135m", help="the servers' target (float32)")
    add("--draft", default="smollm2-135m-draft", help="the edges' draft")
    add("--prompts", default="specbench", help="prompt set or JSON Lines file")
    add("--num-prompts", type=int, default=16)
    add("--max-tokens", type=int, default=64)
    add("--rtt-ms", type=float, default=10.0, help="round trip of the WAN proxies")
    add("--reply-timeout", type=float, default=10.0, help="the edges' --reply-timeout")
    add("--failover-timeout", type=float, default=20.0, help="the edges' --failover-timeout")
    add("--startup-timeout", type=float, default=240.0)
    add("--out", type=Path, default=RESULTS)
    add("--seed", type=int, default=0)
    add("--tested-commit", default="", help="the commit, for a run from a source snapshot")
    add("--rewrite", action="store_true", help="judge --out's results.json again, rewrite")
    args = parser.parse_args(argv)
    fault_every = args.fault_every or min(60.0, args.duration / 6)
    cluster = ClusterSpec(
        target=args.model, draft=args.draft, clients=args.clients, edges=args.edges,
        rtt_ms=args.rtt_ms, reply_timeout_s=args.reply_timeout,
        failover_timeout_s=args.failover_timeout, startup_timeout_s=args.startup_timeout,
    )  # fmt: skip
    return SoakConfig(
        cluster=cluster, duration_s=args.duration, fault_every_s=fault_every,
        faults=tuple(kind for kind in args.faults.split(",") if kind),
        warmup_s=args.warmup if args.warmup is not None else min(180.0, args.duration / 4),
        sample_every_s=args.sample_every,
        partition_s=args.partition or min(15.0, fault_every / 4), down_s=args.down,
        prompts=args.prompts, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
        out_dir=args.out, seed=args.seed, tested_commit=args.tested_commit,
        rewrite=args.rewrite,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_args(argv)
    if config.rewrite:
        results = json.loads((config.out_dir / "results.json").read_text())
        results.setdefault("failovers", count_failovers(config.out_dir / "logs"))
        passed = all(check.passed is not False for check in write_results(results, config.out_dir))
    else:
        passed = run_soak(config, " ".join(["python -m benchmarks.soak", *argv]))
    print((config.out_dir / "report.md").read_text())
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
