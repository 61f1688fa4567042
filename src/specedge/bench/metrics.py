"""Benchmark metrics (DESIGN.md section 8), computed the same way for every system compared.

Inputs are plain records: one `RequestRecord` per request as the user saw it (client-side
timestamps on one monotonic clock, in seconds) plus the speculation counters the API reported,
and one `ServerUsage` per run (the run's server wall time, the server's busy seconds, the
engaged time of each edge, bytes on the WAN link). Definitions:

- TTFT: request start -> first token delivered.
- ITL (inter-token latency) of one request: (end - first token) / (tokens - 1), where end is
  the arrival of its last token; summarised over requests (mean, p50, p90, p99).
- Server throughput: generated tokens / server wall time of the run.
- Tokens per round: emitted tokens / verification rounds (accepted + bonus); acceptance rate:
  accepted draft tokens / emitted tokens.
- Proactive hit rate: hits / attempts. Server busy fraction: busy seconds / wall time. Server
  host ms per token: the server process's CPU outside its model thread / tokens.
- Cost: (server $/s x server wall + sum over edges of edge $/s x engaged time) / tokens; a
  server-only system has no edges and pays the server alone.

Everything here is a pure function of its arguments; nothing reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

SECONDS_PER_HOUR = 3600.0
A100_40GB_PER_HOUR = 4.05
A100_80GB_PER_HOUR = 5.05
RTX_4090_PER_HOUR = 0.35


@dataclass(frozen=True)
class Prices:
    """GPU rental prices in $/hour (defaults: an A100 40GB server, RTX 4090 edges)."""

    server_per_hour: float = A100_40GB_PER_HOUR
    edge_per_hour: float = RTX_4090_PER_HOUR

    def __post_init__(self) -> None:
        if self.server_per_hour < 0 or self.edge_per_hour < 0:
            raise ValueError("prices must be >= 0 $/h")

    @classmethod
    def parse(cls, text: str) -> Prices:
        """`server=4.05,edge=0.35` (either key may be left out)."""
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in ("server", "edge"):
                raise ValueError(f"bad price {item!r}: expected server=$/h or edge=$/h")
            try:
                values[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"bad price {item!r}: {value!r} is not a number") from None
        return cls(
            server_per_hour=values.get("server", A100_40GB_PER_HOUR),
            edge_per_hour=values.get("edge", RTX_4090_PER_HOUR),
        )


@dataclass(frozen=True)
class RequestRecord:
    """One request as its client saw it. Times are seconds on the run's monotonic clock."""

    client: int  # the client (and, for SpecEdge, the edge) that sent it
    prompt_id: str
    category: str
    start_s: float
    first_token_s: float | None  # None when no token arrived
    end_s: float  # arrival of the last token (or of the failure)
    tokens: int  # completion tokens
    prompt_tokens: int = 0
    rounds: int = 0  # verification rounds (0 when the system does not report them)
    accepted: int = 0  # accepted draft tokens (emitted tokens minus bonus tokens)
    proactive_hits: int = 0
    proactive_attempts: int = 0
    finish_reason: str | None = None
    # goodput selection (usage.speculative): over the rounds whose tree carried estimates,
    # the tokens the estimates predicted and the tokens those rounds emitted
    predicted_rounds: int = 0
    predicted_tokens: float = 0.0
    predicted_round_tokens: int = 0
    streamed_rounds: int = 0  # rounds the server decoded itself
    # of the speculative rounds: draft nodes sent, verified (the prefixes the server kept),
    # and rounds whose tree was cut to nothing (what the simulator's acceptance fit needs)
    drafted_nodes: int = 0
    verified_nodes: int = 0
    cut_rounds: int = 0
    error: str | None = None  # a failed request counts in no metric but `failed_requests`
    chunk_times_s: tuple[float, ...] = ()  # arrival of each streamed chunk with tokens

    @property
    def ok(self) -> bool:
        return self.error is None

    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    def itl_s(self) -> float | None:
        """(end - first token) / (tokens - 1); None with fewer than two tokens."""
        if self.first_token_s is None or self.tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.tokens - 1)

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["chunk_times_s"] = list(self.chunk_times_s)
        return record


