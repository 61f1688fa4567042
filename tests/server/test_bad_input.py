"""Bad input hurts only itself, on a real server on loopback (its OpenAI API driven by the
`openai` package and httpx, its gRPC service by a scripted edge): every bad request of the list
gets a clear 4xx or INVALID_ARGUMENT, or its documented behaviour (a tiny temperature decodes
greedily, top_k -1 means none, max_tokens past the context is clamped, any model name is
answered by the served model), never a 5xx, while good sessions batched with them over HTTP and
gRPC complete with the target's greedy tokens. A sampling failure inside one sequence of a batch
fails that session alone. A client that leaves its stream unread loses it and frees its KV slot;
a request that finds no free slot gets 503 with Retry-After within the queue timeout."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, replace
from typing import Any

import grpc
import httpx
import openai
import pytest

from specedge.core.sampling import SamplingParams
from specedge.core.target import SequenceFailure
from specedge.model.loader import LoadedModel
from specedge.rpc.codec import (
    CloseSession,
    SessionOpened,
    TreeVerified,
    VerifierClient,
    VerifyTree,
)
from specedge.server.app import BackgroundServer
from tests.support.models import TARGET_SEED, TINY_VOCAB, CharTokenizer, tiny_model
from tests.support.observe import http_get, metric, wait_for
from tests.support.reference import reference_tokens
from tests.support.scripted_edge import (
    SessionResult,
    channel,
    expect_status,
    open_message,
    run,
    run_session,
)
from tests.support.servers import SERVER_CONFIG
from tests.support.trees import junk_tree

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
GOOD_TOKENS = 40
MAX_BODY = 16_384
MAX_MESSAGE = 4096  # bytes of one gRPC message: room for a 256-token Open, not for a huge tree


def start(target: LoadedModel, **overrides: Any) -> BackgroundServer:
    """The harness's small server (context 256) with its OpenAI API (autoregressive)."""
    settings = {"api_port": 0, "max_sessions": 12, "max_body_bytes": MAX_BODY} | overrides
    config = replace(SERVER_CONFIG, max_message_bytes=MAX_MESSAGE, **settings).validate()
    return BackgroundServer(config, target).start()


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model(TARGET_SEED, char_tokenizer=True)


@pytest.fixture(scope="module")
def server(target: LoadedModel) -> Iterator[BackgroundServer]:
    background = start(target)
    yield background
    background.stop()


def text(target: LoadedModel, prompt: list[int], max_tokens: int) -> str:
    return str(target.tokenizer.decode(reference_tokens(target, prompt, max_tokens)))


def api(server: BackgroundServer) -> str:
    return f"http://127.0.0.1:{server.api_port}/v1"


async def good_sessions(server: BackgroundServer, target: LoadedModel) -> list[str | list[int]]:
    """One greedy completion over HTTP (streamed, the openai client) and one edge session over
    gRPC: their text and tokens."""
    client = openai.AsyncOpenAI(base_url=api(server), api_key="unused", max_retries=0)

    async def http() -> str:
        stream = await client.completions.create(
            model="m", prompt=PROMPT, max_tokens=GOOD_TOKENS, temperature=0, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream])

    message = open_message(target, PROMPT[2:], GOOD_TOKENS)
    answer, edge = await asyncio.gather(http(), run_session(server.port, message, junk_tree))
    return [answer, edge.tokens]


def batched_together(server: BackgroundServer) -> tuple[float, float]:
    """(sequences verified, batched forwards) so far: more sequences than forwards means
    sessions shared forwards."""
    port = server.metrics_port
    return (
        metric(port, "specedge_server_verify_batch_size_sum"),
        metric(port, "specedge_server_verify_batch_size_count"),
    )


