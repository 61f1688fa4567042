"""Benchmark clients: N concurrent users of an OpenAI-compatible API, streaming.

Each client sends one chat completion at a time (`stream: true` with usage) to its own base
URL (its edge, or the shared server) and takes the next prompt from a shared queue when its
answer is complete. A request's record holds the client-side arrival time of every chunk that
carried text, on the one monotonic clock of this process, plus the `usage.speculative`
counters the API reported. A request that fails is recorded with its error, never retried.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from specedge.bench.metrics import RequestRecord
from specedge.bench.prompts import BenchPrompt

CHAT_PATH = "/v1/chat/completions"
MODEL_PLACEHOLDER = "specedge-bench"  # the APIs accept any model name for their one model
ERROR_BODY_CHARS = 300


@dataclass(frozen=True)
class RequestSettings:
    max_tokens: int
    temperature: float
    seed: int | None = None  # per-request seed = seed + the prompt's index in the run
    timeout_s: float = 600.0


def _body(prompt: BenchPrompt, settings: RequestSettings, index: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_PLACEHOLDER,
        "messages": [{"role": "user", "content": prompt.text}],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.seed is not None:
        body["seed"] = settings.seed + index
    return body


async def stream_request(
    http: httpx.AsyncClient,
    base_url: str,
    prompt: BenchPrompt,
    settings: RequestSettings,
    *,
    client: int,
    index: int,
) -> RequestRecord:
    """Send one streaming chat completion and record what arrived when."""
    start = time.perf_counter()
    chunk_times: list[float] = []
    usage: dict[str, Any] = {}
    finish_reason: str | None = None
    error: str | None = None
    try:
        body = _body(prompt, settings, index)
        async with http.stream("POST", base_url + CHAT_PATH, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                error = f"HTTP {response.status_code}: {text[:ERROR_BODY_CHARS]}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    for choice in chunk.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            chunk_times.append(time.perf_counter())
                        finish_reason = choice.get("finish_reason") or finish_reason
                    usage = chunk.get("usage") or usage
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:ERROR_BODY_CHARS]
    end = chunk_times[-1] if chunk_times else time.perf_counter()
    if error is None and not usage:
        error = "the stream ended without usage (stream_options.include_usage ignored?)"
    return _record(prompt, client, start, end, chunk_times, usage, finish_reason, error)


def _record(
    prompt: BenchPrompt,
    client: int,
    start: float,
    end: float,
    chunk_times: list[float],
    usage: dict[str, Any],
    finish_reason: str | None,
    error: str | None,
) -> RequestRecord:
    speculative = usage.get("speculative") or {}
    rounds = int(speculative.get("rounds") or 0)
    emitted = float(speculative.get("tokens_per_round") or 0.0) * rounds
    accepted = round(float(speculative.get("acceptance_rate") or 0.0) * emitted)
    predicted_rounds = int(speculative.get("predicted_rounds") or 0)
    predicted = float(speculative.get("predicted_tokens_per_round") or 0.0) * predicted_rounds
    return RequestRecord(
        client=client,
        prompt_id=prompt.prompt_id,
        category=prompt.category,
        start_s=start,
        first_token_s=chunk_times[0] if chunk_times else None,
        end_s=end,
        tokens=int(usage.get("completion_tokens") or 0),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        rounds=rounds,
        accepted=accepted,
        proactive_hits=int(speculative.get("proactive_hits") or 0),
        proactive_attempts=int(speculative.get("proactive_attempts") or 0),
        finish_reason=finish_reason,
        predicted_rounds=predicted_rounds,
        predicted_tokens=predicted,
        predicted_round_tokens=int(speculative.get("predicted_round_tokens") or 0),
        streamed_rounds=int(speculative.get("streamed_rounds") or 0),
        drafted_nodes=int(speculative.get("drafted_nodes") or 0),
        verified_nodes=int(speculative.get("verified_nodes") or 0),
        cut_rounds=int(speculative.get("cut_rounds") or 0),
        error=error,
        chunk_times_s=tuple(chunk_times),
    )


async def run_clients(
    base_urls: Sequence[str],
    prompts: Sequence[BenchPrompt],
    settings: RequestSettings,
    on_done: Callable[[RequestRecord], None] | None = None,
    num_requests: int | None = None,
) -> list[RequestRecord]:
    """One client per base URL, all at once, sharing the prompt queue of `num_requests`
    requests (default: every prompt once, and at least one per client), cycling through the
    prompts."""
    total = num_requests or max(len(prompts), len(base_urls))
    queue: asyncio.Queue[tuple[int, BenchPrompt]] = asyncio.Queue()
    for index in range(total):
        queue.put_nowait((index, prompts[index % len(prompts)]))
    records: list[RequestRecord] = []
    timeout = httpx.Timeout(settings.timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=len(base_urls) + 4)

    async def client(number: int, base_url: str, http: httpx.AsyncClient) -> None:
        while not queue.empty():
            index, prompt = queue.get_nowait()
            record = await stream_request(
                http, base_url, prompt, settings, client=number, index=index
            )
            records.append(record)
            if on_done:
                on_done(record)

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        await asyncio.gather(*(client(i, url, http) for i, url in enumerate(base_urls)))
    return records
