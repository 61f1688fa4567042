"""Section-8 metrics on hand-made records whose answers are known by hand."""

from __future__ import annotations

import pytest

from specedge.bench.metrics import (
    Prices,
    RequestRecord,
    ServerUsage,
    compute_run_metrics,
    engaged_times,
    percentile,
    run_window,
)


def _record(client: int, start: float, first: float | None, end: float, tokens: int, **kw):
    return RequestRecord(
        client=client,
        prompt_id=f"p{client}-{start}",
        category="qa",
        start_s=start,
        first_token_s=first,
        end_s=end,
        tokens=tokens,
        **kw,
    )


# Client 0: start 10.0, first token 10.2, 11 tokens ending 11.2 -> TTFT 200 ms, ITL
# (11.2 - 10.2) / 10 = 100 ms. Client 1: start 10.0, first 10.5, 6 tokens ending 10.9 -> TTFT
# 500 ms, ITL 0.4 / 5 = 80 ms; then one token at 11.1 (TTFT 100 ms, no ITL), done at 12.0.
RECORDS = [
    _record(0, 10.0, 10.2, 11.2, 11, rounds=4, accepted=7, proactive_hits=1, proactive_attempts=3),
    _record(1, 10.0, 10.5, 10.9, 6, rounds=2, accepted=4, proactive_hits=1, proactive_attempts=1),
    _record(1, 11.0, 11.1, 12.0, 1, rounds=1, accepted=0),  # one token: no ITL
]


def test_latency_metrics_from_known_timestamps() -> None:
    metrics = compute_run_metrics(RECORDS, ServerUsage(wall_s=2.0), Prices())
    assert metrics.requests == 3 and metrics.failed_requests == 0
    assert metrics.tokens == 18
    # TTFTs 200, 500, 100 ms.
    assert metrics.ttft_ms_mean == pytest.approx(800 / 3)
    assert metrics.ttft_ms_p50 == pytest.approx(200.0)
    assert metrics.ttft_ms_p99 == pytest.approx(200 + 0.98 * 300)
    # ITLs 100 and 80 ms (the one-token request has none).
    assert metrics.itl_ms_mean == pytest.approx(90.0)
    assert metrics.itl_ms_p50 == pytest.approx(90.0)
    assert metrics.itl_ms_p90 == pytest.approx(80 + 0.9 * 20)
    assert metrics.itl_ms_p99 == pytest.approx(80 + 0.99 * 20)


def test_throughput_rounds_acceptance_and_proactive() -> None:
    usage = ServerUsage(
        wall_s=2.0,
        busy_s=1.5,
        wire_bytes=1800,
        host_cpu_s=0.36,
        batches=4,
        batched_sequences=10,
        batched_rows=30,
        verify_s=1.2,
    )
    metrics = compute_run_metrics(RECORDS, usage, Prices())
    assert metrics.server_throughput_tok_s == pytest.approx(9.0)
    assert metrics.tokens_per_round == pytest.approx(18 / 7)
    assert metrics.acceptance_rate == pytest.approx(11 / 18)
    assert metrics.proactive_hit_rate == pytest.approx(2 / 4)
    assert metrics.server_busy_fraction == pytest.approx(0.75)
    assert metrics.server_busy_ms_per_token == pytest.approx(1500 / 18)
    assert metrics.bytes_per_token == pytest.approx(100.0)
    assert metrics.server_host_ms_per_token == pytest.approx(360 / 18)
    assert metrics.server_mean_batch == pytest.approx(2.5)
    assert metrics.server_rows_per_batch == pytest.approx(7.5)
    assert metrics.server_ms_per_batch == pytest.approx(300.0)
    unmeasured = compute_run_metrics(RECORDS, ServerUsage(wall_s=2.0), Prices())
    assert unmeasured.server_host_ms_per_token is None and unmeasured.server_mean_batch is None


def test_cost_counts_server_wall_and_edge_engaged_time() -> None:
    prices = Prices(server_per_hour=3600.0, edge_per_hour=360.0)  # $1/s and $0.1/s
    edges = engaged_times(RECORDS)
    assert edges == pytest.approx((1.2, 2.0))  # client 0: 10.0-11.2, client 1: 10.0-12.0
    metrics = compute_run_metrics(RECORDS, ServerUsage(wall_s=2.0, edge_engaged_s=edges), prices)
    assert metrics.cost_usd == pytest.approx(2.0 + 0.1 * 3.2)
    assert metrics.cost_per_mtok_usd == pytest.approx(2.32 / 18 * 1e6)
    assert metrics.tokens_per_usd == pytest.approx(18 / 2.32)


def test_server_only_pays_the_server_alone() -> None:
    metrics = compute_run_metrics(RECORDS, ServerUsage(wall_s=3600.0), Prices())
    assert metrics.cost_usd == pytest.approx(4.05)
    assert metrics.edge_engaged_s == 0.0
    assert metrics.cost_per_mtok_usd == pytest.approx(4.05 / 18 * 1e6)


def test_failed_requests_are_counted_but_not_measured() -> None:
    failed = _record(2, 10.0, None, 10.3, 0, error="503: server unreachable")
    metrics = compute_run_metrics([*RECORDS, failed], ServerUsage(wall_s=2.0), Prices())
    assert metrics.requests == 4 and metrics.failed_requests == 1
    assert metrics.tokens == 18
    assert metrics.ttft_ms_mean == pytest.approx(800 / 3)


def test_missing_measurements_are_none_not_zero() -> None:
    plain = [_record(0, 0.0, 0.1, 1.1, 11)]  # no rounds, no proactive attempts reported
    metrics = compute_run_metrics(plain, ServerUsage(wall_s=1.1), Prices())
    assert metrics.tokens_per_round is None
    assert metrics.acceptance_rate is None
    assert metrics.proactive_hit_rate is None
    assert metrics.server_busy_fraction is None
    assert metrics.bytes_per_token is None
    empty = compute_run_metrics([], ServerUsage(wall_s=0.0), Prices())
    assert empty.tokens == 0 and empty.ttft_ms_mean is None and empty.cost_per_mtok_usd is None


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_run_window_and_prices_parse() -> None:
    assert run_window(RECORDS) == pytest.approx(2.0)
    prices = Prices.parse("server=5.05, edge=0.5")
    assert (prices.server_per_hour, prices.edge_per_hour) == (5.05, 0.5)
    assert Prices.parse("edge=1") == Prices(edge_per_hour=1.0)
    for bad in ("gpu=1", "server", "server=abc", "edge=-1"):
        with pytest.raises(ValueError):
            Prices.parse(bad)
