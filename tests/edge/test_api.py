"""The edge's OpenAI-compatible API on loopback (uvicorn), driven by the `openai` package and
httpx, over the real verification server: completions equal the target's greedy output,
streaming and non-streaming agree, stop strings cut the text, invalid parameters get OpenAI's
error JSON with status 400, concurrent requests all complete, a client that disconnects
mid-stream frees its server session, a dead server means 503 (with Retry-After) quickly, then
recovery, and a body over the limit is a 413. The edge serves the target's tokens, so it lists
the target (with its draft) and names it in every response. Logs: one structured line per
session end on each side, the same session id in both, and no prompt or completion text."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import httpx
import openai
import pytest

from specedge.bench.wan import DelayProxy
from specedge.edge.api import StopMatcher
from specedge.edge.app import BackgroundEdge
from specedge.model.loader import LoadedModel
from specedge.server.app import BackgroundServer
from tests.support.models import TARGET_SEED, CharTokenizer, tiny_model
from tests.support.observe import metric, wait_for
from tests.support.reference import reference_tokens
from tests.support.servers import EDGE_CONFIG, edge_config, start_server

MESSAGES = [{"role": "user", "content": "Say something."}]
MAX_TOKENS = 30
DRAFT_NAME = "tiny-draft"


@dataclass
class Stack:
    target: LoadedModel
    server: BackgroundServer
    edge: BackgroundEdge

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.edge.url}/v1", api_key="unused", max_retries=0)

    def expected_text(self, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
        return self.target.tokenizer.decode(reference_tokens(self.target, prompt_ids, max_tokens))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    target = tiny_model(TARGET_SEED, char_tokenizer=True)
    server = start_server(target)
    draft = replace(tiny_model(TARGET_SEED, char_tokenizer=True), name=DRAFT_NAME)
    edge = BackgroundEdge(edge_config(server), draft)
    edge.start()
    yield Stack(target, server, edge)
    edge.stop()
    server.stop()


def chat_prompt_ids() -> list[int]:
    return CharTokenizer().apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)


def test_models_health_and_metrics(stack: Stack) -> None:
    models = stack.client.models.list()
    assert [model.id for model in models.data] == [stack.target.name]  # what the server serves
    assert models.data[0].owned_by == "specedge"
    assert models.data[0].model_extra == {"draft": DRAFT_NAME}
    health = httpx.get(f"{stack.edge.url}/health").json()
    assert health["status"] == "ok" and health["server_connected"] is True
    assert health["model"] == stack.target.name
    answer = stack.client.completions.create(
        model="x", prompt=[1, 2, 3], max_tokens=4, temperature=0
    )
    assert answer.model == stack.target.name
    text = httpx.get(f"{stack.edge.url}/metrics").text
    assert "specedge_edge_rounds_total" in text and "specedge_edge_ttft_seconds" in text


def test_chat_equals_greedy_target_and_streaming_agrees(stack: Stack) -> None:
    client = stack.client
    full = client.chat.completions.create(
        model="whatever",
        messages=MESSAGES,
        temperature=0,
        max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
    )
    assert full.model == stack.target.name and full.object == "chat.completion"
    choice = full.choices[0]
    assert choice.message.content == stack.expected_text(chat_prompt_ids())
    assert choice.finish_reason == "length"
    assert full.usage is not None and full.usage.completion_tokens == MAX_TOKENS
    speculative = full.usage.model_extra["speculative"]  # type: ignore[index]
    # Zero accepted is possible: the server may decode this session itself (streaming).
    assert speculative["rounds"] >= 1 and 0 <= speculative["acceptance_rate"] <= 1
    assert speculative["rounds"] <= MAX_TOKENS
    assert {"tokens_per_round", "proactive_hits", "proactive_attempts"} <= set(speculative)

    chunks = list(
        client.chat.completions.create(
            model="whatever",
            messages=MESSAGES,  # type: ignore[arg-type]
            temperature=0,
            max_completion_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert {chunk.model for chunk in chunks} == {stack.target.name}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_completions_with_text_and_token_prompts(stack: Stack) -> None:
    client = stack.client
    prompt_ids = [5, 6, 7, 8]
    expected = stack.expected_text(prompt_ids)
    by_ids = client.completions.create(model="m", prompt=prompt_ids, temperature=0, max_tokens=30)
    assert by_ids.choices[0].text == expected and by_ids.object == "text_completion"
    as_text = CharTokenizer().decode(prompt_ids)
    by_text = client.completions.create(model="m", prompt=as_text, temperature=0, max_tokens=30)
    assert by_text.choices[0].text == expected
    stream = client.completions.create(
        model="m", prompt=prompt_ids, temperature=0, max_tokens=30, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == expected
    sampled = client.completions.create(
        model="m", prompt=prompt_ids, temperature=0.9, top_p=0.9, seed=3, max_tokens=30,
        extra_body={"top_k": 50},
    )  # fmt: skip
    assert sampled.usage is not None and sampled.usage.completion_tokens == 30


def test_stop_strings_cut_the_text(stack: Stack) -> None:
    client = stack.client
    full = stack.expected_text([9, 10, 11], max_tokens=40)
    stop = full[20:23]
    expected = full[: full.index(stop)]
    kwargs: dict[str, Any] = dict(model="m", prompt=[9, 10, 11], temperature=0, max_tokens=40)
    cut = client.completions.create(stop=[stop, "never-seen"], **kwargs)
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -3}, "seed"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": []}, "tools"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ],
)
def test_invalid_parameters_get_openai_errors(
    stack: Stack, body: dict[str, Any], param: str
) -> None:
    request = {"model": "m", "messages": MESSAGES, "max_tokens": 4} | body
    response = httpx.post(f"{stack.edge.url}/v1/chat/completions", json=request)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_malformed_requests_get_openai_errors(stack: Stack) -> None:
    url = f"{stack.edge.url}/v1/completions"
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    too_long = httpx.post(url, json={"prompt": [1] * 300, "max_tokens": 4})
    bad_token = httpx.post(url, json={"prompt": [1, 999], "max_tokens": 4})
    two_prompts = httpx.post(url, json={"prompt": ["a", "b"], "max_tokens": 4})
    for response in (bad_json, too_long, bad_token, two_prompts):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert "context limit" in too_long.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        stack.client.completions.create(model="m", prompt="hi", n=3)
    assert httpx.get(f"{stack.edge.url}/v1/nothing").json()["error"]["message"]


def test_a_body_over_the_limit_is_a_413(stack: Stack) -> None:
    limit = EDGE_CONFIG.max_body_bytes
    url = f"{stack.edge.url}/v1/chat/completions"
    big = {"messages": [{"role": "user", "content": "x" * limit}], "max_tokens": 4}
    response = httpx.post(url, json=big)
    assert response.status_code == 413, response.text
    assert f"exceeds {limit} bytes" in response.json()["error"]["message"]
    small = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    assert httpx.post(url, json=small).status_code == 200


def test_logs_one_line_per_session_end_and_no_text(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """A chat request through the edge: the edge and the server each log one `session_end`
    line with the same session id, counts and outcome; no log record holds the prompt or the
    completion text."""
    caplog.set_level(logging.DEBUG, logger="specedge")
    secret = "Tell nobody: the password is swordfish."
    messages = [{"role": "user", "content": secret}]
    answer = stack.client.chat.completions.create(
        model="m", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    completion = answer.choices[0].message.content or ""
    assert len(completion) == MAX_TOKENS

    # The server logs its end once the close crossed the link: later on a loaded machine; an
    # earlier test's session may end in the meantime, so only this request's id counts.
    def ends() -> list[dict[str, str]]:
        lines = [r.getMessage() for r in caplog.records]
        found = [
            dict(p.split("=", 1) for p in x.split()[1:])
            for x in lines
            if x.startswith("session_end")
        ]
        ours = [f["session"] for f in found if f["role"] == "edge"]
        return [f for f in found if ours and f["session"] == ours[-1]]

    wait_for(lambda: sorted(f["role"] for f in ends()) == ["edge", "edge-session"], 30)
    fields = ends()
    assert sorted(f["role"] for f in fields) == ["edge", "edge-session"]
    edge, server = sorted(fields, key=lambda f: f["role"])
    assert edge["session"] == server["session"] and len(edge["session"]) == 32
    prompt_tokens = str(answer.usage.prompt_tokens)  # type: ignore[union-attr]
    for side in (edge, server):
        assert side["prompt_tokens"] == prompt_tokens
        assert side["completion_tokens"] == str(MAX_TOKENS)
        assert side["finish_reason"] == "length" and side["error"] == "-"
        assert int(side["rounds"]) >= 1 and float(side["seconds"]) > 0
    assert edge["outcome"] == "finished"
    for record in caplog.records:
        logged = record.getMessage() + (record.exc_text or "")
        assert "swordfish" not in logged and completion[:8] not in logged


def test_concurrent_requests_all_complete(stack: Stack) -> None:
    prompts = [[i, i + 1, i + 2] for i in range(20, 26)]

    def complete(prompt: list[int]) -> str:
        answer = stack.client.completions.create(
            model="m", prompt=prompt, temperature=0, max_tokens=20
        )
        return answer.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(complete, prompts))
    assert texts == [stack.expected_text(prompt, 20) for prompt in prompts]


def test_client_disconnect_cancels_the_server_session() -> None:
    """Through a delayed link the generation takes seconds; the client leaves after the first
    tokens, and the edge cancels its stream so the server frees the session."""
    target = tiny_model(TARGET_SEED, char_tokenizer=True)
    server = start_server(target)
    proxy = DelayProxy("127.0.0.1", server.port, rtt_ms=20).start()
    edge = BackgroundEdge(edge_config(proxy.port), tiny_model(12, char_tokenizer=True)).start()
    try:
        request = {"prompt": [1, 2, 3], "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{edge.url}/v1/completions", json=request) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first.removeprefix("data: "))["choices"]
            assert metric(server.metrics_port, "specedge_server_active_sessions") == 1
        wait_for(lambda: metric(server.metrics_port, "specedge_server_active_sessions") == 0)
        wait_for(lambda: edge.runtime.active_sessions == 0)
    finally:
        edge.stop()
        proxy.stop()
        server.stop()


def test_dead_server_means_503_quickly_then_recovery() -> None:
    target = tiny_model(TARGET_SEED, char_tokenizer=True)
    server = start_server(target)
    port = server.port
    edge = BackgroundEdge(edge_config(server), tiny_model(12, char_tokenizer=True)).start()
    request = {"prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0}
    try:
        assert httpx.post(f"{edge.url}/v1/completions", json=request).status_code == 200
        server.stop()
        for stream in (False, True):
            started = time.monotonic()
            response = httpx.post(
                f"{edge.url}/v1/completions", json=request | {"stream": stream}, timeout=10
            )
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert "unavailable" in response.json()["error"]["message"]
            assert time.monotonic() - started < 3.0
        assert httpx.get(f"{edge.url}/health").json()["server_connected"] is False
        server = start_server(target, port=port)
        answer = httpx.post(f"{edge.url}/v1/completions", json=request).json()
        assert answer["choices"][0]["text"] == target.tokenizer.decode(
            reference_tokens(target, [1, 2, 3], 5)
        )
    finally:
        edge.stop()
        server.stop()


def test_readiness_line_is_logged_once_serving(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="specedge")
    config = edge_config(stack.server, served_model_name="my-edge")
    edge = BackgroundEdge(config, tiny_model(12, char_tokenizer=True)).start()
    try:
        lines = [
            r.getMessage() for r in caplog.records if r.getMessage().startswith("edge serving")
        ]
        assert lines == [f"edge serving my-edge at {edge.url}"]
        assert httpx.get(f"{edge.url}/v1/models").json()["data"][0]["id"] == "my-edge"
    finally:
        edge.stop()


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "stopped"),
    [
        (["hel", "lo wor", "ld"], ["wor"], "hello ", True),
        (["ab", "c"], ["bcd"], "abc", False),  # a partial match is released at the end
        (["a", "b", "c", "d", "e"], ["cd", "b"], "a", True),  # the earliest match wins
        (["xyz"], [], "xyz", False),
    ],
)
def test_stop_matcher(pieces: list[str], stops: list[str], expected: str, stopped: bool) -> None:
    matcher = StopMatcher(stops)
    out, matched = "", False
    for piece in pieces:
        text, matched = matcher.feed(piece)
        out += text
        if matched:
            break
    if not matched:
        out += matcher.flush()
    assert (out, matched) == (expected, stopped)
