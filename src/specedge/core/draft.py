"""Draft trees grown with a draft model: SpecExec-style best-first search (DESIGN.md section 3).

Each node's *score* is its parent's score + log q(token | parent) + log(decay), decay < 1, so a
child always scores below its parent and the best `budget` nodes never orphan one. A draft step
forwards the <= `beams` best unexpanded nodes (the *frontier*) with tree attention over the
draft's own KV and lets each propose its top-`width` children.

With `TreeShape.lookup` > 0 the first step also hangs the *context lookup chain* from the root
(`specedge.core.lookup`): the tokens that followed an earlier occurrence of the context's last few
tokens, each scored parent score + log p(lookup right) + log(decay) from the sequence's own
record. A candidate proposed twice (by the draft and the lookup) is one node with the better
score. Lookup nodes are not forwarded when added; a draft step that picks one forwards its
not-yet-forwarded ancestors along with it.

Draft KV layout of a sequence's slot: committed tokens with KV at 0..kv_len-1, then the growing
*block*: layout nodes already cached by an earlier builder (`cached_parents`), the *pending*
chain (committed tokens without KV yet; the last is the root), then expanded nodes in the order
they were forwarded. `DraftEngine.commit` keeps the root chain (the pending chain and any
cached committed nodes it hangs from) and the accepted expanded nodes, compacting them after the
committed prefix. A proactive subtree (DESIGN.md section 5) is a builder laid out after another
tree's block (`cached_parents`), its pending chain the one bet token hanging from a leaf
(`attach`); when the bet comes true, `DraftEngine.splice` commits through the bet and seeds the
next tree with the subtree, its KV moved to where the next tree expects it.

Four index spaces, never mixed: a *builder index* (`BuilderIndex`) numbers `TreeBuilder.nodes`,
every candidate ever proposed; a *tree index* numbers the nodes of the `DraftTree` that was
sent (what the wire, the verifier and `VerifyResult.accepted_nodes` use); a *block index*
(`DraftNode.block_index`) is a node's place in the draft KV block after the committed prefix;
a *slot position* is `kv_len` + block index. `SentTree` maps tree indices to builder indices
and is the only translation between the two; block indices and slot positions stay inside the
builder and `DraftEngine`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specedge.core.limits import TreeShape
from specedge.core.lookup import LookupStats, lookup_chain
from specedge.core.model_runner import ModelRunner, TreeRow
from specedge.core.tree import ROOT_PARENT, DraftTree
from specedge.core.verify import VerifyResult

NOT_CACHED = -1  # slot position of a node that has not been forwarded
BuilderIndex = int  # index into TreeBuilder.nodes (module docstring)
TopLogprobs = tuple[torch.Tensor, torch.Tensor]  # [n, width] log q values, [n, width] token ids


@dataclass
class DraftNode:
    token: int
    parent: int  # node index in the builder, ROOT_PARENT for children of the root
    score: float
    depth: int
    block_index: int = NOT_CACHED  # index in the block once forwarded (expanded)
    lookup: bool = False  # the score comes from the context lookup, not from log q


@dataclass
class DraftSequence:
    slot: int
    committed: list[int]
    kv_len: int = 0  # committed tokens whose draft KV is in the slot
    lookup_stats: LookupStats = field(default_factory=LookupStats)


@dataclass(frozen=True)
class SentTree:
    """A tree as sent to the verifier, and what it came from: each tree node's builder index
    and the builder (None for an empty tree drafted by no one)."""

    tree: DraftTree
    builder_nodes: tuple[BuilderIndex, ...]  # [num_nodes]
    builder: TreeBuilder | None = None
    # [num_nodes] the estimate sent with each node that the target accepts the whole path to
    # it, calibrated (`core.calibration`) when the drafter has a calibrator; non-increasing in
    # sent order
    estimates: tuple[float, ...] = ()
    # [num_nodes] the draft's raw estimates (`TreeBuilder.acceptance_estimate`), what the
    # calibrator learns from
    raw_estimates: tuple[float, ...] = ()
    # not sent: the draft's guess at the next token while the verifier decodes on its own,
    # scored against what it emits (`core.round_loop.ModelDrafter.probe`)
    probe: bool = False

    @staticmethod
    def empty() -> SentTree:
        return SentTree(DraftTree(), ())

    def accepted_path(self, verdict: VerifyResult) -> list[BuilderIndex]:
        """Builder indices of the verdict's accepted nodes (tree indices)."""
        return [self.builder_nodes[node] for node in verdict.accepted_nodes]


