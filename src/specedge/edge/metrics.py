"""Prometheus metrics of one edge, in the edge's own registry (served on its `/metrics`).

Per replica (`edge.replicas`, label `replica`: its HOST:PORT): sessions opened there, sessions
that failed over away from it, its health as last polled and the load it last reported; a
retired replica's series are removed. `specedge_edge_failovers_total` counts every failover.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram

from specedge.core.generation import GenerationStats
from specedge.edge.replicas import Replica, ReplicaHealth

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "specedge_edge_requests", "HTTP generation requests by endpoint and outcome",
            ["endpoint", "outcome"], registry=r,
        )  # fmt: skip
        self.active_sessions = Gauge(
            "specedge_edge_active_sessions", "Generations in progress", registry=r
        )
        self.rounds = Counter("specedge_edge_rounds", "Verification rounds", registry=r)
        self.emitted_tokens = Counter(
            "specedge_edge_emitted_tokens", "Tokens emitted by the server", registry=r
        )
        self.accepted_tokens = Counter(
            "specedge_edge_accepted_tokens", "Draft tokens the server accepted", registry=r
        )
        self.proactive_attempts = Counter(
            "specedge_edge_proactive_attempts", "Rounds with a proactive subtree", registry=r
        )
        self.proactive_hits = Counter(
            "specedge_edge_proactive_hits", "Proactive subtrees reused by the next tree", registry=r
        )
        self.bytes_sent = Counter("specedge_edge_bytes_sent", "gRPC payload bytes sent", registry=r)
        self.bytes_received = Counter(
            "specedge_edge_bytes_received", "gRPC payload bytes received", registry=r
        )
        self.ttft = Histogram(
            "specedge_edge_ttft_seconds", "Request start to first token", registry=r,
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.failovers = Counter(
            "specedge_edge_failovers", "Sessions re-opened after their stream broke", registry=r
        )
        self.replica_sessions = Counter(
            "specedge_edge_replica_sessions_opened",
            "Sessions opened on the replica (failovers onto it included)", ["replica"], registry=r,
        )  # fmt: skip
        self.replica_failovers = Counter(
            "specedge_edge_replica_failovers",
            "Sessions whose stream broke on the replica and were re-opened", ["replica"],
            registry=r,
        )  # fmt: skip
        self.replica_health = Enum(
            "specedge_edge_replica_health", "The replica's health as last polled", ["replica"],
            states=[state.value for state in ReplicaHealth], registry=r,
        )  # fmt: skip
        self.replica_active_sessions = Gauge(
            "specedge_edge_replica_active_sessions",
            "Open sessions the replica last reported (every edge's)", ["replica"], registry=r,
        )  # fmt: skip
        self.replica_queued_rounds = Gauge(
            "specedge_edge_replica_queued_rounds",
            "Trees waiting for verification the replica last reported", ["replica"], registry=r,
        )  # fmt: skip
        self.replica_busy_fraction = Gauge(
            "specedge_edge_replica_busy_fraction",
            "Recent busy fraction of the replica's model thread, as last reported", ["replica"],
            registry=r,
        )  # fmt: skip

    def count_request(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint, outcome).inc()

    def observe(self, stats: GenerationStats) -> None:
        """Add one finished (or abandoned) generation's statistics."""
        self.rounds.inc(stats.rounds)
        self.emitted_tokens.inc(stats.emitted)
        self.accepted_tokens.inc(stats.accepted)
        self.proactive_attempts.inc(stats.proactive_attempts)
        self.proactive_hits.inc(stats.proactive_hits)
        self.bytes_sent.inc(stats.bytes_sent)
        self.bytes_received.inc(stats.bytes_received)
        if stats.ttft_s is not None:
            self.ttft.observe(stats.ttft_s)

    # ---- replicas (`edge.failover.ServerPool`) -------------------------------------------
    def replica_opened(self, replica: Replica) -> None:
        self.replica_sessions.labels(replica.address).inc()

    def failed_over(self, replica: Replica | None) -> None:
        """A session's stream broke on `replica` (None: one no longer known)."""
        self.failovers.inc()
        if replica is not None:
            self.replica_failovers.labels(replica.address).inc()

    def replica_polled(self, replica: Replica) -> None:
        address = replica.address
        self.replica_health.labels(address).state(replica.health.value)
        load = replica.load
        for gauge, value in (
            (self.replica_active_sessions, load.active_sessions if load else 0),
            (self.replica_queued_rounds, load.queued_rounds if load else 0),
            (self.replica_busy_fraction, load.busy_fraction if load else 0.0),
        ):
            gauge.labels(address).set(value)

    def replica_retired(self, replica: Replica) -> None:
        for metric in (
            self.replica_sessions, self.replica_failovers, self.replica_health,
            self.replica_active_sessions, self.replica_queued_rounds, self.replica_busy_fraction,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):  # no series yet
                metric.remove(replica.address)
