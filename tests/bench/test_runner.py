"""The runner's plan (runs grouped by deployment) and record rebasing."""

from __future__ import annotations

import dataclasses

import pytest
from rich.progress import Progress

from specedge.bench.config import load_bench_config
from specedge.bench.metrics import RequestRecord, RunMetrics
from specedge.bench.prompts import BenchPrompt
from specedge.bench.results import RunResult, RunSpec, aggregate
from specedge.bench.runner import measure_run, plan_runs, rebase
from specedge.bench.systems import Deployment
from specedge.bench.wan import DelayProxy
from tests.support.fake_openai import (
    BATCH_SECONDS,
    BATCH_SIZE,
    BUSY_PER_REQUEST_S,
    running_fake_api,
)


def test_plan_groups_runs_by_deployment() -> None:
    config = load_bench_config(
        None,
        {
            "clients": "1,2",
            "rtt_ms": "0,15,30",
            "temperatures": "0,0.7",
            "jitter_ms": 2,
            "repeats": 1,
            "worst_case_prompts": "none",
        },
    )
    groups = plan_runs(config, depth=5)
    assert [(g.systems, g.clients) for g in groups] == [
        (("specedge", "specedge-no-proactive"), 2),  # one server, both sets of edges
        (("specedge-no-pipelining",), 1),  # the lockstep server's batch is the client count
        (("specedge-no-pipelining",), 2),
        (("specedge-no-lookup",), 2),  # its server verifies no lookup chains when it decodes
        (("server-spec",), 2),
        (("server-ar",), 2),
        (("vllm",), 2),
        (("vllm-ngram",), 2),
        (("hf-assisted",), 1),
    ]
    edges = groups[0].specs
    assert len([s for s in edges if s.system == "specedge"]) == 2 * 2 * 3
    assert {s.rtt_ms for s in edges if s.system == "specedge-no-proactive"} == {15.0}
    assert {s.rtt_ms for s in groups[3].specs} == {15.0}  # an ablation
    assert {s.rtt_ms for s in groups[4].specs} == {0.0, 15.0}
    assert [(s.clients, s.rtt_ms) for s in groups[8].specs] == [(1, 0.0), (1, 0.0)]
    ar = groups[5].specs[0]
    assert ar.depth is None and ar.budget is None
    spec = edges[0]
    assert spec.depth == 5 and spec.budget == config.budget
    assert spec.jitter_ms == 0.0  # no jitter without delay
    assert edges[1].jitter_ms == 2.0


def test_rebase_counts_from_the_first_start() -> None:
    records = [
        RequestRecord(1, "b", "qa", 105.0, 105.5, 106.0, 3, chunk_times_s=(105.5, 106.0)),
        RequestRecord(0, "a", "qa", 100.0, None, 101.0, 0, error="x"),
    ]
    rebased = rebase(records)
    assert [r.client for r in rebased] == [0, 1]
    assert rebased[1].start_s == 5.0 and rebased[1].first_token_s == 5.5
    assert rebased[1].chunk_times_s == (5.5, 6.0) and rebased[0].first_token_s is None


def test_measure_one_run_through_proxies() -> None:
    """A run against a fake server-only API behind two 20 ms proxies: every metric source
    (client records, busy counter, batch sizes, proxy bytes) reaches the run's metrics."""
    config = load_bench_config(
        None, {"num_prompts": 3, "max_tokens": 12, "requests_per_client": 0, "warmup_per_client": 0}
    )
    prompts = [BenchPrompt(str(i), "qa", f"question {i}") for i in range(3)]
    with running_fake_api() as url:
        port = int(url.rsplit(":", 1)[1])
        proxies = [DelayProxy("127.0.0.1", port).start() for _ in range(2)]
        try:
            deployment = Deployment(
                client_urls={"server-ar": [f"http://{p.address}" for p in proxies]},
                proxies={"server-ar": proxies},
                metrics_url=url + "/metrics",
            )
            spec = RunSpec("server-ar", clients=2, rtt_ms=20.0, temperature=0.0)
            with Progress(disable=True) as progress:
                task = progress.add_task("run")
                run = measure_run(deployment, spec, prompts, config, progress, task)
        finally:
            for proxy in proxies:
                proxy.stop()
    assert all(proxy.rtt_ms == 20.0 for proxy in proxies)
    metrics = run.metrics
    assert metrics.requests == 3 and metrics.failed_requests == 0 and metrics.tokens == 36
    assert len(run.records) == 3 and run.records[0].start_s == 0.0
    assert metrics.wall_s == max(r.end_s for r in run.records)
    assert metrics.ttft_ms_mean is not None and metrics.ttft_ms_mean >= 20.0 + 20.0
    assert metrics.server_busy_s == pytest.approx(3 * BUSY_PER_REQUEST_S)
    assert metrics.server_mean_batch == pytest.approx(BATCH_SIZE)
    assert metrics.server_rows_per_batch == pytest.approx(2 * BATCH_SIZE)
    assert metrics.server_ms_per_batch == pytest.approx(1000 * BATCH_SECONDS)
    assert metrics.bytes_per_token is not None and metrics.bytes_per_token > 0
    assert metrics.edge_engaged_s == 0.0  # server-only: no edges to pay for
    assert metrics.tokens_per_round == pytest.approx(3.0)


def test_repeats_alternate_the_systems_and_the_worst_case_runs_where_it_counts() -> None:
    config = load_bench_config(
        None,
        {"systems": "specedge,server-ar,server-spec", "clients": "1,4", "rtt_ms": "0,15,50"},
    )
    groups = plan_runs(config, depth=5)
    # Two passes over the deployments: a cell's repeats are separated by the other systems.
    assert [g.systems for g in groups] == [("specedge",), ("server-ar",), ("server-spec",)] * 2
    first, second = groups[:3], groups[3:]
    assert {s.repeat for g in first for s in g.specs} == {0}
    assert {s.repeat for g in second for s in g.specs} == {1}
    # Only the reference RTTs repeat; the random-text set runs at 15 ms for two systems.
    assert {s.rtt_ms for g in second for s in g.specs} == {0.0, 15.0}
    random_runs = {
        (s.system, s.rtt_ms) for g in groups for s in g.specs if s.prompt_set == "random"
    }
    assert random_runs == {("specedge", 15.0), ("server-ar", 15.0)}


ZERO_METRICS = RunMetrics(
    **{name: 0 for name in RunMetrics.__dataclass_fields__ if name != "bound"}  # type: ignore[arg-type]
)


def test_aggregate_takes_medians_and_ranges_over_repeats() -> None:
    def run(repeat: int, throughput: float, itl: float) -> RunResult:
        metrics = dataclasses.replace(ZERO_METRICS, server_throughput_tok_s=throughput,
                                      itl_ms_mean=itl, bound="server")  # fmt: skip
        return RunResult(RunSpec("specedge", 4, 15.0, 0.0, repeat=repeat), metrics)

    merged = aggregate([run(0, 10.0, 50.0), run(1, 14.0, 40.0), run(2, 11.0, 45.0)])
    assert len(merged) == 1 and merged[0].spec.repeat == 0
    m = merged[0].metrics
    assert (m.server_throughput_tok_s, m.throughput_min, m.throughput_max) == (11.0, 10.0, 14.0)
    assert (m.itl_ms_mean, m.itl_ms_min, m.itl_ms_max, m.repeats) == (45.0, 40.0, 50.0, 3)
    assert m.bound == "server"
