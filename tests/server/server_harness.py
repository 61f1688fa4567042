"""Helpers for server tests: a tiny random-weight target, an in-process server on loopback
ports and a scripted edge over real gRPC (reading /health and /metrics: `observe`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from conftest import tiny_hf_config, tiny_loaded_model

from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.core.tree import ROOT_PARENT, DraftTree
from specedge.model.loader import LoadedModel, tokenizer_fingerprint
from specedge.rpc.codec import (
    CloseSession,
    OpenSession,
    SessionOpened,
    TreeVerified,
    VerifierClient,
    VerifyTree,
    WireSampling,
)
from specedge.server.app import BackgroundServer
from specedge.server.config import ServerConfig

VOCAB = 256
BASE_CONFIG = ServerConfig(
    model="tiny",
    port=0,
    metrics_port=0,
    max_batch=8,
    max_sessions=6,
    max_tree_nodes=16,
    max_tree_depth=6,
    max_context=256,
    prefill_chunk=16,
    session_timeout=30.0,
    shutdown_grace=0.0,
)


def tiny_target() -> LoadedModel:
    return tiny_loaded_model(tiny_hf_config(), seed=11)


def start_server(target: LoadedModel, **overrides: Any) -> BackgroundServer:
    return BackgroundServer(replace(BASE_CONFIG, **overrides).validate(), target).start()


def reference_tokens(
    target: LoadedModel,
    prompt: Sequence[int],
    max_tokens: int,
    params: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
) -> list[int]:
    """Plain autoregressive target output, computed locally (the ground truth)."""
    generator = LocalGenerator(target, max_context=BASE_CONFIG.max_context)
    output = generator.generate(prompt, params or SamplingParams(), max_tokens, stop_token_ids)
    return output.token_ids


# ---- trees -----------------------------------------------------------------------------------
TreeFunction = Callable[[list[int]], DraftTree]  # generated tokens so far -> next tree


def empty_tree(generated: list[int]) -> DraftTree:
    return DraftTree()


def oracle_tree(reference: list[int], hits: int, decoys: int = 2) -> TreeFunction:
    """A tree whose main chain holds the next `hits` reference tokens, each level also carrying
    `decoys` wrong siblings (so the server must pick the right child among several)."""

    def build(generated: list[int]) -> DraftTree:
        upcoming = reference[len(generated) : len(generated) + hits]
        tokens: list[int] = []
        parents: list[int] = []
        parent = ROOT_PARENT
        for token in upcoming:
            for offset in range(1, decoys + 1):
                tokens.append((token + offset) % VOCAB)
                parents.append(parent)
            tokens.append(token)
            parents.append(parent)
            parent = len(tokens) - 1
        return DraftTree(tuple(tokens), tuple(parents))

    return build


def junk_tree(generated: list[int]) -> DraftTree:
    """A bushy tree of arbitrary tokens (mostly rejected)."""
    seed = len(generated)
    tokens = [(seed * 31 + i * 17) % VOCAB for i in range(3)]
    parents = [ROOT_PARENT] * 3
    tokens += [(seed * 7 + 5) % VOCAB, (seed * 11 + 9) % VOCAB]
    parents += [0, 3]
    return DraftTree(tuple(tokens), tuple(parents))


# ---- a scripted edge ---------------------------------------------------------------------------
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
    sampling: WireSampling | None = None,
    stop_token_ids: Sequence[int] = (),
) -> OpenSession:
    return OpenSession(
        prompt_token_ids=list(prompt),
        sampling=sampling or WireSampling(),
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
            result.bytes_sent.append(await call.send(message))
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
