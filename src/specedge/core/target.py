"""Target-side sequences: prefill, batched tree verification, KV compaction.

A `TargetSequence` holds a request's committed tokens (prompt + emitted); the last one is the
*root* of the next tree and has no KV yet, so the slot always holds len(committed) - 1
positions between rounds. `TargetEngine.verify` runs one batched forward over several
sequences' trees (root + nodes), draws one target sample per node with each request's own
sampling parameters and generator, decides acceptance (`verify.verify_tree`) and compacts each
slot to the root + accepted path. Autoregressive decoding is verification of an empty tree.

Sequences share the forward but not their fate: `verify_each` samples each sequence on its
own, and a sequence whose sampling fails (it raised, or its logits had no distribution) comes
back as a `SequenceFailure` with its KV left as the forward wrote it (its owner closes it);
the other sequences' rounds complete as if it had not been in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from specedge.core.limits import DEFAULT_PREFILL_CHUNK, TreeLimits
from specedge.core.model_runner import ModelRunner, TreeRow
from specedge.core.sampling import INVALID_TOKEN, SamplingParams, sample_at, stream_seed
from specedge.core.tree import DraftTree, validate_tree
from specedge.core.verify import VerifyResult, verify_tree
from specedge.errors import InvalidRequestError, SpecEdgeError


class SamplingError(SpecEdgeError):
    """One sequence's round could not be sampled (see `SequenceFailure`)."""


@dataclass(frozen=True)
class SequenceFailure:
    """A sequence of a batch whose round failed; nothing of the round was committed."""

    reason: str


@dataclass(frozen=True)
class GenerationLimits:
    max_tree_nodes: int = 128
    max_tree_depth: int = 32


@dataclass
class TargetSequence:
    slot: int
    committed: list[int]
    num_prompt: int
    params: SamplingParams
    stream: int  # the sampling stream (`sampling.sample_at`), from the request's seed
    stop_token_ids: frozenset[int]
    max_new_tokens: int
    finish_reason: str | None = None
    prefilled: int = 0  # committed tokens (excluding the root) already in the KV slot
    rounds: int = 0
    accepted: int = 0  # accepted draft tokens over all rounds
    drafted: int = 0  # draft nodes sent over all rounds
    history: list[int] = field(default_factory=list)  # emitted tokens per round

    @property
    def num_generated(self) -> int:
        return len(self.committed) - self.num_prompt

    @property
    def root(self) -> int:
        return self.committed[-1]

    @property
    def needs_prefill(self) -> bool:
        return self.prefilled < len(self.committed) - 1


