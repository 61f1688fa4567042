"""The Verifier service over real gRPC on loopback: output correctness and every bad input."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import asdict, replace

import grpc
import pytest

from specedge.core.sampling import SamplingParams
from specedge.core.tree import DraftTree
from specedge.model.loader import LoadedModel
from specedge.rpc.codec import (
    PROTOCOL_VERSION,
    CloseSession,
    OpenSession,
    SessionOpened,
    TreeVerified,
    VerifierClient,
    VerifyTree,
    encode_edge,
)
from specedge.server.app import BackgroundServer
from tests.support.models import TINY_VOCAB, tiny_hf_config, tiny_loaded_model, tiny_model
from tests.support.observe import metric, wait_for
from tests.support.reference import reference_tokens
from tests.support.scripted_edge import (
    SessionResult,
    channel,
    expect_status,
    open_message,
    run,
    run_session,
)
from tests.support.servers import start_server
from tests.support.trees import empty_tree, junk_tree, oracle_tree

PROMPT = [5, 17, 99, 3, 250, 42, 42, 7, 128, 64, 1, 2, 3, 200, 31, 8, 9, 77, 13]  # 19 tokens
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model()


@pytest.fixture(scope="module")
def server(target: LoadedModel) -> Iterator[BackgroundServer]:
    background = start_server(target)
    yield background
    background.stop()


@pytest.fixture(scope="module")
def reference(target: LoadedModel) -> list[int]:
    return reference_tokens(target, PROMPT, MAX_TOKENS)


def test_info_reports_identity_and_limits(server: BackgroundServer, target: LoadedModel) -> None:
    async def main() -> None:
        async with channel(server.port) as chan:
            info = await VerifierClient(chan).info(timeout=5)
        assert info.protocol_version == PROTOCOL_VERSION
        assert info.model_name == target.name
        assert info.tokenizer_fingerprint == open_message(target, PROMPT, 1).tokenizer_fingerprint
        assert (info.vocab_size, info.max_tree_nodes, info.max_tree_depth) == (TINY_VOCAB, 16, 6)
        assert info.max_context == 256

    run(main())


@pytest.mark.parametrize("tree_kind", ["autoregressive", "oracle", "junk"])
def test_greedy_output_equals_target_output(
    server: BackgroundServer, target: LoadedModel, reference: list[int], tree_kind: str
) -> None:
    next_tree = {
        "autoregressive": empty_tree,
        "oracle": oracle_tree(reference, hits=4),
        "junk": junk_tree,
    }[tree_kind]
    result = run(run_session(server.port, open_message(target, PROMPT, MAX_TOKENS), next_tree))
    assert result.tokens == reference
    assert result.finish_reason == "length"
    assert result.opened.max_new_tokens == MAX_TOKENS
    if tree_kind == "oracle":
        # Every round accepts the 4 drafted tokens and adds a bonus, except the last ones.
        assert result.replies[0].num_accepted == 4 and len(result.replies) <= 6
    if tree_kind == "autoregressive":
        assert all(len(r.emitted_token_ids) == 1 for r in result.replies)


def test_concurrent_sessions_are_batched_and_each_correct(
    server: BackgroundServer, target: LoadedModel
) -> None:
    prompts = [PROMPT[i:] for i in range(5)]
    references = [reference_tokens(target, prompt, 16) for prompt in prompts]
    batches_before = metric(server.metrics_port, "specedge_server_verify_batch_size_count")
    rounds_before = metric(server.metrics_port, "specedge_server_rounds_total")

    async def main() -> list[SessionResult]:
        sessions = [
            run_session(server.port, open_message(target, prompt, 16), tree)
            for prompt, tree in zip(prompts, [empty_tree, junk_tree] * 3, strict=False)
        ]
        return list(await asyncio.gather(*sessions))

    results = run(main())
    assert [r.tokens for r in results] == references
    batches = metric(server.metrics_port, "specedge_server_verify_batch_size_count")
    rounds = metric(server.metrics_port, "specedge_server_rounds_total")
    assert rounds - rounds_before == sum(len(r.replies) for r in results)
    assert batches - batches_before <= rounds - rounds_before


def test_seeded_sampling_matches_local_target_sampling(
    server: BackgroundServer, target: LoadedModel
) -> None:
    """At temperature > 0, autoregressive rounds on the server draw exactly what the local
    engine draws with the same seed: per-session generators survive batching."""
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    expected = reference_tokens(target, PROMPT, 12, params)
    sampling = params

    async def main() -> list[SessionResult]:
        message = open_message(target, PROMPT, 12, sampling)
        return list(
            await asyncio.gather(*(run_session(server.port, message, empty_tree) for _ in range(3)))
        )

    assert [r.tokens for r in run(main())] == [expected] * 3


def test_sessions_stop_at_the_targets_stop_tokens_never_the_edges(
    server: BackgroundServer, target: LoadedModel, reference: list[int]
) -> None:
    """The server decides where text ends: a target with a stop token stops there whatever
    the edge sends; the edge's stop token ids (its draft tokenizer's) are ignored."""
    stop = reference[5]
    first = reference.index(stop)
    stopping = start_server(replace(target, stop_token_ids=(stop,)))
    try:
        for sent in ([], [(stop + 1) % TINY_VOCAB]):  # none, or another one
            message = open_message(target, PROMPT, MAX_TOKENS, stop_token_ids=sent)
            result = run(run_session(stopping.port, message, oracle_tree(reference, hits=3)))
            assert result.tokens == reference[: first + 1]
            assert result.finish_reason == "stop"
    finally:
        stopping.stop()
    message = open_message(target, PROMPT, MAX_TOKENS, stop_token_ids=[stop])
    result = run(run_session(server.port, message, oracle_tree(reference, hits=3)))
    assert result.tokens == reference and result.finish_reason == "length"


def test_prompt_longer_than_a_prefill_chunk(server: BackgroundServer, target: LoadedModel) -> None:
    prompt = [(i * 37 + 11) % TINY_VOCAB for i in range(100)]  # 7 chunks of 16
    expected = reference_tokens(target, prompt, 8)
    result = run(run_session(server.port, open_message(target, prompt, 8), junk_tree))
    assert result.tokens == expected


def test_allowance_is_capped_by_the_context(server: BackgroundServer, target: LoadedModel) -> None:
    """max_tokens past the context limit is cut to fit, and trees near the end are trimmed
    instead of failing the session."""
    prompt = [(i * 13 + 1) % TINY_VOCAB for i in range(250)]
    expected = reference_tokens(target, prompt, 6)
    result = run(run_session(server.port, open_message(target, prompt, 1000), junk_tree))
    assert result.opened.max_new_tokens == 6
    assert result.tokens == expected and result.finish_reason == "length"


def test_wire_size_of_a_round_grows_with_the_tree_not_the_context() -> None:
    """Uplink bytes for a 32-node tree at 2k tokens of context stay under 1 KB, equal to the
    same tree's bytes at a short context."""
    long_target = tiny_loaded_model(tiny_hf_config(max_position_embeddings=4096), seed=11)
    long_server = start_server(
        long_target, max_context=2304, max_tree_nodes=32, max_tree_depth=16, prefill_chunk=512
    )
    tree_tokens = [(i * 41 + 3) % TINY_VOCAB for i in range(32)]
    tree_parents = [-1, -1, -1, -1] + [i // 2 for i in range(28)]

    def tree(generated: list[int]) -> DraftTree:
        return DraftTree(tuple(tree_tokens), tuple(tree_parents))

    try:
        results = []
        for length in (16, 2048):
            prompt = [(i * 7 + 1) % TINY_VOCAB for i in range(length)]
            message = open_message(long_target, prompt, 2)
            results.append(run(run_session(long_server.port, message, tree)))
    finally:
        long_server.stop()
    short, long = (result.bytes_sent[0] for result in results)
    assert long == short < 1024
    # Real vocabularies have larger ids (3-byte varints) and rounds run long: still under 1 KB.
    big_ids = VerifyTree(10**6, [151_000 + i for i in range(32)], tree_parents)
    assert encode_edge(big_ids).ByteSize() < 1024


# ---- bad input: each gets its status, and only its session fails ------------------------------
def unchecked_sampling(**values: float) -> SamplingParams:
    """Sampling parameters as a foreign or broken client might put them on the wire: built
    without the validation every SpecEdge sender runs."""
    params = object.__new__(SamplingParams)
    for name, value in (asdict(SamplingParams()) | values).items():
        object.__setattr__(params, name, value)
    return params


BAD_TREES = {
    "parent after child": ([1, 2, 3], [-1, 2, 0]),
    "parent is itself": ([1, 2], [-1, 1]),
    "too many nodes": (list(range(17)), [-1] * 17),
    "token id >= vocab": ([1, TINY_VOCAB, 3], [-1, -1, -1]),
    "depth over cap": (list(range(7)), [-1, 0, 1, 2, 3, 4, 5]),
    "length mismatch": ([1, 2, 3], [-1, 0]),
    "duplicate siblings": ([4, 4], [-1, -1]),
}


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_bad_tree_fails_only_that_session(
    server: BackgroundServer, target: LoadedModel, case: str
) -> None:
    tokens, parents = BAD_TREES[case]

    async def main() -> grpc.aio.AioRpcError:
        async with channel(server.port) as chan:
            call = VerifierClient(chan).session()
            await call.send(open_message(target, PROMPT, 8))
            assert isinstance(await call.receive(), SessionOpened)
            await call.send(VerifyTree(1, [7], [-1]))  # a good round first
            await call.receive()
            await call.send(VerifyTree(2, tokens, parents))
            return await expect_status(call.receive())

    error = run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "round 2" in (error.details() or "")
    wait_for(lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 0)


BAD_OPENS = {
    "wrong protocol version": (
        {"protocol_version": PROTOCOL_VERSION + 1},
        grpc.StatusCode.FAILED_PRECONDITION,
        "protocol version",
    ),
    "tokenizer mismatch": (
        {"tokenizer_fingerprint": "0123456789abcdef"},
        grpc.StatusCode.FAILED_PRECONDITION,
        "tokenizer fingerprint",
    ),
    "no tokenizer fingerprint": (
        {"tokenizer_fingerprint": ""},
        grpc.StatusCode.FAILED_PRECONDITION,
        "tokenizer fingerprint",
    ),
    "empty prompt": ({"prompt_token_ids": []}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    "prompt token id >= vocab": (
        {"prompt_token_ids": [1, TINY_VOCAB + 5]},
        grpc.StatusCode.INVALID_ARGUMENT,
        "outside vocab",
    ),
    "prompt over the context": (
        {"prompt_token_ids": [1] * 300},
        grpc.StatusCode.INVALID_ARGUMENT,
        "context",
    ),
    "max_tokens 0": ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max tokens"),
    "negative temperature": (
        {"sampling": unchecked_sampling(temperature=-1.0)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature",
    ),
    "infinite temperature": (
        {"sampling": unchecked_sampling(temperature=float("inf"))},
        grpc.StatusCode.INVALID_ARGUMENT,
        "finite",
    ),
    "NaN temperature": (
        {"sampling": unchecked_sampling(temperature=float("nan"))},
        grpc.StatusCode.INVALID_ARGUMENT,
        "temperature must be finite",
    ),
    "top_p over 1": (
        {"sampling": unchecked_sampling(temperature=1.0, top_p=1.5)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p",
    ),
    "negative top_p": (  # 0 is proto3's "not sent" (no top-p); below it is refused
        {"sampling": unchecked_sampling(temperature=1.0, top_p=-0.5)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p",
    ),
    "NaN top_p": (
        {"sampling": unchecked_sampling(temperature=1.0, top_p=float("nan"))},
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_p must be finite",
    ),
}


@pytest.mark.parametrize("case", list(BAD_OPENS))
def test_bad_open_is_refused_with_a_clear_status(
    server: BackgroundServer, target: LoadedModel, case: str
) -> None:
    overrides, code, phrase = BAD_OPENS[case]

    async def main() -> grpc.aio.AioRpcError:
        async with channel(server.port) as chan:
            call = VerifierClient(chan).session()
            await call.send(replace(open_message(target, PROMPT, 8), **overrides))
            return await expect_status(call.receive())

    error = run(main())
    assert error.code() == code
    assert phrase in (error.details() or "")
    assert metric(server.metrics_port, "specedge_server_active_sessions") == 0


def test_empty_first_message_is_invalid(server: BackgroundServer) -> None:
    from specedge.rpc import specedge_pb2 as pb  # the raw stub: the codec cannot send this

    async def main() -> grpc.aio.AioRpcError:
        from specedge.rpc import specedge_pb2_grpc as pb_grpc

        async with channel(server.port) as chan:
            call = pb_grpc.VerifierStub(chan).Session()
            await call.write(pb.EdgeMessage())
            return await expect_status(call.read())

    error = run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first message" in (error.details() or "")


def test_tree_before_open_and_second_open_are_refused(
    server: BackgroundServer, target: LoadedModel
) -> None:
    async def tree_first() -> grpc.aio.AioRpcError:
        async with channel(server.port) as chan:
            call = VerifierClient(chan).session()
            await call.send(VerifyTree(1, [1], [-1]))
            return await expect_status(call.receive())

    async def open_twice() -> grpc.aio.AioRpcError:
        async with channel(server.port) as chan:
            call = VerifierClient(chan).session()
            await call.send(open_message(target, PROMPT, 8))
            await call.receive()
            await call.send(open_message(target, PROMPT, 8))
            return await expect_status(call.receive())

    for scenario in (tree_first, open_twice):
        error = run(scenario())
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "open" in (error.details() or "").lower()
    wait_for(lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 0)


def test_tree_after_finish_is_refused_and_close_ends_cleanly(
    server: BackgroundServer, target: LoadedModel
) -> None:
    async def main() -> grpc.aio.AioRpcError:
        async with channel(server.port) as chan:
            call = VerifierClient(chan).session()
            await call.send(open_message(target, PROMPT, 1))
            await call.receive()
            await call.send(VerifyTree(1, [], []))
            reply = await call.receive()
            assert getattr(reply, "finish_reason", None) == "length"
            await call.send(VerifyTree(2, [], []))
            return await expect_status(call.receive())

    error = run(main())
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "finished" in (error.details() or "")


def test_open_message_defaults_round_trip(target: LoadedModel) -> None:
    """The scripted edge sends what a real edge sends (sanity of the harness itself)."""
    message = open_message(target, PROMPT, 8)
    assert isinstance(message, OpenSession) and message.protocol_version == PROTOCOL_VERSION


def test_a_version_1_edge_is_served_and_its_trees_verified_whole(
    server: BackgroundServer, target: LoadedModel, reference: list[int]
) -> None:
    """No estimates (a version 1 edge): nothing to select by, so every node is verified."""
    tree = [(1, -1), (2, 0), (3, 1), (4, -1)]  # tokens the target is unlikely to take

    async def main() -> list[TreeVerified]:
        async with channel(server.port) as chan:
            call = VerifierClient(chan).session()
            await call.send(replace(open_message(target, PROMPT, 8), protocol_version=1))
            assert isinstance(await call.receive(), SessionOpened)
            replies = []
            for number in range(1, 4):
                tokens, parents = zip(*tree, strict=True)
                await call.send(VerifyTree(number, list(tokens), list(parents)))
                reply = await call.receive()
                assert isinstance(reply, TreeVerified)
                replies.append(reply)
            await call.send(CloseSession())
            return replies

    replies = run(main())
    assert [r.num_verified for r in replies] == [4, 4, 4]
    emitted = [t for r in replies for t in r.emitted_token_ids]
    assert emitted == reference[: len(emitted)]


def test_estimates_that_rise_fail_only_that_session(
    server: BackgroundServer, target: LoadedModel
) -> None:
    async def main() -> grpc.aio.AioRpcError:
        async with channel(server.port) as chan:
            call = VerifierClient(chan).session()
            await call.send(open_message(target, PROMPT, 8))
            assert isinstance(await call.receive(), SessionOpened)
            await call.send(VerifyTree(1, [5, 6], [-1, 0], (0.2, 0.9)))
            return await expect_status(call.receive())

    error = run(main())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must not rise" in (error.details() or "")
