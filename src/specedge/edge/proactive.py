"""Proactive drafting (DESIGN.md section 5): keep drafting while a tree is being verified.

While a round is in flight the edge bets on its single most likely outcome: the accepted path
ends at leaf L of the sent tree and the bonus token is t. The *bet* (L, t) maximises
score(L) + log(decay_p) + log q(t | L) over the sent tree's leaves, which takes one draft
forward over the leaves not expanded yet. The edge then grows the *proactive subtree* rooted at
t under L, with its own smaller budget and depth, one draft step at a time.

When the reply lands, a *hit* (the accepted path ends exactly at L and the bonus is t) splices
the subtree in as the start of the next tree, its draft KV moved to the slot positions the next
tree expects (`DraftEngine.splice`); growth continues from it under one of two policies:
`keep-depth` keeps the tree's total depth (the next tree is sent sooner), `add-depth` grows the
full depth on top of the subtree (the next tree is deeper). A *miss* discards the subtree and
compacts the draft KV to the prefix + accepted path (`DraftEngine.commit`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

from specedge.core.calibration import AcceptanceCalibrator
from specedge.core.draft import BuilderIndex, DraftEngine, DraftSequence, SentTree, TreeBuilder
from specedge.core.draft_batch import StepBatcher
from specedge.core.goodput import TreeSizer
from specedge.core.limits import TreeLimits, TreeShape
from specedge.core.model_runner import ModelRunner
from specedge.core.round_loop import ModelDrafter
from specedge.core.tree import DraftTree
from specedge.core.verify import VerifyResult
from specedge.edge.config import ProactivePolicy
from specedge.edge.worker import DraftWorker, Priority

T = TypeVar("T")


@dataclass(frozen=True)
class Bet:
    leaf: BuilderIndex  # L, a leaf of the sent tree
    token: int  # t, the predicted bonus token
    score: float  # score(L) + log(decay_p) + log q(t | L): the bet's estimated log-probability


@dataclass
class ProactiveDraft:
    """A bet and the subtree grown for it, laid out after the sent tree's block."""

    bet: Bet
    builder: TreeBuilder

    @property
    def started(self) -> bool:
        """Whether the subtree has any draft KV (its root t was forwarded)."""
        return self.builder.root_expanded


def tree_leaves(tree: DraftTree) -> list[int]:
    """Tree node indices of the nodes without children."""
    parents = set(tree.parents)
    return [node for node in range(tree.num_nodes) if node not in parents]


class ProactiveDrafter:
    """Chooses bets, starts their subtrees and turns a verdict into the next tree's builder."""

    def __init__(
        self,
        draft: DraftEngine,
        policy: ProactivePolicy,
        subtree_shape: TreeShape,
        decay_p: float = 0.9,
    ) -> None:
        assert 0.0 < decay_p < 1.0
        self.draft = draft
        self.policy = policy
        self.subtree_shape = subtree_shape
        self.log_decay_p = math.log(decay_p)

    @property
    def enabled(self) -> bool:
        return self.policy != ProactivePolicy.OFF

    def choose_bet(self, sent: SentTree) -> Bet:
        """The best (leaf, next token) bet on the sent tree; forwards the leaves not expanded
        yet (one draft step), which also gives them the draft KV a subtree hangs from."""
        builder = sent.builder
        assert builder is not None and sent.tree.num_nodes > 0
        leaves = [sent.builder_nodes[node] for node in tree_leaves(sent.tree)]
        children = builder.best_children(leaves)
        # A child's score already holds score(L) + log q(t | L) + log(decay).
        child = builder.nodes[max(children, key=lambda i: builder.nodes[i].score)]
        score = child.score - math.log(builder.shape.decay) + self.log_decay_p
        return Bet(child.parent, child.token, score)

    def start(self, sent: SentTree, bet: Bet) -> ProactiveDraft:
        """The bet's subtree, laid out after the sent tree's block; its steps are the caller's
        to run."""
        assert sent.builder is not None
        return ProactiveDraft(bet, sent.builder.subtree(bet.leaf, bet.token, self.subtree_shape))

    @staticmethod
    def is_hit(proactive: ProactiveDraft | None, sent: SentTree, verdict: VerifyResult) -> bool:
        """The accepted path ends at the bet's leaf and the bonus is t."""
        accepted = sent.accepted_path(verdict)
        emitted = verdict.emitted_tokens
        return (
            proactive is not None
            and proactive.started
            and bool(accepted)
            and accepted[-1] == proactive.bet.leaf
            and len(emitted) == len(accepted) + 1
            and emitted[-1] == proactive.bet.token
        )

    def resolve(
        self,
        seq: DraftSequence,
        sent: SentTree,
        proactive: ProactiveDraft | None,
        verdict: VerifyResult,
        max_depth: int | None = None,  # the server's tree depth cap (bounds add-depth)
    ) -> tuple[TreeBuilder, bool]:
        """Commit a round's verdict and return the next tree's builder and whether the bet
        hit (the next tree then starts from the bet's subtree)."""
        if proactive is not None and self.is_hit(proactive, sent, verdict):
            shape = self._next_shape(proactive.builder, max_depth)
            return self.draft.advance(seq, sent, verdict, proactive.builder, shape), True
        return self.draft.advance(seq, sent, verdict), False

    def _next_shape(self, subtree: TreeBuilder, max_depth: int | None) -> TreeShape:
        """keep-depth: the tree keeps its depth and continues from the subtree's steps;
        add-depth: `depth` more levels on top of them (within the server's cap)."""
        shape = self.draft.shape
        if self.policy != ProactivePolicy.ADD_DEPTH:
            return shape
        depth = shape.depth + subtree.steps
        if max_depth is not None:
            depth = min(depth, max_depth)
        return replace(shape, depth=depth)


