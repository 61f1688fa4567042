"""What work on the other core does to the server's decode step on this machine.

    .venv/bin/python benchmarks/core_contention.py [--out benchmarks/results/core_contention.md]

The benchmarks place the server on core 0 and the edge, the clients and the WAN proxies on
core 1. This measures the bundled target's batched decode step (`TargetEngine.verify` with
empty trees, B sequences after S context tokens, one torch thread) on core 0 while core 1:

- *idle*: runs nothing of ours;
- *python*: runs a pure-Python loop (CPU, next to no memory traffic);
- *draft*: runs the bundled draft's 8-row decode forwards back to back (what an edge's batched
  draft steps do).

The three alternate round by round (medians reported), so that drift hits them alike. Writes a
Markdown report and the raw numbers as JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_perf import machine  # noqa: E402
from decode_attention import step_engines  # noqa: E402

from specedge.model import attention  # noqa: E402
from specedge.model.loader import load_model  # noqa: E402

SERVER_CORE, OTHER_CORE = 0, 1
LOADS = ("idle", "python", "draft")
READY = "ready"

PYTHON_LOOP = f"""
import os
os.sched_setaffinity(0, {{{OTHER_CORE}}})
print({READY!r}, flush=True)
x = 0
while True:
    x += 1
"""

DRAFT_LOOP = f"""
import os, random, torch
os.sched_setaffinity(0, {{{OTHER_CORE}}})
torch.set_num_threads(1)
from specedge.core.model_runner import ModelRunner, TreeRow
from specedge.model.loader import load_model
loaded = load_model("smollm2-135m-draft", "cpu", torch.bfloat16)
runner = ModelRunner(loaded, num_slots=8, max_context=400, max_block=8)
slots = [runner.kv.allocate() for _ in range(8)]
rng = random.Random(0)
with torch.inference_mode():
    for slot in slots:
        runner.prefill(slot, [rng.randrange(1000) for _ in range(300)], 0)
    rows = [TreeRow(slot, 300, [-1], [5], num_cached=0) for slot in slots]
    print({READY!r}, flush=True)
    while True:
        runner.forward(rows)
"""


def start_load(kind: str) -> subprocess.Popen[str] | None:
    if kind == "idle":
        return None
    code = PYTHON_LOOP if kind == "python" else DRAFT_LOOP
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    if process.stdout.readline().strip() != READY:
        raise RuntimeError(f"the {kind} load did not start")
    return process


def measure(batch: int, context: int, rounds: int, steps: int) -> dict[str, Any]:
    loaded = load_model("smollm2-135m", "cpu", torch.bfloat16)
    step = step_engines(loaded, batch, context)[attention.NATIVE]
    times: dict[str, list[float]] = {kind: [] for kind in LOADS}
    with torch.inference_mode():
        for _ in range(3):
            step()
        for _ in range(rounds):
            for kind in LOADS:
                load = start_load(kind)
                try:
                    for _ in range(2):  # warm again beside the load
                        step()
                    for _ in range(steps):
                        start = time.perf_counter()
                        step()
                        times[kind].append(time.perf_counter() - start)
                finally:
                    if load is not None:
                        load.kill()
                        load.wait()
    medians = {kind: statistics.median(values) * 1e3 for kind, values in times.items()}
    return {
        "batch": batch,
        "context": context,
        "median_ms": medians,
        "slowdown": {kind: medians[kind] / medians["idle"] for kind in LOADS},
        "times_s": times,
    }


def markdown(results: dict[str, Any]) -> str:
    m, case = results["machine"], results["case"]
    medians, slowdown = case["median_ms"], case["slowdown"]
    return "\n".join(
        [
            "# The server's decode step beside work on the other core",
            "",
            "Written by `benchmarks/core_contention.py` (`core_contention.json` has every step). "
            f"The bundled target's batched decode step (B = {case['batch']}, {case['context']} "
            f"context tokens, native attention, one torch thread) on core {SERVER_CORE}, while "
            f"core {OTHER_CORE} is idle, runs a pure-Python loop, or runs the bundled draft's "
            "8-row decode forwards back to back; the three alternate round by round, medians of "
            f"{results['rounds']} rounds x {results['steps']} steps.",
            "",
            f"- Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['logical_cores']} logical "
            f"cores, torch {m['torch']}.",
            "",
            "| core 1 | decode step ms | against idle |",
            "|---|---|---|",
            *(f"| {kind} | {medians[kind]:.1f} | {slowdown[kind]:.2f}x |" for kind in LOADS),
            "",
            "In the benchmarks the SpecEdge systems put the draft's forwards on core 1 and the "
            "server-only systems do not (their clients and proxies there move little memory); "
            "the two cores share cache and memory bandwidth, so the *draft* row is what that "
            "costs the server on this machine, beyond the *python* row's plain CPU work next "
            "door. A separate edge machine would not carry it.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/core_contention.md"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two cores")
    os.sched_setaffinity(0, {SERVER_CORE})
    torch.set_num_threads(1)
    results = {
        "machine": machine(),
        "rounds": args.rounds,
        "steps": args.steps,
        "case": measure(args.batch, args.context, args.rounds, args.steps),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