@dataclass(frozen=True)
class StepPlan:
    """One planned draft step of a builder (`TreeBuilder.plan_step`)."""

    row: TreeRow | None  # the forward to run (None: the step adds only lookup candidates)
    parents: list[int]  # builder nodes whose children the forward's rows propose
    last_only: bool = False  # only the row's last token proposes (the root step)
    lookup_after: bool = False  # then hang the lookup chain from the root
    entered: int = 0  # candidates that entered the budget while planning


@dataclass
class TreeBuilder:
    """Grows one tree. Call `step()` until it returns False, then `sent_tree()`."""

    runner: ModelRunner
    seq: DraftSequence
    shape: TreeShape
    cached_parents: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    attach: int = ROOT_PARENT  # block index the pending chain (or, if empty, the root) hangs from
    nodes: list[DraftNode] = field(default_factory=list)
    steps: int = 0
    root_expanded: bool = False
    num_forwarded: int = 0
    use_lookup: bool = False  # add a context lookup chain (the root is the last committed token)
    # The root step also keeps the draft's guess after each pending token but the last
    # (`pending_guesses[i]` follows `pending[i]`): a probe scores streamed tokens in arrears.
    score_pending: bool = False
    pending_guesses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.block_parents: list[int] = list(self.cached_parents)
        self.root_expanded = self.root_expanded or bool(self.nodes)
        self.child_of: dict[tuple[int, int], int] = {
            (node.parent, node.token): i for i, node in enumerate(self.nodes)
        }
        self.lookup: tuple[list[int], int] = ([], 0)  # the chain and its matched suffix length
        self.lookup_added = False

    # -- layout --------------------------------------------------------------------------------
    @property
    def root_block_index(self) -> int:
        if self.pending:
            return len(self.cached_parents) + len(self.pending) - 1
        return self.attach

    def _block_parent(self, node: DraftNode) -> int:
        if node.parent == ROOT_PARENT:
            return self.root_block_index
        parent_index = self.nodes[node.parent].block_index
        assert parent_index != NOT_CACHED, "a node is forwarded before its parent"
        return parent_index

    # -- growth --------------------------------------------------------------------------------
    def step(self) -> bool:
        """One draft forward; False when the tree cannot grow further."""
        plan = self.plan_step()
        if plan is None:
            return False
        hidden = self.runner.forward([plan.row])[0] if plan.row is not None else None
        return self.finish_step(plan, hidden)

    def plan_step(self) -> StepPlan | None:
        """The next draft step's forward row (laid out in the block), or None when the tree
        cannot grow further. Run the row's forward (alone, or batched with other builders'
        rows: `core.draft_batch`), then `finish_step` with its hidden states."""
        if self.steps >= self.shape.depth:
            return None
        if not self.root_expanded:
            row = self._pending_row()
            self.root_expanded = True
            return StepPlan(row, [ROOT_PARENT], last_only=True, lookup_after=True)
        if not self.lookup_added:
            entered = self._add_lookup()
            frontier = self._frontier()
            if not frontier:
                return StepPlan(None, [], entered=entered)
            rows, row = self._nodes_row(frontier)
            return StepPlan(row, rows, entered=entered)
        frontier = self._frontier()
        if not frontier:
            return None
        rows, row = self._nodes_row(frontier)
        return StepPlan(row, rows)

    def finish_step(self, plan: StepPlan, hidden: torch.Tensor | None) -> bool:
        """Propose the children of the planned step's rows from their hidden states; whether
        any candidate entered the best `budget`."""
        entered = plan.entered
        if plan.row is not None:
            assert hidden is not None
            scored = plan.last_only and self.score_pending  # every row's best guess too
            values, tokens = self.runner.top_logprobs(
                hidden[-1:] if plan.last_only and not scored else hidden, self.shape.width
            )
            if scored:
                self.pending_guesses = tokens[:-1, 0].tolist()
                values, tokens = values[-1:], tokens[-1:]
            top = values, tokens
            entered += self._propose(plan.parents, top)
        if plan.lookup_after:
            entered += self._add_lookup()
        self.steps += 1
        return entered > 0

    def grow(self) -> None:
        while self.step():
            pass

    def expand(self, nodes: Sequence[int]) -> None:
        """Forward `nodes` (whose parents are cached) in one draft step and add all their
        top-`width` children as candidates, outside the best-first order: proactive drafting
        uses it to score its bets on a tree that has already been sent."""
        if nodes:
            self._propose(*self._forward_nodes(nodes))

    def _frontier(self) -> list[int]:
        alive = set(self._best(self.shape.budget))
        candidates = [
            i
            for i in alive
            if self.nodes[i].block_index == NOT_CACHED and self.nodes[i].depth < self.shape.depth
        ]
        candidates.sort(key=lambda i: -self.nodes[i].score)
        return candidates[: self.shape.beams]

    def _pending_row(self) -> TreeRow:
        """The row of the first step: the pending chain, whose last token is the root."""
        if not self.pending:
            raise AssertionError("the root is cached but has no children: nothing to expand")
        start = len(self.block_parents)
        for i in range(len(self.pending)):
            self.block_parents.append(self.attach if i == 0 else start + i - 1)
        self.num_forwarded += len(self.pending)
        return TreeRow(
            self.seq.slot,
            self.seq.kv_len,
            list(self.block_parents),
            list(self.pending),
            num_cached=start,
        )

    def _forward_nodes(self, frontier: Sequence[int]) -> tuple[list[int], TopLogprobs]:
        """Forward the frontier and its unforwarded ancestors in one draft step; the
        forwarded nodes, parents first, and each one's top children."""
        rows, row = self._nodes_row(frontier)
        hidden = self.runner.forward([row])[0]
        return rows, self.runner.top_logprobs(hidden, self.shape.width)

    def _nodes_row(self, frontier: Sequence[int]) -> tuple[list[int], TreeRow]:
        """Lay out the frontier and any of its ancestors not forwarded yet (lookup nodes) in
        the block; the nodes, parents first, and their forward row."""
        todo: set[int] = set()
        for i in frontier:
            while i != ROOT_PARENT and i not in todo and self.nodes[i].block_index == NOT_CACHED:
                todo.add(i)
                i = self.nodes[i].parent
        rows = sorted(todo)  # creation order puts parents first
        num_cached = len(self.block_parents)
        for offset, i in enumerate(rows):
            self.block_parents.append(self._block_parent(self.nodes[i]))
            self.nodes[i].block_index = num_cached + offset
        row = TreeRow(
            self.seq.slot,
            self.seq.kv_len,
            list(self.block_parents),
            [self.nodes[i].token for i in rows],
            num_cached=num_cached,
        )
        self.num_forwarded += len(rows)
        return rows, row

    def _add(self, token: int, parent: int, score: float, lookup: bool = False) -> tuple[int, bool]:
        """Add a candidate, or raise the score of the sibling with the same token (siblings
        stay distinct); the node's index and whether it is new or better."""
        existing = self.child_of.get((parent, token))
        if existing is not None:
            node = self.nodes[existing]
            if score <= node.score:
                return existing, False
            self._raise(existing, score - node.score)
            node.lookup = lookup
            return existing, True
        depth = 1 if parent == ROOT_PARENT else self.nodes[parent].depth + 1
        self.nodes.append(DraftNode(token, parent, score, depth, lookup=lookup))
        self.child_of[(parent, token)] = len(self.nodes) - 1
        return len(self.nodes) - 1, True

    def _raise(self, index: int, delta: float) -> None:
        """Add `delta` to a node's score and its descendants' (a score is a sum along the
        path, so the subtree keeps its ranking below the node)."""
        raised = {index}
        self.nodes[index].score += delta
        for i in range(index + 1, len(self.nodes)):  # descendants come after their ancestors
            if self.nodes[i].parent in raised:
                raised.add(i)
                self.nodes[i].score += delta

    def _add_lookup(self) -> int:
        """Hang the context lookup chain from the root; count its nodes within the budget."""
        self.lookup_added = True
        if not self.use_lookup or self.shape.lookup == 0:
            return 0
        length = min(self.shape.lookup, self.shape.depth)
        chain, ngram = lookup_chain(self.seq.committed, length)
        self.lookup = (chain, ngram)
        step_score = self.seq.lookup_stats.log_p(ngram) + math.log(self.shape.decay)
        parent, score, added = ROOT_PARENT, 0.0, []
        for token in chain:
            score += step_score
            parent, changed = self._add(token, parent, score, lookup=True)
            score = self.nodes[parent].score
            if changed:
                added.append(parent)
        return self._within_budget(added)

    def _propose(self, parents: Sequence[int], top: TopLogprobs) -> int:
        """Add each parent's top-`width` children that rank within the budget; count them."""
        values, tokens = top
        log_decay = math.log(self.shape.decay)
        added = []
        for row, parent in enumerate(parents):
            base_score = 0.0 if parent == ROOT_PARENT else self.nodes[parent].score
            for logq, token in zip(values[row].tolist(), tokens[row].tolist(), strict=True):
                node, changed = self._add(token, parent, base_score + logq + log_decay)
                if changed:
                    added.append(node)
        return self._within_budget(added)

    def _within_budget(self, nodes: Sequence[int]) -> int:
        """How many of `nodes` rank within the best `budget`."""
        best = set(self._best(self.shape.budget))
        return sum(1 for i in nodes if i in best)

    def _best(self, count: int) -> list[int]:
        order = sorted(range(len(self.nodes)), key=lambda i: (-self.nodes[i].score, i))
        return order[:count]

    # -- result --------------------------------------------------------------------------------
    def sent_tree(
        self,
        max_nodes: int | None = None,
        calibrate: Callable[[Sequence[float]], Sequence[float]] | None = None,
    ) -> SentTree:
        """The best `budget` (or fewer, `max_nodes`) nodes, each with its builder index and
        acceptance estimate, best-first by estimate: a parent's is never below its
        children's (ties keep creation order), so parents come first and every prefix is a
        tree, the prefix a verifier may cut to (`core.goodput`). `calibrate` (monotone) maps
        the raw estimates to the ones sent."""
        count = self.shape.budget if max_nodes is None else min(self.shape.budget, max_nodes)
        estimates = {i: self.acceptance_estimate(i) for i in self._best(count)}
        kept = sorted(estimates, key=lambda i: (-estimates[i], i))
        new_index = {old: new for new, old in enumerate(kept)}
        tokens = tuple(self.nodes[i].token for i in kept)
        parents = tuple(
            ROOT_PARENT if self.nodes[i].parent == ROOT_PARENT else new_index[self.nodes[i].parent]
            for i in kept
        )
        raw = tuple(estimates[i] for i in kept)
        sent = raw
        if calibrate is not None:
            # Calibration is monotone; the running minimum absorbs its rounding errors.
            sent = tuple(itertools.accumulate(calibrate(raw), min))
        return SentTree(DraftTree(tokens, parents), tuple(kept), self, sent, raw)

    def acceptance_estimate(self, node: BuilderIndex) -> float:
        """The draft's own estimate that the target accepts the path to `node`: the product of
        each step's probability along it (log q of the draft, or the lookup record's log p),
        which is the score without its depth decay. Uncalibrated; never above the parent's,
        which the arithmetic alone does not ensure: a certain step (log q rounded to 0) can
        round a child's product one ulp above its parent's, so it is the least along the path."""
        log_decay = math.log(self.shape.decay)
        estimate = 1.0
        while node != ROOT_PARENT:
            entry = self.nodes[node]
            estimate = min(estimate, math.exp(entry.score - entry.depth * log_decay))
            node = entry.parent
        return estimate

    # -- proactive drafting (edge.proactive) ----------------------------------------------------
    def best_children(self, parents: Sequence[BuilderIndex]) -> list[BuilderIndex]:
        """Forward those of `parents` not forwarded yet (one draft step, their top-`width`
        children become candidates outside the best-first order), then return the best-scoring
        child of each parent that has one."""
        self.expand([i for i in parents if self.nodes[i].block_index == NOT_CACHED])
        wanted = set(parents)
        best: dict[int, int] = {}
        for i, node in enumerate(self.nodes):
            if node.parent in wanted:
                current = best.get(node.parent)
                if current is None or node.score > self.nodes[current].score:
                    best[node.parent] = i
        return list(best.values())

    def subtree(self, leaf: BuilderIndex, token: int, shape: TreeShape) -> TreeBuilder:
        """A builder for the tree rooted at `token` hanging from forwarded node `leaf`, laid out
        after this builder's block (a proactive subtree); its steps are the caller's to run."""
        attach = self.nodes[leaf].block_index
        assert attach != NOT_CACHED, "a subtree hangs from a forwarded node"
        return TreeBuilder(
            self.runner,
            self.seq,
            shape,
            cached_parents=list(self.block_parents),
            pending=[token],
            attach=attach,
        )

    def slot_position(self, node: int) -> int:
        """Slot position of a forwarded node's KV."""
        return self.seq.kv_len + self.nodes[node].block_index

    def root_chain(self) -> list[int]:
        """Block indices of the committed tokens laid out in the block: the root and its
        block ancestors (an earlier tree's accepted path, the pending chain), in block order."""
        assert self.root_expanded, "the pending chain is laid out by the first step"
        chain = []
        index = self.root_block_index
        while index != ROOT_PARENT:
            chain.append(index)
            index = self.block_parents[index]
        return chain[::-1]


