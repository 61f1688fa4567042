"""Benchmark clients against a fake OpenAI-compatible streaming API (a real HTTP server)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from specedge.bench.client import RequestSettings, run_clients
from specedge.bench.prompts import BenchPrompt
from specedge.bench.wan import DelayProxy
from tests.support.fake_openai import CHUNK_DELAY_S, CHUNKS, running_fake_api


@pytest.fixture(scope="module")
def api_url() -> Iterator[str]:
    with running_fake_api() as url:
        yield url


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
    records = asyncio.run(run_clients([api_url] * 2, PROMPTS, settings, num_requests=5))
    assert sorted(r.prompt_id for r in records) == ["0", "0", "1", "1", "2"]


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
