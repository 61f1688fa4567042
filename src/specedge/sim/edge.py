"""A simulated edge and its users' requests: `core.round_loop.run_rounds` with the edge's
drafter (`edge.proactive.ProactiveModelDrafter`) and `RemoteVerifier`, on simulated time.

Per round the edge drafts a tree sized by the real `TreeSizer` (its draft steps batched with
the edge's other sessions on its device), sends it over its link, bets and grows a proactive
subtree at low priority while the reply is in flight (the verdict waits for the step under
way, as in the real edge), and on a hit starts the next tree from the subtree's steps
(keep-depth; add-depth is simulated the same way). While the server decodes the session, the
edge probes (one draft step per streamed token, scored by the real `ProbeScore`) and asks to
resume trees when they would pay. A session that ended while streamed makes the edge's next
session of the same temperature regime start streamed, as `edge.runtime` does.

Not simulated: the draft's KV commit after each verdict, the calibrator (estimates are
calibrated by construction, `sim.acceptance`), HTTP and gRPC processing time.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import simpy

from specedge.bench.metrics import RequestRecord
from specedge.core.goodput import TreeSizer
from specedge.core.round_loop import ProbeScore
from specedge.sim.acceptance import RequestSample
from specedge.sim.devices import PROACTIVE, Device, StepBatcher
from specedge.sim.network import (
    DOWN,
    REPLY_BYTES,
    REPLY_TOKEN_BYTES,
    TREE_BYTES,
    TREE_NODE_BYTES,
    UP,
    Link,
    LinkSpec,
)
from specedge.sim.profile import DeviceProfile
from specedge.sim.server import (
    CloseMessage,
    OpenMessage,
    Reply,
    ResumeMessage,
    SimServer,
    TreeMessage,
    Verdict,
    draft_prefill,
    draft_tree,
    least_loaded,
)


@dataclass(frozen=True)
class EdgeSettings:
    budget: int  # the most nodes a tree drafts
    adaptive: bool  # trees sized by TreeSizer (`--budget auto`)
    depth: int
    proactive: bool
    proactive_depth: int
    server_decoding: bool
    max_tokens: int


@dataclass
class Counts:
    """A request's counters, as `usage.speculative` reports them."""

    rounds: int = 0
    accepted: int = 0
    proactive_hits: int = 0
    proactive_attempts: int = 0
    predicted_rounds: int = 0
    predicted_tokens: float = 0.0
    predicted_round_tokens: int = 0
    streamed_rounds: int = 0
    drafted_nodes: int = 0
    verified_nodes: int = 0
    cut_rounds: int = 0
    chunk_times: list[float] = field(default_factory=list)

    def round(self, verdict: Verdict, now: float) -> None:
        self.rounds += 1
        self.accepted += verdict.accepted
        if verdict.emitted:
            self.chunk_times.append(now)

    def verification(self, drafted: int, verdict: Verdict) -> None:
        self.drafted_nodes += drafted
        self.verified_nodes += verdict.verified
        self.cut_rounds += drafted > 0 and verdict.verified == 0
        if verdict.predicted is not None:
            self.predicted_rounds += 1
            self.predicted_tokens += verdict.predicted
            self.predicted_round_tokens += verdict.emitted

    def record(
        self, client: int, sample: RequestSample, start: float, tokens: int, keep_chunks: bool
    ) -> RequestRecord:
        times = self.chunk_times
        return RequestRecord(
            client=client,
            prompt_id=sample.category or "simulated",
            category=sample.category,
            start_s=start,
            first_token_s=times[0] if times else None,
            end_s=times[-1] if times else start,
            tokens=tokens,
            prompt_tokens=sample.prompt_tokens,
            rounds=self.rounds,
            accepted=self.accepted,
            proactive_hits=self.proactive_hits,
            proactive_attempts=self.proactive_attempts,
            finish_reason="length" if tokens >= sample.tokens else "stop",
            predicted_rounds=self.predicted_rounds,
            predicted_tokens=self.predicted_tokens,
            predicted_round_tokens=self.predicted_round_tokens,
            streamed_rounds=self.streamed_rounds,
            drafted_nodes=self.drafted_nodes,
            verified_nodes=self.verified_nodes,
            cut_rounds=self.cut_rounds,
            chunk_times_s=tuple(times) if keep_chunks else (),
        )


class SimEdge:
    """One edge machine: a draft device, the step batcher its sessions share, one link per
    server it talks to."""

    def __init__(
        self,
        env: simpy.Environment,
        device: Device,
        profile: DeviceProfile,
        link_spec: LinkSpec,
    ) -> None:
        self.env = env
        self.device = device
        self.profile = profile
        self.batcher = StepBatcher(device, profile.draft_step_cost)
        self.link_spec = link_spec
        self.links: dict[str, Link] = {}
        # per regime (temperature > 0): whether the latest session that ended or changed over
        # was decoded by the server (as `edge.runtime`'s `_latest_streamed`)
        self.latest_streamed: dict[bool, bool] = {}

    def link_to(self, server: SimServer) -> Link:
        if server.name not in self.links:
            self.links[server.name] = Link(self.env, self.link_spec, self.device.rng)
        return self.links[server.name]

    @property
    def wire_bytes(self) -> int:
        return sum(link.bytes for link in self.links.values())