class DraftEngine:
    def __init__(self, runner: ModelRunner, shape: TreeShape) -> None:
        self.runner = runner
        self.shape = shape

    def open(self, prompt_tokens: Sequence[int]) -> DraftSequence:
        slot = self.runner.kv.allocate()
        return DraftSequence(slot=slot, committed=list(prompt_tokens))

    def prefill(self, seq: DraftSequence, max_tokens: int | None = None) -> bool:
        """KV for the committed tokens but the root, at most `max_tokens` of them per call (so
        a long prompt can be interleaved with other work); True once all are in."""
        end = len(seq.committed) - 1
        if max_tokens is not None:
            end = min(end, seq.kv_len + max_tokens)
        todo = seq.committed[seq.kv_len : end]
        if todo:
            self.runner.prefill(seq.slot, todo, seq.kv_len)
            seq.kv_len = end
        return seq.kv_len >= len(seq.committed) - 1

    def builder(self, seq: DraftSequence) -> TreeBuilder:
        return TreeBuilder(
            self.runner, seq, self.shape, pending=seq.committed[seq.kv_len :], use_lookup=True
        )

    def advance(
        self,
        seq: DraftSequence,
        sent: SentTree,
        verdict: VerifyResult,
        seed: TreeBuilder | None = None,
        shape: TreeShape | None = None,
    ) -> TreeBuilder:
        """Commit a round's verdict on `sent` and return the next tree's builder: seeded with
        `seed` (a proactive subtree whose root is the verdict's bonus token, see `splice`) or
        fresh. The sequence's lookup record learns from the verdict here, and only here."""
        assert sent.builder is not None, "an empty tree needs no draft commit"
        seq.lookup_stats.record(*sent.builder.lookup, verdict.emitted_tokens)
        if seed is not None:
            return self._splice(seq, seed, verdict.emitted_tokens, shape or self.shape)
        self._commit(seq, sent.builder, sent.accepted_path(verdict), verdict.emitted_tokens)
        return self.builder(seq)

    def _commit(
        self,
        seq: DraftSequence,
        builder: TreeBuilder,
        accepted_nodes: Sequence[BuilderIndex],  # along the accepted path
        emitted_tokens: Sequence[int],
    ) -> None:
        """Keep the root chain (committed tokens in the block) and the cached prefix of the
        accepted path, compacted after the committed prefix; drop the rest. A builder that
        never stepped (an empty tree sent at once) laid nothing out: its pending chain simply
        grows by the emitted tokens."""
        if not builder.root_expanded:
            seq.committed.extend(emitted_tokens)
            return
        start = seq.kv_len
        kept = [start + index for index in builder.root_chain()]
        for node in accepted_nodes:
            if builder.nodes[node].block_index == NOT_CACHED:
                break
            kept.append(builder.slot_position(node))
        self.runner.kv.compact(seq.slot, start, kept)
        seq.kv_len = start + len(kept)
        seq.committed.extend(emitted_tokens)

    def _splice(
        self,
        seq: DraftSequence,
        builder: TreeBuilder,
        emitted_tokens: Sequence[int],
        shape: TreeShape,
    ) -> TreeBuilder:
        """Commit `emitted_tokens`, which end exactly at `builder`'s root (a proactive subtree
        whose bet came true), and return a builder for the next tree seeded with that subtree.

        The root chain (now all committed, the root included) becomes context; the subtree's
        forwarded nodes move right after it, so every kept KV entry sits at the slot position
        its own position id says. The seeded builder's root is the last context token."""
        chain = builder.root_chain()
        forwarded = sorted(
            (i for i, node in enumerate(builder.nodes) if node.block_index != NOT_CACHED),
            key=lambda i: builder.nodes[i].block_index,
        )
        start = seq.kv_len
        kept = [start + index for index in chain]
        kept += [builder.slot_position(i) for i in forwarded]
        self.runner.kv.compact(seq.slot, start, kept)
        seq.kv_len = start + len(chain)
        seq.committed.extend(emitted_tokens)
        assert seq.kv_len == len(seq.committed), "the emitted tokens must end at the root"
        new_index = {old: new for new, old in enumerate(forwarded)}
        nodes = [
            DraftNode(
                node.token,
                node.parent,
                node.score,
                node.depth,
                new_index.get(i, NOT_CACHED),
                node.lookup,
            )
            for i, node in enumerate(builder.nodes)
        ]
        cached_parents = [
            ROOT_PARENT if nodes[i].parent == ROOT_PARENT else nodes[nodes[i].parent].block_index
            for i in forwarded
        ]
        return TreeBuilder(
            self.runner,
            seq,
            shape,
            cached_parents=cached_parents,
            nodes=nodes,
            steps=builder.steps,
            root_expanded=True,
            use_lookup=True,
        )

    def close(self, seq: DraftSequence) -> None:
        self.runner.kv.free(seq.slot)
