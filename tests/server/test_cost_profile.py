"""The start-up cost profile: measured on the real engine (positive per-row cost, a batch of
more rows predicted dearer), cached per model and reused, measured again on request, and
the server starts with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from specedge.core.model_runner import ModelRunner
from specedge.core.target import GenerationLimits, TargetEngine
from specedge.model.loader import LoadedModel
from specedge.server import cost_profile
from tests.support.models import tiny_model


@pytest.fixture(scope="module")
def engine() -> TargetEngine:
    target: LoadedModel = tiny_model()
    runner = ModelRunner(target, num_slots=4, max_context=512, max_block=40)
    return TargetEngine(runner, GenerationLimits(max_tree_nodes=32, max_tree_depth=8))


def test_profile_measures_the_engine_and_frees_its_slots(engine: TargetEngine) -> None:
    cost = cost_profile.profile_batch_cost(engine, budget_s=20.0)
    assert cost.fixed_s + cost.per_sequence_s + cost.per_row_s > 0
    assert cost(4, 4 * 33) > cost(1, 1)
    assert engine.runner.kv.num_free == engine.runner.kv.num_slots


def test_profile_is_cached_and_redone_on_request(
    engine: TargetEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPECEDGE_CACHE_DIR", str(tmp_path))
    first = cost_profile.load_or_profile(engine, "tiny")
    files = list((tmp_path / "cost").glob("*.json"))
    assert len(files) == 1
    assert cost_profile.load_or_profile(engine, "tiny") == first  # read back, not measured
    measured = []
    real = cost_profile.profile_batch_cost

    def counting(e: TargetEngine, budget_s: float = cost_profile.PROFILE_BUDGET_S):  # type: ignore[no-untyped-def]
        measured.append(1)
        return real(e, budget_s)

    monkeypatch.setattr(cost_profile, "profile_batch_cost", counting)
    cost_profile.load_or_profile(engine, "tiny")
    assert measured == []
    cost_profile.load_or_profile(engine, "tiny", refresh=True)
    assert measured == [1]
    cost_profile.load_or_profile(engine, "other-model")  # another key: measured
    assert measured == [1, 1] and len(list((tmp_path / "cost").glob("*.json"))) == 2
