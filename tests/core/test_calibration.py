"""Calibrated acceptance estimates: monotone (a tree sent best-first stays best-first), learn
the true acceptance rate of a miscalibrated draft, move bins the verifier never tried with the
others, keep temperature regimes apart, and ignore nodes that were not verified."""

from __future__ import annotations

import random

from specedge.core.calibration import AcceptanceCalibrator, temperature_regime

RAW = [1.0, 0.8, 0.5, 0.3, 0.2, 0.1, 0.05, 0.01, 0.001, 1e-5, 0.0]


def non_increasing(values: tuple[float, ...]) -> bool:
    return all(later <= earlier for earlier, later in zip(values, values[1:], strict=False))


def teach(calibrator: AcceptanceCalibrator, truth: float, temperature: float, rounds: int) -> None:
    """Rounds of single-node trees with raw estimate 0.3 that the target accepts with
    probability `truth`."""
    rng = random.Random(1)
    for _ in range(rounds):
        accepted = [0] if rng.random() < truth else []
        calibrator.observe([0.3], 1, accepted, temperature)


def test_before_any_verdict_the_raw_estimate_stands() -> None:
    calibrated = AcceptanceCalibrator().calibrate(RAW, 0.0)
    assert non_increasing(calibrated)
    for raw, value in zip(RAW[1:-2], calibrated[1:-2], strict=True):  # above the last bin
        assert 0.5 * raw <= value <= 2.0 * raw


def test_learns_an_underconfident_draft_and_stays_monotone() -> None:
    calibrator = AcceptanceCalibrator()
    teach(calibrator, truth=0.9, temperature=0.0, rounds=400)
    calibrated = calibrator.calibrate(RAW, 0.0)
    assert non_increasing(calibrated)
    assert abs(calibrator.calibrate([0.3], 0.0)[0] - 0.9) < 0.08
    # Bins never verified move with the evidence (the fitted exponent), not only the one bin.
    assert calibrator.calibrate([0.05], 0.0)[0] > 0.3


def test_learns_an_overconfident_draft() -> None:
    calibrator = AcceptanceCalibrator()
    teach(calibrator, truth=0.05, temperature=0.7, rounds=400)
    assert calibrator.calibrate([0.3], 0.7)[0] < 0.12
    assert non_increasing(calibrator.calibrate(RAW, 0.7))


def test_temperature_regimes_learn_apart() -> None:
    calibrator = AcceptanceCalibrator()
    teach(calibrator, truth=0.95, temperature=0.0, rounds=300)
    greedy = calibrator.calibrate([0.3], 0.0)[0]
    sampled = calibrator.calibrate([0.3], 1.0)[0]
    assert greedy > 0.85 and sampled < 0.5
    assert [temperature_regime(t) for t in (0.0, 0.3, 0.7, 1.5)] == ["greedy", "low", "mid", "high"]


def test_only_verified_nodes_teach() -> None:
    calibrator = AcceptanceCalibrator()
    for _ in range(200):  # three nodes sent, none verified: nothing to learn
        calibrator.observe([0.3, 0.2, 0.1], 0, [], 0.0)
    assert calibrator.observed_nodes == 0
    assert calibrator.calibrate([0.3], 0.0) == AcceptanceCalibrator().calibrate([0.3], 0.0)
