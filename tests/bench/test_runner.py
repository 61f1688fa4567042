"""The runner's plan (runs grouped by deployment) and record rebasing."""

from __future__ import annotations

from specedge.bench.config import load_bench_config
from specedge.bench.metrics import RequestRecord
from specedge.bench.runner import plan_runs, rebase


def test_plan_groups_runs_by_deployment() -> None:
    config = load_bench_config(
        None, {"clients": "1,2", "rtt_ms": "0,15,30", "temperatures": "0,0.7", "jitter_ms": 2}
    )
    groups = plan_runs(config, depth=5)
    by_system: dict[str, list] = {}
    for group in groups:
        by_system.setdefault(group.system, []).append(group)
    # One deployment serves every SpecEdge run; the lockstep server is per client count.
    assert [g.clients for g in by_system["specedge"]] == [2]
    assert len(by_system["specedge"][0].specs) == 2 * 2 * 3
    assert [g.clients for g in by_system["specedge-no-pipelining"]] == [1, 2]
    assert {s.rtt_ms for s in by_system["specedge-no-proactive"][0].specs} == {15.0}
    assert {s.rtt_ms for s in by_system["server-spec"][0].specs} == {0.0, 15.0}
    hf = by_system["hf-assisted"][0]
    assert [(s.clients, s.rtt_ms) for s in hf.specs] == [(1, 0.0), (1, 0.0)]
    ar = by_system["server-ar"][0].specs[0]
    assert ar.depth is None and ar.budget is None
    spec = by_system["specedge"][0].specs[0]
    assert spec.depth == 5 and spec.budget == config.budget
    assert spec.jitter_ms == 0.0  # no jitter without delay
    assert by_system["specedge"][0].specs[1].jitter_ms == 2.0


def test_rebase_counts_from_the_first_start() -> None:
    records = [
        RequestRecord(1, "b", "qa", 105.0, 105.5, 106.0, 3, chunk_times_s=(105.5, 106.0)),
        RequestRecord(0, "a", "qa", 100.0, None, 101.0, 0, error="x"),
    ]
    rebased = rebase(records)
    assert [r.client for r in rebased] == [0, 1]
    assert rebased[1].start_s == 5.0 and rebased[1].first_token_s == 5.5
    assert rebased[1].chunk_times_s == (5.5, 6.0) and rebased[0].first_token_s is None
