"""The simulator on profiles with known costs: exact times where the answer is known (one user
decoding, a full batch), the real policies' effects where it is not (trees that never pay are
decoded server-side, trees that pay are verified), the network (RTT, loss), replicas, arrival
processes, determinism, and the benchmark's output files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from specedge.bench.results import read_results
from specedge.cli import app
from specedge.sim.acceptance import AcceptanceModel
from specedge.sim.config import SimConfig, SimConfigError, load_sim_config
from specedge.sim.profile import DeviceProfile
from specedge.sim.run import plan, simulate_run
from tests.sim.profiles import linear_profile, write_records

PROFILE = linear_profile()
STEP_S = 0.030 + 0.001 + 0.0005  # verify_cost(1 sequence, 1 row)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("records")
    return {
        "never": write_records(folder / "never.jsonl", 1.0),
        "good": write_records(folder / "good.jsonl", 4.0),
    }


def run(system: str, acceptance: Path | None = None, **settings: Any) -> Any:
    """One simulated run's metrics (the first cell of the grid `settings` make)."""
    settings = {"systems": system, "edges": "1", "rtt_ms": "0", "max_tokens": 64, **settings}
    if acceptance is not None:
        settings["acceptance"] = str(acceptance)
    config = load_sim_config(None, settings)
    model = AcceptanceModel.from_bench(acceptance, config.depth) if acceptance else None
    return simulate_run(plan(config)[0], config, PROFILE, PROFILE, model)


def test_one_user_decoding_takes_one_step_per_token() -> None:
    result = run("server-ar")
    assert result.metrics.itl_ms_mean == pytest.approx(1000 * STEP_S, rel=1e-9)
    assert result.metrics.tokens == 4 * 64 and result.metrics.requests == 4


def test_a_full_batch_takes_the_batchs_time_per_token() -> None:
    result = run("server-ar", edges="8", warmup_per_edge=0)
    step = PROFILE.verify_cost(8, 8)
    # Once every session is prefilled, each token is one batch of all eight.
    assert result.metrics.itl_ms_p50 == pytest.approx(1000 * step, rel=0.05)
    assert result.metrics.server_busy_fraction == pytest.approx(1.0, abs=0.02)


def test_trees_that_never_pay_are_decoded_on_the_server(records: dict[str, Path]) -> None:
    metrics = run("specedge", records["never"], rtt_ms="15").metrics
    assert metrics.streamed_share > 0.8
    assert metrics.tokens_per_round == pytest.approx(1.0)


def test_a_session_that_ended_streamed_starts_the_next_streamed(records: dict[str, Path]) -> None:
    """As `edge.runtime` does: the next session of the regime skips the trees that lost."""
    result = run("specedge", records["never"], rtt_ms="15", warmup_per_edge=0)
    first, *later = sorted(result.records, key=lambda r: r.start_s)
    assert first.streamed_rounds < first.rounds  # it speculated before streaming
    assert all(r.streamed_rounds == r.rounds for r in later)


def test_trees_that_pay_are_verified(records: dict[str, Path]) -> None:
    metrics = run("specedge", records["good"], rtt_ms="15", requests_per_edge=16).metrics
    assert metrics.streamed_share < 0.2
    assert metrics.tokens_per_round > 3.0
    # Calibrated estimates: predicted tokens per round match the emitted ones.
    assert metrics.predicted_tokens_per_round == pytest.approx(
        metrics.measured_tokens_per_predicted_round, rel=0.1
    )


def test_speculation_pays_the_round_trip(records: dict[str, Path]) -> None:
    near = run("specedge", records["good"], rtt_ms="0", server_decoding=False).metrics
    far = run("specedge", records["good"], rtt_ms="50", server_decoding=False).metrics
    assert far.itl_ms_mean > near.itl_ms_mean + 5


def test_lost_messages_wait_for_the_retransmission(records: dict[str, Path]) -> None:
    clean = run("specedge", records["good"], rtt_ms="15").metrics
    lossy = run("specedge", records["good"], rtt_ms="15", loss=0.2, rto_ms=200.0).metrics
    assert lossy.itl_ms_mean > clean.itl_ms_mean + 10


def test_server_spec_drafts_on_the_servers_device(records: dict[str, Path]) -> None:
    spec = run("server-spec", records["good"]).metrics
    assert spec.tokens_per_round > 3.0
    assert spec.server_busy_fraction == pytest.approx(1.0, abs=0.05)  # drafting is busy time


def test_replicas_share_new_sessions(records: dict[str, Path]) -> None:
    one = run("specedge", records["good"], edges="4", requests_per_edge=2).metrics
    two = run("specedge", records["good"], edges="8", servers=2, requests_per_edge=2).metrics
    assert two.server_throughput_tok_s == pytest.approx(2 * one.server_throughput_tok_s, rel=0.25)
    assert two.cost_usd > one.cost_usd  # two servers' price


