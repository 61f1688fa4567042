"""Edge messages for fuzzing a real server's Session stream: hypothesis strategies of good and
bad messages (as raw bytes, `tests.support.wire`), what the server must answer each, one call
sent as bytes, and the property of a call.

Each `FuzzMessage` says what it is (`kind`), whether a server must accept it where it stands
(`valid`) and, when not, the status codes that may end the call (`refusals`);
`allowed_codes` turns a whole call into the set of statuses the call may end with.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1.health_pb2 import HealthCheckRequest
from hypothesis import strategies as st

from specedge.rpc.codec import ServerReply, SessionOpened, TreeVerified, decode_server
from specedge.rpc.specedge_pb2 import (  # to read raw bytes
    EdgeMessage,
    InfoRequest,
    LoadRequest,
    ServerMessage,
)
from tests.support.scripted_edge import channel
from tests.support.trees import random_tree
from tests.support.wire import (
    CLOSE_BYTES,
    EDGE_OPEN,
    EDGE_TREE,
    LENGTH,
    RESUME_BYTES,
    bytes_field,
    open_bytes,
    tag,
    tree_bytes,
    varint,
    varint_field,
)

SESSION_METHOD = "/specedge.v1.Verifier/Session"
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
# What a bad call may end with; UNKNOWN and INTERNAL (an escaped exception), UNAVAILABLE (a dead
# server) and DEADLINE_EXCEEDED (a hang: every fuzzed call half-closes) never are.
CLEAN_CODES = frozenset({OK, INVALID, PRECONDITION, EXHAUSTED})
RETRY_PAUSES = (0.2, 1.0, 5.0)  # seconds between writes of a call sent again in step


@dataclass(frozen=True)
class ServerLimits:
    """What the server under test accepts (its config), and the tokenizer fingerprint."""

    vocab_size: int
    max_tree_nodes: int
    max_tree_depth: int
    max_context: int
    max_message_bytes: int
    fingerprint: str


@dataclass(frozen=True)
class FuzzMessage:
    kind: str  # "open", "tree", "close", "resume", "empty", "garbage"
    data: bytes
    valid: bool  # a server must accept it where a valid message of its kind stands
    refusals: frozenset[grpc.StatusCode] = frozenset()  # when not valid: what may end the call
    label: str = ""
    # Refused as it is read, wherever it stands (INVALID_ARGUMENT): bytes that are no message
    # or one of no kind, sampling parameters or estimates out of range.
    undecodable: bool = False

    def __repr__(self) -> str:
        return f"{self.kind}:{self.label or ('ok' if self.valid else 'bad')}({len(self.data)} B)"


@dataclass(frozen=True)
class FuzzSession:
    messages: tuple[FuzzMessage, ...]
    cancel_after: int | None = None  # cancel the call after this many replies


def bad(
    kind: str, data: bytes, *codes: grpc.StatusCode, label: str = "", undecodable: bool = False
) -> FuzzMessage:
    return FuzzMessage(kind, data, False, frozenset(codes), label, undecodable)


tokens_in_vocab = st.integers(min_value=0, max_value=255)  # the tiny vocabulary's ids
# Token ids no vocabulary of the tests holds, as a 32-bit field reads them (its low 32 bits,
# at least 256): negative ones, just past the vocabulary, the largest, and 64-bit ones.
odd_ids = st.one_of(
    st.sampled_from([-1, -(2**31), 256, 2**32 - 1, 2**64 - 1]),
    st.builds(
        lambda high, low: high << 32 | low,
        st.integers(min_value=0, max_value=2**32 - 1),
        st.integers(min_value=256, max_value=2**32 - 1),
    ),
)


def good_opens(limits: ServerLimits) -> st.SearchStrategy[FuzzMessage]:
    prompts = st.lists(
        st.integers(min_value=0, max_value=limits.vocab_size - 1), min_size=1, max_size=24
    )
    return st.builds(
        lambda prompt, max_tokens, temperature, top_k, seed, streaming: FuzzMessage(
            "open",
            open_bytes(
                prompt=prompt,
                fingerprint=limits.fingerprint,
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k,
                seed=seed,
                accepts_streaming=streaming > 0,
                start_streaming=streaming > 1,
            ),
            True,
        ),
        prompts,
        st.one_of(st.integers(min_value=1, max_value=16), st.just(2**32 - 1)),
        st.sampled_from([0.0, 1e-40, 0.7, 1.0, 2.0]),
        st.sampled_from([0, 1, 5, 2**32 - 1]),
        st.none() | st.integers(min_value=0, max_value=2**64 - 1),
        st.integers(min_value=0, max_value=2),
    )


@st.composite
def bad_opens(draw: st.DrawFn, limits: ServerLimits) -> FuzzMessage:
    """An Open wrong in one way: the sampling (INVALID_ARGUMENT, decoded first), the protocol
    or the tokenizer (FAILED_PRECONDITION), the prompt or max_tokens (INVALID_ARGUMENT)."""
    values: dict[str, Any] = {
        "prompt": [1, 2, 3],
        "fingerprint": limits.fingerprint,
        "max_tokens": 8,
    }
    flaw = draw(
        st.sampled_from(
            ["temperature", "top_p", "version", "fingerprint", "prompt", "max_tokens", "stop"]
        )
    )
    code = INVALID
    if flaw == "temperature":
        values["temperature"] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, -1e-300])
        )
    elif flaw == "top_p":
        values["top_p"] = draw(st.sampled_from([float("nan"), -0.5, 1.5, float("inf")]))
    elif flaw == "version":
        values["protocol_version"] = draw(st.sampled_from([0, 3, 2**32 - 1, -1]))
        code = PRECONDITION
    elif flaw == "fingerprint":
        values["fingerprint"] = draw(st.sampled_from(["", "0" * 16, "\x00", "é" * 40]))
        code = PRECONDITION
    elif flaw == "prompt":
        values["prompt"] = draw(
            st.one_of(
                st.just([]),
                st.lists(odd_ids, min_size=1, max_size=4),
                st.just([7] * limits.max_context),  # no room left for a token
            )
        )
    elif flaw == "max_tokens":
        values["max_tokens"] = draw(st.sampled_from([0, 2**32]))  # 2**32: 0 in 32 bits
    else:  # the edge's stop ids are ignored: a valid Open
        values["stop_token_ids"] = draw(st.lists(odd_ids, min_size=1, max_size=3))
        return FuzzMessage("open", open_bytes(**values), True, label="odd stop ids")
    undecodable = flaw in ("temperature", "top_p")  # sampling is checked as it is decoded
    return bad("open", open_bytes(**values), code, label=flaw, undecodable=undecodable)


@st.composite
def good_trees(draw: st.DrawFn, limits: ServerLimits) -> FuzzMessage:
    """A well-formed tree within the caps (possibly empty), with or without estimates."""
    num_nodes = draw(st.integers(min_value=0, max_value=limits.max_tree_nodes))
    rng = draw(st.randoms(use_true_random=False))
    tokens, parents = random_tree(rng, limits.vocab_size, num_nodes, limits.max_tree_depth)
    with_estimates = draw(st.booleans())
    estimates = b""
    if tokens and with_estimates:
        estimates = bytes(sorted((rng.randrange(256) for _ in tokens), reverse=True))
    round_number = draw(st.integers(min_value=0, max_value=2**64 - 1))
    return FuzzMessage("tree", tree_bytes(round_number, tokens, parents, estimates), True)


@st.composite
def bad_trees(draw: st.DrawFn, limits: ServerLimits) -> FuzzMessage:
    """A tree wrong in one way: INVALID_ARGUMENT, or RESOURCE_EXHAUSTED past gRPC's message
    size."""
    rng = draw(st.randoms(use_true_random=False))
    size = draw(st.integers(min_value=2, max_value=limits.max_tree_nodes))
    tokens, parents = random_tree(rng, limits.vocab_size, size, limits.max_tree_depth)
    estimates = b""
    flaw = draw(
        st.sampled_from(
            [
                "token",
                "parent",
                "cycle",
                "length",
                "deep",
                "wide",
                "siblings",
                "estimates",
                "rising",
                "oversized",
            ]  # fmt: skip
        )
    )
    node = draw(st.integers(min_value=0, max_value=size - 1))
    if flaw == "token":
        tokens[node] = draw(odd_ids)
    elif flaw == "parent":  # before the root, or not earlier than the node itself
        parents[node] = draw(
            st.one_of(
                st.integers(min_value=-(2**31), max_value=-2),
                st.integers(min_value=node, max_value=2**31 - 1),
            )
        )
    elif flaw == "cycle":  # two nodes each other's parent
        other = (node + 1) % size
        parents[node], parents[other] = other, node
    elif flaw == "length":
        parents = parents[:-1] if draw(st.booleans()) else [*parents, -1]
    elif flaw == "deep":  # a chain past the depth cap
        length = draw(st.integers(limits.max_tree_depth + 1, limits.max_tree_nodes))
        tokens, parents = list(range(1, length + 1)), list(range(-1, length - 1))
    elif flaw == "wide":  # more nodes than the cap
        width = draw(st.integers(limits.max_tree_nodes + 1, 4 * limits.max_tree_nodes))
        tokens, parents = list(range(width)), [-1] * width
    elif flaw == "siblings":
        tokens, parents = [*tokens, tokens[0]], [*parents, parents[0]]
    elif flaw == "estimates":  # not one per node
        estimates = bytes(rng.randrange(256) for _ in range(size + draw(st.sampled_from([-1, 1]))))
    elif flaw == "rising":
        estimates = bytes(sorted(rng.randrange(255) for _ in range(size)))
        estimates = estimates[:-1] + bytes([estimates[-2] + 1])  # a later node above an earlier
    else:  # past the server's gRPC message size: gRPC itself refuses it
        width = limits.max_message_bytes  # at least one byte a token and one a parent
        data = tree_bytes(1, [5] * width, [-1] * width)
        return bad("tree", data, EXHAUSTED, label=flaw)
    data = tree_bytes(1, tokens, parents, estimates)
    return bad("tree", data, INVALID, label=flaw, undecodable=flaw in ("estimates", "rising"))


garbage = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.just(b"\xff\xff\xff\xff"),  # a varint that never ends
    st.just(bytes_field(EDGE_TREE, b"\x12\x05\x01")),  # a truncated inner field
    st.just(tag(EDGE_OPEN, LENGTH) + varint(2**40)),  # a length past the message
)


def garbage_messages() -> st.SearchStrategy[FuzzMessage]:
    """Random bytes: INVALID_ARGUMENT whether they parse as nothing or as an empty message;
    those that parse as a message with a kind are left out (they are the other strategies')."""

    def classify(data: bytes) -> FuzzMessage | None:
        try:
            message = EdgeMessage.FromString(data)
        except DecodeError:
            return bad("garbage", data, INVALID, label="unparsable", undecodable=True)
        if message.WhichOneof("kind") is None:  # unknown fields only
            return bad("empty", data, INVALID, label="no kind", undecodable=True)
        return None

    return garbage.map(classify).filter(lambda message: message is not None)  # type: ignore[return-value]


def edge_messages(limits: ServerLimits) -> st.SearchStrategy[FuzzMessage]:
    """Any one edge message, good or bad."""
    empty = st.just(bad("empty", b"", INVALID, undecodable=True))
    unknown_field = st.just(
        bad("empty", varint_field(15, 1), INVALID, label="unknown field", undecodable=True)
    )
    return st.one_of(
        good_trees(limits),
        bad_trees(limits),
        good_opens(limits),
        bad_opens(limits),
        st.just(FuzzMessage("close", CLOSE_BYTES, True)),
        st.just(FuzzMessage("resume", RESUME_BYTES, True)),
        empty,
        unknown_field,
        garbage_messages(),
    )


@st.composite
def fuzz_sessions(draw: st.DrawFn, limits: ServerLimits) -> FuzzSession:
    """A call's messages: mostly a good Open first, then anything in any order."""
    first = draw(st.one_of(good_opens(limits), good_opens(limits), edge_messages(limits)))
    rest = draw(st.lists(edge_messages(limits), max_size=6))
    cancel_after = draw(st.none() | st.none() | st.integers(min_value=0, max_value=3))
    return FuzzSession((first, *rest), cancel_after)


def expected_codes(messages: Sequence[FuzzMessage]) -> frozenset[grpc.StatusCode]:
    """The statuses that may end a call sending `messages` in order (then half-closing): those
    of its first misplaced or invalid message, OK if there is none or a Close comes first.
    Later Opens are misplaced, and so is anything but an Open first."""
    for position, message in enumerate(messages):
        if EXHAUSTED in message.refusals:  # gRPC refuses it before the service sees it
            return message.refusals
        if message.undecodable:
            return frozenset({INVALID})
        if message.kind == "close" and position > 0:
            return frozenset({OK})
        if (position == 0) != (message.kind == "open"):
            return frozenset({PRECONDITION})
        if not message.valid:
            return message.refusals
    return frozenset({OK})


def allowed_codes(
    session: FuzzSession, replies: Sequence[ServerReply], cancelled: bool
) -> frozenset[grpc.StatusCode]:
    """`expected_codes`, widened where the server may rightly not get that far: after a reply
    with a finish reason a tree is out of place (FAILED_PRECONDITION); while it streams, trees
    are dropped unread; a call the client cancelled ends CANCELLED."""
    verified = [reply for reply in replies if isinstance(reply, TreeVerified)]
    if cancelled:
        return CLEAN_CODES | {grpc.StatusCode.CANCELLED}
    if any(reply.streaming for reply in verified):
        return CLEAN_CODES
    codes = expected_codes(session.messages)
    if any(reply.finish_reason is not None for reply in verified):
        codes |= {PRECONDITION}
    return codes


# ---- one call, as bytes ----------------------------------------------------------------------
@dataclass
class CallOutcome:
    code: grpc.StatusCode  # OK: the server ended the call cleanly
    details: str
    replies: list[ServerReply]
    cancelled: bool = False  # the client cancelled it
    # A write of the client failed: the server had ended the call. gRPC's client then reports
    # INTERNAL ("Internal error from Core") in place of the server's status, whatever it was.
    write_failed: bool = False

    @property
    def masked(self) -> bool:
        """Whether the server's status is hidden behind the failed write's INTERNAL."""
        return self.write_failed and self.code == grpc.StatusCode.INTERNAL


def _parse_reply(data: bytes) -> ServerReply:
    return decode_server(ServerMessage.FromString(data))


async def send_session(
    port: int, session: FuzzSession, pause: float | None = None, timeout: float = 30.0
) -> CallOutcome:
    """Send `session`'s messages on one Session call, half-close, and read until the server
    ends the call; cancel it after `cancel_after` replies. Writing and reading go at once;
    with `pause`, each write waits for a reply to the last, or `pause` seconds, so that the
    server ends the call before the next write where it means to. A call that does not end
    within `timeout` seconds raises TimeoutError (a hung server)."""
    async with channel(port) as chan:
        call = chan.stream_stream(SESSION_METHOD, response_deserializer=_parse_reply)()
        replies: list[ServerReply] = []
        replied = asyncio.Event()
        write_failed = False

        async def write() -> None:
            nonlocal write_failed
            for message in session.messages:
                if call.done():
                    return
                replied.clear()
                try:
                    await call.write(message.data)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    write_failed = True
                    return
                if pause is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(replied.wait(), pause)
            await call.done_writing()

        async def read() -> tuple[grpc.StatusCode, str, bool]:
            while True:
                if session.cancel_after is not None and len(replies) >= session.cancel_after:
                    call.cancel()
                    return grpc.StatusCode.CANCELLED, "", True
                try:
                    reply = await call.read()
                except grpc.aio.AioRpcError as error:
                    return error.code(), error.details() or "", False
                if reply is grpc.aio.EOF:
                    return await call.code(), await call.details() or "", False
                replies.append(reply)
                replied.set()

        writer = asyncio.ensure_future(write())
        try:
            code, details, cancelled = await asyncio.wait_for(read(), timeout)
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        return CallOutcome(code, details, replies, cancelled, write_failed)


def check_replies(outcome: CallOutcome, vocab_size: int) -> None:
    """What any call's replies must be: one Opened first, then Verifieds of tokens in the
    vocabulary, no more of them than the Opened allowed."""
    replies = outcome.replies
    if not replies:
        return
    opened = replies[0]
    assert isinstance(opened, SessionOpened), replies
    verified = replies[1:]
    assert all(isinstance(reply, TreeVerified) for reply in verified), replies
    emitted = [t for reply in verified for t in reply.emitted_token_ids]  # type: ignore[union-attr]
    assert all(0 <= t < vocab_size for t in emitted), emitted
    assert len(emitted) <= opened.max_new_tokens, (len(emitted), opened)


def check_grpc_call(
    run: Callable[[Coroutine[Any, Any, CallOutcome]], CallOutcome],
    port: int,
    limits: ServerLimits,
    session: FuzzSession,
) -> CallOutcome:
    """The fuzz property of one Session call, run by `run` (e.g. `GoodSessions.run`):
    well-formed replies and a status among those `allowed_codes` gives (AssertionError
    otherwise)."""
    outcome = run(send_session(port, session))
    for pause in RETRY_PAUSES:  # a status masked by a racing write: write in step instead
        if not outcome.masked:
            break
        outcome = run(send_session(port, session, pause))
    check_replies(outcome, limits.vocab_size)
    allowed = allowed_codes(session, outcome.replies, outcome.cancelled)
    assert outcome.code in allowed, (
        f"{outcome.code.name} ({outcome.details!r}), expected one of "
        f"{sorted(code.name for code in allowed)} for {session}"
    )
    return outcome


# ---- unary calls ---------------------------------------------------------------------------
UNARY_REQUESTS: dict[str, type[Message]] = {  # method: its request's type
    "/specedge.v1.Verifier/Info": InfoRequest,
    "/specedge.v1.Verifier/Load": LoadRequest,
    "/grpc.health.v1.Health/Check": HealthCheckRequest,
}


async def send_unary(port: int, method: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    """One unary call with `data` as its request's bytes: its status and details."""
    async with channel(port) as chan:
        try:
            await chan.unary_unary(method)(data, timeout=30)
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details() or ""
    return OK, ""


def check_unary_call(
    run: Callable[[Coroutine[Any, Any, tuple[grpc.StatusCode, str]]], tuple[grpc.StatusCode, str]],
    port: int,
    method: str,
    data: bytes,
) -> None:
    """The fuzz property of a unary call: bytes that parse as its request get an answer (for
    the health check, NOT_FOUND for a service it does not know), the others INVALID_ARGUMENT."""
    code, details = run(send_unary(port, method, data))
    try:
        UNARY_REQUESTS[method].FromString(data)
        answers = {OK, grpc.StatusCode.NOT_FOUND} if "Health" in method else {OK}
    except DecodeError:
        answers = {INVALID}
    assert code in answers, (
        f"{method} {code.name} ({details!r}), expected one of "
        f"{sorted(answer.name for answer in answers)} for {data!r}"
    )
