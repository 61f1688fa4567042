"""Depth calibration: the published example, clamping, and timing real (tiny) models."""

from __future__ import annotations

import pytest

from specedge.bench.calibrate import measure_timings, suggest_depth
from specedge.core.limits import TreeShape
from tests.support.models import tiny_hf_config, tiny_loaded_model


def test_published_example_gives_depth_seven() -> None:
    # 94.2 ms verify, 11 ms per draft step, ~15 ms RTT (DESIGN.md section 6).
    assert suggest_depth(94.2, 11.0, 15.0) == 7
    assert suggest_depth(94.2, 11.0, 14.0) == 7


def test_depth_balances_drafting_plus_rtt_against_verification() -> None:
    for verify_ms, step_ms, rtt_ms in [(100.0, 10.0, 0.0), (200.0, 20.0, 50.0), (60, 5, 30)]:
        depth = suggest_depth(verify_ms, step_ms, rtt_ms)
        gap = abs(depth * step_ms + rtt_ms - verify_ms)
        assert gap <= step_ms / 2 + 1e-9  # no other depth comes closer


def test_depth_is_clamped() -> None:
    assert suggest_depth(10.0, 11.0, 50.0) == 1  # the RTT alone exceeds verification
    assert suggest_depth(10.0, 11.0, 50.0, min_depth=2) == 2
    assert suggest_depth(1000.0, 1.0, 0.0) == 32
    assert suggest_depth(1000.0, 1.0, 0.0, max_depth=12) == 12


@pytest.mark.parametrize(
    "args", [(0.0, 11.0, 15.0), (94.2, 0.0, 15.0), (94.2, 11.0, -1.0)], ids=str
)
def test_bad_measurements_are_refused(args: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError):
        suggest_depth(*args)


def test_measure_timings_on_tiny_models() -> None:
    config = tiny_hf_config()
    target = tiny_loaded_model(config, seed=1, name="target")
    draft = tiny_loaded_model(config, seed=2, name="draft")
    shape = TreeShape(budget=16, depth=4, width=3, beams=4)
    timings = measure_timings(target, draft, list(range(1, 20)), shape, batch=2, repeats=2)
    assert timings.verify_ms > 0 and timings.draft_step_ms > 0
    assert (timings.batch, timings.budget) == (2, 16)
    assert 1 <= suggest_depth(timings.verify_ms, timings.draft_step_ms, 0.0) <= 32
