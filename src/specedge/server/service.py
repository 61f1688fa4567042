"""The gRPC Verifier service: the handshake, per-session validation and the round loop.

A session stream goes: Open -> Opened, then Tree -> Verified per round, until the edge sends
Close or ends the stream (or a reply carries a finish reason and the edge leaves). When the
edge's trees stop paying (`StreamPolicy`), the server decodes the session itself: the reply says
`streaming`, and one Verified per decoding step follows without waiting for a tree (the session
is in every batch, with no round trip per token) until the edge sends Resume; the reply to the
step in progress then says streaming = false and the server waits for the next round's tree.
Everything is checked before any model work: the bearer token before the call reaches this
service (UNAUTHENTICATED, `rpc.security.TokenAuth`), then the protocol version and tokenizer
fingerprint (FAILED_PRECONDITION), the prompt, sampling parameters and every tree
(INVALID_ARGUMENT). A failure ends that session alone and frees its slot. A full
server answers RESOURCE_EXHAUSTED; an edge silent for `session_timeout` seconds while the server
waits for its tree is evicted with DEADLINE_EXCEEDED. The server, never the edge, names
sessions and slots, and decides where a session stops: at the target's stop token ids (the
service's `stop_token_ids`); the edge's `Open.stop_token_ids` (its draft tokenizer's) are
ignored, so an edge can neither end other text early nor run past the target's end of text.
Each session's end is one `session_end` log line (`specedge.session_log`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

import grpc

from specedge.core.calibration import temperature_regime
from specedge.core.lookup import LookupStats
from specedge.core.tree import DraftTree
from specedge.core.verify import VerifyResult
from specedge.errors import CapacityError, InvalidRequestError
from specedge.rpc.codec import (
    PROTOCOL_VERSION,
    SUPPORTED_PROTOCOL_VERSIONS,
    CloseSession,
    EdgeRequest,
    MalformedMessage,
    OpenSession,
    ResumeTrees,
    ServerInfo,
    ServerLoad,
    ServerReply,
    SessionOpened,
    StreamTraffic,
    TreeVerified,
    VerifyTree,
)
from specedge.server.executor import (
    ServerClosingError,
    ServerSession,
    SessionStateError,
    VerificationExecutor,
    VerificationFailedError,
)
from specedge.server.health import BusyWindow, counter_value
from specedge.server.metrics import ServerMetrics
from specedge.server.streaming import StreamLookup, StreamPolicy
from specedge.session_log import log_session_end

logger = logging.getLogger(__name__)


class _StreamEnded:
    """Marker: the edge half-closed the stream."""


STREAM_ENDED = _StreamEnded()


class _SessionAborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, outcome: str) -> None:
        super().__init__(message)
        self.code, self.message, self.outcome = code, message, outcome


class VerifierService:
    def __init__(
        self,
        executor: VerificationExecutor,
        info: ServerInfo,
        *,
        stop_token_ids: Sequence[int] = (),
        session_timeout: float = 60.0,
        stream_lookup: int = 0,
    ) -> None:
        """`stop_token_ids`: the target's, where every session stops; `stream_lookup`: the
        longest context lookup chain a streamed step verifies (0: one token a step)."""
        self.executor = executor
        self.info_reply = info
        self.stop_token_ids = tuple(stop_token_ids)
        self.session_timeout = session_timeout
        self.stream_lookup = stream_lookup
        # The streamed sessions' lookup record, per temperature regime: each new session's prior.
        self._lookup_records: dict[str, LookupStats] = {}
        # The latest threshold a stream was given: what a session that starts streaming gets.
        self._resume_threshold = 2.0
        self._busy = BusyWindow(lambda: counter_value(self.metrics.busy_seconds))

    @property
    def metrics(self) -> ServerMetrics:
        return self.executor.metrics

    # ---- RPCs ----------------------------------------------------------------------------------
    async def info(self, context: Any) -> ServerInfo:
        return self.info_reply

    async def load(self, context: Any) -> ServerLoad:
        """The executor's sessions, the scheduler's queue and the model thread's recent busy
        fraction, for an edge placing its next session among replicas."""
        executor = self.executor
        return ServerLoad(
            active_sessions=executor.num_sessions,
            queued_rounds=executor.scheduler.num_queued,
            busy_fraction=self._busy.fraction(),
            max_sessions=executor.engine.runner.kv.num_slots,
        )

    async def session(
        self, requests: AsyncIterator[EdgeRequest | None], context: Any, traffic: StreamTraffic
    ) -> AsyncIterator[ServerReply]:
        inbox = _Inbox(requests)
        try:
            async for reply in self._session(inbox, context, traffic):
                yield reply
        finally:
            inbox.close()

    async def _session(
        self, inbox: _Inbox, context: Any, traffic: StreamTraffic
    ) -> AsyncIterator[ServerReply]:
        traffic.on_received = self.metrics.received_bytes.inc
        traffic.on_sent = self.metrics.sent_bytes.inc
        session: ServerSession | None = None
        outcome = "cancelled"  # unless the session ends otherwise
        error: str | None = None
        started = time.monotonic()
        try:
            first = await self._receive(inbox)
            if isinstance(first, _StreamEnded):
                outcome = "closed"
                return
            session = self._open(first)
            assert isinstance(first, OpenSession)
            can_stream = first.accepts_streaming
            opened = SessionOpened(session.session_id, session.seq.max_new_tokens)
            yield opened
            policy = StreamPolicy()
            lookup = self._stream_lookup(first)
            if can_stream and first.start_streaming:  # round 0 on is decoded here
                start = TreeVerified(-1, [], 0, None, streaming=True,
                                     resume_tokens_per_round=self._resume_threshold)  # fmt: skip
                async for streamed in self._stream(session, inbox, start, lookup):
                    yield streamed
                policy.resumed(time.monotonic())
            while True:
                message = await self._receive(inbox)
                if isinstance(message, ResumeTrees):
                    continue  # not streaming (a Resume that crossed the stream's last reply)
                if isinstance(message, _StreamEnded | CloseSession):
                    outcome = "finished" if session.finished else "closed"
                    if isinstance(message, _StreamEnded) and context.cancelled():
                        outcome = "cancelled"  # a cancelled call ends its request stream too
                    return
                reply = await self._round(session, message)
                assert isinstance(message, VerifyTree)  # `_round` refuses anything else
                policy.observe(message, reply, time.monotonic())
                step_s = self.executor.stream_step_seconds(policy.rows_per_round)
                if can_stream and reply.finish_reason is None and policy.should_stream(step_s):
                    threshold = policy.resume_threshold(step_s)
                    self._resume_threshold = threshold  # for sessions that start streaming
                    reply = replace(reply, streaming=True, resume_tokens_per_round=threshold)
                yield reply
                if reply.streaming:
                    async for streamed in self._stream(session, inbox, reply, lookup):
                        yield streamed
                    policy.resumed(time.monotonic())
        except _SessionAborted as aborted:
            outcome, error = aborted.outcome, f"{aborted.code.name}: {aborted.message}"
            if session is not None:  # free the slot before the edge hears of the error
                self.executor.close_session(session.session_id)
            await context.abort(aborted.code, aborted.message)
        finally:
            self.metrics.sessions.labels(outcome).inc()
            if session is not None:
                self.executor.close_session(session.session_id)
                self._log_end(session, traffic, outcome, error, time.monotonic() - started)

    # ---- steps ---------------------------------------------------------------------------------
    def _stream_lookup(self, open_message: OpenSession) -> StreamLookup | None:
        """The session's lookup chains for streamed steps, where its edge takes several tokens
        a streamed reply and the server cuts trees by goodput (`--verify all` would verify
        every chain whole, paying or not)."""
        if (
            not open_message.accepts_token_runs
            or self.stream_lookup == 0
            or not self.executor.goodput
        ):
            return None
        regime = temperature_regime(open_message.sampling.temperature)
        pooled = self._lookup_records.setdefault(regime, LookupStats())
        return StreamLookup(self.stream_lookup, self.info_reply.max_tree_depth, pooled)

    async def _stream(
        self,
        session: ServerSession,
        inbox: _Inbox,
        first: TreeVerified,
        lookup: StreamLookup | None = None,
    ) -> AsyncIterator[TreeVerified]:
        """Decode the session server-side, one Verified per step, until the edge resumes,
        leaves or the session finishes. Each step is queued as the one before returns, before
        its reply is written: the model thread need not wait for the write and the event
        loop's hop back (at one client about a millisecond of a 16 ms step). An edge message
        that ends the session is left in the inbox for the caller; trees sent before the edge
        saw the stream are dropped. With `lookup` each step verifies the session's lookup
        chain (what pays of it) and may emit several tokens; what resuming must beat grows by
        the tokens a streamed step emits."""
        number = first.round
        streaming = True
        step = self._streamed_step(session, number + 1, lookup)
        try:
            while streaming:
                result = await step
                number += 1
                threshold = first.resume_tokens_per_round
                if lookup is not None:
                    lookup.record(result.emitted_tokens)
                    threshold *= lookup.tokens_per_step
                self.metrics.streamed_rounds.inc()
                while (message := inbox.poll()) is not _NOTHING:
                    if isinstance(message, ResumeTrees):
                        streaming = False
                    elif isinstance(message, _StreamEnded | CloseSession):
                        inbox.put_back(message)
                        streaming = False
                        break
                    elif message is None or isinstance(message, MalformedMessage | OpenSession):
                        await self._round(session, message)  # raises the right status
                if result.finish_reason is not None:
                    streaming = False
                if streaming:  # the next step is queued before this reply goes out
                    step = self._streamed_step(session, number + 1, lookup)
                yield TreeVerified(
                    round=number,
                    emitted_token_ids=result.emitted_tokens,
                    num_accepted=0,
                    finish_reason=result.finish_reason,
                    num_verified=0,
                    streaming=streaming,
                    resume_tokens_per_round=threshold,
                )
        finally:
            if not step.done():
                step.cancel()  # the stream ends (the edge left): the session closes with it
            elif not step.cancelled():
                step.exception()  # retrieved (raised above, or the stream was left meanwhile)

    def _streamed_step(
        self, session: ServerSession, number: int, lookup: StreamLookup | None
    ) -> asyncio.Task[VerifyResult]:
        """Round `number` of a streamed session, a server-side decoding step (with the lookup
        chain, if any, as its tree), under way."""
        tree, estimates = DraftTree(), None
        if lookup is not None:
            tree, chain_estimates = lookup.tree(
                session.seq.committed, self.info_reply.max_tree_nodes
            )
            estimates = chain_estimates if tree.num_nodes else None
        verify = self._verify(session, tree, estimates, number, server_lookup=lookup is not None)
        return asyncio.ensure_future(verify)

    async def _receive(self, inbox: _Inbox) -> EdgeRequest | None | _StreamEnded:
        """The next edge message; aborts the session when the edge stays silent too long."""
        try:
            message = await inbox.receive(self.session_timeout)
        except TimeoutError:
            raise _SessionAborted(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no message for {self.session_timeout:g} s; the session was evicted and its "
                "KV cache freed (the server's --session-timeout)",
                "evicted",
            ) from None
        return message

    def _open(self, message: EdgeRequest | None) -> ServerSession:
        if message is None:
            raise _invalid("empty message: the first message of a session must be Open")
        if isinstance(message, MalformedMessage):
            raise _invalid(message.reason)
        if not isinstance(message, OpenSession):
            raise _SessionAborted(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the first message of a session must be Open, got {type(message).__name__}",
                "refused",
            )
        if message.protocol_version not in SUPPORTED_PROTOCOL_VERSIONS:
            raise _SessionAborted(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {message.protocol_version} is not supported: this server "
                f"speaks versions up to {PROTOCOL_VERSION}; upgrade the edge and server to "
                "matching specedge releases",
                "refused",
            )
        expected = self.info_reply.tokenizer_fingerprint
        if message.tokenizer_fingerprint != expected:
            raise _SessionAborted(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tokenizer fingerprint {message.tokenizer_fingerprint or '(none)'!r} does not "
                f"match the server's {expected!r} (model {self.info_reply.model_name!r}): the "
                "draft model must share the target's tokenizer",
                "refused",
            )
        try:
            return self.executor.open_session(
                message.prompt_token_ids,
                message.sampling,
                message.max_tokens,
                self.stop_token_ids,  # the target's, not the edge's (see the module docstring)
            )
        except InvalidRequestError as error:
            raise _invalid(str(error)) from None
        except CapacityError as error:
            raise _SessionAborted(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server is full ({error}); retry later or use another server",
                "refused",
            ) from None
        except ServerClosingError as error:
            raise _SessionAborted(grpc.StatusCode.UNAVAILABLE, str(error), "refused") from None

    async def _round(self, session: ServerSession, message: EdgeRequest | None) -> TreeVerified:
        if message is None:
            raise _invalid("empty message: expected Tree or Close")
        if isinstance(message, MalformedMessage):
            raise _invalid(message.reason)
        if isinstance(message, OpenSession):
            raise _SessionAborted(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the session is already open; send Tree or Close",
                "failed",
            )
        if isinstance(message, ResumeTrees | CloseSession):
            raise _SessionAborted(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"unexpected {type(message).__name__} message",
                "failed",
            )
        tree = DraftTree(tuple(message.tokens), tuple(message.parents))
        # Without estimates (a version 1 edge, or an empty tree) the whole tree is verified.
        estimates = message.estimates if message.estimates else None
        result = await self._verify(session, tree, estimates, message.round)
        return TreeVerified(
            round=message.round,
            emitted_token_ids=result.emitted_tokens,
            num_accepted=result.num_accepted,
            finish_reason=result.finish_reason,
            num_verified=tree.num_nodes if result.num_verified is None else result.num_verified,
        )

    async def _verify(
        self,
        session: ServerSession,
        tree: DraftTree,
        estimates: tuple[float, ...] | None,
        number: int,
        *,
        server_lookup: bool = False,
    ) -> VerifyResult:
        try:
            return await self.executor.verify(
                session.session_id, tree, estimates, server_lookup=server_lookup
            )
        except InvalidRequestError as error:
            raise _invalid(f"round {number}: {error}") from None
        except SessionStateError as error:
            raise _SessionAborted(
                grpc.StatusCode.FAILED_PRECONDITION, f"round {number}: {error}", "failed"
            ) from None
        except ServerClosingError as error:
            raise _SessionAborted(grpc.StatusCode.UNAVAILABLE, str(error), "failed") from None
        except VerificationFailedError as error:
            raise _SessionAborted(grpc.StatusCode.INTERNAL, str(error), "failed") from None

    def _log_end(
        self,
        session: ServerSession,
        traffic: StreamTraffic,
        outcome: str,
        error: str | None,
        seconds: float,
    ) -> None:
        seq = session.seq
        rounds = max(seq.rounds, 1)
        log_session_end(
            logger,
            role="edge-session",
            session=session.session_id,
            prompt_tokens=seq.num_prompt,
            completion_tokens=seq.num_generated,
            rounds=seq.rounds,
            seconds=seconds,
            outcome=outcome,
            finish_reason=seq.finish_reason,
            error=error,
            accepted=seq.accepted,
            drafted=seq.drafted,
            mean_batch=session.batched_with / rounds,
            verify_seconds=session.verify_seconds,
            bytes_in=traffic.received,
            bytes_out=traffic.sent,
        )


class _Nothing:
    """Marker: no edge message has arrived (yet)."""


_NOTHING = _Nothing()
InboxItem = EdgeRequest | None | _StreamEnded


class _Inbox:
    """The edge's messages, read ahead one at a time, so the session can wait for the next
    (with a timeout) or, while it streams, check without waiting."""

    def __init__(self, requests: AsyncIterator[EdgeRequest | None]) -> None:
        self._requests = requests
        self._next: asyncio.Future[InboxItem] | None = None
        self._returned: list[InboxItem] = []

    async def _read(self) -> InboxItem:
        try:
            return await anext(self._requests)
        except StopAsyncIteration:
            return STREAM_ENDED

    def _pending(self) -> asyncio.Future[InboxItem]:
        if self._next is None:
            self._next = asyncio.ensure_future(self._read())
            # An aborted call fails the read; whoever awaits it sees that, nobody else must.
            self._next.add_done_callback(_retrieve)
        return self._next

    async def receive(self, timeout: float) -> InboxItem:
        """The next message; TimeoutError after `timeout` seconds (the read stays pending)."""
        if self._returned:
            return self._returned.pop()
        message = await asyncio.wait_for(asyncio.shield(self._pending()), timeout)
        self._next = None
        return message

    def poll(self) -> InboxItem | _Nothing:
        """The next message if one has arrived, else `_NOTHING`."""
        if self._returned:
            return self._returned.pop()
        pending = self._pending()
        if not pending.done():
            return _NOTHING
        self._next = None
        return pending.result()

    def put_back(self, message: InboxItem) -> None:
        self._returned.append(message)

    def close(self) -> None:
        if self._next is not None and not self._next.done():
            self._next.cancel()


def _retrieve(future: asyncio.Future[InboxItem]) -> None:
    if not future.cancelled():
        future.exception()


def _invalid(message: str) -> _SessionAborted:
    return _SessionAborted(grpc.StatusCode.INVALID_ARGUMENT, message, "failed")