@dataclass(frozen=True)
class ServerUsage:
    """What a run cost the server (and the edges)."""

    wall_s: float  # server wall-clock time of the run
    busy_s: float | None = None  # server busy seconds over the run; None when not measured
    edge_engaged_s: tuple[float, ...] = ()  # one per edge used; () for server-only systems
    wire_bytes: int | None = None  # bytes on the WAN link, both directions
    # CPU seconds of the server process outside its model thread (event loop, gRPC, HTTP)
    host_cpu_s: float | None = None
    # batched verification forwards over the run, and the sequences and rows they verified
    batches: float | None = None
    batched_sequences: float | None = None
    batched_rows: float | None = None
    verify_s: float | None = None  # their time: busy time less prefill and server drafting


@dataclass(frozen=True)
class RunMetrics:
    requests: int
    failed_requests: int
    tokens: int
    wall_s: float
    server_throughput_tok_s: float
    ttft_ms_mean: float | None
    ttft_ms_p50: float | None
    ttft_ms_p99: float | None
    itl_ms_mean: float | None
    itl_ms_p50: float | None
    itl_ms_p90: float | None
    itl_ms_p99: float | None
    tokens_per_round: float | None
    acceptance_rate: float | None
    proactive_hit_rate: float | None
    server_busy_s: float | None
    server_busy_fraction: float | None
    server_busy_ms_per_token: float | None
    bytes_per_token: float | None
    edge_engaged_s: float
    cost_usd: float
    cost_per_mtok_usd: float | None
    tokens_per_usd: float | None
    # goodput selection: tokens per round the estimates predicted, and measured on the same
    # rounds (calibration); share of rounds the server decoded itself
    predicted_tokens_per_round: float | None = None
    measured_tokens_per_predicted_round: float | None = None
    streamed_share: float | None = None
    # tokens per server-busy second: what the server could serve if it were never idle
    server_capacity_tok_s: float | None = None
    bound: str | None = None  # which side limited the run: server | clients
    # over repeats of the run (the metrics above are medians): how many, and the spread
    repeats: int = 1
    throughput_min: float | None = None
    throughput_max: float | None = None
    itl_ms_min: float | None = None
    itl_ms_max: float | None = None
    # the server's host CPU (outside the model thread) per emitted token: what the simulator
    # charges its server for the event loop, gRPC and HTTP work (`specedge simulate`)
    server_host_ms_per_token: float | None = None
    # sequences per batched verification forward (decoding steps included): at a fixed step
    # cost, fewer per batch means more server time per token
    server_mean_batch: float | None = None
    server_rows_per_batch: float | None = None  # a sequence's row plus its verified nodes
    server_ms_per_batch: float | None = None  # time per batched verification forward

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default), so p50 of [1, 2, 3, 4] is 2.5."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)


def engaged_times(records: Sequence[RequestRecord]) -> tuple[float, ...]:
    """Per client, in client order: first request start -> last request end. An edge serves
    one client, so this is how long the benchmark kept that edge's GPU engaged."""
    spans: dict[int, tuple[float, float]] = {}
    for record in records:
        start, end = spans.get(record.client, (record.start_s, record.end_s))
        spans[record.client] = (min(start, record.start_s), max(end, record.end_s))
    return tuple(end - start for _, (start, end) in sorted(spans.items()))


def run_window(records: Sequence[RequestRecord]) -> float:
    """First request start -> last request end."""
    if not records:
        return 0.0
    return max(r.end_s for r in records) - min(r.start_s for r in records)


