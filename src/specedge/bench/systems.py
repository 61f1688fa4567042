"""The systems a benchmark compares, each started as real processes behind an OpenAI API.

- `specedge`: one `specedge serve` and, by default (`edge_mode` shared), one `specedge edge`
  serving every client (an office edge box: one draft model, its sessions' critical draft work
  ahead of their proactive work), reaching the server through one delaying proxy (the WAN);
  with `edge_mode` per-client, one edge per client, each with its own proxy (the ablation: on
  one edge core their processes compete with no priorities between them). Clients talk to
  their edge directly.
- `specedge-no-proactive`: the same with `--proactive off` on the edges.
- `specedge-no-pipelining`: proactive edges, but the server batches at most `clients` trees
  and holds a partial batch for every session whose next tree it predicts (its bounded batch
  wait, raised to `LOCKSTEP_BATCH_WAIT_MS`), so the edges move in lockstep instead of drafting
  while others are verified. The server has no true barrier: a tree later than predicted is
  not waited for.
- `specedge-no-lookup`: `specedge` with `serve --stream-lookup 0`: the steps the server decodes
  itself are one token each (no context lookup chain verified with them).
- `server-spec` / `server-ar`: `specedge serve --api-port P` (with `--draft` for server-side
  tree speculation); each client reaches the API through its own delaying proxy (the WAN).
- `vllm` / `vllm-ngram`: vLLM's OpenAI server on the server's cores, serving the target
  exported as a Hugging Face folder (see `vllm_server.py`), reached like `server-ar`.
- `hf-assisted`: see `hf_assisted.py` (not a deployment: one process, one request at a time).

A `Deployment` is one server and the edges of the systems that share it (`specedge` and
`specedge-no-proactive` differ only in their edges, so they share a server; idle edges cost
nothing). It gives the runner each system's client URLs, the proxies whose RTT it sets per run
and whose bytes it counts, and the server's metrics URL. All processes start at once (the
edges wait for the server), so start-up costs one model load per core, not one per process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from specedge.bench import vllm_server
from specedge.bench.processes import (
    BenchProcessError,
    ManagedProcess,
    Placement,
    free_port,
    managed,
    parse_counter,
    scrape_metrics,
    specedge_args,
)
from specedge.bench.results import (
    EDGE_SYSTEMS,
    SERVER_AR,
    SERVER_SPEC,
    SPECEDGE,
    SPECEDGE_NO_LOOKUP,
    SPECEDGE_NO_PIPELINING,
    SPECEDGE_NO_PROACTIVE,
    VLLM,
    VLLM_NGRAM,
    VLLM_SYSTEMS,
)
from specedge.bench.vllm_server import VllmRuntime
from specedge.bench.wan import DelayProxy
from specedge.core.limits import budget_cap

LOCALHOST = "127.0.0.1"
BUSY_COUNTER = "specedge_server_busy_seconds_total"
HOST_CPU_GAUGE = "specedge_server_host_cpu_seconds"
BATCHES = "specedge_server_verify_batch_size_count"  # batched verification forwards
BATCHED_SEQUENCES = "specedge_server_verify_batch_size_sum"  # sequences over those forwards
BATCHED_ROWS = "specedge_server_verify_rows_total"  # rows over those forwards
VERIFY_SECONDS = "specedge_server_verify_seconds_sum"  # their time (busy time less prefill)
LOCKSTEP_BATCH_WAIT_MS = 5000.0  # longer than any edge's turnaround here
# Systems served by one kind of server; the lockstep server is per client count.
SERVER_KINDS = {
    SPECEDGE: "edges",
    SPECEDGE_NO_PROACTIVE: "edges",
    SPECEDGE_NO_PIPELINING: "lockstep",
    SPECEDGE_NO_LOOKUP: "edges-no-lookup",
    SERVER_SPEC: "api-spec",
    SERVER_AR: "api-ar",
    VLLM: VLLM,
    VLLM_NGRAM: VLLM_NGRAM,
}
API_KINDS = ("api-spec", "api-ar")  # `specedge serve --api-port`


@dataclass(frozen=True)
class SystemSettings:
    """What every deployment needs from the benchmark configuration."""

    target: str
    draft: str
    budget: str  # auto or a fixed node count
    depth: int
    proactive: str = "keep-depth"
    edge_mode: str = "shared"  # shared: one edge for all clients; per-client: one each
    dtype: str | None = None
    startup_timeout_s: float = 300.0
    vllm: VllmRuntime | None = None  # None: vLLM not available
    vllm_kv_cache_gb: int = 4


@dataclass(frozen=True)
class ServerCounters:
    """A snapshot of the server counters a run reads before and after (`since` the delta)."""

    busy_s: float | None = None
    host_cpu_s: float | None = None
    batches: float | None = None
    batched_sequences: float | None = None
    batched_rows: float | None = None
    verify_s: float | None = None

    def since(self, before: ServerCounters) -> ServerCounters:
        def delta(after: float | None, earlier: float | None) -> float | None:
            return None if after is None or earlier is None else after - earlier

        return ServerCounters(
            *(delta(getattr(self, f), getattr(before, f)) for f in self.__dataclass_fields__)
        )


@dataclass
class Deployment:
    client_urls: dict[str, list[str]]  # per system: one base URL per client slot
    proxies: dict[str, list[DelayProxy]]  # per system: its WAN links, one per client slot
    metrics_url: str
    processes: list[ManagedProcess] = field(default_factory=list)

    def set_network(self, rtt_ms: float, jitter_ms: float) -> None:
        """Every WAN link gets this RTT from now on (the proxies read it per chunk)."""
        for proxies in self.proxies.values():
            for proxy in proxies:
                proxy.rtt_ms = rtt_ms
                proxy.jitter_ms = jitter_ms

    def wire_bytes(self, system: str) -> int:
        return sum(
            p.counters.uplink_bytes + p.counters.downlink_bytes for p in self.proxies[system]
        )

    def server_counters(self) -> ServerCounters:
        """The server's counters now (one scrape; None where it does not export them)."""
        text = scrape_metrics(self.metrics_url)
        if text is None:
            return ServerCounters()
        return ServerCounters(
            busy_s=parse_counter(text, BUSY_COUNTER),
            host_cpu_s=parse_counter(text, HOST_CPU_GAUGE),
            batches=parse_counter(text, BATCHES),
            batched_sequences=parse_counter(text, BATCHED_SEQUENCES),
            batched_rows=parse_counter(text, BATCHED_ROWS),
            verify_s=parse_counter(text, VERIFY_SECONDS),
        )

    def check_alive(self) -> None:
        for process in self.processes:
            process.check_alive()


