"""The edge's link to its verification server.

A *link* is one `grpc.aio` channel that has passed the Info handshake: same protocol version,
same tokenizer fingerprint, a vocabulary that covers ours and tree limits that fit our shape.
Sessions (one bidirectional stream per generation) open on the current link, and `poll` asks
the server's health service and its Load call on it. When the server goes away, the link is
retired and the next session (or poll) builds a fresh one (new channel, new handshake), so an
edge outlives server restarts; keepalive pings find a server that vanished without closing
the connection. Every wait has a deadline: an unreachable
server or a dropped session surfaces quickly as `ServerUnavailableError` (HTTP 503), never as
a hang. The channel is TLS or plaintext as `ChannelSecurity` says (`rpc.security`), and a
refused connection's error says what to check (CA, client certificate, server name).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from specedge.core.limits import TreeShape
from specedge.core.tree import DraftTree
from specedge.errors import InvalidRequestError, ServiceUnavailableError, SpecEdgeError
from specedge.rpc.codec import (
    PROTOCOL_VERSION,
    CloseSession,
    OpenSession,
    ResumeTrees,
    ServerInfo,
    ServerLoad,
    SessionCall,
    SessionOpened,
    TreeVerified,
    VerifierClient,
    VerifyTree,
    health_status,
)
from specedge.rpc.security import ChannelSecurity

logger = logging.getLogger(__name__)
T = TypeVar("T")
Reply = TypeVar("Reply", SessionOpened, TreeVerified)

# Reconnect quickly once the server is back (gRPC's default backoff grows to two minutes).
# Keepalive pings (within what the server permits: `server.app.GRPC_OPTIONS`) find a server
# that vanished without closing the connection (power loss, a partition).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A fresh link is a fresh connection: with gRPC's global subchannel pool a new channel
    # shares the subchannel (and its reconnect backoff, up to 2 s) of any other channel to the
    # same address, so a restarted server stayed "connection refused" past the failover timeout.
    ("grpc.use_local_subchannel_pool", 1),
)
# Status code meaning "the server (or the way to it) is gone": retire the link.
LINK_LOST = frozenset({grpc.StatusCode.UNAVAILABLE})
# Status codes caused by the request itself: HTTP 400.
REQUEST_REJECTED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
HANDSHAKE = "the handshake"  # the Info call that opens a link (the only phase TLS can fail in)


class ServerUnavailableError(ServiceUnavailableError):
    """The verification server cannot be reached, refused us, or dropped the session."""


class ServerIncompatibleError(ServerUnavailableError):
    """The server speaks another protocol version or uses another tokenizer."""


@dataclass
class _Link:
    channel: grpc.aio.Channel
    client: VerifierClient
    info: ServerInfo
    active_sessions: int = 0
    retired: bool = False
    closing: bool = False  # its channel is being closed


@dataclass(frozen=True)
class ServerStatus:
    """What one poll of a server found."""

    serving: bool  # its health service says SERVING (or it has none)
    load: ServerLoad | None  # None: it reports no load (a server from before the Load call)


@dataclass(frozen=True)
class ClientIdentity:
    """What the handshake checks on our side."""

    tokenizer_fingerprint: str
    vocab_size: int
    shape: TreeShape
    adaptive: bool = False  # trees sized to the server's take: its node cap is no conflict


class ServerConnection:
    def __init__(
        self,
        address: str,
        identity: ClientIdentity,
        *,
        auth_token: str | None = None,
        security: ChannelSecurity | None = None,
        connect_timeout_s: float = 5.0,
        reply_timeout_s: float = 60.0,
    ) -> None:
        self.address = address
        self.identity = identity
        self.security = security or ChannelSecurity()
        self.connect_timeout_s = connect_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self._link: _Link | None = None
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()  # retired channels being closed
        self._open_links = 0  # links whose channel is not closed yet (the current one too)

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def closed(self) -> bool:
        """Every channel it opened is closed (or being closed): nothing left to release."""
        return self._open_links == 0 and not self._closing

    @property
    def info(self) -> ServerInfo | None:
        return self._link.info if self._link else None

    async def connect(self) -> ServerInfo:
        """The current link's server info, handshaking on a fresh channel if there is none."""
        return (await self._current()).info

    async def wait_ready(self, timeout_s: float) -> ServerInfo:
        """Retry `connect` until the server answers or `timeout_s` passes (start-up)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                return await self.connect()
            except ServerIncompatibleError:
                raise
            except ServerUnavailableError:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.2)

    async def open_session(self, request: OpenSession) -> RemoteSession:
        """Open a session stream and send `request`; its `opened` task yields the reply."""
        link = await self._current()
        link.active_sessions += 1
        session = RemoteSession(self, link, link.client.session())
        await session.start(request)
        return session

    async def poll(self, timeout_s: float) -> ServerStatus:
        """The server's health and load, asked on the current link (handshaking first if
        there is none). ServerUnavailableError when it cannot be reached (the link is then
        retired), ServerIncompatibleError when its handshake fails."""
        link = await self._current()
        try:
            status = await _unless_unimplemented(health_status(link.channel, timeout=timeout_s))
            load = await _unless_unimplemented(link.client.load(timeout=timeout_s))
        except grpc.aio.AioRpcError as error:
            if error.code() in LINK_LOST:
                self._retire(link)
            raise self.error_from(error, "a load poll") from None
        return ServerStatus(serving=status in ("SERVING", None), load=load)

    def retire(self) -> None:
        """Open nothing more on the current link: it closes once its sessions end (a replica
        gone from DNS)."""
        if self._link is not None:
            self._link.retired = True
            self._close_if_idle(self._link)
            self._link = None

    async def close(self) -> None:
        if self._link is not None:
            self._open_links -= 1
            await self._link.channel.close()
            self._link = None
        await asyncio.gather(*self._closing)

    # ---- links ---------------------------------------------------------------------------
    async def _current(self) -> _Link:
        async with self._lock:
            if self._link is None:
                self._link = await self._handshake()
            return self._link

    async def _handshake(self) -> _Link:
        channel = self.security.channel(self.address, CHANNEL_OPTIONS)
        client = VerifierClient(channel, self._metadata)
        try:
            info = await client.info(timeout=self.connect_timeout_s)
            self._check(info)
        except grpc.aio.AioRpcError as error:
            await channel.close()
            raise self.error_from(error, HANDSHAKE) from None
        except ServerIncompatibleError:
            await channel.close()
            raise
        logger.info("connected to %s (target %s)", self.address, info.model_name)
        self._open_links += 1
        return _Link(channel, client, info)

    def _check(self, info: ServerInfo) -> None:
        ours = self.identity
        problems = []
        if info.protocol_version != PROTOCOL_VERSION:
            problems.append(
                f"protocol version {info.protocol_version}, ours is {PROTOCOL_VERSION} "
                "(upgrade the older side)"
            )
        if info.tokenizer_fingerprint != ours.tokenizer_fingerprint:
            problems.append(
                f"tokenizer fingerprint {info.tokenizer_fingerprint}, ours is "
                f"{ours.tokenizer_fingerprint} (pick a draft from the target's model family)"
            )
        elif ours.vocab_size > info.vocab_size:
            problems.append(f"vocabulary of {info.vocab_size} ids, ours has {ours.vocab_size}")
        if ours.shape.budget > info.max_tree_nodes and not ours.adaptive:
            problems.append(
                f"at most {info.max_tree_nodes} tree nodes (lower --budget from "
                f"{ours.shape.budget})"
            )
        if ours.shape.depth > info.max_tree_depth:
            problems.append(
                f"at most tree depth {info.max_tree_depth} (lower --depth from {ours.shape.depth})"
            )
        if problems:
            raise ServerIncompatibleError(
                f"server {self.address} (target {info.model_name!r}) is incompatible: it has "
                + "; ".join(problems)
            )

    def release(self, link: _Link, lost: bool) -> None:
        """A session on `link` ended; `lost` retires the link so the next session reconnects."""
        link.active_sessions -= 1
        if lost:
            self._retire(link)
        self._close_if_idle(link)

    def _retire(self, link: _Link) -> None:
        """The server behind `link` is gone: the next session or poll reconnects."""
        if not link.retired:
            link.retired = True
            if self._link is link:
                self._link = None
            logger.warning("lost the server at %s; the next request reconnects", self.address)
        self._close_if_idle(link)

    def _close_if_idle(self, link: _Link) -> None:
        if link.retired and link.active_sessions == 0 and not link.closing:
            link.closing = True
            self._open_links -= 1
            task = asyncio.get_running_loop().create_task(link.channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def error_from(self, error: grpc.aio.AioRpcError, during: str) -> SpecEdgeError:
        """A gRPC failure as the edge's typed error (InvalidRequestError for a rejected request,
        ServerUnavailableError for everything else)."""
        code, details = error.code(), error.details() or ""
        if code in REQUEST_REJECTED:
            return InvalidRequestError(f"the server rejected the request: {details}")
        if code == grpc.StatusCode.UNAVAILABLE:
            # TLS advice only where TLS is settled: a link whose handshake worked has a
            # working TLS setup, so a socket closed later is a server gone, not a certificate.
            hint = self.security.hint(details) if during == HANDSHAKE else ""
            return ServerUnavailableError(
                f"verification server {self.address} is unavailable during {during}: {details}"
                + (f" ({hint})" if hint else "")
            )
        return ServerUnavailableError(
            f"verification server {self.address} failed during {during}: {code.name}: {details}"
        )


async def _unless_unimplemented(call: Awaitable[T]) -> T | None:
    """`call`'s answer, or None when the server does not implement it."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise


