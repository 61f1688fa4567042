"""KV memory and admission: the pool is sized by memory, sessions reserve what their prompt and
max tokens need, so the memory 16 contiguous full-length slots took serves 96 short sessions at
once, correctly; a request that does not fit is refused with a message saying why."""

from __future__ import annotations

import asyncio
import random

import pytest

from specedge.core.model_runner import ModelRunner
from specedge.core.sampling import SamplingParams
from specedge.core.target import GenerationLimits, TargetEngine
from specedge.core.tree import DraftTree
from specedge.errors import CapacityError
from specedge.model.kv_cache import KVCache, pool_blocks
from specedge.model.loader import LoadedModel
from specedge.server.executor import VerificationExecutor
from specedge.server.scheduler import SchedulerPolicy
from tests.support.models import tiny_model
from tests.support.reference import reference_tokens

MAX_CONTEXT = 2048
MAX_BLOCK = 24


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model()


def test_pool_blocks_follow_the_memory_and_never_exceed_what_the_slots_can_use(
    target: LoadedModel,
) -> None:
    config, dtype = target.config, target.dtype
    block_bytes = KVCache.bytes_per_position(config, dtype) * 16
    sized = pool_blocks(config, dtype, "cpu", num_slots=64, max_len=2048, memory_gb=1e-3)
    assert sized == int(1e6 // block_bytes)
    capped = pool_blocks(config, dtype, "cpu", num_slots=2, max_len=100, memory_gb=100.0)
    assert capped == 2 * 7  # two slots of ceil(100 / 16) blocks
    assert pool_blocks(config, dtype, "cpu", num_slots=2, max_len=100) == capped  # default


def test_memory_of_16_full_slots_serves_96_short_sessions_correctly(target: LoadedModel) -> None:
    """16 x (2048 + tree room) positions of KV, 128 session handles: 96 sessions of prompt +
    output under 256 tokens run at once through the executor, each equal to the plain greedy
    reference; full-length requests take what is left, then are refused; afterwards every
    block is free again."""
    blocks = 16 * -(-(MAX_CONTEXT + MAX_BLOCK) // 16)
    runner = ModelRunner(
        target, num_slots=128, max_context=MAX_CONTEXT, max_block=MAX_BLOCK, kv_blocks=blocks
    )
    engine = TargetEngine(runner, GenerationLimits(max_tree_nodes=16, max_tree_depth=6))
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(20, 120))] for _ in range(96)]
    max_tokens = [256 - len(p) - 1 for p in prompts]

    async def run(session_id: int) -> list[int]:
        tokens: list[int] = []
        while True:
            result = await executor.verify(session_id, DraftTree())
            tokens += result.emitted_tokens
            if result.finish_reason is not None:
                return tokens

    async def main() -> list[list[int]]:
        executor.start()
        try:
            sessions = [
                executor.open_session(p, SamplingParams(), n)
                for p, n in zip(prompts, max_tokens, strict=True)
            ]
            assert runner.kv.num_slots - runner.kv.num_free == 96
            # What is left (2080 blocks - 96 x 18) holds two full-length sessions (130 each).
            long_prompt = [i % 200 for i in range(1500)]
            long = [executor.open_session(long_prompt, SamplingParams(), 2048) for _ in range(2)]
            with pytest.raises(CapacityError, match="KV cache is full"):
                executor.open_session(long_prompt, SamplingParams(), 2048)
            for session in long:
                executor.close_session(session.session_id)
            outputs = await asyncio.gather(*(run(s.session_id) for s in sessions))
            for session in sessions:
                executor.close_session(session.session_id)
            return outputs
        finally:
            await executor.stop()

    executor = VerificationExecutor(engine, SchedulerPolicy(prefill_chunk=64, max_batch=96))
    outputs = asyncio.run(main())
    assert [len(o) for o in outputs] == max_tokens
    for i in (0, 37, 95):
        assert outputs[i] == reference_tokens(target, prompts[i], max_tokens[i])
    assert runner.kv.num_free_blocks == blocks and runner.kv.num_free == 128
