"""The server's own OpenAI-compatible API (`specedge serve --api-port`), driven over loopback
by the `openai` package and httpx: server-side speculative decoding (`--draft`) and server-side
autoregressive decoding both equal the local autoregressive target output at temperature 0;
streaming agrees with non-streaming; concurrent requests, and an edge session over real gRPC at
the same time, are all correct and batched together; bad requests get OpenAI's error JSON;
draft time counts as server busy time; a client that leaves frees its session; the draft must
share the target's tokenizer; the flags the benchmark passes parse."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from specedge import cli
from specedge.errors import SpecEdgeError, TokenizerMismatchError
from specedge.model.loader import LoadedModel
from specedge.rpc.codec import CloseSession, SessionOpened, VerifierClient
from specedge.server.app import BackgroundServer
from specedge.server.config import ConfigError, ServerConfig, load_server_config
from specedge.server.metrics import ServerMetrics
from tests.support.models import TARGET_SEED, tiny_model
from tests.support.observe import metric, wait_for
from tests.support.reference import reference_tokens
from tests.support.scripted_edge import channel, open_message, run_session
from tests.support.servers import SERVER_CONFIG
from tests.support.trees import oracle_tree

MAX_TOKENS = 24
PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7], [2, 7, 1, 8], [31, 41], [59, 26, 53]]
# Server-side tree shape: within the harness's caps (16 nodes, depth 6).
SHAPE = {"budget": 12, "depth": 4, "width": 3, "beams": 3}


def start_api_server(draft: LoadedModel | None, **overrides: Any) -> BackgroundServer:
    """The harness's small server with its HTTP API on a free port (drafting with `draft`)."""
    draft_name = None if draft is None else draft.name
    settings = {"api_port": 0, "draft": draft_name, **SHAPE} | overrides
    config = replace(SERVER_CONFIG, **settings)
    target = tiny_model(TARGET_SEED, char_tokenizer=True)
    return BackgroundServer(config.validate(), target, draft).start()


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model(TARGET_SEED, char_tokenizer=True)


@pytest.fixture(scope="module")
def spec_server() -> Iterator[BackgroundServer]:
    """Server-side speculative decoding with a draft that disagrees with the target; room for
    every API request and an edge session at once."""
    server = start_api_server(tiny_model(12, char_tokenizer=True), max_sessions=len(PROMPTS) + 2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ar_server() -> Iterator[BackgroundServer]:
    server = start_api_server(None)
    yield server
    server.stop()


def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.api_port}/v1", api_key="unused", max_retries=0
    )


def expected_text(target: LoadedModel, prompt: Sequence[int], max_tokens: int = MAX_TOKENS) -> str:
    return str(target.tokenizer.decode(reference_tokens(target, prompt, max_tokens)))


def complete(server: BackgroundServer, prompt: list[int], **kwargs: Any) -> Any:
    settings = {"model": "m", "prompt": prompt, "temperature": 0, "max_tokens": MAX_TOKENS}
    return client(server).completions.create(**(settings | kwargs))


# ---- output ------------------------------------------------------------------------------------
def test_spec_and_ar_equal_the_local_autoregressive_target(
    target: LoadedModel, spec_server: BackgroundServer, ar_server: BackgroundServer
) -> None:
    for prompt in PROMPTS[:2]:
        expected = expected_text(target, prompt)
        spec = complete(spec_server, prompt)
        ar = complete(ar_server, prompt)
        assert spec.choices[0].text == expected == ar.choices[0].text
        assert spec.choices[0].finish_reason == ar.choices[0].finish_reason == "length"
        assert spec.usage.completion_tokens == ar.usage.completion_tokens == MAX_TOKENS
    spec_stats = spec.usage.model_extra["speculative"]
    ar_stats = ar.usage.model_extra["speculative"]
    assert ar_stats["rounds"] == MAX_TOKENS and ar_stats["acceptance_rate"] == 0.0
    assert ar_stats["tokens_per_round"] == 1.0
    assert 1 <= spec_stats["rounds"] <= MAX_TOKENS
    for stats in (spec_stats, ar_stats):
        assert stats["proactive_hits"] == stats["proactive_attempts"] == 0
        assert stats["ttft_ms"] > 0


