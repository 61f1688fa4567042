"""The verification executor: one loop that owns the target model and every session's KV slot.

Producers (the gRPC service for edges; `local_sessions.LocalSessions` for the server's own
HTTP API) call `open_session`, `verify` and `close_session` on the event loop. `verify` queues
the tree with the `Scheduler` and awaits its result. The executor loop takes every ready
request (after a short bounded wait when the scheduler predicts more within a few ms), runs one
batched `TargetEngine.verify` in its single worker thread, resolves each request's future at
once, and only then does its bookkeeping (scheduler, metrics, freeing slots) and runs at most
one prefill chunk of a new session. It sleeps on an `asyncio.Event` when there is nothing to
do. Server-side drafting runs its draft-model jobs on the same worker thread
(`run_model_job`), serialized with verification; every job's time, measured in the thread, is
busy time.

Goodput selection (DESIGN.md section 12): of each ready tree that came with acceptance
estimates the batch verifies only the prefix that maximises expected emitted tokens per second,
under the cost model `batch_cost` (profiled at start-up, kept current from every batch) plus
the server's recent idle time per batch: idle time is free, so a server waiting for its users
verifies larger trees (lower latency), a saturated one only what pays (goodput). A tree cut to
nothing is a plain decoding step. Trees without estimates (version 1 edges) are verified whole.

Failures stay where they belong: a sequence whose sampling fails (`core.target.SequenceFailure`)
closes its own session while the rest of its batch completes; a batched forward that raises is
retried one sequence at a time, so a sequence that breaks the forward fails alone. Every job on
the model thread runs under `ModelHealth` (`server.health`): forwards that keep failing or a job
that never ends make the server report itself degraded.

Invariant: model work (forwards, compaction) runs only in the worker thread, and target work
only on the sessions of the running batch. The event loop opens sessions (taking free slots)
and closes them; a session closed while in flight keeps its slot until the batch is over, so a
slot is never reused under a running forward.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, TypeVar

from specedge.core.goodput import UNPROFILED_BATCH_COST, FittedBatchCost, LinearBatchCost
from specedge.core.sampling import SamplingParams
from specedge.core.target import SequenceFailure, TargetEngine, TargetSequence
from specedge.core.tree import DraftTree
from specedge.core.verify import VerifyResult
from specedge.errors import InvalidRequestError, ServiceUnavailableError, SpecEdgeError
from specedge.server.batching import GoodputBatching
from specedge.server.health import ModelHealth
from specedge.server.metrics import ServerMetrics
from specedge.server.scheduler import Batch, PrefillChunk, Scheduler, SchedulerPolicy

logger = logging.getLogger(__name__)
T = TypeVar("T")


class SessionStateError(SpecEdgeError):
    """The request does not fit the session's state (finished, closed, one already queued)."""


DRAINING_MESSAGE = "the server is draining; open the session on another server"


class ServerClosingError(ServiceUnavailableError):
    """The server is shutting down and takes no more work."""


class VerificationFailedError(SpecEdgeError):
    """The model failed on this session's round (e.g. out of memory, NaN logits); the session
    is closed."""


@dataclass
class ServerSession:
    """A session's server-side state: its target sequence plus the round in progress."""

    session_id: str
    seq: TargetSequence
    opened_at: float
    tree: DraftTree | None = None  # the tree waiting for or in verification
    estimates: tuple[float, ...] | None = None  # per node (None: verify the whole tree)
    server_lookup: bool = False  # the tree is the server's own lookup chain (a streamed step)
    future: asyncio.Future[VerifyResult] | None = None
    slot_released: bool = False
    closed: bool = False
    verify_seconds: float = 0.0  # time this session's rounds spent in batched forwards
    batched_with: int = 0  # sum over rounds of the batch size (mean = batched_with / rounds)
    verified: int = 0  # draft nodes verified over all rounds (the selected prefixes)

    @property
    def finished(self) -> bool:
        return self.seq.finish_reason is not None


class Verified(NamedTuple):
    """A session's completed round in a batch: the tree verified (the selected prefix), the
    estimates sent, whether the tree was the server's own lookup chain, the result."""

    session: ServerSession
    tree: DraftTree
    estimates: tuple[float, ...] | None
    server_lookup: bool
    result: VerifyResult