class WorkerJobs:
    """`ModelJobs` on the edge's one draft worker thread (`core.round_loop.ModelJobs`), shared
    by the edge's sessions: their draft steps, critical and proactive, are batched into one
    forward when they are ready together (`core.draft_batch`)."""

    def __init__(self, worker: DraftWorker, runner: ModelRunner) -> None:
        self.worker = worker
        self.batcher = StepBatcher(runner, lambda job, p: worker.submit(job, Priority(p)))

    async def run(self, job: Callable[[], T]) -> T:
        return await self.worker.run(job, Priority.CRITICAL)

    async def step(self, builder: TreeBuilder) -> bool:
        return await self.batcher.step(builder, Priority.CRITICAL)

    async def proactive_step(self, builder: TreeBuilder, guard: Callable[[], bool]) -> bool:
        """A proactive subtree's step: skipped (False) once `guard()` is false."""
        return await self.batcher.step(builder, Priority.PROACTIVE, guard)

    def submit_cleanup(self, job: Callable[[], None]) -> concurrent.futures.Future[None]:
        return self.worker.submit(job, Priority.CLEANUP)


class ProactiveModelDrafter(ModelDrafter):
    """The edge's drafter: a `ModelDrafter` that bets on each verdict while it is in flight
    and grows the bet's subtree, one draft step per worker job, until the verdict lands."""

    def __init__(
        self,
        engine: DraftEngine,
        prompt_tokens: list[int],
        jobs: WorkerJobs,
        proactive: ProactiveDrafter,
        limits: TreeLimits,
        *,
        temperature: float = 0.0,
        calibrator: AcceptanceCalibrator | None = None,
        sizer: TreeSizer | None = None,
    ) -> None:
        super().__init__(
            engine,
            prompt_tokens,
            jobs,
            temperature=temperature,
            calibrator=calibrator,
            sizer=sizer,
        )
        self.worker_jobs = jobs
        self.worker = jobs.worker
        self.proactive = proactive
        self.limits = limits
        self.pending: ProactiveDraft | None = None

    async def wait(self, sent: SentTree, verdict: asyncio.Future[VerifyResult]) -> bool:
        self.pending = None
        if not self.proactive.enabled or sent.tree.num_nodes == 0 or sent.probe:
            return False
        arrived = threading.Event()  # read on the worker thread: skip steps queued too late
        verdict.add_done_callback(lambda _: arrived.set())

        def bet() -> ProactiveDraft | None:
            if arrived.is_set():
                return None
            return self.proactive.start(sent, self.proactive.choose_bet(sent))

        pending = await self.worker.run(bet, Priority.PROACTIVE)
        if pending is None:
            return False
        self.pending = pending
        subtree = pending.builder

        def in_flight() -> bool:
            return not arrived.is_set()

        while not verdict.done() and await self.worker_jobs.proactive_step(subtree, in_flight):
            pass
        return pending.started

    async def commit(self, sent: SentTree, verdict: VerifyResult) -> bool:
        self.learn(sent, verdict)
        pending, self.pending = self.pending, None
        resolve = partial(
            self.proactive.resolve, self.seq, sent, pending, verdict, self.limits.max_tree_depth
        )
        self.builder, hit = await self.worker.run(resolve)
        return hit