def test_a_draft_that_agrees_is_accepted() -> None:
    """With the target's own weights as the draft, whole trees are accepted."""
    target = tiny_model(TARGET_SEED, char_tokenizer=True)
    # Every node verified: the goodput selection's cut depends on measured times.
    server = start_api_server(tiny_model(TARGET_SEED, char_tokenizer=True), verify="all")
    try:
        answer = complete(server, PROMPTS[0])
        assert answer.choices[0].text == expected_text(target, PROMPTS[0])
        stats = answer.usage.model_extra["speculative"]
        assert stats["acceptance_rate"] > 0.5 and stats["tokens_per_round"] > 2.0
    finally:
        server.stop()


def test_streaming_agrees_with_non_streaming(spec_server: BackgroundServer) -> None:
    openai_client = client(spec_server)
    messages = [{"role": "user", "content": "Say something."}]
    settings: dict[str, Any] = {"model": "m", "messages": messages, "temperature": 0}
    full = openai_client.chat.completions.create(max_tokens=MAX_TOKENS, **settings)
    assert full.object == "chat.completion" and full.choices[0].finish_reason == "length"
    chunks = list(
        openai_client.chat.completions.create(
            max_completion_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            **settings,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert chunks[-1].usage.model_extra["speculative"]["rounds"] >= 1

    stream = complete(spec_server, PROMPTS[1], stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == (
        complete(spec_server, PROMPTS[1]).choices[0].text
    )


# ---- concurrency -------------------------------------------------------------------------------
def test_concurrent_api_requests_and_an_edge_session_are_all_correct(
    target: LoadedModel, spec_server: BackgroundServer
) -> None:
    """API sessions (server-side drafting) and an edge's session over real gRPC at once, all
    verified by the same executor in shared batches."""
    port = spec_server.metrics_port
    batches_before = metric(port, "specedge_server_verify_batch_size_count")
    trees_before = metric(port, "specedge_server_verify_batch_size_sum")
    finished_before = metric(port, "specedge_server_sessions_total", {"outcome": "finished"})
    edge_prompt = [7, 7, 7, 1]
    edge_reference = reference_tokens(target, edge_prompt, 30)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = pool.map(lambda p: complete(spec_server, p).choices[0].text, PROMPTS)
        edge = asyncio.run(
            run_session(
                spec_server.port,
                open_message(target, edge_prompt, 30),
                oracle_tree(edge_reference, hits=3),
            )
        )
        texts = list(answers)
    assert texts == [expected_text(target, prompt) for prompt in PROMPTS]
    assert edge.tokens == edge_reference and edge.finish_reason == "length"
    finished = metric(port, "specedge_server_sessions_total", {"outcome": "finished"})
    assert finished - finished_before == len(PROMPTS) + 1
    trees = metric(port, "specedge_server_verify_batch_size_sum") - trees_before
    batches = metric(port, "specedge_server_verify_batch_size_count") - batches_before
    assert trees > batches  # some batches held several sessions' trees


def test_host_cpu_is_the_process_outside_its_model_thread(
    spec_server: BackgroundServer,
) -> None:
    """On /metrics, and counting none of the model thread's CPU: a thread that burns 0.3 s of
    CPU counts as host CPU until it is watched as the model thread."""
    port = spec_server.metrics_port
    before = metric(port, "specedge_server_host_cpu_seconds")
    complete(spec_server, PROMPTS[0])
    assert metric(port, "specedge_server_host_cpu_seconds") > before  # the HTTP API's work

    def burn() -> None:
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass

    metrics = ServerMetrics()
    metrics.watch_model_thread(threading.get_ident())  # this thread: the burner is host CPU

    def host_cpu() -> float:
        return metrics.registry.get_sample_value("specedge_server_host_cpu_seconds") or 0.0

    for watched in (False, True):
        thread = threading.Thread(target=burn)
        thread.start()
        if watched:
            metrics.watch_model_thread(thread.ident or 0)
        start = host_cpu()
        thread.join()
        host = host_cpu() - start
        assert (host < 0.15) if watched else (host > 0.25)


def test_draft_time_is_server_busy_time(spec_server: BackgroundServer) -> None:
    port = spec_server.metrics_port
    busy_before = metric(port, "specedge_server_busy_seconds_total")
    draft_before = metric(port, "specedge_server_draft_seconds_total")
    ttfts_before = metric(port, "specedge_server_api_ttft_seconds_count")
    complete(spec_server, PROMPTS[2])
    drafting = metric(port, "specedge_server_draft_seconds_total") - draft_before
    busy = metric(port, "specedge_server_busy_seconds_total") - busy_before
    assert 0.0 < drafting < busy
    requests = metric(
        port, "specedge_server_api_requests_total", {"endpoint": "completions", "outcome": "200"}
    )
    assert requests >= 1
    assert metric(port, "specedge_server_api_ttft_seconds_count") == ttfts_before + 1
    # Every batch updates the fitted cost model of a verification forward, on /metrics.
    terms = {
        term: metric(port, "specedge_server_batch_cost_seconds", {"term": term})
        for term in ("fixed", "per_sequence", "per_row")
    }
    assert min(terms.values()) >= 0.0 and terms["fixed"] + terms["per_row"] > 0.0
    mean_verify = metric(port, "specedge_server_verify_seconds_sum") / metric(
        port, "specedge_server_verify_seconds_count"
    )
    assert 0.0 < terms["fixed"] + terms["per_sequence"] + terms["per_row"] < 20 * mean_verify


def test_a_client_that_leaves_frees_its_session(ar_server: BackgroundServer) -> None:
    port = ar_server.metrics_port
    request = {"prompt": [1, 2, 3], "max_tokens": 200, "temperature": 0, "stream": True}
    url = f"http://127.0.0.1:{ar_server.api_port}/v1/completions"
    with httpx.stream("POST", url, json=request) as response:
        next(line for line in response.iter_lines() if line.startswith("data: "))
    wait_for(lambda: metric(port, "specedge_server_active_sessions") == 0)
    health = httpx.get(f"http://127.0.0.1:{ar_server.api_port}/health").json()
    assert health["active_sessions"] == 0 and health["decoding"] == "autoregressive"


def test_a_request_waits_for_a_slot_an_edge_holds(target: LoadedModel) -> None:
    """With the one KV slot held by an edge session, an API request waits for it instead of
    failing, and completes once the edge leaves."""
    server = start_api_server(None, max_sessions=1)

    async def body() -> str:
        async with channel(server.port) as chan:
            call = VerifierClient(chan).session()
            await call.send(open_message(target, [4, 4], 8))
            assert isinstance(await call.receive(), SessionOpened)
            request = asyncio.create_task(asyncio.to_thread(complete, server, PROMPTS[0]))
            await asyncio.sleep(0.5)
            assert not request.done()
            await call.send(CloseSession())
            await call.done_writing()
            answer = await request
        return str(answer.choices[0].text)

    try:
        assert asyncio.run(body()) == expected_text(target, PROMPTS[0])
    finally:
        server.stop()


def test_stopping_ends_a_running_stream_with_an_error_event() -> None:
    """Past the drain's grace, a stream still running gets OpenAI's error JSON in-band and
    ends, instead of a dropped connection; new requests are refused meanwhile."""
    server = start_api_server(None)
    url = f"http://127.0.0.1:{server.api_port}/v1/completions"
    request = {"prompt": [1, 2, 3], "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.stream("POST", url, json=request, timeout=10) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(next(lines).removeprefix("data: "))["choices"]
        server.stop(grace=0.0)
        events = [line.removeprefix("data: ") for line in lines]
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and "shutting down" in error["message"]
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, json=request)


# ---- the HTTP surface ----------------------------------------------------------------------------
def test_models_health_and_metrics_on_the_api_port(spec_server: BackgroundServer) -> None:
    base = f"http://127.0.0.1:{spec_server.api_port}"
    assert [model.id for model in client(spec_server).models.list().data] == ["tiny-11"]
    health = httpx.get(f"{base}/health")
    assert health.status_code == 200
    assert health.json() | {"active_sessions": 0} == {
        "status": "ok",
        "model": "tiny-11",
        "decoding": "speculative",
        "active_sessions": 0,
        "max_sessions": len(PROMPTS) + 2,
    }
    assert "specedge_server_busy_seconds_total" in httpx.get(f"{base}/metrics").text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [1, 999]}, "prompt"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"n": 2}, "n"),
        ({"functions": []}, "functions"),
    ],
)
def test_invalid_parameters_get_openai_errors(
    spec_server: BackgroundServer, body: dict[str, Any], param: str
) -> None:
    request = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4} | body
    url = f"http://127.0.0.1:{spec_server.api_port}/v1/completions"
    response = httpx.post(url, json=request)
    error = response.json()["error"]
    assert (response.status_code, error["type"], error["param"]) == (
        400,
        "invalid_request_error",
        param,
    )
    assert error["message"]


