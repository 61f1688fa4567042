"""The one round loop of speculative decoding, parameterised by a drafter and a verifier.

A *round*: the drafter grows a tree within the room the verifier allows (its node cap and the
context left), the verifier verifies it, the drafter may keep drafting while the verdict is in
flight, the emitted tokens go to the caller, and the drafter commits them. Autoregressive
decoding is the same loop with `NoDrafter` (every tree empty). Every way SpecEdge generates
runs this loop:

- `specedge generate` (`core.local`): `ModelDrafter` or `NoDrafter`; `LocalVerifier`, the
  target in the same process.
- the edge (`edge.runtime`): `edge.proactive.ProactiveModelDrafter`; `RemoteVerifier`, the
  server over gRPC.
- the server's own API (`server.local_sessions`): `ModelDrafter` or `NoDrafter`;
  `ExecutorVerifier`, a session of the batching executor.

A verifier may verify fewer nodes than it was sent: the verdict's `num_verified` says how
many (a prefix in the sent order), and the accepted path never leaves that prefix. A verifier
may also decode on its own (`streaming`: the edge's server when trees stopped paying); then
each round is one of its steps, the drafter only *probes* (guesses the next token, scored
against what comes), and once its guesses promise more tokens per round than the verifier's
`resume_threshold`, the loop asks the verifier to `resume` verifying trees.

Draft-model work runs through `ModelJobs`, so each caller decides where it runs (inline, the
edge's worker thread, the server's model thread) and one job is one draft step or one prefill
chunk, which lets sessions interleave.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import replace
from functools import partial
from typing import Protocol, TypeVar

from specedge.core.calibration import AcceptanceCalibrator
from specedge.core.draft import DraftEngine, DraftSequence, SentTree, TreeBuilder
from specedge.core.generation import GenerationRequest, GenerationStats, check_request
from specedge.core.goodput import TreeSizer
from specedge.core.limits import DEFAULT_PREFILL_CHUNK, TreeLimits
from specedge.core.tree import DraftTree
from specedge.core.verify import VerifyResult
from specedge.errors import ServiceUnavailableError
from specedge.session_log import log_session_end

logger = logging.getLogger(__name__)
T = TypeVar("T")
MIN_PROBES = 8  # probes scored before a drafter may ask to resume trees
MAX_BACKOFF = 3  # doublings of MIN_PROBES for streamed phases that follow failed resumes
PROBE_WINDOW = 48  # latest probes a resume decision replays
PROBE_STRIDE = 4  # streamed tokens per probe forward (it scores all of them)


class ModelJobs(Protocol):
    """Where draft-model work runs."""

    async def run(self, job: Callable[[], T]) -> T:
        """Run `job` after the work already queued and return its result."""
        ...

    async def step(self, builder: TreeBuilder) -> bool:
        """Run `builder`'s next draft step (`TreeBuilder.step`), batched with other
        sessions' steps where the jobs can (`core.draft_batch`)."""
        ...

    def submit_cleanup(self, job: Callable[[], None]) -> concurrent.futures.Future[None]:
        """Queue `job` without awaiting it (freeing a finished session's draft slot)."""
        ...


class InlineJobs:
    """Model jobs run at once on the caller's thread (one process, one request)."""

    async def run(self, job: Callable[[], T]) -> T:
        return job()

    async def step(self, builder: TreeBuilder) -> bool:
        return builder.step()

    def submit_cleanup(self, job: Callable[[], None]) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        job()
        future.set_result(None)
        return future


