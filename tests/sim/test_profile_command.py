"""`specedge profile` on a tiny random model: every cost set is measured and the file is the
simulator's input."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from specedge.cli import app
from specedge.core.limits import TreeShape
from specedge.sim.profile import DeviceProfile
from tests.support.models import random_hf_model, tiny_hf_config, word_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    random_hf_model(tiny_hf_config(), 0).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_profile_measures_every_cost_set(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "profile.json"
    arguments = ["profile", "--quick", "--target", str(model_dir), "--draft", str(model_dir)]
    result = CliRunner().invoke(app, [*arguments, "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    profile = DeviceProfile.load(out)
    assert {(p.sequences, p.rows) for p in profile.verify} == {(1, 1), (1, 5), (2, 2), (2, 10)}
    assert len(profile.prefill) == len(profile.draft_prefill) == 2
    assert profile.draft_step and profile.draft_rows_per_step[0] == 1.0
    # Sized trees, grown as the drafter grows them: one root row alone at budget 1, and a
    # bigger budget never forwards fewer rows in all.
    by_budget = profile.draft_rows_by_budget
    assert by_budget[1] == (1.0,) and max(by_budget) == TreeShape().budget
    totals = [sum(by_budget[b]) for b in sorted(by_budget)]
    assert totals == sorted(totals)
    assert all(p.seconds > 0 for p in profile.verify + profile.draft_step + profile.prefill)
    assert profile.verify_cost(2, 10) > 0 and not profile.estimate


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["profile", "--sequences", "0", "--out", str(tmp_path / "p")])
    assert result.exit_code != 0
    assert "sequences" in str(result.exception) or "sequences" in result.output