# ---- the list over HTTP ------------------------------------------------------------------------
GREEDY_REFERENCE = "the target's greedy text"
# name: (body fields, status, a phrase of the error message, or what the answer must be)
HTTP_CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    "temperature 1e-40": ({"temperature": 1e-40}, 200, GREEDY_REFERENCE),
    "temperature -1": ({"temperature": -1}, 400, "temperature"),
    "temperature 2.5": ({"temperature": 2.5}, 400, "temperature"),
    "top_p 0": ({"top_p": 0}, 400, "top_p"),
    "top_p 1.5": ({"top_p": 1.5}, 400, "top_p"),
    "top_k -1": ({"top_k": -1}, 200, GREEDY_REFERENCE),
    "top_k -2": ({"top_k": -2}, 400, "top_k"),
    "max_tokens 0": ({"max_tokens": 0}, 400, "max_tokens"),
    "max_tokens 10^9": ({"max_tokens": 10**9}, 200, "clamped to the context"),
    "prompt over the context": ({"prompt": [1] * 300}, 400, "context limit is 256"),
    "prompt token out of the vocabulary": ({"prompt": [1, TINY_VOCAB]}, 400, "outside vocab"),
    "unknown model": ({"model": "no-such-model"}, 200, GREEDY_REFERENCE),
    "unknown field": ({"best_of_all": 3}, 400, "Unrecognized request argument"),
    "n 2": ({"n": 2}, 400, "n=1"),
}
# name: (raw body, extra headers, status, phrase)
RAW_CASES: dict[str, tuple[bytes, dict[str, str], int, str]] = {
    "temperature NaN": (b'{"prompt": [1, 2], "temperature": NaN}', {}, 400, "finite number"),
    "temperature inf": (b'{"prompt": [1, 2], "temperature": Infinity}', {}, 400, "finite number"),
    "top_p NaN": (b'{"prompt": [1, 2], "top_p": NaN}', {}, 400, "finite number"),
    "malformed JSON": (b'{"prompt": [1, 2', {}, 400, "not valid JSON"),
    "oversized body": (
        json.dumps({"prompt": "x" * MAX_BODY}).encode(),
        {},
        413,
        f"exceeds {MAX_BODY} bytes",
    ),
}


async def chunked(data: bytes) -> AsyncIterator[bytes]:
    """A body without Content-Length (chunked transfer encoding)."""
    for start in range(0, len(data), 4096):
        yield data[start : start + 4096]


async def http_case(client: httpx.AsyncClient, case: str) -> httpx.Response:
    if case in RAW_CASES:
        data, headers, _, _ = RAW_CASES[case]
        headers = {"content-type": "application/json"} | headers
        return await client.post("/completions", content=data, headers=headers)
    if case == "oversized chunked body":
        data = json.dumps({"prompt": "x" * (2 * MAX_BODY)}).encode()
        return await client.post("/completions", content=chunked(data))
    fields, _, _ = HTTP_CASES[case]
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 12, "temperature": 0} | fields
    return await client.post("/completions", json=body)


def check_http(case: str, response: httpx.Response, target: LoadedModel) -> None:
    if case == "oversized chunked body":
        status, expected = 413, "exceeds"
    elif case in RAW_CASES:
        _, _, status, expected = RAW_CASES[case]
    else:
        _, status, expected = HTTP_CASES[case]
    assert response.status_code == status, (case, response.text)
    body = response.json()
    if status != 200:
        error = body["error"]
        assert expected in error["message"], (case, error)
        assert error["type"] == "invalid_request_error"
        return
    choice = body["choices"][0]
    assert body["model"] == target.name  # whatever the request named
    if expected == GREEDY_REFERENCE:
        assert choice["text"] == text(target, PROMPT, 12), case
    else:  # max_tokens past the context: everything the context leaves, then "length"
        room = SERVER_CONFIG.max_context - len(PROMPT)
        assert body["usage"]["completion_tokens"] == room
        assert choice["finish_reason"] == "length"
        assert choice["text"] == text(target, PROMPT, room)