class SessionVerifier(Protocol):
    """One session's verifier: takes a tree, answers with the verdict."""

    @property
    def limits(self) -> TreeLimits: ...

    @property
    def session_id(self) -> str:
        """The verifier's name for the session, for logs ("" when it has none)."""
        ...

    def verify(self, sent: SentTree) -> Awaitable[VerifyResult]:
        """The verdict on `sent.tree` (accepted nodes are tree indices)."""
        ...

    @property
    def streaming(self) -> bool:
        """The verifier decodes on its own: the next verdict comes without a tree."""
        ...

    @property
    def resume_threshold(self) -> float:
        """While streaming: the tokens per round trees must promise to be worth resuming."""
        ...

    async def resume(self) -> None:
        """While streaming: go back to verifying trees."""
        ...

    def traffic(self) -> tuple[int, int]:
        """Bytes sent and received so far (0, 0 in process)."""
        ...

    async def finish(self) -> None:
        """The last verdict came: end the session cleanly."""
        ...

    def close(self) -> None:
        """Free the session (idempotent; after `finish`, or instead of it on any failure)."""
        ...


class Drafter(Protocol):
    """One request's drafting."""

    async def prepare(self) -> None:
        """Draft KV for the prompt (but its last token, the first tree's root)."""
        ...

    async def draft(self, max_nodes: int) -> SentTree:
        """The next tree, at most `max_nodes` nodes (possibly none)."""
        ...

    async def probe(self) -> SentTree:
        """While the verifier streams: a guess at the next token (not sent)."""
        ...

    def wants_trees(self, threshold: float) -> bool:
        """Whether the probes promise more than `threshold` tokens per round."""
        ...

    async def wait(self, sent: SentTree, verdict: asyncio.Future[VerifyResult]) -> bool:
        """Use the time until `verdict` lands; whether a proactive subtree was under way."""
        ...

    async def commit(self, sent: SentTree, verdict: VerifyResult) -> bool:
        """Commit the emitted tokens; whether the next tree starts from a proactive bet."""
        ...

    def close(self) -> concurrent.futures.Future[None]:
        """Free what the request holds, after any job it left queued."""
        ...


async def run_rounds(
    prompt_len: int, drafter: Drafter, verifier: SessionVerifier, stats: GenerationStats
) -> AsyncGenerator[list[int], None]:
    """The tokens each round emits, until the verifier gives a finish reason."""
    await drafter.prepare()
    context_len = prompt_len
    while True:
        if verifier.streaming:
            sent = await drafter.probe()
        else:
            sent = await drafter.draft(verifier.limits.room(context_len))
        reply = asyncio.ensure_future(verifier.verify(sent))
        try:
            proactive = await drafter.wait(sent, reply)
            verdict = await reply
        finally:
            if not reply.done():
                reply.cancel()
            elif not reply.cancelled():
                reply.exception()  # retrieved: raised above, or abandoned with the request
        stats.record_round(len(verdict.emitted_tokens), verdict.num_accepted, verdict.finish_reason)
        if sent.probe:
            stats.streamed_rounds += 1
        else:
            verified = verified_nodes(sent, verdict)
            predicted = 1.0 + sum(sent.estimates[:verified]) if sent.estimates else None
            emitted = len(verdict.emitted_tokens)
            stats.record_verification(sent.tree.num_nodes, verified, predicted, emitted)
        stats.proactive_attempts += proactive
        stats.bytes_sent, stats.bytes_received = verifier.traffic()
        yield verdict.emitted_tokens
        if verdict.finish_reason is not None:
            await verifier.finish()
            return
        context_len += len(verdict.emitted_tokens)
        stats.proactive_hits += await drafter.commit(sent, verdict)
        if verifier.streaming and drafter.wants_trees(verifier.resume_threshold):
            await verifier.resume()


class InProcessVerifier:
    """What every verifier in the drafter's process shares: no wire (no traffic, nothing to
    finish) and no server-side decoding to follow. Subclasses add `limits`, `verify` and
    `close` (`SessionVerifier`)."""

    streaming = False
    resume_threshold = 0.0
    session_id = ""

    async def resume(self) -> None:
        pass

    def traffic(self) -> tuple[int, int]:
        return 0, 0

    async def finish(self) -> None:
        pass


def verified_nodes(sent: SentTree, verdict: VerifyResult) -> int:
    """How many of the sent nodes the verdict covers (all of them unless it says fewer)."""
    return sent.tree.num_nodes if verdict.num_verified is None else verdict.num_verified


