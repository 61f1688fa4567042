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


def test_slots_reserve_the_blocks_they_need_and_admission_counts_free_blocks() -> None:
    """A short request takes a few blocks, not `max_len`; a request that does not fit in the
    free blocks is refused with a message saying so, and fits again once blocks are freed."""
    kv = KVCache(small_config(), num_slots=8, max_len=64, num_blocks=10, block_size=4)
    short = [kv.allocate(capacity=6) for _ in range(4)]  # 2 blocks each
    assert kv.num_free_blocks == 2 and all(kv.capacity(s) == 8 for s in short)
    assert kv.can_allocate(capacity=8) and not kv.can_allocate(capacity=9)
    with pytest.raises(CapacityError, match="3 blocks needed, 2 of 10 free"):
        kv.allocate(capacity=12)
    kv.free(short[3])
    kv.free(short[2])
    long = kv.allocate(capacity=24)  # 6 blocks: the freed 4 and the last 2, merged into one run
    assert kv.is_contiguous(long) and kv.num_free_blocks == 0


def test_random_churn_leaks_no_blocks_and_keeps_every_slots_data() -> None:
    """Random allocations and frees of random sizes, some scattered over a fragmented pool:
    each live slot reads back exactly what was written to it, and when all are freed the
    pool is whole again (one run: nothing leaked, nothing freed twice)."""
    config = small_config()
    kv = KVCache(config, num_slots=12, max_len=40, num_blocks=30, block_size=4)
    rng = torch.Generator().manual_seed(0)
    live: dict[int, tuple[int, torch.Tensor]] = {}
    fragmented = 0
    for _ in range(300):
        if live and (len(live) == 12 or torch.rand(1, generator=rng).item() < 0.45):
            slot = list(live)[int(torch.randint(len(live), (1,), generator=rng))]
            del live[slot]
            kv.free(slot)
            continue
        length = int(torch.randint(1, 40, (1,), generator=rng))
        if not kv.can_allocate(length):
            continue
        slot = kv.allocate(capacity=length)
        fragmented += not kv.is_contiguous(slot)
        data = torch.randn(length, config.num_kv_heads, config.head_dim, generator=rng)
        for layer in range(config.num_layers):
            kv.write(layer, kv.physical(slot, 0, length), data + layer, -data)
        live[slot] = (length, data)
        for other, (other_length, other_data) in live.items():
            keys, values = kv.read(config.num_layers - 1, other, other_length)
            assert torch.equal(keys, (other_data + (config.num_layers - 1)).transpose(0, 1))
            assert torch.equal(values, -other_data.transpose(0, 1))
    assert fragmented > 0, "the churn never fragmented the pool: the gather path is untested"
    for slot in list(live):
        kv.free(slot)
    assert kv.num_free_blocks == 30 and kv.num_free == 12
    assert kv.is_contiguous(kv.allocate(capacity=120))


@pytest.mark.parametrize("scattered", [False, True])
def test_compact_moves_kept_positions_and_leaves_other_slots_alone(scattered: bool) -> None:
    config = small_config()
    kv = KVCache(config, num_slots=8, max_len=12, num_blocks=6, block_size=4)
    if scattered:  # one-block slots, every other one freed: the pool is a comb
        singles = [kv.allocate(capacity=4) for _ in range(6)]
        for slot in singles[::2]:
            kv.free(slot)
        slots = [kv.allocate(capacity=12)]
        for slot in singles[1::2]:
            kv.free(slot)
        slots.append(kv.allocate(capacity=12))
        assert not any(kv.is_contiguous(s) for s in slots)
    else:
        slots = [kv.allocate(capacity=12), kv.allocate(capacity=12)]
        assert all(kv.is_contiguous(s) for s in slots)
    # Position p of slot s holds the value 100 s + p (+ 0.5 in values), in every lane.
    code = torch.arange(12, dtype=torch.float32)[:, None, None].expand(
        12, config.num_kv_heads, config.head_dim
    )
    for layer in range(config.num_layers):
        for i, slot in enumerate(slots):
            kv.write(layer, kv.physical(slot, 0, 12), 100 * i + code + layer, code + 0.5)
    kv.compact(slots[1], start=3, kept_positions=[3, 5, 8, 9])
    assert kv.lengths[slots[1]] == 7
    for layer in range(config.num_layers):
        keys, values = kv.read(layer, slots[1], 7)
        assert (keys[0, :, 0] - 100 - layer).tolist() == [0, 1, 2, 3, 5, 8, 9]
        assert (values[0, :, 0] - 0.5).tolist() == [0, 1, 2, 3, 5, 8, 9]
        untouched, _ = kv.read(layer, slots[0], 12)
        assert (untouched[0, :, 0] - layer).tolist() == list(range(12))


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
