"""A scripted edge: opens a session on a verification server over real gRPC and sends one tree
per round from a `TreeFunction`, recording what comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from specedge.core.sampling import SamplingParams
from specedge.model.loader import LoadedModel, tokenizer_fingerprint
from specedge.rpc.codec import (
    CloseSession,
    OpenSession,
    SessionOpened,
    TreeVerified,
    VerifierClient,
    VerifyTree,
)
from tests.support.trees import TreeFunction


@dataclass
class SessionResult:
    opened: SessionOpened
    tokens: list[int] = field(default_factory=list)
    replies: list[TreeVerified] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        return self.replies[-1].finish_reason if self.replies else None


def open_message(
    target: LoadedModel,
    prompt: Sequence[int],
    max_tokens: int,
    sampling: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
) -> OpenSession:
    return OpenSession(
        prompt_token_ids=list(prompt),
        sampling=sampling or SamplingParams(),
        max_tokens=max_tokens,
        stop_token_ids=list(stop_token_ids),
        tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer),
    )


def channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


async def run_session(
    port: int,
    open_request: OpenSession,
    next_tree: TreeFunction,
    metadata: tuple[tuple[str, str], ...] = (),
    close: bool = True,
) -> SessionResult:
    """Open, send a tree per round until a finish reason, close; returns what came back."""
    async with channel(port) as chan:
        call = VerifierClient(chan, metadata).session()
        await call.send(open_request)
        opened = await call.receive()
        assert isinstance(opened, SessionOpened)
        result = SessionResult(opened)
        round_number = 0
        while result.finish_reason is None:
            round_number += 1
            tree = next_tree(result.tokens)
            message = VerifyTree(round_number, list(tree.tokens), list(tree.parents))
            sent_before = call.traffic.sent
            await call.send(message)
            result.bytes_sent.append(call.traffic.sent - sent_before)
            reply = await call.receive()
            assert isinstance(reply, TreeVerified) and reply.round == round_number
            result.replies.append(reply)
            result.tokens.extend(reply.emitted_token_ids)
        if close:
            await call.send(CloseSession())
            await call.done_writing()
            assert await call.receive() is None
        return result


async def expect_status(call_coro: Any) -> grpc.aio.AioRpcError:
    """Await something that must fail with a gRPC status; return the error."""
    try:
        await call_coro
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the call succeeded; expected a gRPC error status")


def run(coro: Any) -> Any:
    return asyncio.run(coro)