def test_a_prompt_longer_than_the_context_is_a_400(spec_server: BackgroundServer) -> None:
    url = f"http://127.0.0.1:{spec_server.api_port}/v1/completions"
    response = httpx.post(url, json={"prompt": [1] * 300, "max_tokens": 4})
    assert response.status_code == 400
    assert "this server's context limit is 256" in response.json()["error"]["message"]


# ---- start-up ------------------------------------------------------------------------------------
def test_the_draft_must_share_the_targets_tokenizer() -> None:
    with pytest.raises(TokenizerMismatchError, match="do not share a tokenizer"):
        start_api_server(tiny_model(12, vocab=128, char_tokenizer=True))


def test_a_taken_api_port_fails_at_once(ar_server: BackgroundServer) -> None:
    with pytest.raises(SpecEdgeError, match="pick another --api-port"):
        start_api_server(None, api_port=ar_server.api_port)


def test_the_benchmarks_serve_flags_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench/systems.py` starts server-spec with these flags."""
    configs: list[ServerConfig] = []
    monkeypatch.setattr("specedge.server.app.run_server", configs.append)
    args = ["serve", "--model", "t", "--port", "0", "--metrics-port", "0",
            "--max-tree-nodes", "64", "--max-tree-depth", "16", "--api-port", "0",
            "--draft", "d", "--budget", "24", "--depth", "5",
            "--width", "2", "--beams", "4"]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    (config,) = configs
    assert (config.api_port, config.draft) == (0, "d")
    assert (config.budget, config.depth, config.width, config.beams) == ("24", 5, 2, 4)


def test_config_file_keys(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text("model: t\napi-port: 8080\ndraft: d\nbudget: 16\n")
    config = load_server_config(path)
    assert (config.api_port, config.draft, config.budget, config.depth) == (8080, "d", "16", 6)
    assert config.tree_shape.budget == 16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"draft": "d"}, "--draft drafts for the server's own HTTP API; add --api-port"),
        ({"draft": "", "api_port": 0}, "--draft .* is empty"),
        ({"api_port": 70000}, "--api-port .* must be a port"),
        ({"api_port": 9000, "port": 9000}, "--port and --api-port are both 9000"),
        ({"api_port": 9400}, "--metrics-port and --api-port are both 9400"),
        ({"api_port": 0, "draft": "d", "budget": 65}, "--budget .* exceeds --max-tree-nodes"),
        ({"api_port": 0, "draft": "d", "depth": 17}, "--depth .* exceeds --max-tree-depth"),
        ({"beams": 0}, "--beams .* must be >= 1"),
    ],
)
def test_invalid_api_settings_say_what_to_fix(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server_config(overrides={"model": "m", **overrides})
