"""The systems a benchmark compares, each started as real processes behind an OpenAI API.

- `specedge`: one `specedge serve` and one `specedge edge` per client; each edge reaches the
  server through its own delaying proxy (the WAN). Clients talk to their own edge directly.
- `specedge-no-proactive`: the same with `--proactive off` on the edges.
- `specedge-no-pipelining`: proactive edges, but the server batches at most `clients` trees
  and holds a partial batch for every session whose next tree it predicts (its bounded batch
  wait, raised to `LOCKSTEP_BATCH_WAIT_MS`), so the edges move in lockstep instead of drafting
  while others are verified. The server has no true barrier: a tree later than predicted is
  not waited for.
- `server-spec` / `server-ar`: `specedge serve --api-port P` (with `--draft` for server-side
  tree speculation); each client reaches the API through its own delaying proxy (the WAN).
- `hf-assisted`: see `hf_assisted.py` (not a deployment: one process, one request at a time).

A `Deployment` is what the runner needs from a running system: the clients' base URLs, the
proxies whose RTT it sets per run and whose bytes it counts, and the server's metrics URL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from specedge.bench.processes import (
    ManagedProcess,
    Placement,
    free_port,
    managed,
    scrape_counter,
    specedge_args,
)
from specedge.bench.results import (
    SERVER_AR,
    SERVER_SPEC,
    SPECEDGE_NO_PIPELINING,
    SPECEDGE_NO_PROACTIVE,
)
from specedge.bench.wan import DelayProxy

LOCALHOST = "127.0.0.1"
BUSY_COUNTER = "specedge_server_busy_seconds_total"
LOCKSTEP_BATCH_WAIT_MS = 5000.0  # longer than any edge's turnaround here


@dataclass(frozen=True)
class SystemSettings:
    """What every deployment needs from the benchmark configuration."""

    target: str
    draft: str
    budget: int
    depth: int
    proactive: str = "keep-depth"
    dtype: str | None = None
    startup_timeout_s: float = 300.0


@dataclass
class Deployment:
    system: str
    client_urls: list[str]  # one base URL per client slot, e.g. http://127.0.0.1:8001
    proxies: list[DelayProxy]  # the WAN links, one per client slot
    metrics_url: str
    has_edges: bool
    processes: list[ManagedProcess] = field(default_factory=list)

    def set_network(self, rtt_ms: float, jitter_ms: float) -> None:
        """Every WAN link gets this RTT from now on (the proxies read it per chunk)."""
        for proxy in self.proxies:
            proxy.rtt_ms = rtt_ms
            proxy.jitter_ms = jitter_ms

    def wire_bytes(self) -> int:
        return sum(p.counters.uplink_bytes + p.counters.downlink_bytes for p in self.proxies)

    def busy_seconds(self) -> float | None:
        return scrape_counter(self.metrics_url, BUSY_COUNTER)

    def check_alive(self) -> None:
        for process in self.processes:
            process.check_alive()


def deployment_key(system: str, clients: int, max_clients: int) -> int:
    """Runs with equal keys share one deployment: one per client count for the lockstep
    server (its batch size is the client count), otherwise one for all counts."""
    return clients if system == SPECEDGE_NO_PIPELINING else max_clients


def _serve_args(settings: SystemSettings, grpc_port: int, metrics_port: int) -> list[str]:
    args = [
        "serve",
        "--model", settings.target,
        "--port", str(grpc_port),
        "--metrics-port", str(metrics_port),
        "--max-tree-nodes", str(max(64, settings.budget)),
        "--max-tree-depth", str(max(16, 2 * settings.depth)),
    ]  # fmt: skip
    return args + (["--dtype", settings.dtype] if settings.dtype else [])


@contextlib.contextmanager
def deploy(
    system: str, clients: int, settings: SystemSettings, placement: Placement, log_dir: Path
) -> Iterator[Deployment]:
    """Start `system` for up to `clients` concurrent clients; stop everything on exit."""
    # Processes stop before the proxies, so that no proxy is cut mid-connection.
    with _proxies() as proxies, managed([]) as processes:
        grpc_port, metrics_port = free_port(), free_port()
        serve = _serve_args(settings, grpc_port, metrics_port)
        if system == SPECEDGE_NO_PIPELINING:
            # `batch_wait_ms` has no flag; the server takes it from its config file.
            server_yaml = log_dir / f"{system}-{clients}-server.yaml"
            server_yaml.parent.mkdir(parents=True, exist_ok=True)
            server_yaml.write_text(f"batch_wait_ms: {LOCKSTEP_BATCH_WAIT_MS}\n")
            serve += ["--max-batch", str(clients), "--config", str(server_yaml)]
        api_port = free_port()
        if system in (SERVER_SPEC, SERVER_AR):
            serve += ["--api-port", str(api_port)]
        if system == SERVER_SPEC:
            serve += ["--draft", settings.draft]
            serve += ["--budget", str(settings.budget), "--depth", str(settings.depth)]
        server = ManagedProcess(
            "server",
            specedge_args(*serve),
            log_dir / f"{system}-{clients}-server.log",
            placement.server_cpus,
        )
        processes.append(server)
        metrics_url = f"http://{LOCALHOST}:{metrics_port}"
        server.wait_healthy(metrics_url + "/health", settings.startup_timeout_s)
        if system in (SERVER_SPEC, SERVER_AR):
            server.wait_healthy(f"http://{LOCALHOST}:{api_port}/health", settings.startup_timeout_s)
            proxies += [DelayProxy(LOCALHOST, api_port).start() for _ in range(clients)]
            urls = [f"http://{proxy.address}" for proxy in proxies]
            yield Deployment(system, urls, proxies, metrics_url + "/metrics", False, processes)
            return
        proactive = "off" if system == SPECEDGE_NO_PROACTIVE else settings.proactive
        edges = []
        for number in range(clients):
            proxy = DelayProxy(LOCALHOST, grpc_port).start()
            proxies.append(proxy)
            http_port = free_port()
            args = specedge_args(
                "edge", "--model", settings.draft, "--server", proxy.address,
                "--port", str(http_port), "--proactive", proactive,
                "--budget", str(settings.budget), "--depth", str(settings.depth),
                *(["--dtype", settings.dtype] if settings.dtype else []),
            )  # fmt: skip
            log = log_dir / f"{system}-edge{number}.log"
            edges.append(
                (ManagedProcess(f"edge {number}", args, log, placement.edge_cpus), http_port)
            )
            processes.append(edges[-1][0])
        for edge, http_port in edges:
            edge.wait_healthy(f"http://{LOCALHOST}:{http_port}/health", settings.startup_timeout_s)
        urls = [f"http://{LOCALHOST}:{port}" for _, port in edges]
        yield Deployment(system, urls, proxies, metrics_url + "/metrics", True, processes)


@contextlib.contextmanager
def _proxies() -> Iterator[list[DelayProxy]]:
    proxies: list[DelayProxy] = []
    try:
        yield proxies
    finally:
        for proxy in proxies:
            proxy.stop()