class NoDrafter:
    """Autoregressive decoding: every tree is empty."""

    async def prepare(self) -> None:
        pass

    async def draft(self, max_nodes: int) -> SentTree:
        return SentTree.empty()

    async def probe(self) -> SentTree:
        return SentTree(DraftTree(), (), probe=True)

    def wants_trees(self, threshold: float) -> bool:
        return False

    async def wait(self, sent: SentTree, verdict: asyncio.Future[VerifyResult]) -> bool:
        return False

    async def commit(self, sent: SentTree, verdict: VerifyResult) -> bool:
        return False

    def close(self) -> concurrent.futures.Future[None]:
        return InlineJobs().submit_cleanup(lambda: None)


class ProbeScore:
    """How well a drafter's probes guess the tokens a streaming verifier decodes, as the tokens
    per round a chain of its guesses would have emitted over the latest `PROBE_WINDOW` of them.

    A chain drafted at a streamed token accepts the run of hits from there, up to `depth`
    (each probe guessed after the true tokens, and a chain that hit so far guessed after the
    same ones), and the verifier adds one token; the next round starts after them. Replaying
    the rounds this way keeps the order of hits: they come in runs (a quoted passage, a list),
    and a mean hit rate h, read as 1 / (1 - h) tokens per round, took them for spread out and
    promised 3.5 tokens a round where the trees then gave 1.6. Trees do at least as well as
    the chain of their best guesses, so trees are wanted again once the replay beats the
    verifier's `resume_threshold`.

    One score lives as long as its session: each streamed phase (`observe` after
    `trees_verified`) starts from no probes, and needs `MIN_PROBES` of them, doubled for each
    phase before it up to `MAX_BACKOFF` doublings: a phase of trees that ended streamed again
    did not pay, and each costs its rounds' round trips."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.hits: deque[bool] = deque(maxlen=PROBE_WINDOW)
        self.count = 0  # probes of this streamed phase
        self.phases = 0  # streamed phases so far

    def observe(self, hit: bool) -> None:
        if self.count == 0:  # the first probe of a streamed phase
            self.phases += 1
        self.hits.append(hit)
        self.count += 1

    def trees_verified(self) -> None:
        """A round of trees: the next probe starts a new streamed phase, from no probes."""
        self.hits.clear()
        self.count = 0

    @property
    def min_probes(self) -> int:
        return MIN_PROBES * 2 ** min(max(0, self.phases - 1), MAX_BACKOFF)

    def tokens_per_round(self) -> float:
        """The chain's replayed tokens per round over the rounds that fit in the window (1.0
        before a whole round fits)."""
        hits, rounds, tokens, start = list(self.hits), 0, 0, 0
        while True:
            run = 0
            while run < self.depth and start + run < len(hits) and hits[start + run]:
                run += 1
            if start + run >= len(hits):  # the window ends inside this round
                break
            rounds += 1
            tokens += run + 1
            start += run + 1
        return tokens / rounds if rounds else 1.0

    def wants_trees(self, threshold: float) -> bool:
        return self.count >= self.min_probes and self.tokens_per_round() > threshold


class ModelDrafter:
    """Trees from a draft model (with context lookup), one draft step per model job.

    Each tree's estimates go through `calibrator` (shared by the backend's requests: it
    learns from every verdict, per temperature regime); with a `sizer` the tree is sized to
    what the verifier recently verified (`core.goodput.TreeSizer`), else it is the shape's
    budget (a fixed `--budget`)."""

    def __init__(
        self,
        engine: DraftEngine,
        prompt_tokens: list[int],
        jobs: ModelJobs,
        *,
        temperature: float = 0.0,
        calibrator: AcceptanceCalibrator | None = None,
        sizer: TreeSizer | None = None,
    ) -> None:
        self.engine = engine
        self.jobs = jobs
        self.temperature = temperature
        self.calibrator = calibrator
        self.sizer = sizer
        self.probes = ProbeScore(engine.shape.depth)
        # Taking a free slot is bookkeeping, not model work: done here, at once.
        self.seq: DraftSequence = engine.open(prompt_tokens)
        self.builder: TreeBuilder | None = None  # the next tree's, once the prompt is in

    async def prepare(self) -> None:
        prefill = partial(self.engine.prefill, self.seq, DEFAULT_PREFILL_CHUNK)
        while not await self.jobs.run(prefill):
            pass
        self.builder = self.engine.builder(self.seq)

    async def draft(self, max_nodes: int) -> SentTree:
        builder = self.builder
        assert builder is not None, "prepare() lays out the first tree's root"
        size = max_nodes if self.sizer is None else min(max_nodes, self.sizer.next_size())
        builder.shape = builder.shape.sized(size)
        if size > 0:
            while await self.jobs.step(builder):
                pass
        return builder.sent_tree(size, self._calibrate)

    async def probe(self) -> SentTree:
        """Once `PROBE_STRIDE` streamed tokens wait in the pending chain, one draft step
        (batched with the other sessions') over them: its best guess at the next token, and
        its guess after each of those tokens, scored in `learn`. Before that, nothing: the
        tokens join the pending chain (one forward reads the draft's weights once for all of
        them, where a step per token read them every token)."""
        builder = self.builder
        assert builder is not None, "prepare() lays out the first tree's root"
        if len(builder.pending) < PROBE_STRIDE and not builder.root_expanded:
            return SentTree(DraftTree(), (), builder, probe=True)
        builder.shape = replace(builder.shape, budget=1, depth=1)
        builder.score_pending = True
        await self.jobs.step(builder)
        return replace(builder.sent_tree(1, self._calibrate), probe=True)

    def wants_trees(self, threshold: float) -> bool:
        return self.probes.wants_trees(threshold)

    def _calibrate(self, raw: Sequence[float]) -> Sequence[float]:
        if self.calibrator is None:
            return raw
        return self.calibrator.calibrate(raw, self.temperature)

    def learn(self, sent: SentTree, verdict: VerifyResult) -> None:
        """What the verdict teaches: the calibrator which verified nodes the target accepted
        (rounds cut short by a finish reason say nothing of the nodes below), the sizer how
        many nodes were verified."""
        if sent.probe:
            builder = sent.builder
            if builder is not None:  # the tokens streamed before, in order
                for guess, token in zip(builder.pending_guesses, builder.pending[1:], strict=False):
                    self.probes.observe(guess == token)
            if sent.tree.num_nodes:
                self.probes.observe(verdict.emitted_tokens[0] == sent.tree.tokens[0])
            return
        self.probes.trees_verified()
        verified = verified_nodes(sent, verdict)
        if self.calibrator is not None and verdict.finish_reason is None:
            self.calibrator.observe(
                sent.raw_estimates, verified, verdict.accepted_nodes, self.temperature
            )
        if self.sizer is not None and sent.tree.num_nodes > 0:
            self.sizer.observe(verified)

    async def wait(self, sent: SentTree, verdict: asyncio.Future[VerifyResult]) -> bool:
        return False

    async def commit(self, sent: SentTree, verdict: VerifyResult) -> bool:
        self.learn(sent, verdict)
        advance = partial(self.engine.advance, self.seq, sent, verdict)
        self.builder = await self.jobs.run(advance)
        return False

    def close(self) -> concurrent.futures.Future[None]:
        return self.jobs.submit_cleanup(partial(self.engine.close, self.seq))


class RoundLoopBackend(ABC):
    """A `core.generation.GenerationBackend` that runs each request's round loop: validate
    it, wait up to `queue_timeout` seconds for one of `max_sessions` slots (then
    ServiceUnavailableError), open the session's verifier and drafter, yield each round's
    tokens, then free both and log the session's end (`specedge.session_log`, as `role`).
    `owner` names whose context limit a request breaks (e.g. "this edge's")."""

    role = "generation"

    def __init__(
        self, *, max_sessions: int, max_context: int, owner: str, queue_timeout: float = 30.0
    ) -> None:
        self.max_sessions = max_sessions
        self.max_context = max_context
        self.owner = owner
        self.queue_timeout = queue_timeout
        self.active_sessions = 0
        self._slots = asyncio.Semaphore(max_sessions)

    @abstractmethod
    async def _open_verifier(
        self, request: GenerationRequest, max_tokens: int
    ) -> SessionVerifier: ...

    @abstractmethod
    def _open_drafter(self, request: GenerationRequest, verifier: SessionVerifier) -> Drafter: ...

    def _ended(self, outcome: str) -> None:  # noqa: B027 (a hook: most backends ignore it)
        """A generation ended: "finished", "closed" (the caller stopped reading), "refused"
        (no session could be opened), "failed" or "cancelled"."""

    def check(self, request: GenerationRequest) -> int:
        """Validate a request (InvalidRequestError); returns its max new tokens."""
        return check_request(request, self.max_context, self.owner)

    async def generate(
        self, request: GenerationRequest, stats: GenerationStats
    ) -> AsyncGenerator[list[int], None]:
        """The tokens each round emits (see `GenerationBackend.generate`)."""
        max_tokens = self.check(request)
        self.active_sessions += 1  # waiting for a slot counts as active
        try:
            await self._take_slot()
            async with aclosing(self._session(request, max_tokens, stats)) as rounds:
                async for tokens in rounds:
                    yield tokens
        finally:
            self.active_sessions -= 1

    async def _take_slot(self) -> None:
        try:
            await asyncio.wait_for(self._slots.acquire(), self.queue_timeout)
        except TimeoutError:
            self._ended("refused")
            raise ServiceUnavailableError(
                f"all {self.max_sessions} session slots stayed busy for {self.queue_timeout:g} s "
                "(--queue-timeout); retry later"
            ) from None

    async def _session(
        self, request: GenerationRequest, max_tokens: int, stats: GenerationStats
    ) -> AsyncGenerator[list[int], None]:
        """One request's round loop in a slot it holds; frees the slot at the end."""
        verifier: SessionVerifier | None = None
        drafter: Drafter | None = None
        outcome = "cancelled"  # unless the generation ends otherwise
        error: BaseException | None = None
        started = time.monotonic()
        try:
            verifier = await self._open_verifier(request, max_tokens)
            drafter = self._open_drafter(request, verifier)
            rounds = run_rounds(len(request.prompt_token_ids), drafter, verifier, stats)
            async with aclosing(rounds):
                async for tokens in rounds:
                    yield tokens
            outcome = "finished"
        except GeneratorExit:  # the caller stopped reading (a stop string, a disconnect)
            outcome = "closed"
            raise
        except ServiceUnavailableError as failure:  # full, unreachable or shutting down
            outcome, error = "refused" if verifier is None else "failed", failure
            raise
        except Exception as failure:  # SpecEdgeError, or a bug: failed either way
            outcome, error = "failed", failure
            raise
        finally:
            self._ended(outcome)
            session_id = verifier.session_id if verifier is not None else ""
            if verifier is not None:
                verifier.close()
            self._release(drafter)
            log_session_end(
                logger,
                role=self.role,
                session=session_id,
                prompt_tokens=len(request.prompt_token_ids),
                completion_tokens=stats.emitted,
                rounds=stats.rounds,
                seconds=time.monotonic() - started,
                outcome=outcome,
                finish_reason=stats.finish_reason,
                error=error,
                accepted=stats.accepted,
                proactive_hits=stats.proactive_hits,
            )

    def _release(self, drafter: Drafter | None) -> None:
        """Free the draft slot after any job the request left queued, then admit the next
        request waiting for a slot."""
        if drafter is None:
            self._slots.release()
            return
        loop = asyncio.get_running_loop()
        freed = drafter.close()
        freed.add_done_callback(lambda _: loop.call_soon_threadsafe(self._slots.release))