def deployment_key(system: str, clients: int, max_clients: int) -> tuple[str, int]:
    """Runs with equal keys share one deployment: (server kind, client slots)."""
    kind = SERVER_KINDS[system]
    return kind, clients if kind == "lockstep" else max_clients


def _serve_args(
    kind: str, settings: SystemSettings, clients: int, ports: dict[str, int], log_dir: Path
) -> list[str]:
    args = [
        "serve",
        "--model", settings.target,
        "--port", str(ports["grpc"]),
        "--metrics-port", str(ports["metrics"]),
        "--max-tree-nodes", str(max(64, budget_cap(settings.budget))),
        "--max-tree-depth", str(max(16, 2 * settings.depth)),
        *(["--dtype", settings.dtype] if settings.dtype else []),
    ]  # fmt: skip
    if kind == "lockstep":
        # `batch_wait_ms` has no flag; the server takes it from its config file.
        server_yaml = log_dir / f"lockstep-{clients}-server.yaml"
        server_yaml.write_text(f"batch_wait_ms: {LOCKSTEP_BATCH_WAIT_MS}\n")
        args += ["--max-batch", str(clients), "--config", str(server_yaml)]
    if kind == "edges-no-lookup":
        args += ["--stream-lookup", "0"]
    if kind in API_KINDS:
        args += ["--api-port", str(ports["api"])]
    if kind == "api-spec":
        args += ["--draft", settings.draft]
        args += ["--budget", str(settings.budget), "--depth", str(settings.depth)]
    return args


def _edge_args(
    system: str,
    settings: SystemSettings,
    server: str,
    port: int,
    edge_yaml: Path,
    sessions: int,
) -> list[str]:
    proactive = "off" if system == SPECEDGE_NO_PROACTIVE else settings.proactive
    return specedge_args(
        "edge", "--model", settings.draft, "--server", server, "--port", str(port),
        "--proactive", proactive, "--budget", str(settings.budget),
        "--depth", str(settings.depth), "--config", str(edge_yaml),
        "--max-sessions", str(max(sessions, 1)),
        *(["--dtype", settings.dtype] if settings.dtype else []),
    )  # fmt: skip


