"""Benchmark clients against a fake OpenAI-compatible streaming API (a real HTTP server)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from specedge.bench.client import RequestSettings, run_clients
from specedge.bench.prompts import BenchPrompt
from specedge.bench.wan import DelayProxy

CHUNK_DELAY_S = 0.02
TOKENS_PER_CHUNK = 3
CHUNKS = 4


def _fake_api() -> FastAPI:
    """Streams CHUNKS chunks of TOKENS_PER_CHUNK tokens (one per round), then usage; answers
    400 for a prompt saying 'bad'."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # type: ignore[no-untyped-def]
        body = await request.json()
        if body["messages"][0]["content"] == "bad":
            return JSONResponse({"error": {"message": "bad prompt"}}, status_code=400)
        assert body["stream"] and body["stream_options"] == {"include_usage": True}

        async def events() -> AsyncIterator[str]:
            for _ in range(CHUNKS):
                await asyncio.sleep(CHUNK_DELAY_S)
                delta = {"choices": [{"index": 0, "delta": {"content": "abc"}}]}
                yield f"data: {json.dumps(delta)}\n\n"
            yield 'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}\n\n'
            usage = {
                "prompt_tokens": 7,
                "completion_tokens": CHUNKS * TOKENS_PER_CHUNK,
                "speculative": {
                    "rounds": CHUNKS,
                    "tokens_per_round": TOKENS_PER_CHUNK,
                    "acceptance_rate": 2 / 3,
                    "proactive_hits": 1,
                    "proactive_attempts": 3,
                },
            }
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    server = uvicorn.Server(uvicorn.Config(_fake_api(), port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


PROMPTS = [BenchPrompt(str(i), "qa", f"question {i}") for i in range(3)]


def test_clients_share_the_prompts_and_record_every_chunk(api_url: str) -> None:
    settings = RequestSettings(max_tokens=12, temperature=0.0)
    done = []
    records = asyncio.run(run_clients([api_url, api_url], PROMPTS, settings, done.append))
    assert len(records) == len(done) == 3
    assert sorted(r.prompt_id for r in records) == ["0", "1", "2"]
    assert {r.client for r in records} == {0, 1}
    for record in records:
        assert record.ok and record.finish_reason == "length"
        assert record.tokens == 12 and record.prompt_tokens == 7
        assert (record.rounds, record.accepted) == (4, 8)
        assert (record.proactive_hits, record.proactive_attempts) == (1, 3)
        assert len(record.chunk_times_s) == CHUNKS
        assert record.first_token_s == record.chunk_times_s[0]
        assert record.end_s == record.chunk_times_s[-1]
        ttft = record.ttft_s()
        assert ttft is not None and ttft >= CHUNK_DELAY_S
        itl = record.itl_s()
        assert itl is not None and itl == pytest.approx(
            (record.end_s - record.chunk_times_s[0]) / 11
        )


def test_more_clients_than_prompts_repeat_them(api_url: str) -> None:
    settings = RequestSettings(max_tokens=12, temperature=0.7, seed=5)
    records = asyncio.run(run_clients([api_url] * 3, PROMPTS[:1], settings))
    assert len(records) == 3 and {r.client for r in records} == {0, 1, 2}


def test_errors_are_recorded_not_raised(api_url: str) -> None:
    bad = [BenchPrompt("x", "qa", "bad")]
    records = asyncio.run(run_clients([api_url], bad, RequestSettings(12, 0.0)))
    assert records[0].error is not None and records[0].error.startswith("HTTP 400")
    assert records[0].tokens == 0
    unreachable = asyncio.run(run_clients(["http://127.0.0.1:9"], bad, RequestSettings(12, 0.0)))
    assert unreachable[0].error is not None and "Connect" in unreachable[0].error


def test_rtt_through_the_proxy_shows_in_ttft(api_url: str) -> None:
    port = int(api_url.rsplit(":", 1)[1])
    proxy = DelayProxy("127.0.0.1", port, rtt_ms=100.0).start()
    try:
        settings = RequestSettings(max_tokens=12, temperature=0.0)
        records = asyncio.run(run_clients([f"http://{proxy.address}"], PROMPTS[:1], settings))
    finally:
        proxy.stop()
    ttft = records[0].ttft_s()
    assert ttft is not None and ttft >= 0.1 + CHUNK_DELAY_S
    assert proxy.counters.uplink_bytes > 0 and proxy.counters.downlink_bytes > 0