class TargetEngine:
    def __init__(self, runner: ModelRunner, limits: GenerationLimits | None = None) -> None:
        self.runner = runner
        self.limits = limits or GenerationLimits()
        self.vocab_size = runner.config.vocab_size

    @property
    def tree_limits(self) -> TreeLimits:
        """What this engine verifies: its tree caps and its context (what a verifier built on
        it announces to drafters)."""
        return TreeLimits(
            self.limits.max_tree_nodes, self.limits.max_tree_depth, self.runner.max_context
        )

    def open(
        self,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
    ) -> TargetSequence:
        """Validate a request and take a KV slot for it (prefill is separate, see below)."""
        if not prompt_tokens:
            raise InvalidRequestError("the prompt is empty")
        if max_new_tokens < 1:
            raise InvalidRequestError(f"max tokens must be >= 1, got {max_new_tokens}")
        bad = [t for t in prompt_tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt token id {bad[0]} outside vocab [0, {self.vocab_size})"
            )
        if len(prompt_tokens) >= self.runner.max_context:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_tokens)} tokens; the context limit is "
                f"{self.runner.max_context} (prompt + generated)"
            )
        max_new_tokens = min(max_new_tokens, self.runner.max_context - len(prompt_tokens))
        # The slot reserves what this request can use (its prompt, its answer, one tree past
        # the end), not the longest context: short requests leave the pool to others.
        slot = self.runner.kv.allocate(self.capacity_for(len(prompt_tokens), max_new_tokens))
        return TargetSequence(
            slot=slot,
            committed=list(prompt_tokens),
            num_prompt=len(prompt_tokens),
            params=params,
            stream=stream_seed(params.seed),
            stop_token_ids=frozenset(stop_token_ids),
            max_new_tokens=max_new_tokens,
        )

    def capacity_for(self, num_prompt: int, max_new_tokens: int) -> int:
        """KV positions a request of this size reserves."""
        max_new_tokens = min(max_new_tokens, self.runner.max_context - num_prompt)
        return num_prompt + max_new_tokens + self.runner.max_block

    def can_open(self, num_prompt: int, max_new_tokens: int) -> bool:
        """Whether a request of this size would get a KV slot now."""
        return self.runner.kv.can_allocate(self.capacity_for(num_prompt, max_new_tokens))

    def prefill_chunk(self, seq: TargetSequence, chunk: int = DEFAULT_PREFILL_CHUNK) -> bool:
        """Prefill at most `chunk` prompt tokens; True when the sequence is ready to verify."""
        end = min(seq.prefilled + chunk, len(seq.committed) - 1)
        if end > seq.prefilled:
            self.runner.prefill(seq.slot, seq.committed[seq.prefilled : end], seq.prefilled, chunk)
            seq.prefilled = end
        return not seq.needs_prefill

    def prefill(self, seq: TargetSequence) -> None:
        while not self.prefill_chunk(seq):
            pass

    def admit(self, seq: TargetSequence, tree: DraftTree) -> DraftTree:
        """The tree this sequence's next round verifies: `tree` checked against the vocabulary
        and the caps (InvalidRequestError), then fitted to the context left. The one check of
        a tree on the verifying side."""
        validate_tree(
            tree.tokens,
            tree.parents,
            vocab_size=self.vocab_size,
            max_nodes=self.limits.max_tree_nodes,
            max_depth=self.limits.max_tree_depth,
        )
        if seq.finish_reason is not None:
            raise InvalidRequestError("the sequence has already finished")
        return fit_to_context(tree, len(seq.committed), self.runner.max_context)

    def verify(self, batch: Sequence[tuple[TargetSequence, DraftTree]]) -> list[VerifyResult]:
        """`verify_each` for callers that fail as a whole (one sequence, the cost profile):
        raises SamplingError if any sequence failed."""
        results = []
        for outcome in self.verify_each(batch):
            if isinstance(outcome, SequenceFailure):
                raise SamplingError(outcome.reason)
            results.append(outcome)
        return results

    def verify_each(
        self, batch: Sequence[tuple[TargetSequence, DraftTree]]
    ) -> list[VerifyResult | SequenceFailure]:
        """One batched target forward over every (sequence, tree); see the module docstring.
        Trees must have passed `admit`; sequences must be prefilled. A failure of the forward
        itself raises (it is every sequence's); a failure of one sequence's sampling is that
        sequence's `SequenceFailure`."""
        rows = []
        for seq, tree in batch:
            assert not seq.needs_prefill and seq.finish_reason is None
            tokens, parents = tree.rooted(seq.root)
            rows.append(TreeRow(seq.slot, len(seq.committed) - 1, parents, tokens))
        hidden = self.runner.forward(rows)
        # One LM-head matmul for the whole batch (one per sequence re-reads the head's weights
        # each time: the head is a fifth of a 135M target), in the model's dtype: greedy rows
        # take their argmax there (the same token), sampled rows are converted to float32.
        logits = self.runner.logits(torch.cat(hidden), upcast=False).split([len(h) for h in hidden])
        samples: list[torch.Tensor | SequenceFailure] = []
        for (seq, tree), node_logits in zip(batch, logits, strict=True):
            samples.append(_sample_round(seq, tree, node_logits))
        drawn = [s for s in samples if not isinstance(s, SequenceFailure)]
        flat = torch.cat(drawn).tolist() if drawn else []  # the round's one device-to-host copy
        outcomes: list[VerifyResult | SequenceFailure] = []
        first = 0
        for (seq, tree), node_samples in zip(batch, samples, strict=True):
            if isinstance(node_samples, SequenceFailure):
                outcomes.append(node_samples)
                continue
            drawn_tokens = flat[first : first + len(node_samples)]
            first += len(node_samples)
            if INVALID_TOKEN in drawn_tokens:
                outcomes.append(SequenceFailure("the target's logits had no distribution (NaN)"))
                continue
            result = verify_tree(
                tree.tokens,
                tree.parents,
                drawn_tokens,
                stop_token_ids=seq.stop_token_ids,
                max_new_tokens=seq.max_new_tokens - seq.num_generated,
            )
            self._commit(seq, tree, result)
            outcomes.append(replace(result, num_verified=tree.num_nodes))
        return outcomes

    def _commit(self, seq: TargetSequence, tree: DraftTree, result: VerifyResult) -> None:
        start = len(seq.committed) - 1  # the root's slot position
        kept = [start] + [start + 1 + node for node in result.accepted_nodes]
        self.runner.kv.compact(seq.slot, start, kept)
        seq.committed.extend(result.emitted_tokens)
        seq.prefilled = start + len(kept)
        seq.finish_reason = result.finish_reason
        seq.rounds += 1
        seq.accepted += result.num_accepted
        seq.drafted += tree.num_nodes
        seq.history.append(len(result.emitted_tokens))

    def rewind(self, seq: TargetSequence, context: int) -> None:
        """Undo every round since `seq` held `context` tokens of KV plus its root, so that
        repeated rounds (benchmarks, profiles) all see the same context. Committing only moves
        KV at or past the root's position, so the context's KV is still valid."""
        del seq.committed[context + 1 :]
        seq.prefilled = context
        seq.finish_reason = None
        self.runner.kv.set_length(seq.slot, context)

    def close(self, seq: TargetSequence) -> None:
        self.runner.kv.free(seq.slot)


def _sample_round(
    seq: TargetSequence,
    tree: DraftTree,
    node_logits: torch.Tensor,  # [1 + num_nodes, V]
) -> torch.Tensor | SequenceFailure:  # [1 + num_nodes] int64
    """The target's sample at the root and at every node of one sequence's tree: the root
    draws for the next position, a node at depth d for d positions later. Whatever goes wrong
    here is this sequence's failure alone."""
    root_position = len(seq.committed)
    positions = [root_position, *(root_position + d for d in tree.depths())]
    try:
        if not seq.params.greedy:
            node_logits = node_logits.float()
        return sample_at(node_logits, seq.params, seq.stream, positions)
    except Exception as error:  # isolation: one sequence's sampling never fails the batch
        return SequenceFailure(f"sampling failed ({type(error).__name__}: {error})")


def fit_to_context(tree: DraftTree, context_len: int, max_context: int) -> DraftTree:
    """Keep the first nodes that fit in the context (a prefix of a well-formed tree is a tree).

    A drafter sizes its trees to the room its verifier announced (`core.round_loop.TreeLimits`);
    a tree that still does not fit loses its last nodes here, which only lowers the
    acceptance, never changes the output, so the session goes on instead of failing.
    """
    room = max_context - context_len
    if tree.num_nodes <= room or room < 0:
        return tree  # room < 0 cannot happen for an open session: its prompt was checked
    return tree.prefix(room)
