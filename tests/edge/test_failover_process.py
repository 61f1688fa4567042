"""Failover against real `specedge serve` processes killed with SIGKILL, driven through the
edge's OpenAI API by the `openai` client: a stream whose server is killed after its first
chunk completes on the next listed server with the greedy reference text and full usage; then,
with the last server killed, a stream ends in a clean error event within the failover
timeout. A lone server SIGKILLed and restarted on its port within the failover timeout
continues the stream just as well."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.edge.app import BackgroundEdge
from specedge.model.loader import LoadedModel, load_model
from tests.support.models import TARGET_SEED, random_hf_model, tiny_hf_config, word_tokenizer
from tests.support.observe import metric
from tests.support.serve_process import Serve
from tests.support.servers import edge_config

PROMPT = [5, 9, 2, 6, 5, 3]
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-target")
    random_hf_model(tiny_hf_config(), TARGET_SEED).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def target(model_dir: Path) -> LoadedModel:
    import torch

    return load_model(str(model_dir), "cpu", torch.float32)


@pytest.fixture
def servers(model_dir: Path) -> Iterator[list[Serve]]:
    """Two `specedge serve` processes, killed at the end if a test left them running."""
    started = [Serve(model_dir), Serve(model_dir)]
    yield started
    for server in started:
        server.kill()


def stream(edge: BackgroundEdge, fault: Callable[[], None]) -> tuple[str, int]:
    """One greedy streamed completion; `fault` runs after the first chunk. Returns (text,
    usage's completion tokens)."""
    client = openai.OpenAI(base_url=f"{edge.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    chunks = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    text: list[str] = []
    completion_tokens = 0
    for chunk in chunks:
        if chunk.choices:
            text.append(chunk.choices[0].text)
        if chunk.usage is not None:
            completion_tokens = chunk.usage.completion_tokens
        if len(text) == 1:
            fault()
    return "".join(text), completion_tokens


def reference(target: LoadedModel) -> list[int]:
    generator = LocalGenerator(target, max_context=512)
    expected = generator.generate(PROMPT, SamplingParams(), MAX_TOKENS, target.stop_token_ids)
    return list(expected.token_ids)


def test_sigkilled_server_fails_over_then_none_left_is_a_clean_error(
    servers: list[Serve], target: LoadedModel, model_dir: Path
) -> None:
    expected = reference(target)
    first, second = servers
    ports = [first.port, second.port]
    edge = BackgroundEdge(edge_config(ports, model=str(model_dir)), target).start()
    try:
        text, completion_tokens = stream(edge, fault=first.kill)
    finally:
        edge.stop()
    assert text == target.tokenizer.decode(expected)
    assert completion_tokens == len(expected)
    assert metric(second.metrics_port, "specedge_server_emitted_tokens_total") > 0

    # The last server killed too: nothing to fail over to within the timeout.
    config = edge_config(ports, model=str(model_dir), failover_timeout=0.5)
    edge = BackgroundEdge(config, target).start()
    started = time.monotonic()
    try:
        with pytest.raises(openai.APIError, match="failover timeout of 0.5 s"):
            stream(edge, fault=second.kill)
    finally:
        edge.stop()
    assert time.monotonic() - started < 10.0


def test_the_only_server_sigkilled_and_restarted_within_the_timeout_continues_the_stream(
    servers: list[Serve], target: LoadedModel, model_dir: Path
) -> None:
    expected = reference(target)
    only = servers[0]
    restarted: list[Serve] = []

    def restart() -> None:
        only.kill()  # SIGKILL
        restarted.append(Serve(model_dir, port=only.port))  # returns once it serves

    # The restart (a new process loading the model) must fit in the failover timeout.
    config = edge_config([only.port], model=str(model_dir), failover_timeout=60.0)
    edge = BackgroundEdge(config, target).start()
    try:
        text, completion_tokens = stream(edge, fault=restart)
        emitted_after_restart = metric(
            restarted[0].metrics_port, "specedge_server_emitted_tokens_total"
        )
    finally:
        edge.stop()
        for server in restarted:
            server.kill()
    assert text == target.tokenizer.decode(expected)
    assert completion_tokens == len(expected)
    assert emitted_after_restart > 0
