"""The edge's generation backend: the one round loop (`core.round_loop`) with a proactive
draft model here and the verifier on a remote server.

A round: grow a draft tree (one draft step per worker job), send it, draft proactively until
the server's reply lands (checked between draft steps), hand the emitted tokens to the caller,
then commit them to the draft KV (or splice the proactive subtree on a hit) and start the next
tree. Sessions interleave on the one model thread; network waits never block it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from specedge.core.calibration import AcceptanceCalibrator, temperature_regime
from specedge.core.draft import DraftEngine, SentTree
from specedge.core.generation import GenerationRequest
from specedge.core.goodput import TreeSizer
from specedge.core.limits import TreeLimits
from specedge.core.round_loop import Drafter, RoundLoopBackend, SessionVerifier
from specedge.core.tree import DraftTree
from specedge.core.verify import VerifyResult, verdict_from_reply
from specedge.edge.client import RemoteSession, ServerUnavailableError
from specedge.edge.failover import ServerPool
from specedge.edge.proactive import ProactiveDrafter, ProactiveModelDrafter, WorkerJobs
from specedge.edge.worker import DraftWorker
from specedge.rpc.codec import OpenSession, TreeVerified

logger = logging.getLogger(__name__)


class RemoteVerifier:
    """One session's verifier on the server (`core.round_loop.SessionVerifier`), failing over:
    when the session's stream breaks, it re-opens the session through `pool`
    (`edge.failover`) with the prompt plus every token its verdicts emitted, and sends the
    round again, so the round loop never sees the break. Rounds, tokens and traffic add up
    across the sessions; `session_id` is the current one's."""

    def __init__(
        self,
        remote: RemoteSession,
        streaming: bool = False,
        *,
        pool: ServerPool | None = None,
        request: OpenSession | None = None,
    ) -> None:
        self.remote = remote
        self.limits = self._limits(remote)
        # the server decodes the session itself (its last reply said, or the Open asked)
        self.streaming = streaming
        self.resume_threshold = 0.0
        self._resumed = False
        self.last_streamed = False  # the latest verdict was a server-side step
        # Told whether the server decodes the session itself, when it starts to and at the end.
        self.on_mode: Callable[[bool], None] | None = None
        self._pool = pool
        self._request = request  # the session's Open, replayed with `_emitted` on a failover
        self._emitted: list[int] = []
        self._past_traffic = (0, 0)  # bytes of the sessions before a failover
        self._deadline: float | None = None  # of the failover under way
        self.failovers = 0

    @staticmethod
    def _limits(remote: RemoteSession) -> TreeLimits:
        info = remote.info
        return TreeLimits(info.max_tree_nodes, info.max_tree_depth, info.max_context)

    @property
    def session_id(self) -> str:
        return self.remote.session_id

    async def verify(self, sent: SentTree) -> VerifyResult:
        """The verdict on `sent`, from a re-opened session if the stream breaks meanwhile
        (until the failover timeout, then the ServerUnavailableError)."""
        while True:
            try:
                verdict = await self._verify_once(sent)
            except ServerUnavailableError as error:
                await self._fail_over(error)
                continue
            self._deadline = None
            self._emitted.extend(verdict.emitted_tokens)
            return verdict

    async def _fail_over(self, error: ServerUnavailableError) -> None:
        """Replace the broken session by one that continues it (or re-raise `error`)."""
        request = self._request
        if self._pool is None or request is None:
            raise error
        loop = asyncio.get_running_loop()
        if self._deadline is None:
            self._deadline = loop.time() + self._pool.policy.timeout_s
        elif loop.time() >= self._deadline:
            raise error
        broken = self.remote
        broken.cancel()
        sent, received = self._past_traffic
        self._past_traffic = (sent + broken.bytes_sent, received + broken.bytes_received)
        logger.warning("session %s on %s broke (%s); failing over after %d tokens",
                       broken.session_id, broken.address, error, len(self._emitted))  # fmt: skip
        resumed = replace(
            request,
            prompt_token_ids=[*request.prompt_token_ids, *self._emitted],
            max_tokens=request.max_tokens - len(self._emitted),
            start_streaming=self.streaming,
        )
        self.remote = await self._pool.open_session(
            resumed, after_failure_of=broken.address, deadline=self._deadline
        )
        self.limits = self._limits(self.remote)
        self._resumed = False
        self.failovers += 1

    async def _verify_once(self, sent: SentTree) -> VerifyResult:
        self.last_streamed = self.streaming
        if self.streaming:  # nothing is sent: the server's next step
            reply = await self.remote.next_streamed()
            self._follow(reply)
            if reply.num_accepted:
                raise ServerUnavailableError("a streamed reply claims accepted draft tokens")
            return VerifyResult(reply.emitted_token_ids, [], reply.finish_reason, 0)
        tree = self._fitted(sent.tree)
        reply = await self.remote.verify(tree, sent.estimates[: tree.num_nodes])
        self._follow(reply)
        try:
            if reply.num_verified > tree.num_nodes:
                raise ValueError(f"{reply.num_verified} verified nodes of {tree.num_nodes} sent")
            verified = reply.num_verified
            return verdict_from_reply(
                tree.tokens[:verified],
                tree.parents[:verified],
                reply.emitted_token_ids,
                reply.num_accepted,
                reply.finish_reason,
                num_verified=verified,
            )
        except ValueError as error:
            raise ServerUnavailableError(
                f"the server's reply does not fit our tree: {error}"
            ) from None

    def _fitted(self, tree: DraftTree) -> DraftTree:
        """`tree`'s longest prefix within this server's caps: a tree drafted for the server
        before a failover may exceed the next one's. A prefix in the sent order is what a
        server that verifies fewer nodes verifies anyway."""
        limits = self.limits
        prompt_len = len(self._request.prompt_token_ids) if self._request is not None else 0
        fits = min(tree.num_nodes, limits.room(prompt_len + len(self._emitted)))
        deep = [node for node, depth in enumerate(tree.depths()) if depth > limits.max_tree_depth]
        return tree.prefix(min([fits, *deep]))

    async def resume(self) -> None:
        if self.streaming and not self._resumed:
            self._resumed = True
            # A broken stream fails the next round over (the new session streams too).
            with contextlib.suppress(ServerUnavailableError):
                await self.remote.resume()

    def _follow(self, reply: TreeVerified) -> None:
        """Whether the server streams from now on, and what resuming must beat."""
        if reply.streaming and not self.streaming and self.on_mode is not None:
            self.on_mode(True)
        self.streaming = reply.streaming
        self.resume_threshold = reply.resume_tokens_per_round
        if not reply.streaming:
            self._resumed = False

    def traffic(self) -> tuple[int, int]:
        sent, received = self._past_traffic
        return sent + self.remote.bytes_sent, received + self.remote.bytes_received

    async def finish(self) -> None:
        if self.on_mode is not None:
            self.on_mode(self.last_streamed)
        await self.remote.finish()

    def close(self) -> None:
        self.remote.cancel()


