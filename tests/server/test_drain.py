"""The SIGTERM drain of a real `specedge serve` process (a tiny random model saved to disk, the
HTTP API on): a stream in flight completes with the greedy reference tokens while /health says
503 "draining", gRPC health NOT_SERVING, a new API request gets 503 with Retry-After and a new
gRPC session UNAVAILABLE; the process exits 0. With a drain timeout shorter than the stream,
the stream is cut with a clean in-band error and the process still exits 0."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.model.loader import LoadedModel, load_model
from specedge.rpc.codec import health_status
from tests.support.models import TARGET_SEED, random_hf_model, tiny_hf_config, word_tokenizer
from tests.support.observe import http_get, wait_for
from tests.support.scripted_edge import channel, open_message, run, run_session
from tests.support.serve_process import MAX_CONTEXT, Serve
from tests.support.trees import empty_tree

PROMPT = [5, 9, 2, 6, 5, 3]
MAX_TOKENS = 400  # long enough to still be streaming while the test looks at the drain
LONG_MAX_TOKENS = 4000  # far more than a drain timeout of 0 lets run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-target")
    # Long enough for LONG_MAX_TOKENS (the tiny config caps the context at 512).
    config = tiny_hf_config(max_position_embeddings=LONG_MAX_TOKENS + 64)
    random_hf_model(config, TARGET_SEED).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    # No stop token: a stream ends by its length or by the drain, never because the random
    # model happened to draw <eos> (at token 532 of the long stream, before a slow cut).
    for name in ("generation_config.json", "config.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists():
            settings = json.loads(path.read_text())
            settings.pop("eos_token_id", None)
            settings.pop("eos_token", None)
            path.write_text(json.dumps(settings))
    return folder


@pytest.fixture(scope="module")
def target(model_dir: Path) -> LoadedModel:
    import torch

    loaded = load_model(str(model_dir), "cpu", torch.float32)
    assert loaded.stop_token_ids == ()  # see model_dir
    return loaded


@pytest.fixture
def serve(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[type[Serve]]:
    started: list[Serve] = []

    class Started(Serve):
        def __init__(self, *flags: str) -> None:  # type: ignore[override]
            super().__init__(model_dir, *flags)
            started.append(self)

    yield Started
    for server in started:
        server.kill()


def stream_events(response: httpx.Response) -> Iterator[dict[str, object]]:
    """The JSON events of an SSE stream, up to `data: [DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        yield json.loads(data)


def completion(max_tokens: int) -> dict[str, object]:
    return {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}  # fmt: skip


def test_sigterm_drain_completes_the_stream_and_refuses_new_work(
    serve: type[Serve], target: LoadedModel
) -> None:
    generator = LocalGenerator(target, max_context=MAX_CONTEXT)
    stops = target.stop_token_ids
    expected = generator.generate(PROMPT, SamplingParams(), MAX_TOKENS, stops).token_ids
    assert len(expected) == MAX_TOKENS  # no early stop: the stream outlasts the checks
    server = serve("--drain-timeout", "20")
    text: list[str] = []
    request = completion(MAX_TOKENS)
    with (
        httpx.Client(base_url=server.api_url, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=request) as response,
    ):
        assert response.status_code == 200
        events = stream_events(response)
        for event in events:
            text.append(event["choices"][0]["text"])  # type: ignore[index]
            if len(text) >= 3:
                break
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: http_get(server.metrics_port, "/health")[0] == 503)
        status, body = http_get(server.metrics_port, "/health")
        assert (status, json.loads(body)["status"]) == (503, "draining")
        api_health = client.get("/health")
        assert (api_health.status_code, api_health.json()["status"]) == (503, "draining")
        refused = client.post("/v1/completions", json=completion(4) | {"stream": False})
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        assert "draining" in refused.json()["error"]["message"]
        assert _grpc_refusal(server.port, target) == (grpc.StatusCode.UNAVAILABLE, True)
        assert _grpc_health(server.port) == "NOT_SERVING"
        for event in events:
            assert "error" not in event, event
            text.append(event["choices"][0]["text"])  # type: ignore[index]
    assert "".join(text) == target.tokenizer.decode(expected)
    assert server.exit_code() == 0, server.log
    assert "draining: 1 sessions in flight" in server.log and "drained" in server.log


def test_a_drain_timeout_shorter_than_the_stream_cuts_it_cleanly(
    serve: type[Serve], target: LoadedModel
) -> None:
    server = serve("--drain-timeout", "0", "--max-context", str(LONG_MAX_TOKENS + 64))
    events: list[dict[str, object]] = []
    request = completion(LONG_MAX_TOKENS)
    with (
        httpx.Client(base_url=server.api_url, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=request) as response,
    ):
        assert response.status_code == 200
        for event in stream_events(response):
            events.append(event)
            if len(events) == 1:
                server.process.send_signal(signal.SIGTERM)
    assert len(events) < LONG_MAX_TOKENS and "error" in events[-1], (
        len(events),
        events[-1].get("choices"),
    )
    assert server.exit_code() == 0, server.log
    assert "drain ended with 1 sessions left" in server.log


def _grpc_refusal(port: int, target: LoadedModel) -> tuple[grpc.StatusCode, bool]:
    message = open_message(target, PROMPT, 4, stop_token_ids=target.stop_token_ids)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        run(run_session(port, message, empty_tree))
    details = refused.value.details() or ""
    return refused.value.code(), "open the session on another server" in details


def _grpc_health(port: int) -> str:
    async def check() -> str:
        async with channel(port) as grpc_channel:
            return await health_status(grpc_channel, timeout=5)

    return str(run(check()))
