"""One generation on the edge: the round loop, and the runtime all sessions share.

A round: grow a draft tree (one draft step per worker job), send it, draft proactively until
the server's reply lands (checked between draft steps), hand the emitted tokens to the caller,
then commit them to the draft KV (or splice the proactive subtree on a hit) and start the next
tree. Sessions interleave on the one model thread; network waits never block it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from functools import partial
from typing import Any

from specedge.core.draft import DraftEngine, DraftSequence, TreeBuilder
from specedge.core.generation import (
    GenerationRequest,
    GenerationStats,
    RoundLoopBackend,
    check_request,
)
from specedge.core.tree import DraftTree
from specedge.edge.client import RemoteSession, ServerUnavailableError, VerifierConnection
from specedge.edge.proactive import ProactiveDraft, ProactiveDrafter, accepted_nodes
from specedge.edge.worker import DraftWorker, Priority
from specedge.rpc.codec import OpenSession, ServerInfo, TreeVerified, WireSampling

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens per worker job, so a long prompt does not stall others


def record_round(
    stats: GenerationStats,
    reply: TreeVerified,
    remote: RemoteSession,
    proactive: ProactiveDraft | None,
) -> None:
    """Add one round's reply, proactive attempt and wire traffic to the request's stats."""
    stats.record_round(len(reply.emitted_token_ids), reply.num_accepted, reply.finish_reason)
    stats.proactive_attempts += proactive is not None and proactive.started
    stats.bytes_sent, stats.bytes_received = remote.bytes_sent, remote.bytes_received


@dataclass
class EdgeRuntime(RoundLoopBackend):
    """What every session of one edge shares: the draft model (behind its one worker thread),
    the proactive policy and the server link. `max_sessions` bounds the draft KV slots;
    requests beyond it wait for a slot."""

    worker: DraftWorker
    draft: DraftEngine
    drafter: ProactiveDrafter
    connection: VerifierConnection
    fingerprint: str
    max_context: int
    max_sessions: int

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.max_sessions)
        self.active_sessions = 0

    def health(self) -> dict[str, Any]:
        connection = self.connection
        return {
            "server": connection.address,
            "server_connected": connection.connected,
            "active_sessions": self.active_sessions,
        }

    def check(self, request: GenerationRequest) -> int:
        """Validate a request against the edge's context; returns its max new tokens."""
        return check_request(request, self.max_context, "this edge's")

    async def _rounds(
        self, request: GenerationRequest, max_tokens: int, stats: GenerationStats
    ) -> AsyncGenerator[list[int], None]:
        await self._slots.acquire()
        remote: RemoteSession | None = None
        seq: DraftSequence | None = None
        reply: asyncio.Future[TreeVerified] | None = None
        try:
            remote = await self.connection.open_session(self._open_message(request, max_tokens))
            # Taking a free slot is bookkeeping, not model work: done here, it cannot be lost
            # to a cancellation between the job and this frame.
            seq = self.draft.open(request.prompt_token_ids)
            while not await self.worker.run(partial(self.draft.prefill, seq, PREFILL_CHUNK)):
                pass
            builder = self.draft.builder(seq)
            while True:
                while await self.worker.run(builder.step):
                    pass
                tree, node_map = builder.tree(self._max_nodes(remote.info, seq))
                reply = asyncio.ensure_future(remote.verify(tree))
                proactive = await self._draft_while_waiting(builder, node_map, tree, reply)
                verdict = await reply
                record_round(stats, verdict, remote, proactive)
                yield verdict.emitted_token_ids
                if verdict.finish_reason is not None:
                    await remote.finish()
                    return
                accepted = [node_map[i] for i in self._accepted(tree, verdict)]
                resolve = partial(
                    self.drafter.resolve, seq, builder, proactive, accepted,
                    verdict.emitted_token_ids, remote.info.max_tree_depth,
                )  # fmt: skip
                builder, hit = await self.worker.run(resolve)
                stats.proactive_hits += hit
        finally:
            if reply is not None and not reply.done():
                reply.cancel()
            elif reply is not None and not reply.cancelled():
                reply.exception()  # retrieved: the caller has already seen or abandoned it
            if remote is not None:
                remote.cancel()
            self._release(seq)

    def _release(self, seq: DraftSequence | None) -> None:
        """Free the draft slot after any job the session left queued, then admit the next
        request waiting for a slot."""
        if seq is None:
            self._slots.release()
            return
        loop = asyncio.get_running_loop()
        freed = self.worker.submit(partial(self.draft.close, seq), Priority.CLEANUP)
        freed.add_done_callback(lambda _: loop.call_soon_threadsafe(self._slots.release))

    async def _draft_while_waiting(
        self,
        builder: TreeBuilder,
        node_map: list[int],
        tree: DraftTree,
        reply: asyncio.Future[TreeVerified],
    ) -> ProactiveDraft | None:
        """Bet on the reply and grow the bet's subtree until the reply lands."""
        if not self.drafter.enabled or tree.num_nodes == 0:
            return None
        arrived = threading.Event()  # read on the worker thread: skip steps queued too late
        reply.add_done_callback(lambda _: arrived.set())

        def bet() -> ProactiveDraft | None:
            if arrived.is_set():
                return None
            return self.drafter.start(builder, self.drafter.choose_bet(builder, node_map, tree))

        proactive = await self.worker.run(bet, Priority.PROACTIVE)
        if proactive is None:
            return None
        subtree = proactive.builder

        def step() -> bool:
            return not arrived.is_set() and subtree.step()

        while not reply.done() and await self.worker.run(step, Priority.PROACTIVE):
            pass
        return proactive

    def _max_nodes(self, info: ServerInfo, seq: DraftSequence) -> int:
        """Tree size allowed by the server's node cap and its context room left."""
        return max(0, min(info.max_tree_nodes, info.max_context - len(seq.committed)))

    def _accepted(self, tree: DraftTree, verdict: TreeVerified) -> list[int]:
        try:
            return accepted_nodes(tree, verdict.emitted_token_ids, verdict.num_accepted)
        except ValueError as error:
            raise ServerUnavailableError(
                f"the server's reply does not fit our tree: {error}"
            ) from None

    def _open_message(self, request: GenerationRequest, max_tokens: int) -> OpenSession:
        params = request.params
        return OpenSession(
            prompt_token_ids=list(request.prompt_token_ids),
            sampling=WireSampling(params.temperature, params.top_p, params.top_k, params.seed),
            max_tokens=max_tokens,
            stop_token_ids=list(request.stop_token_ids),
            tokenizer_fingerprint=self.fingerprint,
        )
