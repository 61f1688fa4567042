"""`specedge demo`: a server and an edge on loopback, one streamed chat answer, round stats.

The demo drives the system only through its public interfaces: it starts `specedge serve` and
`specedge edge` as subprocesses with the benchmark's launcher (`bench.processes`, here
unpinned and with torch's own thread count), with the delaying proxy between them when
`--rtt-ms` > 0, sends the prompt to the edge's OpenAI-compatible API and streams the answer.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from specedge.bench.processes import ManagedProcess, free_port, managed, specedge_args
from specedge.bench.wan import DelayProxy
from specedge.errors import SpecEdgeError

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."
STARTUP_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class DemoConfig:
    target: str = "smollm2-135m"
    draft: str = "smollm2-135m-draft"
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 128
    temperature: float = 0.0
    rtt_ms: float = 0.0
    proactive: str = "keep-depth"
    dtype: str | None = None


def run_demo(config: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the demo; returns the final usage (with `usage.speculative`) for callers/tests."""
    console = console or Console()
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    dtype_args = ["--dtype", config.dtype] if config.dtype else []
    serve = specedge_args(
        "serve", "--model", config.target, "--port", str(grpc_port),
        "--metrics-port", str(metrics_port), "--max-sessions", "2", *dtype_args,
    )  # fmt: skip
    proxy = DelayProxy("127.0.0.1", grpc_port, rtt_ms=config.rtt_ms).start()
    edge = specedge_args(
        "edge", "--model", config.draft, "--server", proxy.address,
        "--port", str(http_port), "--proactive", config.proactive, *dtype_args,
    )  # fmt: skip
    try:
        # The processes stop before the proxy, so that no connection is cut under them.
        with (
            tempfile.TemporaryDirectory(prefix="specedge-demo-") as log_dir,
            managed([], failure_logs=sys.stderr) as processes,
        ):
            console.print(f"[bold]server[/] {config.target} on 127.0.0.1:{grpc_port}")
            _start(processes, "server", serve, Path(log_dir), f"127.0.0.1:{metrics_port}")
            console.print(
                f"[bold]edge[/] {config.draft} on http://127.0.0.1:{http_port} "
                f"(to the server through a {config.rtt_ms:g} ms RTT proxy)"
            )
            _start(processes, "edge", edge, Path(log_dir), f"127.0.0.1:{http_port}")
            usage, elapsed, ttft = _stream_answer(config, http_port, console)
    finally:
        proxy.stop()
    _print_table(console, usage, elapsed, ttft, proxy.counters.uplink_bytes)
    return usage


def _start(
    processes: list[ManagedProcess], name: str, args: list[str], log_dir: Path, health: str
) -> None:
    """Start `specedge ...` (unpinned, torch's own thread count) and wait for its /health."""
    process = ManagedProcess(name, args, log_dir / f"{name}.log", None, single_thread=False)
    processes.append(process)
    process.wait_healthy(f"http://{health}/health", STARTUP_TIMEOUT_S)


def _stream_answer(config: DemoConfig, port: int, console: Console) -> tuple[dict, float, float]:
    body = {
        "model": config.target,
        "messages": [{"role": "user", "content": config.prompt}],
        "max_tokens": config.max_tokens,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    console.print(f"\n[bold]user[/]: {config.prompt}\n[bold]assistant[/]: ", end="")
    usage: dict[str, Any] = {}
    start = time.perf_counter()
    first: float | None = None
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=120.0) as response:
        if response.status_code != 200:
            raise SpecEdgeError(f"edge answered {response.status_code}: {response.read()!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content") or ""
                if text:
                    first = first or time.perf_counter()
                    sys.stdout.write(text)
                    sys.stdout.flush()
            if chunk.get("usage"):
                usage = chunk["usage"]
    sys.stdout.write("\n\n")
    elapsed = time.perf_counter() - start
    return usage, elapsed, ((first or time.perf_counter()) - start)


def _print_table(console: Console, usage: dict, elapsed: float, ttft: float, uplink: int) -> None:
    spec = usage.get("speculative", {})
    tokens = int(usage.get("completion_tokens", 0))
    attempts = spec.get("proactive_attempts", 0)
    hit_rate = spec.get("proactive_hits", 0) / attempts if attempts else 0.0
    table = Table(title="SpecEdge demo", show_header=True)
    for column in ("tokens", "tokens/s", "TTFT", "tokens / round", "proactive hits",
                   "bytes sent / token"):  # fmt: skip
        table.add_column(column, justify="right")
    table.add_row(
        str(tokens),
        f"{tokens / elapsed:.1f}" if elapsed > 0 else "-",
        f"{1000 * ttft:.0f} ms",
        f"{spec.get('tokens_per_round', 0.0):.2f}",
        f"{hit_rate:.0%} of {attempts}",
        f"{uplink / tokens:.0f} B" if tokens else "-",
    )
    console.print(table)