def edge_request(
    edge: SimEdge,
    servers: list[SimServer],
    sample: RequestSample,
    temperature: float,
    settings: EdgeSettings,
    client: int,
    sink: Callable[[RequestRecord], None],
    keep_chunks: bool = True,
) -> Generator[Any, Any, None]:
    """One user request through `edge`, from its start to its last token."""
    env, rng, profile = edge.env, edge.device.rng, edge.profile
    start = env.now
    server = least_loaded(servers)
    link = edge.link_to(server)
    to_server: simpy.Store = simpy.Store(env)
    replies: simpy.Store = simpy.Store(env)

    def send(message: object, size: int) -> None:
        link.send(UP, lambda: to_server.put(message), size)

    def reply(message: Reply) -> None:
        size = REPLY_BYTES + REPLY_TOKEN_BYTES * message.verdict.emitted
        link.send(DOWN, lambda: replies.put(message), size)

    env.process(server.session(to_server, reply))
    regime = temperature > 0
    length = min(sample.tokens, settings.max_tokens)
    streaming = settings.server_decoding and edge.latest_streamed.get(regime, False)
    open_size = TREE_BYTES + 4 * sample.prompt_tokens
    send(
        OpenMessage(sample, length, settings.depth, settings.server_decoding, streaming), open_size
    )
    yield from draft_prefill(edge.batcher, profile, sample.prompt_tokens)
    sizer = TreeSizer(settings.budget) if settings.adaptive else None
    probes = ProbeScore(settings.depth)
    counts = Counts()
    emitted = 0
    subtree_steps = 0  # steps of the proactive subtree the next tree starts from
    resumed = False
    while True:
        context = sample.prompt_tokens + emitted
        if streaming:
            yield from edge.batcher.step(profile.rows_of_step(0), context)
            answer: Reply = yield replies.get()
            if answer.streamed:
                probes.observe(rng.random() < sample.alpha)
                counts.streamed_rounds += 1
            size = 0
        else:
            size = settings.budget if sizer is None else sizer.next_size()
            yield from draft_tree(
                edge.batcher, profile, size, settings.budget, settings.depth, context, subtree_steps
            )
            subtree_steps = 0
            send(TreeMessage(size, sample.estimates(size, settings.depth)), _tree_bytes(size))
            pending = replies.get()
            bet = None
            if settings.proactive and size > 0:
                bet = _Bet()
                betting = env.process(_grow_bet(edge, pending, bet, size, settings, context))
            answer = yield pending
            if bet is not None:
                yield betting  # the step under way finishes first
                counts.proactive_attempts += bet.started
                if bet.started and rng.random() < sample.proactive_hit_rate:
                    counts.proactive_hits += 1
                    subtree_steps = bet.steps
        verdict = answer.verdict
        emitted += verdict.emitted
        counts.round(verdict, env.now)
        if not answer.streamed:
            counts.verification(size, verdict)
            probes.trees_verified()
            if sizer is not None and size > 0:
                sizer.observe(verdict.verified)
        if verdict.finished:
            send(CloseMessage(), TREE_BYTES)
            edge.latest_streamed[regime] = answer.streamed  # the last round was streamed
            break
        if answer.streaming and not streaming:
            resumed = False
            edge.latest_streamed[regime] = True  # the next session starts streamed
        streaming = answer.streaming
        if streaming and not resumed and probes.wants_trees(answer.resume_threshold):
            send(ResumeMessage(), TREE_BYTES)
            resumed = True
    sink(counts.record(client, sample, start, emitted, keep_chunks))


@dataclass
class _Bet:
    started: bool = False  # the subtree's root was forwarded
    steps: int = 0


def _grow_bet(
    edge: SimEdge,
    verdict: simpy.Event,
    bet: _Bet,
    size: int,
    settings: EdgeSettings,
    context: int,
) -> Generator[Any, Any, None]:
    """`ProactiveModelDrafter.wait`: the bet (one forward over the tree's leaves), then the
    subtree's steps at low priority until the verdict lands."""
    profile, leaves = edge.profile, max(1, size // 2)
    cost = profile.draft_step_cost

    def bet_seconds() -> float:
        return 0.0 if verdict.triggered else cost(1, leaves, context)

    yield from edge.device.run(bet_seconds, PROACTIVE)
    while not verdict.triggered and bet.steps < settings.proactive_depth:
        rows = profile.rows_of_step(bet.steps)
        ran = yield from edge.batcher.step(rows, context, PROACTIVE, lambda: not verdict.triggered)
        if not ran:
            return
        bet.steps += 1
        bet.started = True


def _tree_bytes(size: int) -> int:
    return TREE_BYTES + TREE_NODE_BYTES * size