class RemoteSession:
    """One generation's stream: `start(open)`, `verify(tree)` per round, then `finish()` after
    the final reply, or `cancel()` to abandon it."""

    def __init__(self, connection: ServerConnection, link: _Link, call: SessionCall) -> None:
        self._connection = connection
        self._link = link
        self._call = call
        self._opened: asyncio.Task[SessionOpened] | None = None
        self._ended = False
        self.info = link.info
        self.round = 0

    @property
    def session_id(self) -> str:
        """The server's name for the session ("" until it has answered the Open)."""
        opened = self._opened
        if opened is None or not opened.done() or opened.cancelled() or opened.exception():
            return ""
        return opened.result().session_id

    @property
    def address(self) -> str:
        """The server's HOST:PORT."""
        return self._connection.address

    @property
    def bytes_sent(self) -> int:
        return self._call.traffic.sent

    @property
    def bytes_received(self) -> int:
        return self._call.traffic.received

    async def start(self, request: OpenSession) -> None:
        await self._guard(self._call.send(request), "open")
        self._opened = asyncio.ensure_future(self._receive(SessionOpened, "open"))

    async def opened(self) -> SessionOpened:
        """The server's answer to Open (its session id and token allowance)."""
        assert self._opened is not None
        return await self._opened

    async def verify(self, tree: DraftTree, estimates: Sequence[float] = ()) -> TreeVerified:
        """Send one round's tree (with its nodes' acceptance estimates) and await the server's
        verdict."""
        await self.opened()
        message = VerifyTree(
            round=self.round,
            tokens=list(tree.tokens),
            parents=list(tree.parents),
            estimates=tuple(estimates),
        )
        await self._guard(self._call.send(message), "a round")
        reply = await self._receive(TreeVerified, "a round")
        if reply.round != self.round:
            raise self._fail(f"reply to round {reply.round} while round {self.round} was sent")
        self.round += 1
        return reply

    async def next_streamed(self) -> TreeVerified:
        """While the server decodes the session itself: its next step's reply (no tree
        sent)."""
        await self.opened()
        reply = await self._receive(TreeVerified, "a streamed round")
        if reply.round != self.round:
            raise self._fail(f"streamed round {reply.round} while round {self.round} was due")
        self.round += 1
        return reply

    async def resume(self) -> None:
        """Ask the server to verify our trees again (it answers with its step in progress,
        streaming = false)."""
        await self._guard(self._call.send(ResumeTrees()), "a resume")

    async def finish(self) -> None:
        """Tell the server we are done (after its final reply), best effort."""
        if not self._ended:
            try:
                await self._call.send(CloseSession())
                await self._call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
            self._end(lost=False)

    def cancel(self) -> None:
        """Abandon the session (client gone, stop string, error): the server frees it."""
        if self._opened is not None:
            if not self._opened.done():
                self._opened.cancel()
            elif not self._opened.cancelled():
                self._opened.exception()  # a failed Open was already reported, or is moot
        self._call.cancel()
        self._end(lost=False)

    # ---- internals -------------------------------------------------------------------------
    async def _receive(self, kind: type[Reply], during: str) -> Reply:
        try:
            reply = await asyncio.wait_for(
                self._guard(self._call.receive(), during), self._connection.reply_timeout_s
            )
        except TimeoutError:
            raise self._fail(
                f"no reply during {during} within {self._connection.reply_timeout_s:g} s",
                lost=True,
            ) from None
        if reply is None:
            raise self._fail(f"the server closed the session during {during}")
        if not isinstance(reply, kind):
            raise self._fail(f"unexpected {type(reply).__name__} during {during}")
        return reply

    async def _guard(self, awaitable: Awaitable[T], during: str) -> T:
        try:
            return await awaitable
        except grpc.aio.AioRpcError as error:
            lost = error.code() in LINK_LOST
            self._end(lost=lost)
            raise self._connection.error_from(error, during) from None

    def _fail(self, message: str, lost: bool = False) -> ServerUnavailableError:
        self._call.cancel()
        self._end(lost=lost)
        return ServerUnavailableError(f"verification server {self._connection.address}: {message}")

    def _end(self, lost: bool) -> None:
        if not self._ended:
            self._ended = True
            self._connection.release(self._link, lost)
