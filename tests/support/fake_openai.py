"""A fake OpenAI-compatible streaming API with a Prometheus busy counter, on a real port.

Each chat completion streams CHUNKS chunks of TOKENS_PER_CHUNK tokens (one per "round"),
CHUNK_DELAY_S apart, then usage with `usage.speculative`; a prompt saying 'bad' gets a 400.
`/metrics` exports `specedge_server_busy_seconds_total`, which grows by BUSY_PER_REQUEST_S per
completed request, and the verification counters, which grow by CHUNKS batches of BATCH_SIZE
sequences of two rows, BATCH_SECONDS each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

CHUNK_DELAY_S = 0.02
TOKENS_PER_CHUNK = 3
CHUNKS = 4
BUSY_PER_REQUEST_S = 0.05
BATCH_SIZE = 1.5  # sequences per batch, each of two rows
BATCH_SECONDS = 0.01


def fake_api() -> FastAPI:
    app = FastAPI()
    busy = {"seconds": 0.0, "batches": 0.0}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        batches = busy["batches"]
        return PlainTextResponse(
            f"specedge_server_busy_seconds_total {busy['seconds']}\n"
            f"specedge_server_verify_batch_size_count {batches}\n"
            f"specedge_server_verify_batch_size_sum {batches * BATCH_SIZE}\n"
            f"specedge_server_verify_rows_total {batches * BATCH_SIZE * 2}\n"
            f"specedge_server_verify_seconds_sum {batches * BATCH_SECONDS}\n"
        )

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
            busy["seconds"] += BUSY_PER_REQUEST_S
            busy["batches"] += CHUNKS
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@contextlib.contextmanager
def running_fake_api() -> Iterator[str]:
    """Serve a fresh fake API on a free port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(fake_api(), port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
