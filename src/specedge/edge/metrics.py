"""Prometheus metrics of one edge, in the edge's own registry (served on its `/metrics`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from specedge.core.generation import GenerationStats

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
