"""The device profile: its fitted surfaces recover known costs, keep out what the points cannot
tell, never let time fall as work grows, and the file round-trips."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from specedge.core.goodput import CostPoint
from specedge.sim.profile import DeviceProfile, ProfileError, SurfaceCost
from tests.sim.profiles import linear_profile


def test_fit_recovers_a_known_surface() -> None:
    truth = SurfaceCost(0.02, 0.001, 0.0004, 2e-7)
    points = [
        CostPoint(n, n * (k + 1), c, truth(n, n * (k + 1), c))
        for n in (1, 2, 4, 8)
        for k in (0, 8, 32)
        for c in (128, 1024)
    ]
    fitted = SurfaceCost.fit(points)
    for a, b in zip(
        (fitted.fixed_s, fitted.per_sequence_s, fitted.per_row_s, fitted.per_row_context_s),
        (truth.fixed_s, truth.per_sequence_s, truth.per_row_s, truth.per_row_context_s),
        strict=True,
    ):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-12)


def test_one_context_says_nothing_of_the_context_term() -> None:
    points = [CostPoint(n, r, 128, 0.01 + 0.001 * r) for n in (1, 2) for r in (n, 4 * n)]
    fitted = SurfaceCost.fit(points)
    assert fitted.per_row_context_s == 0.0
    assert fitted(2, 8, 128) == pytest.approx(0.018)


def test_a_term_that_comes_out_negative_is_dropped() -> None:
    # Times fall slightly with sequences at equal rows (noise): no negative coefficient.
    points = [CostPoint(1, 4, 0, 0.0150), CostPoint(4, 4, 0, 0.0149), CostPoint(4, 16, 0, 0.0270)]
    fitted = SurfaceCost.fit(points)
    assert min(fitted.fixed_s, fitted.per_sequence_s, fitted.per_row_s) >= 0.0
    assert fitted(8, 64, 0) > fitted(1, 1, 0)


def test_linear_at_a_context_is_the_servers_cost_model() -> None:
    surface = SurfaceCost(0.02, 0.001, 0.0004, 1e-6)
    linear = surface.linear(256)
    assert linear(4, 40) == pytest.approx(surface(4, 40, 256))


def test_profile_round_trips(tmp_path: Path) -> None:
    profile = replace(linear_profile(), notes=("a note",), machine={"CPU": "x"})
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = DeviceProfile.load(path)
    assert loaded == profile
    assert loaded.verify_cost(1, 1) == pytest.approx(0.030 + 0.001 + 0.0005)
    assert loaded.rows_of_step(0) == 1.0 and loaded.rows_of_step(99) == 8.0


def test_a_sized_tree_takes_the_steps_measured_for_its_size(tmp_path: Path) -> None:
    table = {1: (1.0,), 4: (1.0, 4.0, 1.0, 0.2), 8: (1.0, 4.0, 4.0, 1.0, 0.2)}
    profile = replace(linear_profile(), draft_rows_by_budget=table)
    assert profile.tree_rows(0, 8, 6) == ()
    assert profile.tree_rows(1, 8, 6) == (1.0,)
    assert profile.tree_rows(4, 8, 6) == (1.0, 4.0, 1.0)  # a step a fifth of trees run: none
    # between measured budgets, step by step: 6 is halfway from 4 to 8
    assert profile.tree_rows(6, 8, 6) == pytest.approx((1.0, 4.0, 2.5, 0.6))
    assert profile.tree_rows(99, 8, 6) == profile.tree_rows(8, 8, 6)  # above the table: its top
    path = tmp_path / "p.json"
    profile.save(path)
    assert DeviceProfile.load(path).draft_rows_by_budget == table  # JSON keys back to ints


def test_without_a_table_a_tree_takes_the_full_shapes_steps() -> None:
    profile = linear_profile(rows_per_step=(1.0, 4.0, 8.0))
    assert profile.tree_rows(32, 32, 4) == (1.0, 4.0, 8.0, 8.0)
    assert profile.tree_rows(2, 32, 4) == (1.0, 4.0)  # no more steps than nodes


def test_bad_profiles_say_how_to_fix_them(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="specedge profile"):
        DeviceProfile.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not a profile JSON"):
        DeviceProfile.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"version": 0}))
    with pytest.raises(ProfileError, match="version 1"):
        DeviceProfile.load(tmp_path / "old.json")