def cost_usd(usage: ServerUsage, prices: Prices) -> float:
    server = prices.server_per_hour / SECONDS_PER_HOUR * usage.wall_s
    edges = prices.edge_per_hour / SECONDS_PER_HOUR * sum(usage.edge_engaged_s)
    return server + edges


def compute_run_metrics(
    records: Sequence[RequestRecord], usage: ServerUsage, prices: Prices
) -> RunMetrics:
    """Every section-8 metric of one run. Failed requests are counted, nothing more."""
    ok = [r for r in records if r.ok]
    tokens = sum(r.tokens for r in ok)
    ttfts = [1000.0 * t for r in ok if (t := r.ttft_s()) is not None]
    itls = [1000.0 * t for r in ok if (t := r.itl_s()) is not None]
    rounds = sum(r.rounds for r in ok)
    attempts = sum(r.proactive_attempts for r in ok)
    cost = cost_usd(usage, prices)
    predicted_rounds = sum(r.predicted_rounds for r in ok)
    busy_fraction = _ratio(usage.busy_s, usage.wall_s)
    return RunMetrics(
        requests=len(records),
        failed_requests=len(records) - len(ok),
        tokens=tokens,
        wall_s=usage.wall_s,
        server_throughput_tok_s=tokens / usage.wall_s if usage.wall_s > 0 else 0.0,
        ttft_ms_mean=mean(ttfts) if ttfts else None,
        ttft_ms_p50=percentile(ttfts, 50) if ttfts else None,
        ttft_ms_p99=percentile(ttfts, 99) if ttfts else None,
        itl_ms_mean=mean(itls) if itls else None,
        itl_ms_p50=percentile(itls, 50) if itls else None,
        itl_ms_p90=percentile(itls, 90) if itls else None,
        itl_ms_p99=percentile(itls, 99) if itls else None,
        tokens_per_round=tokens / rounds if rounds else None,
        acceptance_rate=sum(r.accepted for r in ok) / tokens if rounds and tokens else None,
        proactive_hit_rate=sum(r.proactive_hits for r in ok) / attempts if attempts else None,
        server_busy_s=usage.busy_s,
        server_busy_fraction=busy_fraction,
        server_busy_ms_per_token=_ratio(usage.busy_s, tokens / 1000.0),
        bytes_per_token=_ratio(usage.wire_bytes, tokens),
        edge_engaged_s=sum(usage.edge_engaged_s),
        cost_usd=cost,
        cost_per_mtok_usd=cost / tokens * 1e6 if tokens else None,
        tokens_per_usd=tokens / cost if cost > 0 else None,
        predicted_tokens_per_round=_ratio(sum(r.predicted_tokens for r in ok), predicted_rounds),
        measured_tokens_per_predicted_round=_ratio(
            sum(r.predicted_round_tokens for r in ok), predicted_rounds
        ),
        streamed_share=_ratio(sum(r.streamed_rounds for r in ok), rounds),
        server_capacity_tok_s=_ratio(tokens, usage.busy_s or 0.0),
        bound=None if busy_fraction is None else ("server" if busy_fraction >= 0.9 else "clients"),
        throughput_min=tokens / usage.wall_s if usage.wall_s > 0 else 0.0,
        throughput_max=tokens / usage.wall_s if usage.wall_s > 0 else 0.0,
        itl_ms_min=mean(itls) if itls else None,
        itl_ms_max=mean(itls) if itls else None,
        server_host_ms_per_token=_ratio(usage.host_cpu_s, tokens / 1000.0),
        server_mean_batch=_ratio(usage.batched_sequences, usage.batches or 0.0),
        server_rows_per_batch=_ratio(usage.batched_rows, usage.batches or 0.0),
        server_ms_per_batch=_ratio(usage.verify_s, (usage.batches or 0.0) / 1000.0),
    )


def _ratio(numerator: float | None, denominator: float) -> float | None:
    if numerator is None or denominator <= 0:
        return None
    return numerator / denominator