@pytest.mark.parametrize("arrival", ["poisson", "bursts"])
def test_open_loop_arrivals(arrival: str) -> None:
    settings = {"arrival": arrival, "edges": "4", "duration_s": 20.0, "warmup_s": 2.0}
    metrics = run("server-ar", rate=0.5, burst_size=2, burst_interval_s=5.0, **settings).metrics
    if arrival == "bursts":  # bursts at 5, 10, 15 s are measured: 3 x 2 x 4 edges
        assert metrics.requests == 24
    else:  # about 0.5/s x 18 s x 4 edges = 36
        assert 15 <= metrics.requests <= 60


def test_same_seed_same_run_other_seed_other_run(records: dict[str, Path]) -> None:
    first = run("specedge", records["good"], edges="4", rtt_ms="15", jitter_ms=5.0)
    again = run("specedge", records["good"], edges="4", rtt_ms="15", jitter_ms=5.0)
    other = run("specedge", records["good"], edges="4", rtt_ms="15", jitter_ms=5.0, seed=1)
    assert first.metrics == again.metrics
    assert first.metrics != other.metrics


def test_many_edges_over_replicas(records: dict[str, Path]) -> None:
    """A smaller count of the 10,000-edge run (docs/simulator.md times that one)."""
    settings = {"edges": "120", "servers": 4, "requests_per_edge": 1, "warmup_per_edge": 0}
    metrics = run("specedge", records["good"], max_tokens=32, **settings).metrics
    assert metrics.requests == 120 and metrics.failed_requests == 0
    assert metrics.tokens == 120 * 32


def test_host_work_per_token_holds_the_server() -> None:
    """The server's host work per emitted token is device time after each batch: one user's
    token takes the step plus it, and the other systems' costs do not apply."""
    result = run("server-ar", host_ms_per_token="server-ar=2.5,specedge=100")
    assert result.metrics.itl_ms_mean == pytest.approx(1000 * STEP_S + 2.5, rel=1e-9)
    full = run("server-ar", edges="8", warmup_per_edge=0, host_ms_per_token="server-ar=2.5")
    step = 1000 * PROFILE.verify_cost(8, 8)  # each token is one batch of all eight, as above
    assert full.metrics.itl_ms_p50 == pytest.approx(step + 8 * 2.5, rel=0.05)
    with pytest.raises(SimConfigError, match="--host-ms-per-token"):
        load_sim_config(None, {"systems": "server-ar", "host_ms_per_token": "tgi=1"})
    with pytest.raises(SimConfigError, match="--host-ms-per-token"):
        load_sim_config(None, {"systems": "server-ar", "host_ms_per_token": "server-ar=-1"})


def test_settings_are_validated() -> None:
    with pytest.raises(SimConfigError, match="--systems"):
        load_sim_config(None, {"systems": "nope"})
    with pytest.raises(SimConfigError, match="--acceptance"):
        load_sim_config(None, {"systems": "specedge"})
    with pytest.raises(SimConfigError, match="--arrival"):
        load_sim_config(None, {"systems": "server-ar", "arrival": "sometimes"})
    assert replace(SimConfig(), edges=(2,)).edges == (2,)


def test_simulate_writes_the_benchmarks_results(tmp_path: Path, records: dict[str, Path]) -> None:
    profile = tmp_path / "profile.json"
    PROFILE.save(profile)
    config = tmp_path / "sim.yaml"
    config.write_text(
        f"profile: profile.json\nacceptance: {records['good']}\nsystems: [specedge, server-ar]\n"
        f"edges: [1, 2]\nrtt_ms: [15]\nmax_tokens: 32\nrequests_per_edge: 2\nout: {tmp_path}/out\n"
    )
    result = CliRunner().invoke(app, ["simulate", "--config", str(config)])
    assert result.exit_code == 0, result.output
    runs, meta = read_results(tmp_path / "out")
    assert {(r.spec.system, r.spec.clients) for r in runs} == {
        (s, n) for s in ("specedge", "server-ar") for n in (1, 2)
    }
    assert meta.config["simulated"].startswith("yes")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "specedge" in report and (tmp_path / "out" / "throughput_vs_clients.png").exists()
    lines = (tmp_path / "out" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 2 * (1 + 2) * 2 and json.loads(lines[0])["chunk_times_s"]


def test_profile_file_is_the_simulators_input(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    PROFILE.save(path)
    assert DeviceProfile.load(path).verify_cost(1, 1) == pytest.approx(STEP_S)
