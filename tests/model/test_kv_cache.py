"""KV slots: allocation, capacity errors, compaction; and the compaction property on the draft
side: after any sequence of accept/reject rounds, a slot's keys and values for its committed
positions equal a fresh prefill of the committed tokens (the target side, through TargetEngine:
tests/core/test_target.py)."""

from __future__ import annotations

import pytest
import torch

from specedge.core.draft import DraftEngine
from specedge.core.limits import TreeShape
from specedge.core.model_runner import ModelRunner
from specedge.core.sampling import SamplingParams
from specedge.core.target import TargetEngine
from specedge.errors import CapacityError
from specedge.model.config import ModelConfig
from specedge.model.kv_cache import KVCache
from specedge.model.loader import LoadedModel
from tests.support.models import tiny_hf_config, tiny_loaded_model
from tests.support.reference import assert_slot_matches_fresh_prefill

VOCAB = 24  # small, so that random trees often contain the target's sample


def small_config(num_slots_layers: int = 2) -> ModelConfig:
    return ModelConfig.from_hf(tiny_hf_config("llama", num_hidden_layers=num_slots_layers))


def test_allocate_until_full_then_capacity_error() -> None:
    kv = KVCache(small_config(), num_slots=3, max_len=8)
    slots = [kv.allocate() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2] and kv.num_free == 0
    with pytest.raises(CapacityError, match="all 3 KV slots are in use"):
        kv.allocate()
    kv.set_length(slots[1], 5)
    kv.free(slots[1])
    assert kv.num_free == 1
    assert kv.allocate() == slots[1]
    assert kv.lengths[slots[1]] == 0


def test_double_free_is_an_error() -> None:
    kv = KVCache(small_config(), num_slots=2, max_len=8)
    slot = kv.allocate()
    kv.free(slot)
    with pytest.raises(AssertionError):
        kv.free(slot)


def test_compact_moves_kept_positions_and_leaves_other_slots_alone() -> None:
    config = small_config()
    kv = KVCache(config, num_slots=2, max_len=12)
    for layer in range(config.num_layers):
        # Position p of slot s holds the value 100 s + p (+ 0.5 in values), in every lane.
        code = torch.arange(12, dtype=torch.float32)[None, None, :, None]
        for slot in range(2):
            kv.keys[layer][slot] = (100 * slot + code + layer)[0]
            kv.values[layer][slot] = (100 * slot + code + layer + 0.5)[0]
    kv.compact(1, start=3, kept_positions=[3, 5, 8, 9])
    assert kv.lengths[1] == 7
    for layer in range(config.num_layers):
        positions = kv.keys[layer][1, 0, :, 0] - 100 - layer
        assert positions[:7].tolist() == [0, 1, 2, 3, 5, 8, 9]
        assert (kv.values[layer][1, :, :7] - kv.keys[layer][1, :, :7] == 0.5).all()
        untouched = kv.keys[layer][0, 0, :, 0] - layer
        assert untouched.tolist() == list(range(12))


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_loaded_model(tiny_hf_config("llama", vocab_size=VOCAB), seed=11)


@pytest.fixture(scope="module")
def draft() -> LoadedModel:
    return tiny_loaded_model(tiny_hf_config("llama", vocab_size=VOCAB), seed=12)


def test_draft_kv_after_rounds_equals_fresh_prefill(
    target: LoadedModel, draft: LoadedModel
) -> None:
    """Draft trees grown by DraftEngine, verified at temperature 1 by the target: after each
    commit the draft slot holds exactly the K/V of its committed tokens with KV."""
    shape = TreeShape(budget=10, depth=4, width=3, beams=3)
    target_engine = TargetEngine(ModelRunner(target, num_slots=1, max_context=96, max_block=16))
    draft_runner = ModelRunner(draft, num_slots=1, max_context=96, max_block=shape.max_block)
    draft_engine = DraftEngine(draft_runner, shape)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    seq = target_engine.open(prompt, SamplingParams(temperature=1.0, seed=0), max_new_tokens=48)
    target_engine.prefill(seq)
    draft_seq = draft_engine.open(prompt)
    draft_engine.prefill(draft_seq)
    accepted = []
    while seq.finish_reason is None:
        builder = draft_engine.builder(draft_seq)
        builder.grow()
        sent = builder.sent_tree()
        result = target_engine.verify([(seq, sent.tree)])[0]
        draft_engine.advance(draft_seq, sent, result)
        accepted.append(result.num_accepted)
        assert draft_seq.committed == seq.committed
        assert_slot_matches_fresh_prefill(
            draft, draft_runner.kv, draft_seq.slot, draft_seq.committed[: draft_seq.kv_len]
        )
        assert_slot_matches_fresh_prefill(
            target, target_engine.runner.kv, seq.slot, seq.committed[:-1]
        )
    assert 0 in accepted and max(accepted) >= 2