@contextlib.contextmanager
def deploy(
    systems: Sequence[str],
    clients: int,
    settings: SystemSettings,
    placement: Placement,
    log_dir: Path,
) -> Iterator[Deployment]:
    """Start the server of `systems` (one kind) and, for edge systems, `clients` edges each;
    wait until every process answers; stop everything on exit."""
    kinds = {SERVER_KINDS[system] for system in systems}
    assert len(kinds) == 1, f"{systems} need different servers"
    kind = kinds.pop()
    log_dir.mkdir(parents=True, exist_ok=True)
    ports = {"grpc": free_port(), "metrics": free_port(), "api": free_port()}
    name = f"{kind}-{clients}"
    # Processes stop before the proxies, so that no proxy is cut mid-connection.
    with _proxies() as all_proxies, managed([]) as processes:
        server_log = log_dir / f"{name}-server.log"
        vllm = kind in VLLM_SYSTEMS
        if vllm:
            server = _vllm_process(kind, settings, ports["api"], placement, server_log)
        else:
            serve = _serve_args(kind, settings, clients, ports, log_dir)
            args = specedge_args(*serve)
            server = ManagedProcess("server", args, server_log, placement.server_cpus)
        processes.append(server)
        edge_yaml = log_dir / "edge.yaml"  # settings with no flag
        edge_yaml.write_text(f"startup_timeout: {settings.startup_timeout_s}\n")
        urls: dict[str, list[str]] = {}
        proxies: dict[str, list[DelayProxy]] = {}
        metrics_port = ports["api"] if vllm else ports["metrics"]  # vLLM serves both on one
        health = [(server, f"http://{LOCALHOST}:{metrics_port}/health")]
        for system in systems:
            upstream = ports["grpc"] if system in EDGE_SYSTEMS else ports["api"]
            shared = system in EDGE_SYSTEMS and settings.edge_mode == "shared"
            links = 1 if shared else clients
            proxies[system] = [DelayProxy(LOCALHOST, upstream).start() for _ in range(links)]
            all_proxies += proxies[system]
            if system not in EDGE_SYSTEMS:
                urls[system] = [f"http://{proxy.address}" for proxy in proxies[system]]
                continue
            urls[system] = []
            for number, proxy in enumerate(proxies[system]):
                port = free_port()
                sessions = clients if shared else 1
                args = _edge_args(system, settings, proxy.address, port, edge_yaml, sessions)
                log = log_dir / f"{name}-{system}-edge{number}.log"
                edge = ManagedProcess(f"{system} edge {number}", args, log, placement.edge_cpus)
                processes.append(edge)
                urls[system].append(f"http://{LOCALHOST}:{port}")
                health.append((edge, urls[system][-1] + "/health"))
            if shared:  # every client talks to the one edge
                urls[system] = urls[system] * clients
        if kind in API_KINDS:
            health.append((server, f"http://{LOCALHOST}:{ports['api']}/health"))
        for process, url in health:
            process.wait_healthy(url, settings.startup_timeout_s)
        metrics_url = f"http://{LOCALHOST}:{metrics_port}/metrics"
        yield Deployment(urls, proxies, metrics_url, processes)


def _vllm_process(
    system: str, settings: SystemSettings, port: int, placement: Placement, log_path: Path
) -> ManagedProcess:
    """vLLM's OpenAI server for `system` on `port`, on the server's cores, serving the target
    exported (once, cached) in the benchmark's dtype."""
    from specedge.model.export import cached_export
    from specedge.model.loader import default_dtype, parse_dtype

    if settings.vllm is None:
        raise BenchProcessError(f"{system} needs vLLM, which is not available here")
    dtype = parse_dtype(settings.dtype) if settings.dtype else default_dtype("cpu")
    model_dir = cached_export(settings.target, dtype)
    args = vllm_server.server_args(system, model_dir, port, str(dtype).removeprefix("torch."))
    return ManagedProcess(
        f"{system} server",
        args,
        log_path,
        placement.server_cpus,
        python=settings.vllm.python,
        env=vllm_server.server_env(placement.server_cpus, settings.vllm_kv_cache_gb),
    )


@contextlib.contextmanager
def _proxies() -> Iterator[list[DelayProxy]]:
    proxies: list[DelayProxy] = []
    try:
        yield proxies
    finally:
        for proxy in proxies:
            proxy.stop()
