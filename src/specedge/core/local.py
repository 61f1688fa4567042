"""Local generation in one process: the library behind `specedge generate`.

The one round loop (`core.round_loop`) with the target in this process as the verifier:
autoregressive decoding with no drafter (every tree empty), speculative decoding with a draft
model growing each tree first (the "server-only speculative" baseline).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from specedge.core.calibration import AcceptanceCalibrator
from specedge.core.draft import DraftEngine, SentTree
from specedge.core.generation import GenerationStats
from specedge.core.goodput import UNPROFILED_BATCH_COST, FittedBatchCost, TreeSizer, select_prefixes
from specedge.core.limits import DEFAULT_MAX_CONTEXT, TreeShape
from specedge.core.model_runner import ModelRunner
from specedge.core.round_loop import (
    Drafter,
    InlineJobs,
    InProcessVerifier,
    ModelDrafter,
    NoDrafter,
    run_rounds,
)
from specedge.core.sampling import SamplingParams
from specedge.core.target import GenerationLimits, TargetEngine, TargetSequence
from specedge.core.verify import VerifyResult
from specedge.model.loader import LoadedModel, check_same_tokenizer


@dataclass(frozen=True)
class GenerationOutput:
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    stats: GenerationStats

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class LocalVerifier(InProcessVerifier):
    """The target in this process verifies one sequence per round
    (`core.round_loop.SessionVerifier`): of a tree with estimates, the prefix that maximises
    expected tokens per second under `cost` (kept current from each round's time), as the
    server's executor does for a batch (`core.goodput`)."""

    def __init__(
        self, target: TargetEngine, seq: TargetSequence, cost: FittedBatchCost | None = None
    ) -> None:
        self.target = target
        self.seq = seq
        self.limits = target.tree_limits
        self.cost = cost

    async def verify(self, sent: SentTree) -> VerifyResult:
        tree = self.target.admit(self.seq, sent.tree)
        if self.cost is not None and sent.estimates and tree.num_nodes:
            keep = select_prefixes([sent.estimates[: tree.num_nodes]], self.cost).verified[0]
            tree = tree.prefix(keep)
        start = time.perf_counter()
        result = self.target.verify([(self.seq, tree)])[0]
        if self.cost is not None:
            self.cost.observe(1, tree.num_nodes + 1, time.perf_counter() - start)
        return result

    def close(self) -> None:
        self.target.close(self.seq)


class LocalGenerator:
    """Target (and optionally draft) in this process; `draft=None` decodes autoregressively.
    With `adaptive` (`--budget auto`) trees are sized to what the verifier's goodput
    selection kept recently and cut to what pays; otherwise every tree has the shape's
    budget and is verified whole (the fixed-size behaviour)."""

    def __init__(
        self,
        target: LoadedModel,
        draft: LoadedModel | None = None,
        shape: TreeShape | None = None,
        max_context: int = DEFAULT_MAX_CONTEXT,
        *,
        adaptive: bool = True,
    ) -> None:
        self.shape = shape or TreeShape()
        self.adaptive = adaptive
        self.calibrator = AcceptanceCalibrator()
        self.cost = FittedBatchCost(UNPROFILED_BATCH_COST)
        max_context = min(max_context, target.config.max_context)
        limits = GenerationLimits(max_tree_nodes=self.shape.budget, max_tree_depth=self.shape.depth)
        self.target = TargetEngine(
            ModelRunner(
                target, num_slots=1, max_context=max_context, max_block=self.shape.budget + 8
            ),
            limits,
        )
        self.draft: DraftEngine | None = None
        if draft is not None:
            check_same_tokenizer(target, draft)
            max_context = min(max_context, draft.config.max_context)
            runner = ModelRunner(
                draft, num_slots=1, max_context=max_context, max_block=self.shape.max_block
            )
            self.draft = DraftEngine(runner, self.shape)

    def generate(
        self,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationOutput:
        """Generate for one prompt; `on_tokens` sees each round's emitted tokens. Callable
        from inside an event loop too (the loop then runs on a helper thread)."""
        generation = self._generate(
            prompt_tokens, params, max_new_tokens, stop_token_ids, on_tokens
        )
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop here: the usual case
            return asyncio.run(generation)
        with concurrent.futures.ThreadPoolExecutor(1) as thread:
            return thread.submit(asyncio.run, generation).result()

    async def _generate(
        self,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
        on_tokens: Callable[[list[int]], None] | None,
    ) -> GenerationOutput:
        stats = GenerationStats()
        seq = self.target.open(prompt_tokens, params, max_new_tokens, stop_token_ids)
        verifier = LocalVerifier(self.target, seq, self.cost if self.adaptive else None)
        drafter: Drafter = NoDrafter()
        try:
            if self.draft is not None:
                drafter = ModelDrafter(
                    self.draft,
                    list(prompt_tokens),
                    InlineJobs(),
                    temperature=params.temperature,
                    calibrator=self.calibrator,
                    sizer=TreeSizer(self.shape.budget) if self.adaptive else None,
                )
            self.target.prefill(seq)
            async for tokens in run_rounds(len(prompt_tokens), drafter, verifier, stats):
                if on_tokens:
                    on_tokens(tokens)
        finally:
            verifier.close()
            drafter.close()
        return GenerationOutput(
            token_ids=seq.committed[seq.num_prompt :],
            prompt_tokens=seq.num_prompt,
            finish_reason=seq.finish_reason or "length",
            stats=stats,
        )
