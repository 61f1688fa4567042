"""Generations on the server itself, for its OpenAI-compatible HTTP API (`--api-port`).

Users with no edge GPU talk to the server directly; these are also the two server-only
baselines of DESIGN.md section 9. Each request runs the one round loop (`core.round_loop`): a
session on the `VerificationExecutor` verifies, batched with every other session's tree (edge
sessions included), the trees the server's own draft model grows (`--draft`; without one every
tree is empty, i.e. autoregressive decoding). Draft steps run one per job on the executor's
model thread, serialized with verification and counted as busy time: on the server, draft
time is server time. There is no proactive drafting here: betting on a reply would compete
with its own verification for the one model thread (overlapping the two is the edge's
contribution).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from specedge.core.calibration import AcceptanceCalibrator
from specedge.core.draft import DraftEngine, SentTree, TreeBuilder
from specedge.core.draft_batch import StepBatcher
from specedge.core.generation import GenerationRequest
from specedge.core.goodput import TreeSizer
from specedge.core.model_runner import ModelRunner
from specedge.core.round_loop import (
    Drafter,
    InProcessVerifier,
    ModelDrafter,
    NoDrafter,
    RoundLoopBackend,
    SessionVerifier,
)
from specedge.core.verify import VerifyResult
from specedge.errors import CapacityError, ServiceUnavailableError
from specedge.server.executor import ServerSession, VerificationExecutor

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ExecutorVerifier(InProcessVerifier):
    """One session on the executor (`core.round_loop.SessionVerifier`)."""

    def __init__(self, executor: VerificationExecutor, session: ServerSession) -> None:
        self.executor = executor
        self.session = session
        self.session_id = session.session_id
        self.limits = executor.engine.tree_limits

    async def verify(self, sent: SentTree) -> VerifyResult:
        estimates = sent.estimates if sent.tree.num_nodes else None
        return await self.executor.verify(self.session.session_id, sent.tree, estimates)

    def close(self) -> None:
        self.executor.close_session(self.session.session_id)


class ExecutorJobs:
    """`ModelJobs` on the executor's model thread: draft time is server time. The API
    sessions' draft steps are batched into one forward when they are ready together
    (`core.draft_batch`)."""

    def __init__(self, executor: VerificationExecutor, runner: ModelRunner | None) -> None:
        self.executor = executor
        self.batcher = (
            StepBatcher(runner, lambda job, _: executor.submit_model_job(job))
            if runner is not None
            else None
        )

    async def run(self, job: Callable[[], T]) -> T:
        return await self.executor.run_model_job(job)

    async def step(self, builder: TreeBuilder) -> bool:
        if self.batcher is None:
            return await self.run(builder.step)
        return await self.batcher.step(builder)

    def submit_cleanup(self, job: Callable[[], None]) -> concurrent.futures.Future[None]:
        return self.executor.submit_model_job(job)


class LocalSessions(RoundLoopBackend):
    """The server's `GenerationBackend`. `max_sessions` bounds concurrent generations (and the
    draft's KV slots); requests beyond it wait up to `queue_timeout` seconds for one. A request
    that finds every target KV slot taken (edge sessions share them) waits up to as long for
    one; either wait ends in a 503."""

    role = "server-api"

    def __init__(
        self,
        executor: VerificationExecutor,
        draft: DraftEngine | None,
        *,
        max_sessions: int,
        queue_timeout: float = 30.0,
        status: Callable[[], str] = lambda: "ok",
        adaptive: bool = True,
    ) -> None:
        """`adaptive` (`--budget auto`): each request sizes its trees to what the selection
        recently verified of them; otherwise every tree has the draft shape's budget."""
        max_context = executor.engine.runner.max_context
        if draft is not None:
            max_context = min(max_context, draft.runner.max_context)
        super().__init__(
            max_sessions=max_sessions,
            max_context=max_context,
            owner="this server's",
            queue_timeout=queue_timeout,
        )
        self.executor = executor
        self.draft = draft
        self._status = status
        self._jobs = ExecutorJobs(executor, draft.runner if draft is not None else None)
        self.adaptive = adaptive
        self.calibrator = AcceptanceCalibrator()  # the server's draft against its target

    @property
    def mode(self) -> str:
        return "autoregressive" if self.draft is None else "speculative"

    def health(self) -> dict[str, Any]:
        return {
            "status": self._status(),
            "decoding": self.mode,
            "active_sessions": self.active_sessions,
            "max_sessions": self.max_sessions,
        }

    async def _open_verifier(self, request: GenerationRequest, max_tokens: int) -> ExecutorVerifier:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.queue_timeout
        while True:
            try:
                session = self.executor.open_session(
                    request.prompt_token_ids, request.params, max_tokens, request.stop_token_ids
                )
                return ExecutorVerifier(self.executor, session)
            except CapacityError as error:
                remaining = deadline - loop.time()
                if remaining <= 0 or not await self.executor.wait_for_free_slot(remaining):
                    raise ServiceUnavailableError(
                        f"the server is full ({error}; edges included) and no room freed "
                        f"within {self.queue_timeout:g} s (--queue-timeout); retry later"
                    ) from None

    def _open_drafter(self, request: GenerationRequest, verifier: SessionVerifier) -> Drafter:
        if self.draft is None:
            return NoDrafter()
        budget = min(self.draft.shape.budget, verifier.limits.max_tree_nodes)
        return ModelDrafter(
            self.draft,
            list(request.prompt_token_ids),
            self._jobs,
            temperature=request.params.temperature,
            calibrator=self.calibrator,
            sizer=TreeSizer(budget) if self.adaptive else None,
        )

    def _ended(self, outcome: str) -> None:
        self.executor.metrics.sessions.labels(outcome).inc()
