"""Local generation in one process: the loop behind `specedge generate`.

One loop serves both strategies: autoregressive decoding verifies an empty tree each round;
speculative decoding grows a draft tree first (the "server-only speculative" baseline).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from specedge.core.draft import DraftEngine, TreeShape
from specedge.core.model_runner import ModelRunner
from specedge.core.sampling import SamplingParams
from specedge.core.target import GenerationLimits, TargetEngine
from specedge.core.tree import DraftTree
from specedge.errors import TokenizerMismatchError
from specedge.model.loader import LoadedModel, tokenizer_fingerprint

DEFAULT_MAX_CONTEXT = 4096


@dataclass(frozen=True)
class GenerationStats:
    rounds: int
    tokens_per_round: float
    acceptance_rate: float  # share of emitted tokens that were accepted draft tokens
    tokens_per_s: float
    ttft_ms: float


@dataclass(frozen=True)
class GenerationOutput:
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    stats: GenerationStats

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def check_same_tokenizer(target: LoadedModel, draft: LoadedModel) -> None:
    """Raise TokenizerMismatchError unless token ids mean the same to both models."""
    target_fp = tokenizer_fingerprint(target.tokenizer)
    draft_fp = tokenizer_fingerprint(draft.tokenizer)
    if target_fp != draft_fp or target.config.vocab_size != draft.config.vocab_size:
        raise TokenizerMismatchError(
            f"draft {draft.name!r} and target {target.name!r} do not share a tokenizer "
            f"(fingerprints {draft_fp} vs {target_fp}, vocab {draft.config.vocab_size} vs "
            f"{target.config.vocab_size}); pick a draft from the target's model family"
        )


class LocalGenerator:
    """Target (and optionally draft) in this process; `draft=None` decodes autoregressively."""

    def __init__(
        self,
        target: LoadedModel,
        draft: LoadedModel | None = None,
        shape: TreeShape | None = None,
        max_context: int = DEFAULT_MAX_CONTEXT,
    ) -> None:
        self.shape = shape or TreeShape()
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
        start = time.perf_counter()
        seq = self.target.open(prompt_tokens, params, max_new_tokens, stop_token_ids)
        draft_seq = self.draft.open(prompt_tokens) if self.draft else None
        first_token_at = None
        try:
            self.target.prefill(seq)
            if self.draft and draft_seq:
                self.draft.prefill(draft_seq)
            while seq.finish_reason is None:
                builder = None
                tree, node_map = DraftTree(), list[int]()
                if self.draft and draft_seq:
                    builder = self.draft.builder(draft_seq)
                    builder.grow()
                    tree, node_map = builder.tree()
                result = self.target.verify([(seq, tree)])[0]
                if self.draft and draft_seq and builder:
                    accepted = [node_map[node] for node in result.accepted_nodes]
                    self.draft.commit(draft_seq, builder, accepted, result.emitted_tokens)
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if on_tokens:
                    on_tokens(result.emitted_tokens)
        finally:
            self.target.close(seq)
            if self.draft and draft_seq:
                self.draft.close(draft_seq)
        elapsed = time.perf_counter() - start
        generated = seq.committed[seq.num_prompt :]
        stats = GenerationStats(
            rounds=seq.rounds,  # target forwards after prefill: one per token without a draft
            tokens_per_round=len(generated) / max(seq.rounds, 1),
            acceptance_rate=seq.accepted / max(len(generated), 1),
            tokens_per_s=len(generated) / elapsed if elapsed > 0 else 0.0,
            ttft_ms=1000 * ((first_token_at or time.perf_counter()) - start),
        )
        return GenerationOutput(
            token_ids=generated,
            prompt_tokens=seq.num_prompt,
            finish_reason=seq.finish_reason or "length",
            stats=stats,
        )
