"""The soak's processes: two `specedge serve` processes (A and B), each behind a `DelayProxy`
of this process, and the `specedge edge` processes that list both proxies; their restarts on
the same ports, their memory and their session gauges.

A *role* is one server or edge as the soak sees it: a command line, fixed ports, and the
process of its current *lifetime* (a restart is a new lifetime, with a new pid and log).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from specedge.bench.processes import (
    ManagedProcess,
    Placement,
    free_port,
    scrape_counter,
    specedge_args,
)
from specedge.bench.wan import DelayProxy

LOCALHOST = "127.0.0.1"
SERVERS = ("A", "B")
SERVER_SESSIONS = "specedge_server_active_sessions"
EDGE_SESSIONS = "specedge_edge_active_sessions"
SESSIONS_TOTAL = "specedge_server_sessions_total"
SERVER_QUEUE_TIMEOUT_S = 5.0  # how long an API request waits for a slot (the slot probe's)
SESSION_TIMEOUT_S = 60.0  # a server evicts an edge session silent this long
EDGE_CONNECT_TIMEOUT_S = 3.0  # a handshake across a partition gives up after this


@dataclass(frozen=True)
class ClusterSpec:
    target: str
    draft: str
    clients: int
    edges: int
    rtt_ms: float
    reply_timeout_s: float
    failover_timeout_s: float
    startup_timeout_s: float

    @property
    def server_max_sessions(self) -> int:
        """Every client's session, plus those a partition leaves open until it heals."""
        return self.clients + 4

    @property
    def edge_max_sessions(self) -> int:
        """An edge's clients, plus sessions of hung-up clients not yet noticed."""
        return -(-self.clients // self.edges) + 2


@dataclass
class Role:
    """One server or edge; restarts keep its command and ports."""

    name: str  # "server A", "edge 0"
    args: list[str]
    cpus: frozenset[int] | None
    url: str  # where /health and /metrics are
    log_dir: Path
    process: ManagedProcess | None = None
    lifetimes: int = 0
    down_on_purpose: bool = False  # killed by a fault, restart pending
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one fault or recovery at a time

    @property
    def metrics_url(self) -> str:
        return self.url + "/metrics"

    def launch(self) -> None:
        self.lifetimes += 1
        log = self.log_dir / f"{self.name.replace(' ', '-')}-{self.lifetimes}.log"
        self.process = ManagedProcess(self.name, self.args, log, self.cpus)

    def wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        self.process.wait_healthy(self.url + "/health", timeout_s)
        self.down_on_purpose = False

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.process is not None
        self.down_on_purpose = True
        self.process.process.kill()
        self.process.process.wait()

    @property
    def pid(self) -> int | None:
        """The current lifetime's pid while it runs."""
        if self.process is None or self.process.process.poll() is not None:
            return None
        return self.process.process.pid

    def crashed(self) -> bool:
        return not self.down_on_purpose and self.process is not None and self.pid is None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


@dataclass
class Cluster:
    servers: dict[str, Role]  # by SERVERS
    proxies: dict[str, DelayProxy]  # the link to each server
    api_urls: dict[str, str]  # each server's own HTTP API (the slot probe)
    edges: list[Role]

    @property
    def roles(self) -> list[Role]:
        return [*self.servers.values(), *self.edges]


@contextlib.contextmanager
def deployed(spec: ClusterSpec, placement: Placement, log_dir: Path) -> Iterator[Cluster]:
    """Launch every server and edge (the edges wait for a server within their start-up
    timeout); stop them all and the proxies on exit."""
    servers, proxies, api_urls = {}, {}, {}
    for name in SERVERS:
        grpc_port, metrics_port, api_port = free_port(), free_port(), free_port()
        args = specedge_args(
            "serve", "--model", spec.target, "--dtype", "float32", "--device", "cpu",
            "--port", str(grpc_port), "--metrics-port", str(metrics_port),
            "--api-port", str(api_port), "--max-sessions", str(spec.server_max_sessions),
            "--queue-timeout", str(SERVER_QUEUE_TIMEOUT_S),
            "--session-timeout", str(SESSION_TIMEOUT_S),
        )  # fmt: skip
        url = f"http://{LOCALHOST}:{metrics_port}"
        servers[name] = Role(f"server {name}", args, placement.server_cpus, url, log_dir)
        proxies[name] = DelayProxy(LOCALHOST, grpc_port, rtt_ms=spec.rtt_ms).start()
        api_urls[name] = f"http://{LOCALHOST}:{api_port}"
    upstreams = ",".join(proxies[name].address for name in SERVERS)
    edges = []
    for number in range(spec.edges):
        port = free_port()
        args = specedge_args(
            "edge", "--model", spec.draft, "--server", upstreams, "--port", str(port),
            "--max-sessions", str(spec.edge_max_sessions),
            "--reply-timeout", str(spec.reply_timeout_s),
            "--failover-timeout", str(spec.failover_timeout_s),
            "--connect-timeout", str(EDGE_CONNECT_TIMEOUT_S),
            "--startup-timeout", str(spec.startup_timeout_s),
        )  # fmt: skip
        url = f"http://{LOCALHOST}:{port}"
        edges.append(Role(f"edge {number}", args, placement.edge_cpus, url, log_dir))
    cluster = Cluster(servers, proxies, api_urls, edges)
    try:
        for role in cluster.roles:
            role.launch()
        yield cluster
    finally:
        for role in reversed(cluster.roles):
            role.stop()
        for proxy in proxies.values():
            proxy.stop()


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a live process (/proc), None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return None if match is None else int(match.group(1)) * 1024


async def gauge(role: Role, name: str) -> int | None:
    value = await asyncio.to_thread(scrape_counter, role.metrics_url, name)
    return None if value is None else int(value)


async def open_sessions(cluster: Cluster) -> dict[str, int | None]:
    """Each server's and edge's open sessions (None: its /metrics did not answer)."""
    gauges = {role.name: await gauge(role, SERVER_SESSIONS) for role in cluster.servers.values()}
    for role in cluster.edges:
        gauges[role.name] = await gauge(role, EDGE_SESSIONS)
    return gauges


async def settle(cluster: Cluster, timeout_s: float) -> dict[str, int | None]:
    """Wait until no server or edge has an open session, or `timeout_s`; the gauges then."""
    deadline = time.monotonic() + timeout_s
    while True:
        gauges = await open_sessions(cluster)
        if all(value == 0 for value in gauges.values()) or time.monotonic() > deadline:
            return gauges
        await asyncio.sleep(1.0)


def sessions_by_outcome(role: Role) -> dict[str, float]:
    """A server's `specedge_server_sessions_total` by outcome (its current lifetime)."""
    try:
        text = httpx.get(role.metrics_url, timeout=5.0).text
    except httpx.HTTPError:
        return {}
    pattern = re.compile(rf'^{SESSIONS_TOTAL}\{{[^}}]*outcome="([^"]+)"[^}}]*\}}\s+(\S+)', re.M)
    return {outcome: float(value) for outcome, value in pattern.findall(text)}


_FAILOVER = re.compile(r"broke \((.*)\); failing over after (\d+) tokens")


def count_failovers(log_dir: Path) -> dict[str, int]:
    """Sessions the edges' logs show failing over, by why their stream broke: `stream broke`
    (a killed server, a reset link) or `no reply` (within --reply-timeout: a black hole)."""
    counts = {"stream broke": 0, "no reply": 0}
    for log in sorted(log_dir.glob("edge-*.log")):
        for match in _FAILOVER.finditer(log.read_text(errors="replace")):
            counts["no reply" if "no reply" in match.group(1) else "stream broke"] += 1
    return counts
