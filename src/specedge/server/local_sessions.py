"""Generations on the server itself, for its OpenAI-compatible HTTP API (`--api-port`).

Users with no edge GPU talk to the server directly; these are also the two server-only
baselines of DESIGN.md section 9. Each request runs one round loop here: open a session on the
`VerificationExecutor`, grow a draft tree with the server's own draft model (`--draft`; without
one every tree is empty, i.e. autoregressive decoding), queue it for verification, batched with
every other session's tree (edge sessions included), yield the emitted tokens, commit them to
the draft, repeat. Draft steps run one per job on the executor's model thread, serialized with
verification and counted as busy time: on the server, draft time is server time. There is no
proactive drafting here: betting on a reply would compete with its own verification for the
one model thread (overlapping the two is the edge's contribution).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
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
from specedge.core.verify import VerifyResult
from specedge.errors import CapacityError, ServiceUnavailableError, SpecEdgeError
from specedge.server.executor import ServerSession, VerificationExecutor

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # draft prompt tokens per model job, so a long prompt does not stall others


class LocalSessions(RoundLoopBackend):
    """The server's `GenerationBackend`. `max_sessions` bounds concurrent generations (and the
    draft's KV slots); requests beyond it wait for one. A request that finds every target KV
    slot taken (edge sessions share them) waits up to `slot_wait` seconds for one, then gets
    a 503."""

    def __init__(
        self,
        executor: VerificationExecutor,
        draft: DraftEngine | None,
        *,
        max_sessions: int,
        slot_wait: float = 60.0,
        status: Callable[[], str] = lambda: "ok",
    ) -> None:
        self.executor = executor
        self.draft = draft
        self.max_sessions = max_sessions
        self.slot_wait = slot_wait
        self._status = status
        self._slots = asyncio.Semaphore(max_sessions)
        self.active_sessions = 0
        self.max_context = executor.engine.runner.max_context
        if draft is not None:
            self.max_context = min(self.max_context, draft.runner.max_context)

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

    def check(self, request: GenerationRequest) -> int:
        return check_request(request, self.max_context, "this server's")

    async def _rounds(
        self, request: GenerationRequest, max_tokens: int, stats: GenerationStats
    ) -> AsyncGenerator[list[int], None]:
        await self._slots.acquire()
        session: ServerSession | None = None
        seq: DraftSequence | None = None
        outcome = "cancelled"  # unless the generation ends otherwise
        try:
            session = await self._open(request, max_tokens)
            if self.draft is not None:  # taking a slot is bookkeeping: done on the loop
                seq = self.draft.open(request.prompt_token_ids)
                await self._prefill_draft(seq)
            while True:
                builder, tree, node_map = await self._draft_tree(seq, len(session.seq.committed))
                result = await self.executor.verify(session.session_id, tree)
                stats.record_round(
                    len(result.emitted_tokens), result.num_accepted, result.finish_reason
                )
                yield result.emitted_tokens
                if result.finish_reason is not None:
                    outcome = "finished"
                    return
                await self._commit(seq, builder, node_map, result)
        except GeneratorExit:  # the caller stopped reading (a stop string, a disconnect)
            outcome = "closed"
            raise
        except ServiceUnavailableError:  # full or shutting down
            outcome = "refused" if session is None else "failed"
            raise
        except SpecEdgeError:
            outcome = "failed"
            raise
        finally:
            self.executor.metrics.sessions.labels(outcome).inc()
            if session is not None:
                self.executor.close_session(session.session_id)
            self._release(seq)

    # ---- steps -----------------------------------------------------------------------------------
    async def _open(self, request: GenerationRequest, max_tokens: int) -> ServerSession:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.slot_wait
        while True:
            try:
                return self.executor.open_session(
                    request.prompt_token_ids, request.params, max_tokens, request.stop_token_ids
                )
            except CapacityError:
                remaining = deadline - loop.time()
                if remaining <= 0 or not await self.executor.wait_for_free_slot(remaining):
                    raise ServiceUnavailableError(
                        f"the server is full ({self.executor.engine.runner.kv.num_slots} "
                        f"sessions, edges included) and none freed within {self.slot_wait:g} "
                        "s; retry later"
                    ) from None

    async def _prefill_draft(self, seq: DraftSequence) -> None:
        """Draft KV for the prompt but its last token (the first tree's root)."""
        assert self.draft is not None
        prefill = partial(self.draft.prefill, seq, PREFILL_CHUNK)
        while not await self.executor.run_model_job(prefill):
            pass

    async def _draft_tree(
        self, seq: DraftSequence | None, context_len: int
    ) -> tuple[TreeBuilder | None, DraftTree, list[int]]:
        """The next tree (empty without a draft), its builder and each node's builder index."""
        if self.draft is None or seq is None:
            return None, DraftTree(), []
        builder = self.draft.builder(seq)
        while await self.executor.run_model_job(builder.step):
            pass
        room = self.executor.engine.runner.max_context - context_len
        tree, node_map = builder.tree(max(room, 0))
        return builder, tree, node_map

    async def _commit(
        self,
        seq: DraftSequence | None,
        builder: TreeBuilder | None,
        node_map: list[int],
        result: VerifyResult,
    ) -> None:
        if self.draft is None or seq is None or builder is None:
            return
        accepted = [node_map[node] for node in result.accepted_nodes]
        commit = partial(self.draft.commit, seq, builder, accepted, result.emitted_tokens)
        await self.executor.run_model_job(commit)

    def _release(self, seq: DraftSequence | None) -> None:
        """Free the draft slot after any job the generation left queued on the model thread,
        then admit the next request waiting for a slot."""
        if self.draft is None or seq is None:
            self._slots.release()
            return
        loop = asyncio.get_running_loop()
        freed = self.executor.submit_model_job(partial(self.draft.close, seq))
        freed.add_done_callback(lambda _: loop.call_soon_threadsafe(self._slots.release))