def test_every_bad_http_request_gets_a_clear_answer_while_good_sessions_complete(
    server: BackgroundServer, target: LoadedModel
) -> None:
    cases = [*HTTP_CASES, *RAW_CASES, "oversized chunked body"]

    async def main() -> tuple[list[str | list[int]], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=api(server), timeout=30) as client:
            good = asyncio.ensure_future(good_sessions(server, target))
            responses = await asyncio.gather(*(http_case(client, case) for case in cases))
            chat = await client.post(  # the chat template's path: a tiny temperature too
                "/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "hi"}],
                    "temperature": 1e-40,
                    "max_tokens": 8,
                },  # fmt: skip
            )
            long_chat = await client.post(
                "/chat/completions",
                json={"messages": [{"role": "user", "content": "y" * 300}], "max_tokens": 8},
            )
            return await good, [*responses, chat, long_chat]

    sizes_before, batches_before = batched_together(server)
    (good_text, good_tokens), responses = run(main())
    assert good_text == text(target, PROMPT, GOOD_TOKENS)
    assert good_tokens == reference_tokens(target, PROMPT[2:], GOOD_TOKENS)
    for case, response in zip(cases, responses, strict=False):
        check_http(case, response, target)
    chat, long_chat = responses[-2:]
    chat_ids = CharTokenizer().apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True
    )
    assert chat.status_code == 200
    assert chat.json()["choices"][0]["message"]["content"] == text(target, chat_ids, 8)
    assert long_chat.status_code == 400 and "context limit" in long_chat.text
    sizes, batches = batched_together(server)  # the good sessions shared forwards
    assert sizes - sizes_before > batches - batches_before
    assert http_get(server.metrics_port, "/health")[0] == 200
    wait_for(lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 0)


# ---- the list over gRPC ------------------------------------------------------------------------
def unchecked(**values: float) -> SamplingParams:
    """Sampling parameters as a broken client might put them on the wire (unvalidated)."""
    params = object.__new__(SamplingParams)
    for name, value in (asdict(SamplingParams()) | values).items():
        object.__setattr__(params, name, value)
    return params


BAD_OPENS = {
    "temperature NaN": {"sampling": unchecked(temperature=float("nan"))},
    "temperature inf": {"sampling": unchecked(temperature=float("inf"))},
    "temperature -1": {"sampling": unchecked(temperature=-1.0)},
    "top_p 1.5": {"sampling": unchecked(temperature=1.0, top_p=1.5)},
    "max_tokens 0": {"max_tokens": 0},
    "prompt over the context": {"prompt_token_ids": [1] * 300},
}
BAD_TREES = {
    "parent after its child": ([1, 2, 3], [-1, 2, 0]),
    "token out of the vocabulary": ([1, TINY_VOCAB], [-1, 0]),
    "more parents than tokens": ([1], [-1, 0]),
    "too deep": (list(range(7)), list(range(-1, 6))),
    "too many nodes": (list(range(17)), [-1] * 17),
}


async def bad_open(server: BackgroundServer, target: LoadedModel, case: str) -> grpc.StatusCode:
    async with channel(server.port) as chan:
        call = VerifierClient(chan).session()
        await call.send(replace(open_message(target, PROMPT, 8), **BAD_OPENS[case]))
        error = await expect_status(call.receive())
    return error.code()  # type: ignore[no-any-return]


async def bad_tree(server: BackgroundServer, target: LoadedModel, case: str) -> grpc.StatusCode:
    tokens, parents = BAD_TREES[case]
    async with channel(server.port) as chan:
        call = VerifierClient(chan).session()
        await call.send(open_message(target, PROMPT, 8))
        assert isinstance(await call.receive(), SessionOpened)
        await call.send(VerifyTree(1, [5], [-1]))  # a good round first
        assert isinstance(await call.receive(), TreeVerified)
        await call.send(VerifyTree(2, tokens, parents))
        error = await expect_status(call.receive())
    return error.code()  # type: ignore[no-any-return]


