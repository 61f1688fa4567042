"""The acceptance model: alpha inverts tokens per round, the estimates are calibrated by
construction (a statistical check with a fixed seed, and a power check: a wrong alpha fails
it), records are read the way the benchmark writes them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from specedge.sim.acceptance import (
    AcceptanceError,
    AcceptanceModel,
    RequestSample,
    step_acceptance,
)
from tests.sim.profiles import write_records


@pytest.mark.parametrize("depth", [1, 3, 6])
@pytest.mark.parametrize("tokens", [1.0, 1.5, 2.4, 3.9])
def test_alpha_gives_back_tokens_per_round(tokens: float, depth: int) -> None:
    alpha = step_acceptance(tokens, depth)
    expected = sum(alpha**j for j in range(depth + 1))
    assert expected == pytest.approx(min(tokens, depth + 1), abs=1e-6)


def test_estimates_never_rise_and_stop_at_the_path() -> None:
    sample = RequestSample(50, 64, 0.6, 0.0)
    estimates = sample.estimates(10, depth=4)
    assert len(estimates) == 10
    assert all(b <= a for a, b in zip(estimates, estimates[1:], strict=False))
    assert estimates[4:] == (0.0,) * 6


def _mean_accepted(alpha: float, verified: int, depth: int, draws: int = 20_000) -> float:
    rng = random.Random(0)
    sample = RequestSample(50, 64, alpha, 0.0)
    return sum(sample.accepted(verified, depth, rng) for _ in range(draws)) / draws


@pytest.mark.parametrize("verified", [0, 1, 3, 8])
def test_estimates_are_calibrated(verified: int) -> None:
    """Mean accepted tokens over many rounds = the sum of the verified nodes' estimates."""
    sample = RequestSample(50, 64, 0.7, 0.0)
    predicted = sum(sample.estimates(8, depth=6)[:verified])
    assert _mean_accepted(0.7, verified, depth=6) == pytest.approx(predicted, abs=0.03)


def test_the_calibration_check_can_fail() -> None:
    predicted = sum(RequestSample(50, 64, 0.7, 0.0).estimates(8, depth=6)[:3])
    assert abs(_mean_accepted(0.6, 3, depth=6) - predicted) > 0.1


def test_records_fit_alpha_per_request(tmp_path: Path) -> None:
    path = write_records(tmp_path / "requests.jsonl", 2.0)
    model = AcceptanceModel.from_bench(path, depth=6)
    assert model.mean_alpha(0.0) == pytest.approx(step_acceptance(64 / 32, 6))
    sample = model.draw(0.7, random.Random(0))
    assert sample.tokens == 64 and sample.prompt_tokens == 50


def test_streamed_and_cut_rounds_are_left_out_of_the_fit(tmp_path: Path) -> None:
    # 40 rounds: 20 streamed (1 token each), 4 cut (1 each), 16 verified with 40 tokens.
    fields = {"rounds": 40, "streamed_rounds": 20, "cut_rounds": 4, "verified_nodes": 48}
    path = write_records(tmp_path / "r.jsonl", 2.0, **fields)
    model = AcceptanceModel.from_bench(path, depth=6)
    assert model.mean_alpha(0.0) == pytest.approx(step_acceptance(40 / 16, 3))


def test_a_request_never_speculated_gets_its_temperatures_mean(tmp_path: Path) -> None:
    path = write_records(tmp_path / "r.jsonl", 2.0)
    lines = path.read_text().splitlines()
    lines.append(lines[0].replace('"streamed_rounds": 0', '"streamed_rounds": 32'))
    path.write_text("\n".join(lines) + "\n")
    model = AcceptanceModel.from_bench(path, depth=6)
    alphas = [s.alpha for s in model.samples[0.0]]
    assert len(alphas) == 9
    assert alphas == pytest.approx([step_acceptance(2.0, 6)] * 9)


def test_a_system_replays_its_own_requests_where_there_are_some(tmp_path: Path) -> None:
    # SpecEdge's verified rounds emit 3 tokens, server-spec's 1.5: same draft, but SpecEdge
    # verifies only the trees that pay.
    edge = write_records(tmp_path / "edge.jsonl", 3.0).read_text()
    server = write_records(tmp_path / "spec.jsonl", 1.5, system="server-spec").read_text()
    path = tmp_path / "requests.jsonl"
    path.write_text(edge + server)
    model = AcceptanceModel.from_bench(path, depth=6)
    rng = random.Random(0)
    assert model.draw(0.0, rng, "server-spec").alpha == pytest.approx(step_acceptance(64 / 43, 6))
    assert model.draw(0.0, rng, "specedge").alpha == pytest.approx(step_acceptance(64 / 21, 6))
    # a system with no records of its own (an ablation) draws from every drafting system
    alphas = {round(model.draw(0.0, rng, "specedge-per-user").alpha, 6) for _ in range(64)}
    assert len(alphas) == 2


def test_missing_records_and_temperatures_are_errors(tmp_path: Path) -> None:
    with pytest.raises(AcceptanceError, match="cannot read"):
        AcceptanceModel.from_bench(tmp_path / "none", depth=6)
    model = AcceptanceModel.from_bench(write_records(tmp_path / "r.jsonl", 2.0), depth=6)
    with pytest.raises(AcceptanceError, match="temperature 1"):
        model.draw(1.0, random.Random(0))
