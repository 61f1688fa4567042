"""The one module that touches the generated protobuf code (`specedge_pb2*`).

Domain code speaks the dataclasses below; this module turns them into wire messages and back,
and wires a servicer object / a client stub to the gRPC runtime. Regenerate the protobuf code
with `make proto` after editing `specedge.proto`. The standard gRPC health service
(`grpc.health.v1`, from grpcio-health-checking) is wired here too (`HealthService`,
`health_status`), so its generated code stays in this module as well.

Wire protocol version `PROTOCOL_VERSION`: bump it on any incompatible change. Version 2 added
per-node acceptance estimates (one byte each, `quantize_estimates`), the verified count and
server-side decoding (streamed replies, `ResumeTrees`);
a server still serves version 1 edges (no estimates: it verifies their whole trees). The
unary Load call (`ServerLoad`) came later without a version bump: an edge that gets
UNIMPLEMENTED from an older server places sessions there without its load. Nor did
`Open.accepts_token_runs` (streamed replies of several tokens): an edge that does not set it,
older ones included, gets one token per streamed reply, and an older server ignores it.

Bytes that parse as no message end their call with INVALID_ARGUMENT, never gRPC's UNKNOWN:
on the Session stream as a `MalformedMessage`, for unary calls by `UndecodableRequests`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specedge.core.sampling import SamplingParams
from specedge.errors import InvalidRequestError
from specedge.rpc import specedge_pb2 as pb
from specedge.rpc import specedge_pb2_grpc as pb_grpc

PROTOCOL_VERSION = 2
SUPPORTED_PROTOCOL_VERSIONS = (1, 2)
ESTIMATE_LEVELS = 255  # an estimate a travels as the byte round(255 * a)
SERVICE_NAME = "specedge.v1.Verifier"

_FINISH_TO_WIRE = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
}
_FINISH_FROM_WIRE = {value: key for key, value in _FINISH_TO_WIRE.items()}


# ---- domain messages ------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerInfo:
    protocol_version: int
    model_name: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_tree_nodes: int
    max_tree_depth: int
    max_context: int


@dataclass(frozen=True)
class ServerLoad:
    """How busy a server is (the Load call): what an edge weighs to place a new session."""

    active_sessions: int
    queued_rounds: int  # trees waiting for the next verification batch
    busy_fraction: float  # of the last few seconds, the share the model thread ran
    max_sessions: int  # session slots: what `active_sessions` is out of


@dataclass(frozen=True)
class OpenSession:
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    tokenizer_fingerprint: str = ""
    protocol_version: int = PROTOCOL_VERSION
    accepts_streaming: bool = False  # the edge follows server-side decoding (`ResumeTrees`)
    start_streaming: bool = False  # ... and asks for it from the first round
    accepts_token_runs: bool = False  # ... and takes several tokens per streamed reply


@dataclass(frozen=True)
class VerifyTree:
    round: int
    tokens: list[int]
    parents: list[int]
    # per node, the estimate that the target accepts the path to it (non-increasing); empty:
    # none sent, verify every node
    estimates: tuple[float, ...] = ()


@dataclass(frozen=True)
class CloseSession:
    pass


@dataclass(frozen=True)
class ResumeTrees:
    """While the server streams a session: go back to verifying trees."""


@dataclass(frozen=True)
class MalformedMessage:
    """An edge message that decodes but says something impossible (the caller reports it as
    INVALID_ARGUMENT with `reason`)."""

    reason: str


EdgeRequest = OpenSession | VerifyTree | CloseSession | ResumeTrees | MalformedMessage


@dataclass(frozen=True)
class SessionOpened:
    session_id: str
    max_new_tokens: int


@dataclass(frozen=True)
class TreeVerified:
    round: int
    emitted_token_ids: list[int]
    num_accepted: int
    finish_reason: str | None  # "stop" | "length" | None
    num_verified: int = 0  # the tree's first nodes that were verified
    streaming: bool = False  # the server decodes the session itself: more replies follow
    resume_tokens_per_round: float = 0.0  # while streaming: what a tree must promise to pay


ServerReply = SessionOpened | TreeVerified


# ---- encoding -------------------------------------------------------------------------------
def quantize_estimates(estimates: tuple[float, ...] | list[float]) -> bytes:
    """One byte per estimate in [0, 1] (rounding is monotone: the order survives)."""
    return bytes(round(ESTIMATE_LEVELS * min(1.0, max(0.0, a))) for a in estimates)


def dequantize_estimates(data: bytes) -> tuple[float, ...]:
    return tuple(level / ESTIMATE_LEVELS for level in data)


def encode_edge(message: EdgeRequest) -> pb.EdgeMessage:
    if isinstance(message, OpenSession):
        sampling = pb.SamplingParams(
            temperature=message.sampling.temperature,
            top_p=message.sampling.top_p,
            top_k=message.sampling.top_k,
        )
        if message.sampling.seed is not None:
            sampling.seed = message.sampling.seed
        return pb.EdgeMessage(
            open=pb.Open(
                protocol_version=message.protocol_version,
                tokenizer_fingerprint=message.tokenizer_fingerprint,
                prompt_token_ids=message.prompt_token_ids,
                sampling=sampling,
                max_tokens=message.max_tokens,
                stop_token_ids=message.stop_token_ids,
                accepts_streaming=message.accepts_streaming,
                start_streaming=message.start_streaming,
                accepts_token_runs=message.accepts_token_runs,
            )
        )
    if isinstance(message, VerifyTree):
        return pb.EdgeMessage(
            tree=pb.Tree(
                round=message.round,
                tokens=message.tokens,
                parents=message.parents,
                estimates=quantize_estimates(message.estimates),
            )
        )
    if isinstance(message, ResumeTrees):
        return pb.EdgeMessage(resume=pb.Resume())
    return pb.EdgeMessage(close=pb.Close())


def decode_edge(message: pb.EdgeMessage) -> EdgeRequest | None:
    """None for an empty message, `MalformedMessage` for invalid values (the caller reports
    both as INVALID_ARGUMENT)."""
    kind = message.WhichOneof("kind")
    if kind == "open":
        o = message.open
        s = o.sampling
        try:
            sampling = SamplingParams(
                temperature=s.temperature,
                top_p=s.top_p if s.top_p != 0 else 1.0,  # proto3's 0: not sent, no top-p
                top_k=s.top_k,
                seed=s.seed if s.HasField("seed") else None,
            )
        except InvalidRequestError as error:
            return MalformedMessage(f"invalid sampling parameters: {error}")
        return OpenSession(
            prompt_token_ids=list(o.prompt_token_ids),
            sampling=sampling,
            max_tokens=o.max_tokens,
            stop_token_ids=list(o.stop_token_ids),
            tokenizer_fingerprint=o.tokenizer_fingerprint,
            protocol_version=o.protocol_version,
            accepts_streaming=o.accepts_streaming,
            start_streaming=o.start_streaming,
            accepts_token_runs=o.accepts_token_runs,
        )
    if kind == "tree":
        t = message.tree
        if t.estimates and len(t.estimates) != len(t.tokens):
            return MalformedMessage(
                f"round {t.round}: {len(t.estimates)} estimates for {len(t.tokens)} tree nodes"
            )
        levels = t.estimates
        if any(later > earlier for earlier, later in zip(levels, levels[1:], strict=False)):
            return MalformedMessage(
                f"round {t.round}: acceptance estimates must not rise in node order (send the "
                "nodes best-first)"
            )
        return VerifyTree(
            round=t.round,
            tokens=list(t.tokens),
            parents=list(t.parents),
            estimates=dequantize_estimates(levels),
        )
    if kind == "close":
        return CloseSession()
    if kind == "resume":
        return ResumeTrees()
    return None


def encode_server(message: ServerReply) -> pb.ServerMessage:
    if isinstance(message, SessionOpened):
        return pb.ServerMessage(
            opened=pb.Opened(session_id=message.session_id, max_new_tokens=message.max_new_tokens)
        )
    return pb.ServerMessage(
        verified=pb.Verified(
            round=message.round,
            emitted_token_ids=message.emitted_token_ids,
            num_accepted=message.num_accepted,
            finish_reason=_FINISH_TO_WIRE[message.finish_reason],
            num_verified=message.num_verified,
            streaming=message.streaming,
            resume_tokens_per_round=message.resume_tokens_per_round,
        )
    )


def decode_server(message: pb.ServerMessage) -> ServerReply:
    kind = message.WhichOneof("kind")
    if kind == "opened":
        return SessionOpened(message.opened.session_id, message.opened.max_new_tokens)
    if kind == "verified":
        v = message.verified
        return TreeVerified(
            round=v.round,
            emitted_token_ids=list(v.emitted_token_ids),
            num_accepted=v.num_accepted,
            finish_reason=_FINISH_FROM_WIRE.get(v.finish_reason),
            num_verified=v.num_verified,
            streaming=v.streaming,
            resume_tokens_per_round=v.resume_tokens_per_round,
        )
    raise ValueError(f"unexpected server message kind {kind!r}")


def encode_info(info: ServerInfo) -> pb.InfoReply:
    return pb.InfoReply(
        protocol_version=info.protocol_version,
        model_name=info.model_name,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        vocab_size=info.vocab_size,
        max_tree_nodes=info.max_tree_nodes,
        max_tree_depth=info.max_tree_depth,
        max_context=info.max_context,
    )


def decode_info(reply: pb.InfoReply) -> ServerInfo:
    return ServerInfo(
        protocol_version=reply.protocol_version,
        model_name=reply.model_name,
        tokenizer_fingerprint=reply.tokenizer_fingerprint,
        vocab_size=reply.vocab_size,
        max_tree_nodes=reply.max_tree_nodes,
        max_tree_depth=reply.max_tree_depth,
        max_context=reply.max_context,
    )


def encode_load(load: ServerLoad) -> pb.LoadReply:
    return pb.LoadReply(
        active_sessions=load.active_sessions,
        queued_rounds=load.queued_rounds,
        busy_fraction=load.busy_fraction,
        max_sessions=load.max_sessions,
    )


def decode_load(reply: pb.LoadReply) -> ServerLoad:
    return ServerLoad(
        active_sessions=reply.active_sessions,
        queued_rounds=reply.queued_rounds,
        busy_fraction=reply.busy_fraction,
        max_sessions=reply.max_sessions,
    )


@dataclass
class StreamTraffic:
    """Serialized bytes one Session stream carried (before gRPC framing), counted where the
    codec encodes and decodes each message; `on_sent` / `on_received` see each message's size
    (e.g. a Prometheus counter's `inc`)."""

    sent: int = 0
    received: int = 0
    on_sent: Callable[[int], None] | None = None
    on_received: Callable[[int], None] | None = None

    def count_sent(self, size: int) -> None:
        self.sent += size
        if self.on_sent is not None:
            self.on_sent(size)

    def count_received(self, size: int) -> None:
        self.received += size
        if self.on_received is not None:
            self.on_received(size)


# ---- gRPC wiring (asyncio) --------------------------------------------------------------------
SessionHandler = Callable[
    [AsyncIterator[EdgeRequest | None], Any, StreamTraffic], AsyncIterator[ServerReply]
]
InfoHandler = Callable[[Any], Awaitable[ServerInfo]]
LoadHandler = Callable[[Any], Awaitable[ServerLoad]]


def add_verifier_service(
    server: grpc.aio.Server,
    info: InfoHandler,
    session: SessionHandler,
    load: LoadHandler | None = None,
) -> None:
    """Register the Verifier service: `info(context)`, `session(requests, context,
    traffic)` and `load(context)` (None: Load answers UNIMPLEMENTED, as a server from before
    it does), where `requests` yields decoded EdgeRequests (None for an empty message), the
    handler yields ServerReplys and `traffic` counts the stream's bytes both ways. Errors:
    `await context.abort(grpc.StatusCode.X, message)`."""

    class _Servicer(pb_grpc.VerifierServicer):
        async def Info(self, request: pb.InfoRequest, context: Any) -> pb.InfoReply:  # noqa: N802
            return encode_info(await info(context))

        async def Load(self, request: pb.LoadRequest, context: Any) -> pb.LoadReply:  # noqa: N802
            if load is None:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server reports no load")
            assert load is not None
            return encode_load(await load(context))

        async def Session(  # noqa: N802
            self, request_iterator: AsyncIterator[pb.EdgeMessage], context: Any
        ) -> AsyncIterator[pb.ServerMessage]:
            traffic = StreamTraffic()

            async def decoded() -> AsyncIterator[EdgeRequest | None]:
                try:
                    async for message in request_iterator:
                        traffic.count_received(message.ByteSize())
                        yield decode_edge(message)
                except DecodeError as error:  # bytes that parse as no EdgeMessage
                    yield MalformedMessage(f"the message is not a valid EdgeMessage: {error}")

            async for reply in session(decoded(), context, traffic):
                encoded = encode_server(reply)
                traffic.count_sent(encoded.ByteSize())
                yield encoded

    pb_grpc.add_VerifierServicer_to_server(_Servicer(), server)


@dataclass(frozen=True)
class _Undecodable:
    reason: str


class UndecodableRequests(grpc.aio.ServerInterceptor):
    """Unary calls (Info, Load, the health Check) whose request bytes parse as no message of
    their type end with INVALID_ARGUMENT: gRPC reads a unary request before any handler runs
    and would end the call with UNKNOWN. The Session stream reports its own
    (`MalformedMessage`)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler  # unknown methods, streams, and handlers that take raw bytes
        parse, behavior = handler.request_deserializer, handler.unary_unary
        method = handler_call_details.method

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as error:
                return _Undecodable(str(error))

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request of {method} is not a valid message: {request.reason}",
                )
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked, request_deserializer=lenient, response_serializer=handler.response_serializer
        )


class HealthService:
    """The standard gRPC health service on `server`: the whole server ("") and the Verifier
    service answer SERVING or NOT_SERVING together, as `set_serving` last said."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._servicer = grpc_health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self._servicer.set(service, status)

    async def shutdown(self) -> None:
        """NOT_SERVING for good (a stopping server)."""
        await self._servicer.enter_graceful_shutdown()


async def health_status(
    channel: grpc.aio.Channel, service: str = SERVICE_NAME, timeout: float | None = None
) -> str:
    """What the server's gRPC health service says of `service`: "SERVING", "NOT_SERVING",
    "UNKNOWN" or "SERVICE_UNKNOWN"."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


class VerifierClient:
    """Client side of the Verifier service over a `grpc.aio` channel."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()):
        self._stub = pb_grpc.VerifierStub(channel)
        self._metadata = metadata

    async def info(self, timeout: float | None = None) -> ServerInfo:
        reply = await self._stub.Info(pb.InfoRequest(), metadata=self._metadata, timeout=timeout)
        return decode_info(reply)

    async def load(self, timeout: float | None = None) -> ServerLoad:
        reply = await self._stub.Load(pb.LoadRequest(), metadata=self._metadata, timeout=timeout)
        return decode_load(reply)

    def session(self) -> SessionCall:
        return SessionCall(self._stub.Session(metadata=self._metadata))


class SessionCall:
    """One open Session stream: `send` edge requests, `receive` server replies."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.traffic = StreamTraffic()

    async def send(self, message: EdgeRequest) -> None:
        """Send one request (counted in `traffic` once written). A call the server already
        ended (e.g. refused before reading anything) raises its status, as `receive` would."""
        encoded = encode_edge(message)
        try:
            await self._call.write(encoded)
        except asyncio.InvalidStateError:
            if not self._call.done() or self._call.cancelled():
                raise
            await self._call.read()  # raises the call's status (AioRpcError)
            raise
        self.traffic.count_sent(encoded.ByteSize())

    async def receive(self) -> ServerReply | None:
        """The next reply, or None when the server closed the stream cleanly."""
        message = await self._call.read()
        if message is grpc.aio.EOF:
            return None
        self.traffic.count_received(message.ByteSize())
        return decode_server(message)

    async def done_writing(self) -> None:
        await self._call.done_writing()

    def cancel(self) -> None:
        self._call.cancel()