async def oversized_message(server: BackgroundServer, target: LoadedModel) -> grpc.StatusCode:
    async with channel(server.port) as chan:
        call = VerifierClient(chan).session()
        await call.send(open_message(target, PROMPT, 8))
        await call.receive()
        await call.send(VerifyTree(1, [200] * MAX_MESSAGE, [-1] * MAX_MESSAGE))
        error = await expect_status(call.receive())
    return error.code()  # type: ignore[no-any-return]


async def accepted_opens(server: BackgroundServer, target: LoadedModel) -> list[SessionResult]:
    """A tiny temperature (greedy) and max_tokens 10^9 (clamped to the context)."""
    tiny = open_message(target, PROMPT, 12, SamplingParams(temperature=1e-40))
    huge = open_message(target, PROMPT, 10**9)
    return list(
        await asyncio.gather(
            run_session(server.port, tiny, junk_tree), run_session(server.port, huge, junk_tree)
        )
    )


def test_every_bad_grpc_request_is_refused_while_good_sessions_complete(
    server: BackgroundServer, target: LoadedModel
) -> None:
    async def main() -> tuple[Any, ...]:
        good = asyncio.ensure_future(good_sessions(server, target))
        opens = asyncio.gather(*(bad_open(server, target, case) for case in BAD_OPENS))
        trees = asyncio.gather(*(bad_tree(server, target, case) for case in BAD_TREES))
        return await asyncio.gather(
            good, opens, trees, oversized_message(server, target), accepted_opens(server, target)
        )

    (good_text, good_tokens), opens, trees, oversized, (tiny, huge) = run(main())
    assert good_text == text(target, PROMPT, GOOD_TOKENS)
    assert good_tokens == reference_tokens(target, PROMPT[2:], GOOD_TOKENS)
    assert opens == [grpc.StatusCode.INVALID_ARGUMENT] * len(BAD_OPENS)
    assert trees == [grpc.StatusCode.INVALID_ARGUMENT] * len(BAD_TREES)
    assert oversized == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC's own message-size status
    assert tiny.tokens == reference_tokens(target, PROMPT, 12)
    room = SERVER_CONFIG.max_context - len(PROMPT)
    assert huge.opened.max_new_tokens == room and len(huge.tokens) == room
    assert huge.tokens == reference_tokens(target, PROMPT, room)
    wait_for(lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 0)
    assert http_get(server.metrics_port, "/health")[0] == 200


