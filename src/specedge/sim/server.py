"""A simulated server replica: the verification executor's loop over the real `Scheduler` and
`GoodputBatching` (batch waits, goodput cuts, cost refits), the gRPC service's per-session
logic over the real `StreamPolicy` (when to decode a session server-side, when to stop), and
the server's own API sessions for the server-only baselines (`server-spec`: drafting on the
server's device, serialized with verification; `server-ar`: empty trees).

Where the real server runs a forward, the simulated one holds its `Device` for the profile's
time; where the real one samples the target, the simulated one draws the accepted path from
the request's `RequestSample`. Everything else is the real code's decision, called the way
`server.executor` and `server.service` call it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import simpy

from specedge.core.goodput import FittedBatchCost, TreeSizer
from specedge.core.limits import DEFAULT_PREFILL_CHUNK
from specedge.rpc.codec import TreeVerified, VerifyTree
from specedge.server.batching import GoodputBatching
from specedge.server.scheduler import Batch, PrefillChunk, Scheduler, SchedulerPolicy
from specedge.server.streaming import StreamPolicy
from specedge.sim.acceptance import RequestSample
from specedge.sim.devices import CRITICAL, Device, StepBatcher
from specedge.sim.profile import DeviceProfile

PROFILE_CONTEXT = 128  # the context of the server's start-up profile (server.cost_profile)
ARRIVAL_EPSILON_S = 1e-4  # a server-side step's next request follows its reply at once


@dataclass(frozen=True)
class Verdict:
    """A round's outcome: tokens emitted (accepted + bonus), accepted draft tokens, nodes
    verified of the tree, and whether the request is complete."""

    emitted: int
    accepted: int
    verified: int
    finished: bool
    predicted: float | None = None  # 1 + the verified nodes' estimates (None: none sent)


@dataclass(eq=False)
class ServerSession:
    session_id: str
    sample: RequestSample
    length: int  # completion tokens this request emits in all
    depth: int  # the longest path its trees can accept
    emitted: int = 0
    num_nodes: int = 0
    estimates: tuple[float, ...] | None = None
    reply: simpy.Event | None = None

    @property
    def context(self) -> int:
        return self.sample.prompt_tokens + self.emitted

    @property
    def finished(self) -> bool:
        return self.emitted >= self.length

    @property
    def left(self) -> int:
        return self.length - self.emitted


class SimExecutor:
    """`server.executor.VerificationExecutor`'s loop on simulated time (see the module
    docstring)."""

    def __init__(
        self,
        env: simpy.Environment,
        device: Device,
        profile: DeviceProfile,
        policy: SchedulerPolicy,
        rng: random.Random,
        *,
        goodput: bool = True,
        host_s_per_token: float = 0.0,
    ) -> None:
        """`host_s_per_token`: the server's host work (event loop, gRPC, HTTP) per emitted
        token, held on the device after each batch's forward (on a CPU server it shares the
        cores with the model; `specedge bench` measures it as `server_host_ms_per_token`)."""
        self.env = env
        self.host_s_per_token = host_s_per_token
        self.device = device
        self.rng = rng
        self.verify_cost = profile.verify_cost
        self.prefill_cost = profile.prefill_cost
        self.scheduler = Scheduler(policy)
        start = FittedBatchCost(self.verify_cost.linear(PROFILE_CONTEXT))
        self.batching = GoodputBatching(self.scheduler, start, goodput)
        self.sessions: dict[str, ServerSession] = {}
        self.batches = 0
        self.batched_sequences = 0
        self._wake = env.event()
        self._count = 0
        env.process(self._run())

    # ---- producer side ---------------------------------------------------------------------------
    def open(self, sample: RequestSample, length: int, depth: int) -> ServerSession:
        self._count += 1
        session = ServerSession(f"s{self._count}", sample, length, depth)
        self.sessions[session.session_id] = session
        self.scheduler.add_session(session.session_id, prefill_tokens=sample.prompt_tokens - 1)
        self._notify()
        return session

    def verify(
        self, session: ServerSession, num_nodes: int, estimates: tuple[float, ...] | None
    ) -> Generator[Any, Any, Verdict]:
        assert session.reply is None, "one round at a time"
        session.num_nodes, session.estimates = num_nodes, estimates
        session.reply = self.env.event()
        self.scheduler.add_request(session.session_id, num_nodes + 1, self.env.now)
        self._notify()
        verdict: Verdict = yield session.reply
        return verdict

    def close(self, session: ServerSession) -> None:
        self.sessions.pop(session.session_id, None)
        self.scheduler.remove_session(session.session_id)
        if not self.sessions:
            self.batching.no_sessions()

    def draft_busy(self, seconds: float) -> None:
        """Server-side drafting held the device (busy time between batches)."""
        self.batching.busy_since_batch += seconds

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)

    # ---- the loop -------------------------------------------------------------------------------
    def _notify(self) -> None:
        if not self._wake.triggered:
            self._wake.succeed()

    def _run(self) -> Generator[Any, Any, None]:
        env = self.env
        while True:
            if not self.scheduler.has_work():
                self._wake = env.event()
                yield self._wake
                continue
            yield from self._hold_for_arrivals()
            batch = self.scheduler.next_batch(env.now)
            if batch.session_ids:
                yield from self._verify_batch(batch)
            if batch.prefill is not None:
                yield from self._prefill(batch.prefill)

    def _hold_for_arrivals(self) -> Generator[Any, Any, None]:
        env = self.env
        delay = self.batching.batch_delay(env.now)
        if delay <= 0.0:
            return
        deadline = env.now + delay
        while (remaining := deadline - env.now) > 1e-12:
            self._wake = env.event()
            timer = env.timeout(remaining)
            yield env.any_of([timer, self._wake])
            if timer.triggered or self.batching.batch_delay(env.now) <= 0.0:
                return

    def _verify_batch(self, batch: Batch) -> Generator[Any, Any, None]:
        env = self.env
        sessions = [self.sessions[session_id] for session_id in batch.session_ids]
        self.batching.note_idle(env.now)
        keep = self.batching.select(
            [s.estimates for s in sessions], [s.num_nodes for s in sessions]
        )
        rows = sum(k + 1 for k in keep)
        context = sum(s.context for s in sessions) / len(sessions)
        emitted = [
            min(session.sample.accepted(verified, session.depth, self.rng) + 1, session.left)
            for session, verified in zip(sessions, keep, strict=True)
        ]
        host = self.host_s_per_token * sum(emitted)
        elapsed = yield from self.device.run(
            lambda: self.verify_cost(len(sessions), rows, context) + host
        )
        for session, verified, tokens in zip(sessions, keep, emitted, strict=True):
            session.emitted += tokens
            predicted = None
            if session.estimates is not None:
                predicted = 1.0 + sum(session.estimates[:verified])
            verdict = Verdict(tokens, tokens - 1, verified, session.finished, predicted)
            reply, session.reply = session.reply, None
            assert reply is not None
            reply.succeed(verdict)
        self.scheduler.complete(batch, env.now)
        self.batching.record(len(sessions), rows, elapsed, emitted, env.now)
        self.batches += 1
        self.batched_sequences += len(sessions)
        for session in sessions:
            if session.finished:
                self.scheduler.remove_session(session.session_id)

    def _prefill(self, chunk: PrefillChunk) -> Generator[Any, Any, None]:
        if chunk.session_id not in self.sessions:
            return
        elapsed = yield from self.device.run(
            lambda: self.prefill_cost(1, chunk.num_tokens, chunk.start)
        )
        self.batching.busy_since_batch += elapsed
        self.scheduler.complete_prefill(chunk)


# ---- the gRPC service's session logic


@dataclass(frozen=True)
class OpenMessage:
    sample: RequestSample
    length: int
    depth: int
    accepts_streaming: bool
    start_streaming: bool


@dataclass(frozen=True)
class TreeMessage:
    num_nodes: int
    estimates: tuple[float, ...]


@dataclass(frozen=True)
class ResumeMessage:
    pass


@dataclass(frozen=True)
class CloseMessage:
    pass


@dataclass(frozen=True)
class Reply:
    verdict: Verdict
    streaming: bool = False  # the server decodes the session itself: more replies follow
    streamed: bool = False  # this reply is one of its own decoding steps
    resume_threshold: float = 0.0


@dataclass
class SimServer:
    """One replica: its device, executor and service."""

    env: simpy.Environment
    executor: SimExecutor
    name: str
    drafting: StepBatcher | None = None  # server-side drafting (server-spec)
    resume_threshold: float = 2.0  # the latest threshold given (server.service's default)
    streamed_rounds: int = 0
    sessions_opened: int = 0
    assigned: int = 0  # sessions sent here and not yet ended (what balancing compares)

    def session(
        self, inbox: simpy.Store, send: Callable[[Reply], None]
    ) -> Generator[Any, Any, None]:
        """`server.service.VerifierService._session` for one edge stream: messages from
        `inbox`, replies through `send`."""
        first = yield inbox.get()
        assert isinstance(first, OpenMessage)
        executor = self.executor
        session = executor.open(first.sample, first.length, first.depth)
        self.sessions_opened += 1
        policy = StreamPolicy()
        try:
            if first.accepts_streaming and first.start_streaming:
                start = Reply(Verdict(0, 0, 0, False), True, True, self.resume_threshold)
                yield from self._stream(session, inbox, send, start)
                policy.resumed(self.env.now)
            while not session.finished:
                message = yield inbox.get()
                if isinstance(message, ResumeMessage):
                    continue
                if isinstance(message, CloseMessage):
                    return
                assert isinstance(message, TreeMessage)
                verdict = yield from executor.verify(session, message.num_nodes, message.estimates)
                policy.observe(_tree(message), _reply(verdict), self.env.now)
                reply = Reply(verdict)
                step_s = executor.batching.stream_step_seconds(policy.rows_per_round)
                if (
                    first.accepts_streaming
                    and not verdict.finished
                    and policy.should_stream(step_s)
                ):
                    self.resume_threshold = policy.resume_threshold(step_s)
                    reply = Reply(verdict, True, False, self.resume_threshold)
                send(reply)
                if reply.streaming:
                    yield from self._stream(session, inbox, send, reply)
                    policy.resumed(self.env.now)
        finally:
            executor.close(session)
            self.assigned -= 1

    def _stream(
        self,
        session: ServerSession,
        inbox: simpy.Store,
        send: Callable[[Reply], None],
        first: Reply,
    ) -> Generator[Any, Any, None]:
        """Decode the session server-side until the edge resumes or the session finishes."""
        streaming = True
        while streaming:
            yield self.env.timeout(ARRIVAL_EPSILON_S)
            verdict = yield from self.executor.verify(session, 0, None)
            self.streamed_rounds += 1
            while inbox.items:
                message = inbox.items[0]
                if isinstance(message, ResumeMessage):
                    inbox.items.pop(0)
                    streaming = False
                elif isinstance(message, CloseMessage):
                    streaming = False
                    break
                else:
                    inbox.items.pop(0)  # a tree sent before the edge saw the stream
            if verdict.finished:
                streaming = False
            send(Reply(verdict, streaming, True, first.resume_threshold))


def _tree(message: TreeMessage) -> VerifyTree:
    return VerifyTree(0, [0] * message.num_nodes, [-1] * message.num_nodes)


def _reply(verdict: Verdict) -> TreeVerified:
    return TreeVerified(0, [0] * verdict.emitted, verdict.accepted, None, verdict.verified)


# ---- the server's own API (server-only baselines)


def local_session(
    server: SimServer,
    sample: RequestSample,
    length: int,
    depth: int,
    drafting: StepBatcher | None,
    draft_profile: DeviceProfile,
    budget: int,
    adaptive: bool,
    on_round: Callable[[Verdict], None],
) -> Generator[Any, Any, None]:
    """`server.local_sessions`: one API request's round loop on the server, drafting with
    `drafting` (server-spec: the server's device) or not at all (server-ar)."""
    executor = server.executor
    session = executor.open(sample, length, depth)
    server.sessions_opened += 1
    try:
        if drafting is not None:
            yield from draft_prefill(drafting, draft_profile, sample.prompt_tokens)
        sizer = TreeSizer(budget) if adaptive else None
        while not session.finished:
            size = 0
            if drafting is not None:
                size = budget if sizer is None else sizer.next_size()
                yield from draft_tree(drafting, draft_profile, size, budget, depth, session.context)
            estimates = sample.estimates(size, depth) if size else None
            verdict = yield from executor.verify(session, size, estimates)
            on_round(verdict)
            if sizer is not None and size > 0:
                sizer.observe(verdict.verified)
    finally:
        executor.close(session)
        server.assigned -= 1


def draft_tree(
    drafting: StepBatcher,
    profile: DeviceProfile,
    size: int,
    budget: int,
    depth: int,
    context: int,
    done_steps: int = 0,
    priority: int = CRITICAL,
) -> Generator[Any, Any, int]:
    """Grow a tree of `size` nodes (`DeviceProfile.tree_rows`), `done_steps` of its steps
    already done (a proactive subtree); returns the steps run."""
    steps = profile.tree_rows(size, budget, depth)
    for rows in steps[done_steps:]:
        yield from drafting.step(rows, context, priority)
    return max(0, len(steps) - done_steps)


def draft_prefill(
    drafting: StepBatcher, profile: DeviceProfile, prompt_tokens: int
) -> Generator[Any, Any, None]:
    """The draft's prompt prefill on the drafter's device, one job per chunk."""
    cost = profile.draft_prefill_cost
    device = drafting.device
    for start in range(0, prompt_tokens, DEFAULT_PREFILL_CHUNK):
        tokens = min(DEFAULT_PREFILL_CHUNK, prompt_tokens - start)
        elapsed = yield from device.run(partial(cost, 1, tokens, start))
        if drafting.on_busy is not None:
            drafting.on_busy(elapsed)


def least_loaded(servers: Sequence[SimServer]) -> SimServer:
    """The replica a new session goes to: the fewest sessions assigned (counting those whose
    Open is still on its way, as a client-side balancer does), the first on a tie."""
    server = min(servers, key=lambda s: s.assigned)
    server.assigned += 1
    return server