class EdgeRuntime(RoundLoopBackend):
    """What every session of one edge shares: the draft model (behind its one worker thread),
    the proactive policy, the server link and the acceptance calibrator (one per edge: its
    draft against the server's target, learned from every session's verdicts).
    `max_sessions` bounds the draft KV slots; requests beyond it wait up to `queue_timeout`
    seconds for a slot. With `adaptive` (`--budget auto`) each session sizes its trees to what
    the server recently verified of them."""

    role = "edge"

    def __init__(
        self,
        *,
        worker: DraftWorker,
        draft: DraftEngine,
        drafter: ProactiveDrafter,
        connection: ServerPool,
        fingerprint: str,
        max_context: int,
        max_sessions: int,
        adaptive: bool = True,
        server_decoding: bool = True,
        queue_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            max_sessions=max_sessions,
            max_context=max_context,
            owner="this edge's",
            queue_timeout=queue_timeout,
        )
        self.worker = worker
        self.draft = draft
        self.drafter = drafter
        self.connection = connection
        self.fingerprint = fingerprint
        self.adaptive = adaptive
        self.server_decoding = server_decoding
        # Per temperature regime: whether the server decoded the latest session that ended or
        # changed over to it (the next session then starts that way, and probes its way back
        # to trees); concurrent sessions tell each other, not only the one that ended last.
        self._latest_streamed: dict[str, bool] = {}
        self.calibrator = AcceptanceCalibrator()
        self.jobs = WorkerJobs(worker, draft.runner)  # batches the sessions' draft steps

    def health(self) -> dict[str, Any]:
        connection = self.connection
        return {
            "server": connection.address,
            "server_connected": connection.connected,
            "replicas": connection.describe(),
            "active_sessions": self.active_sessions,
        }

    async def _open_verifier(self, request: GenerationRequest, max_tokens: int) -> RemoteVerifier:
        regime = temperature_regime(request.params.temperature)
        start_streaming = self.server_decoding and self._latest_streamed.get(regime, False)
        message = OpenSession(
            prompt_token_ids=list(request.prompt_token_ids),
            sampling=request.params,
            max_tokens=max_tokens,
            stop_token_ids=list(request.stop_token_ids),
            tokenizer_fingerprint=self.fingerprint,
            accepts_streaming=self.server_decoding,
            start_streaming=start_streaming,
            accepts_token_runs=self.server_decoding,
        )
        remote = await self.connection.open_session(message)
        verifier = RemoteVerifier(
            remote, streaming=start_streaming, pool=self.connection, request=message
        )
        verifier.on_mode = lambda streaming: self._latest_streamed.__setitem__(regime, streaming)
        return verifier

    def _open_drafter(self, request: GenerationRequest, verifier: SessionVerifier) -> Drafter:
        budget = min(self.draft.shape.budget, verifier.limits.max_tree_nodes)
        return ProactiveModelDrafter(
            self.draft,
            list(request.prompt_token_ids),
            self.jobs,
            self.drafter,
            verifier.limits,
            temperature=request.params.temperature,
            calibrator=self.calibrator,
            sizer=TreeSizer(budget) if self.adaptive else None,
        )
