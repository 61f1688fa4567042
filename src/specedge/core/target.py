"""Target-side sequences: prefill, batched tree verification, KV compaction.

A `TargetSequence` holds a request's committed tokens (prompt + emitted); the last one is the
*root* of the next tree and has no KV yet, so the slot always holds len(committed) - 1
positions between rounds. `TargetEngine.verify` runs one batched forward over several
sequences' trees (root + nodes), draws the target's samples with each request's own sampling
parameters and stream, decides acceptance (`verify.TreeWalk`) and compacts each slot to the
root + accepted path. Autoregressive decoding is verification of an empty tree.

Only the rows on a walk are ever read (the root, then each accepted node), so on a CPU a
round of many rows runs the LM head step by step along the walks, over every sequence's
pending row at once, instead of over all rows (`PATH_HEAD_MIN_ROWS`). Each draw depends only
on the row's logits, the request's stream and the position (`sampling.sample_at`), so which
rows were drawn never changes a token.

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
from specedge.core.verify import TreeWalk, VerifyResult
from specedge.errors import InvalidRequestError, SpecEdgeError

# When the LM head runs along the walks: rounds of at least MIN_ROWS + ROWS_PER_SEQUENCE x
# sequences rows. The head of the bundled target on one core costs about 2.2 ms + 0.27 ms a
# row (2.5 ms for 1 row, 5.3 for 16, 36 for 136), and a step of the walk about 2.2 ms + 0.37
# ms a sequence (the head over their pending rows, their samples); a walk of three draws (the
# root and two accepted nodes, as the bundled draft's rounds) costs less than the head over
# every row from about 16 + 4 x sequences rows.
PATH_HEAD_MIN_ROWS = 16
PATH_HEAD_ROWS_PER_SEQUENCE = 4


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
        # On a CPU (compute-bound, where the head costs each row it runs on), rounds of at
        # least min_rows + rows_per_sequence x sequences rows run the head only on the rows
        # the walks read; min_rows None: every row at once (a GPU: one host copy a round).
        cpu = runner.device.type == "cpu"
        self.path_head_min_rows: int | None = PATH_HEAD_MIN_ROWS if cpu else None
        self.path_head_rows_per_sequence = PATH_HEAD_ROWS_PER_SEQUENCE
        self.num_head_rows = 0  # rows the LM head has run on (the path head's saving)
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
        rounds = [_Round(seq, tree, h) for (seq, tree), h in zip(batch, hidden, strict=True)]
        head_every_row = not self._walks_the_head(len(rows), sum(len(h) for h in hidden))
        while pending := [r for r in rounds if r.failure is None and r.walk.pending is not None]:
            self._draw(pending, head_every_row)
            head_every_row = False  # later steps of the walks: their rows' logits, or the head
        outcomes: list[VerifyResult | SequenceFailure] = []
        for r in rounds:
            if r.failure is not None:
                outcomes.append(r.failure)
                continue
            result = r.walk.result()
            self._commit(r.seq, r.tree, result)
            outcomes.append(replace(result, num_verified=r.tree.num_nodes))
        return outcomes

    def _walks_the_head(self, num_sequences: int, num_rows: int) -> bool:
        """Whether a round runs the LM head along its walks (see `PATH_HEAD_MIN_ROWS`)."""
        if self.path_head_min_rows is None:
            return False
        least = self.path_head_min_rows + self.path_head_rows_per_sequence * num_sequences
        return num_rows >= least

    def _draw(self, rounds: list[_Round], head_every_row: bool) -> None:
        """The target's draws at the rows `rounds` read next, fed to their walks as far as
        they go, with one device-to-host copy. The LM head runs in one matmul over every row
        of the rounds (`head_every_row`; one per sequence would re-read the head's weights
        each time: the head is a fifth of a 135M target), or over the pending rows of rounds
        whose logits it has not computed. It runs in the model's dtype: greedy rows take their
        argmax there (the same token), sampled rows are converted to float32. On a CPU a
        sampled sequence draws only its pending row (sampling a row costs 0.3-1 ms of a 49k
        vocabulary, a greedy one's argmax little); elsewhere every row is drawn at once."""
        if head_every_row:
            hidden = torch.cat([r.hidden for r in rounds])
            self.num_head_rows += len(hidden)
            logits = self.runner.logits(hidden, upcast=False).split([len(r.hidden) for r in rounds])
            for r, round_logits in zip(rounds, logits, strict=True):
                r.logits = round_logits
        picks = [r.rows_to_draw(on_path=self.path_head_min_rows is not None) for r in rounds]
        headless = [i for i, r in enumerate(rounds) if r.logits is None]
        fresh: dict[int, torch.Tensor] = {}
        if headless:
            hidden = torch.cat([rounds[i].hidden[picks[i]] for i in headless])
            self.num_head_rows += len(hidden)
            sizes = [len(picks[i]) for i in headless]
            logits = self.runner.logits(hidden, upcast=False).split(sizes)
            fresh = dict(zip(headless, logits, strict=True))
        samples = [
            r.sample(row, fresh[i] if i in fresh else r.logits_at(row))
            for i, (r, row) in enumerate(zip(rounds, picks, strict=True))
        ]
        drawn = [s for s in samples if not isinstance(s, SequenceFailure)]
        flat = torch.cat(drawn).tolist() if drawn else []
        first = 0
        for r, row, node_samples in zip(rounds, picks, samples, strict=True):
            if isinstance(node_samples, SequenceFailure):
                r.failure = node_samples
                continue
            r.drawn.update(zip(row, flat[first : first + len(row)], strict=True))
            first += len(row)
            r.feed()

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


class _Round:
    """One sequence's part of a `TargetEngine.verify_each`: its tree's hidden states (and
    logits, where the head ran over every row), the target's draws so far (by row: the
    root's is row 0, node i's row i + 1) and the walk down the tree along them."""

    def __init__(self, seq: TargetSequence, tree: DraftTree, hidden: torch.Tensor) -> None:
        self.seq, self.tree, self.hidden = seq, tree, hidden  # hidden: [1 + num_nodes, E]
        root_position = len(seq.committed)  # the root draws for the next position
        self.positions = [root_position, *(root_position + d for d in tree.depths())]
        self.logits: torch.Tensor | None = None  # [1 + num_nodes, V], once the head ran on all
        self.drawn: dict[int, int] = {}
        self.failure: SequenceFailure | None = None
        self.walk = TreeWalk(
            tree.tokens,
            tree.parents,
            stop_token_ids=seq.stop_token_ids,
            max_new_tokens=seq.max_new_tokens - seq.num_generated,
        )

    def rows_to_draw(self, on_path: bool) -> list[int]:
        """Every row, once its logits are known, for a greedy sequence or off the CPU (the walk
        then ends on these draws); else the pending node's."""
        if self.logits is not None and (not on_path or self.seq.params.greedy):
            return list(range(len(self.positions)))
        assert self.walk.pending is not None
        return [self.walk.pending + 1]

    def logits_at(self, rows: list[int]) -> torch.Tensor:
        assert self.logits is not None
        return self.logits if len(rows) == len(self.logits) else self.logits[rows]

    def sample(self, rows: list[int], logits: torch.Tensor) -> torch.Tensor | SequenceFailure:
        """The target's samples at `rows` ([len(rows)] int64, on the device). Whatever goes
        wrong here is this sequence's failure alone."""
        try:
            if not self.seq.params.greedy:
                logits = logits.float()
            positions = [self.positions[row] for row in rows]
            return sample_at(logits, self.seq.params, self.seq.stream, positions)
        except Exception as error:  # isolation: one sequence's sampling never fails the batch
            return SequenceFailure(f"sampling failed ({type(error).__name__}: {error})")

    def feed(self) -> None:
        """Walk on while the pending node's draw is known."""
        while self.walk.pending is not None and (row := self.walk.pending + 1) in self.drawn:
            token = self.drawn[row]
            if token == INVALID_TOKEN:
                self.failure = SequenceFailure("the target's logits had no distribution (NaN)")
                return
            self.walk.feed(token)


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