class VerificationExecutor:
    def __init__(
        self,
        engine: TargetEngine,
        policy: SchedulerPolicy | None = None,
        metrics: ServerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        batch_cost: LinearBatchCost | None = None,
        goodput: bool = True,
        health: ModelHealth | None = None,
    ) -> None:
        """`batch_cost`: the profiled cost model to start from; `goodput=False` verifies every
        tree whole (the fixed-size behaviour, for experiments); `health`: what watches the
        model thread (default thresholds otherwise)."""
        self.engine = engine
        self.health = health or ModelHealth()
        self.scheduler = Scheduler(policy)
        self.metrics = metrics or ServerMetrics()
        # The batch-level policy: batch waits, goodput cuts with the idle allowance, and the
        # cost model of a verification forward kept current from every batch (DESIGN.md
        # section 12); `specedge simulate` runs the same object.
        cost = FittedBatchCost(batch_cost or UNPROFILED_BATCH_COST)
        self.batching = GoodputBatching(self.scheduler, cost, goodput)
        self._clock = clock
        self._sessions: dict[str, ServerSession] = {}
        self._in_flight: set[str] = set()
        self._deferred_release: list[ServerSession] = []
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()  # replaced by a fresh one each time it is set
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specedge-verify")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._draining = False

    @property
    def batch_cost(self) -> FittedBatchCost:
        """Seconds of a verification forward by (sequences, rows)."""
        return self.batching.batch_cost

    @batch_cost.setter
    def batch_cost(self, cost: FittedBatchCost) -> None:
        self.batching.batch_cost = cost

    @property
    def goodput(self) -> bool:
        return self.batching.goodput

    @property
    def idle_allowance(self) -> float:
        return self.batching.idle_allowance

    def stream_step_seconds(self, session_rows: float) -> float:
        """What a recent batch would take with a session of `session_rows` rows per round
        decoding instead (`GoodputBatching.stream_step_seconds`)."""
        return self.batching.stream_step_seconds(session_rows)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        assert self._task is None
        self.metrics.watch_model_thread(self._pool.submit(threading.get_ident).result())
        self._task = asyncio.get_running_loop().create_task(self._run(), name="specedge-executor")
        self._task.add_done_callback(self._on_loop_exit)

    def _on_loop_exit(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.critical("the executor loop died", exc_info=task.exception())

    @property
    def failed(self) -> bool:
        """The loop died of a bug: the server cannot verify anything any more."""
        task = self._task
        return task is not None and task.done() and not task.cancelled() and not self._closing

    def problem(self) -> str | None:
        """Why the server cannot verify properly now (`server.health`), or None."""
        if self.failed:
            return "the executor loop died"
        return self.health.problem()

    def drain(self) -> None:
        """Refuse new sessions (`ServerClosingError`); running sessions go on to their end."""
        self._draining = True

    async def stop(self) -> None:
        """Fail queued work, close every session, stop the loop and the worker thread."""
        self._closing = True
        for session_id in list(self._sessions):
            self.close_session(session_id)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A forward still running in the worker finishes before the slots are released.
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)
        self._release_deferred()

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def idle(self) -> bool:
        """No model work running or ready to run."""
        return not self._in_flight and not self.scheduler.has_work()

    # ---- producer API (event loop) -------------------------------------------------------------
    def open_session(
        self,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
    ) -> ServerSession:
        """Validate, take a KV slot and queue the prefill. Raises InvalidRequestError,
        CapacityError (no free slot) or ServerClosingError. The session can take trees at once:
        they wait until its prefill is done."""
        if self._closing:
            raise ServerClosingError("the server is shutting down")
        if self._draining:
            raise ServerClosingError(DRAINING_MESSAGE)
        bad = [t for t in stop_token_ids if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"stop token id {bad[0]} outside vocab [0, {self.engine.vocab_size})"
            )
        seq = self.engine.open(prompt_tokens, params, max_new_tokens, stop_token_ids)
        session = ServerSession(uuid.uuid4().hex, seq, self._clock())
        self._sessions[session.session_id] = session
        self.scheduler.add_session(session.session_id, prefill_tokens=len(seq.committed) - 1)
        self.metrics.active_sessions.set(len(self._sessions))
        self._wake.set()
        return session

    async def wait_for_free_slot(self, timeout: float) -> bool:
        """Wait until some session frees its KV slot; False after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._slot_freed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def session(self, session_id: str) -> ServerSession | None:
        return self._sessions.get(session_id)

    async def verify(
        self,
        session_id: str,
        tree: DraftTree,
        estimates: Sequence[float] | None = None,
        *,
        server_lookup: bool = False,
    ) -> VerifyResult:
        """Verify `tree` in the session's next round: with `estimates` (per node, the
        probability that the target accepts the path to it, non-increasing) the prefix the
        goodput selection keeps, else all of it; the result's `num_verified` says how many.
        `server_lookup`: the tree is the server's own context lookup chain for a step it
        decodes itself (`server.streaming.StreamLookup`), counted apart from the edges' trees.
        Raises InvalidRequestError (bad tree or estimates), SessionStateError (closed,
        finished, a tree already queued) or ServerClosingError. Cancelling the call closes
        the session."""
        session = self._sessions.get(session_id)
        if session is None and self._closing:
            raise ServerClosingError("the server is shutting down")
        if session is None:
            raise SessionStateError(f"session {session_id} is closed")
        if session.finished:
            raise SessionStateError("the session has finished; open a new one")
        if session.future is not None:
            raise SessionStateError("the session already has a tree in verification")
        if estimates is not None:
            _check_estimates(estimates, tree.num_nodes)
        tree = self.engine.admit(session.seq, tree)
        future: asyncio.Future[VerifyResult] = asyncio.get_running_loop().create_future()
        session.tree, session.future, session.server_lookup = tree, future, server_lookup
        # `admit` keeps a prefix of the tree: its estimates are the same prefix.
        session.estimates = None if estimates is None else tuple(estimates[: tree.num_nodes])
        self.scheduler.add_request(session_id, tree.num_nodes + 1, self._clock())
        if not server_lookup:
            self.metrics.draft_nodes.inc(tree.num_nodes)
        self.metrics.queued_requests.set(self.scheduler.num_queued)
        self._wake.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The producer gave up on the round: its view of the session can no longer match
            # the server's, so the session ends here.
            self.close_session(session_id)
            raise

    def close_session(self, session_id: str, error: SpecEdgeError | None = None) -> None:
        """Forget the session and free its slot (after the running batch if it is in it).
        Idempotent; a pending `verify` fails with `error` (default: SessionStateError)."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        session.closed = True
        self.scheduler.remove_session(session_id)
        if session.future is not None and not session.future.done():
            if error is None:
                error = (
                    ServerClosingError("the server is shutting down")
                    if self._closing
                    else SessionStateError("the session was closed")
                )
            session.future.set_exception(error)
            session.future.exception()  # retrieved: nobody may be awaiting it any more
        if session_id in self._in_flight:
            self._deferred_release.append(session)
        else:
            self._release(session)
        if not self._sessions:
            self.batching.no_sessions()
        self.metrics.active_sessions.set(len(self._sessions))
        self.metrics.queued_requests.set(self.scheduler.num_queued)

    async def run_model_job(self, job: Callable[[], T]) -> T:
        """Run draft-model work (never a target session's) on the model thread, after the work
        already queued there; its time counts as busy and draft time. Cancelling the call skips
        a job that has not started."""
        if self._closing:
            raise ServerClosingError("the server is shutting down")
        return await asyncio.wrap_future(self._pool.submit(self._draft_job, job))

    def submit_model_job(self, job: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Queue `job` like `run_model_job`, without awaiting it (clean-up in `finally`). Once
        the thread is gone the job runs at once: no forward can be running any more."""
        try:
            return self._pool.submit(self._draft_job, job)
        except RuntimeError:  # the pool is shut down
            future: concurrent.futures.Future[T] = concurrent.futures.Future()
            future.set_result(job())
            return future

    def _draft_job(self, job: Callable[[], T]) -> T:
        result, elapsed = self.health.watch(partial(_timed, job), kind="draft")
        self.batching.busy_since_batch += elapsed  # a float add: atomic enough for an estimate
        self.metrics.busy_seconds.inc(elapsed)
        self.metrics.draft_seconds.inc(elapsed)
        return result

    # ---- the loop ------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if not self.scheduler.has_work():
                await self._wake.wait()
                continue
            await self._hold_for_arrivals()
            batch = self.scheduler.next_batch(self._clock())
            self.metrics.queued_requests.set(self.scheduler.num_queued)
            if batch.session_ids:
                await self._verify_batch(batch)
            if batch.prefill is not None:
                await self._prefill(batch.prefill)

    async def _hold_for_arrivals(self) -> None:
        """Wait (bounded) while more trees are expected soon enough to be worth it."""
        delay = self._batch_delay()
        if delay <= 0.0:
            return
        deadline = self._clock() + delay
        while (remaining := deadline - self._clock()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return
            if self._batch_delay() <= 0.0:
                return

    def _batch_delay(self) -> float:
        """How long to hold the ready trees for predicted arrivals
        (`GoodputBatching.batch_delay`)."""
        return self.batching.batch_delay(self._clock())

    async def _verify_batch(self, batch: Batch) -> None:
        sessions = [self._sessions[session_id] for session_id in batch.session_ids]
        self._note_idle()
        trees = self._select(sessions)
        estimates = [session.estimates for session in sessions]
        lookups = [session.server_lookup for session in sessions]
        work = [(session.seq, tree) for session, tree in zip(sessions, trees, strict=True)]
        self._in_flight = set(batch.session_ids)
        outcomes, elapsed = await self._verify_work(work)
        self._in_flight = set()
        # Replies first: each producer resumes as soon as the loop is free.
        verified = []
        rounds = zip(sessions, trees, estimates, lookups, outcomes, strict=True)
        for session, tree, sent, lookup, outcome in rounds:
            if isinstance(outcome, SequenceFailure):
                logger.warning(
                    "session %s: round failed: %s", session.session_id[:8], outcome.reason
                )
                failure = VerificationFailedError(
                    f"the server failed to verify this round ({outcome.reason}); the session "
                    "is closed, open a new one"
                )
                self.close_session(session.session_id, failure)
                continue
            if session.future is not None and not session.future.done():
                session.future.set_result(outcome)
            session.tree, session.future, session.estimates = None, None, None
            verified.append(Verified(session, tree, sent, lookup, outcome))
        self.scheduler.complete(batch, self._clock())
        rows = sum(tree.num_nodes + 1 for tree in trees)
        self._record_batch(len(sessions), rows, elapsed, verified)
        for session in sessions:
            if session.finished and not session.closed:
                # Nothing more can happen in this session: give its slot to the next one now.
                self.scheduler.remove_session(session.session_id)
                self._release(session)
        self._release_deferred()

    async def _verify_work(
        self, work: list[tuple[TargetSequence, DraftTree]]
    ) -> tuple[list[VerifyResult | SequenceFailure], float]:
        """Each sequence's outcome of one batched forward and its time (0 when it failed). A
        forward that raises is retried one sequence at a time (the forward rewrites the same
        KV positions), so a sequence that breaks it fails alone; each failure is a
        `SequenceFailure`."""
        rows = sum(tree.num_nodes + 1 for _, tree in work)
        try:
            return await self._run_target(self.engine.verify_each, work, rows)
        except Exception as error:
            logger.exception("verification of a batch of %d failed", len(work))
            if len(work) == 1:
                reason = f"{type(error).__name__}: {error}"
                return [SequenceFailure(reason)] * len(work), 0.0
        outcomes: list[VerifyResult | SequenceFailure] = []
        for item in work:  # one at a time: only the sequences that break the forward fail
            try:
                (outcome,), seconds = await self._run_target(self.engine.verify_each, [item])
            except Exception as error:
                outcome = SequenceFailure(f"{type(error).__name__}: {error}")
            else:
                self.metrics.busy_seconds.inc(seconds)
            outcomes.append(outcome)
        return outcomes, 0.0  # no time of the batch as a whole: nothing for the cost model

    async def _run_target(
        self,
        verify: Callable[[list[tuple[TargetSequence, DraftTree]]], list[T]],
        work: list[tuple[TargetSequence, DraftTree]],
        rows: int | None = None,
    ) -> tuple[list[T], float]:
        """`verify(work)` on the model thread under the health watch (its modelled cost as
        the measure of "stuck"), timed in the thread: a draft job queued before it is not
        verify time."""
        rows = sum(tree.num_nodes + 1 for _, tree in work) if rows is None else rows
        modelled = self.batch_cost(len(work), rows)
        job = partial(_timed, partial(verify, work))
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self.health.watch, job, modelled
        )

    async def _prefill(self, chunk: PrefillChunk) -> None:
        session = self._sessions.get(chunk.session_id)
        if session is None:  # closed since the batch was formed
            return
        assert session.seq.prefilled == chunk.start
        self._in_flight = {chunk.session_id}
        prefill = partial(_timed, partial(self.engine.prefill_chunk, session.seq, chunk.num_tokens))
        try:
            _, elapsed = await asyncio.get_running_loop().run_in_executor(
                self._pool, partial(self.health.watch, prefill, kind="prefill")
            )
        except Exception as error:
            logger.exception("prefill of session %s failed", chunk.session_id[:8])
            self._in_flight = set()
            failure = VerificationFailedError(
                f"the server failed to prefill the prompt ({type(error).__name__}: {error}); "
                "the session is closed"
            )
            self.close_session(chunk.session_id, failure)
            self._release_deferred()
            return
        self._in_flight = set()
        self.batching.busy_since_batch += elapsed
        self.metrics.busy_seconds.inc(elapsed)
        self.metrics.prefill_tokens.inc(chunk.num_tokens)
        self.scheduler.complete_prefill(chunk)
        self._release_deferred()

    # ---- goodput selection -----------------------------------------------------------------------
    def _select(self, sessions: list[ServerSession]) -> list[DraftTree]:
        """The tree each session's round verifies: the goodput-optimal prefix of each tree
        with estimates, the whole of each other tree (`GoodputBatching.select`)."""
        trees: list[DraftTree] = []
        for session in sessions:
            assert session.tree is not None
            trees.append(session.tree)
        keep = self.batching.select(
            [session.estimates for session in sessions], [tree.num_nodes for tree in trees]
        )
        return [
            tree if verified == tree.num_nodes else tree.prefix(verified)
            for tree, verified in zip(trees, keep, strict=True)
        ]

    def _note_idle(self) -> None:
        """Fold the wait since the last batch into the idle allowance."""
        self.batching.note_idle(self._clock())
        self.metrics.idle_allowance.set(self.batching.idle_allowance)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _record_batch(
        self,
        num_sequences: int,
        rows: int,
        elapsed: float,
        verified: list[Verified],
    ) -> None:
        """A batch of `num_sequences` trees and `rows` rows took `elapsed` seconds (0: its
        forward failed); `verified` are its sessions whose round completed."""
        emitted = [len(each.result.emitted_tokens) for each in verified]
        self.batching.record(num_sequences, rows, elapsed, emitted, self._clock())
        metrics = self.metrics
        if elapsed > 0.0:
            metrics.verify_batch_size.observe(num_sequences)
            metrics.verify_rows.inc(rows)
            metrics.verify_seconds.observe(elapsed)
            metrics.busy_seconds.inc(elapsed)
        if not verified:
            return
        cost = self.batch_cost.current
        metrics.batch_cost.labels("fixed").set(cost.fixed_s)
        metrics.batch_cost.labels("per_sequence").set(cost.per_sequence_s)
        metrics.batch_cost.labels("per_row").set(cost.per_row_s)
        metrics.rounds.inc(len(verified))
        metrics.emitted_tokens.inc(sum(emitted))
        for session, tree, sent, lookup, result in verified:
            session.verify_seconds += elapsed
            session.batched_with += num_sequences
            if lookup:  # the server's own chain: not an edge's draft nodes or estimates
                metrics.lookup_tokens.inc(result.num_accepted)
                continue
            metrics.accepted_tokens.inc(result.num_accepted)
            session.verified += tree.num_nodes
            metrics.verified_nodes.inc(tree.num_nodes)
            # Rounds with estimates: cut to nothing, and predicted against emitted tokens.
            if sent is None:
                continue
            if tree.num_nodes == 0 and sent:
                metrics.cut_rounds.inc()
            metrics.predicted_rounds.inc()
            metrics.predicted_tokens.inc(1.0 + sum(sent[: tree.num_nodes]))
            metrics.estimated_round_tokens.inc(len(result.emitted_tokens))

    def _release(self, session: ServerSession) -> None:
        if not session.slot_released:
            session.slot_released = True
            self.engine.close(session.seq)
            self._slot_freed.set()
            self._slot_freed = asyncio.Event()

    def _release_deferred(self) -> None:
        deferred, self._deferred_release = self._deferred_release, []
        for session in deferred:
            self._release(session)


def _check_estimates(estimates: Sequence[float], num_nodes: int) -> None:
    if len(estimates) != num_nodes:
        raise InvalidRequestError(f"{len(estimates)} acceptance estimates for {num_nodes} nodes")
    if any(not 0.0 <= a <= 1.0 for a in estimates):
        raise InvalidRequestError("acceptance estimates must lie in [0, 1]")
    if any(later > earlier for earlier, later in zip(estimates, estimates[1:], strict=False)):
        raise InvalidRequestError(
            "acceptance estimates must not rise in node order (send the nodes best-first)"
        )


def _timed(job: Callable[[], T]) -> tuple[T, float]:
    """Run `job`; its result and its wall time in seconds."""
    start = time.perf_counter()
    result = job()
    return result, time.perf_counter() - start