# ---- a sampling failure in one sequence of a batch ---------------------------------------------
def test_a_sampling_failure_fails_only_its_session(
    server: BackgroundServer, target: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target's sampler raises for one session's rows (its seed marks it) from its third
    round on: that session alone ends with INTERNAL, the good sessions batched with it finish
    with the target's tokens, and the server stays healthy (a bad sequence is no failing
    model)."""
    import specedge.core.target as target_module

    poison = SamplingParams(temperature=0.8, seed=666)
    real_sample = target_module.sample_at
    calls = {"poisoned": 0}

    def sample(logits, params, stream, positions):  # type: ignore[no-untyped-def]
        if params.seed == poison.seed:
            calls["poisoned"] += 1
            if calls["poisoned"] >= 3:
                raise RuntimeError("probability tensor contains inf or nan (simulated)")
        return real_sample(logits, params, stream, positions)

    monkeypatch.setattr(target_module, "sample_at", sample)
    engine = server.server.executor.engine  # type: ignore[union-attr]
    real_verify = engine.verify_each
    failed_batches: list[int] = []  # the size of each batch with a failed sequence

    def verify_each(batch: Any) -> Any:
        outcomes = real_verify(batch)
        if any(isinstance(outcome, SequenceFailure) for outcome in outcomes):
            failed_batches.append(len(batch))
        return outcomes

    monkeypatch.setattr(engine, "verify_each", verify_each)

    async def poisoned() -> grpc.aio.AioRpcError:
        message = open_message(target, PROMPT[1:], 200, poison)
        return await expect_status(run_session(server.port, message, junk_tree))

    async def main() -> tuple[Any, ...]:
        return await asyncio.gather(good_sessions(server, target), poisoned())

    sizes_before, batches_before = batched_together(server)
    (good_text, good_tokens), error = run(main())
    monkeypatch.undo()
    sizes, batches = batched_together(server)
    assert sizes - sizes_before > batches - batches_before
    assert len(failed_batches) == 1 and failed_batches[0] > 1  # it failed inside a shared batch
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "sampling failed" in (error.details() or "") and "simulated" in (error.details() or "")
    assert good_text == text(target, PROMPT, GOOD_TOKENS)
    assert good_tokens == reference_tokens(target, PROMPT[2:], GOOD_TOKENS)
    assert http_get(server.metrics_port, "/health")[0] == 200
    wait_for(lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 0)


# ---- clients that hold on ----------------------------------------------------------------------
class WideTokenizer(CharTokenizer):
    """Each token decodes to 25,000 characters (50 kB of UTF-8): a stream of 200 tokens is
    more than any socket buffers between the server and a client that stopped reading (the
    kernel's send buffer grows to 4 MB at most)."""

    def decode(self, token_ids: Any, skip_special_tokens: bool = False) -> str:
        return "".join(chr(self.base + t) * 25_000 for t in token_ids)


def test_a_client_that_leaves_its_stream_unread_loses_it_and_its_kv_slot() -> None:
    target = replace(tiny_model(TARGET_SEED, char_tokenizer=True), tokenizer=WideTokenizer())
    server = start(target, stream_timeout=1.0)
    kv = server.server.executor.engine.runner.kv  # type: ignore[union-attr]
    request = json.dumps(
        {"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True}
    ).encode()
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
    try:
        reader.connect(("127.0.0.1", server.api_port))
        reader.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(request)}\r\n\r\n".encode()
            + request
        )
        # It never reads: the stream stalls, and within the timeout the server gives up.
        wait_for(lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 1)
        started = time.monotonic()
        wait_for(lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 0, 15)
        assert time.monotonic() - started < 10
        assert kv.num_free == kv.num_slots
        closed = metric(
            server.metrics_port, "specedge_server_sessions_total", {"outcome": "closed"}
        )
        assert closed == 1
        # Meanwhile and afterwards the server serves others.
        answer = httpx.post(
            f"{api(server)}/completions",
            json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0},
            timeout=10,
        )
        assert answer.json()["choices"][0]["text"] == text(target, PROMPT, 8)
    finally:
        reader.close()
        server.stop()


def test_no_free_slot_within_the_queue_timeout_is_a_503_with_retry_after(
    target: LoadedModel,
) -> None:
    """One KV slot, held by an edge session: an API request waiting for it, and one waiting
    behind that for the API's one generation slot, both get 503 with Retry-After once the
    queue timeout passes."""
    server = start(target, max_sessions=1, queue_timeout=0.3)
    url = f"{api(server)}/completions"
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}

    async def main() -> list[tuple[httpx.Response, float]]:
        async with channel(server.port) as chan, httpx.AsyncClient(timeout=10) as client:
            call = VerifierClient(chan).session()
            await call.send(open_message(target, [4, 4], 8))
            assert isinstance(await call.receive(), SessionOpened)

            async def timed() -> tuple[httpx.Response, float]:
                started = time.monotonic()
                response = await client.post(url, json=body)
                return response, time.monotonic() - started

            answers = await asyncio.gather(timed(), timed())
            await call.send(CloseSession())
            await call.done_writing()
            return list(answers)

    try:
        for response, waited in run(main()):
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert "retry later" in response.json()["error"]["message"]
            assert 0.25 <= waited < 5
        after = httpx.post(url, json=body, timeout=10)  # the slot is free again
        assert after.json()["choices"][0]["text"] == text(target, PROMPT, 4)
    finally:
        server.stop()
