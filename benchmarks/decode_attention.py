"""Decode attention on the CPU: the native kernel against torch's SDPA, and what it does to a
whole decode step of the bundled target.

    taskset -c 0 .venv/bin/python benchmarks/decode_attention.py \
        [--out benchmarks/results/decode_attention.md] [--quick]

Two parts, each alternating the two sides repetition by repetition so that load from other
processes hits both alike (medians reported), one torch thread:

- *Kernel*: one decode step's attention over all 30 layers of SmolLM2-135M's geometry (9
  query heads, 3 K/V heads, head dim 64, bf16) for B sequences of S positions each, read in
  place from a pool: `native.row_attention` (one call per layer) against SDPA per sequence
  and layer (what the `sdpa` and `bmm` kernels do for a one-row block). Bandwidth is the K/V
  bytes read divided by the time.
- *Decode step*: `TargetEngine.verify` with empty trees (a batched decode step: forward,
  logits, sampling, commit) for B sequences after a context of S tokens, with the engine's
  attention kernel `bmm` (the previous CPU default) against `native`; and the weight floor
  (the weights streamed once at the bandwidth of a large copy) for the one-token step.

Writes a Markdown report and the raw numbers as JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_perf import COPY_BYTES, copy_bandwidth, machine, weight_bytes  # noqa: E402

from specedge.core.model_runner import ModelRunner  # noqa: E402
from specedge.core.sampling import SamplingParams  # noqa: E402
from specedge.core.target import GenerationLimits, TargetEngine  # noqa: E402
from specedge.core.tree import DraftTree  # noqa: E402
from specedge.model import attention, native  # noqa: E402
from specedge.model.loader import LoadedModel, load_model  # noqa: E402

MODEL = "smollm2-135m"
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30  # SmolLM2-135M
KERNEL_CASES = ((1, 300), (1, 1500), (8, 300), (8, 1500), (16, 300), (16, 1500))
STEP_CASES = ((1, 64), (1, 300), (1, 1500), (4, 300), (4, 1500), (8, 300), (8, 1500), (16, 300))


def alternate(calls: dict[str, Callable[[], Any]], repetitions: int) -> dict[str, list[float]]:
    """Seconds per call of each side, the sides interleaved (forward then reverse order)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for call in calls.values():
        call()  # warm-up
    for repetition in range(repetitions):
        for name in names if repetition % 2 == 0 else reversed(names):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, Any]:
    """Every repetition, the medians in ms, and the first side's median over the second's."""
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    slower, faster = medians.values()
    return {
        "seconds": times,
        "median_ms": {name: 1e3 * t for name, t in medians.items()},
        "speedup": slower / faster,
    }


# ---- kernel --------------------------------------------------------------------------------


def kernel_case(batch: int, length: int, repetitions: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(batch * 10_000 + length)
    stride = length + 64  # pool positions per sequence: slots with room past their length
    pool = batch * stride
    shape = (LAYERS, KV_HEADS, pool, HEAD_DIM)
    keys = torch.randn(shape, generator=generator).to(torch.bfloat16)
    values = torch.randn(shape, generator=generator).to(torch.bfloat16)
    fused = torch.randn(batch, HEADS + KV_HEADS, HEAD_DIM, generator=generator)
    queries = fused.to(torch.bfloat16)[:, :HEADS]
    rows = torch.arange(batch)
    starts = rows * stride
    lengths = torch.full((batch,), length)
    out = torch.empty(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    group = HEADS // KV_HEADS

    def run_native() -> None:
        for layer in range(LAYERS):
            native.row_attention(
                queries, keys[layer], values[layer], rows, starts, lengths, out, HEADS
            )

    def run_sdpa() -> None:
        for layer in range(LAYERS):
            for b in range(batch):
                begin = b * stride
                k = keys[layer, :, begin : begin + length]
                v = values[layer, :, begin : begin + length]
                folded = queries[b].reshape(KV_HEADS, group, HEAD_DIM)
                F.scaled_dot_product_attention(folded[None], k[None], v[None])

    run_native()
    native_out = out.clone()
    difference = 0.0
    for b in range(batch):  # the last layer's outputs, against SDPA's
        begin = b * stride
        k = keys[-1, :, begin : begin + length]
        v = values[-1, :, begin : begin + length]
        folded = queries[b].reshape(KV_HEADS, group, HEAD_DIM)
        expected = F.scaled_dot_product_attention(folded[None], k[None], v[None])[0]
        got = native_out[b].reshape(KV_HEADS, group, HEAD_DIM)
        difference = max(difference, (got.float() - expected.float()).abs().max().item())
    summary = summarise(alternate({"sdpa": run_sdpa, "native": run_native}, repetitions))
    kv_bytes = 2 * LAYERS * KV_HEADS * batch * length * HEAD_DIM * 2
    gb_per_s = {name: kv_bytes / ms / 1e6 for name, ms in summary["median_ms"].items()}
    return {
        "batch": batch,
        "length": length,
        **summary,
        "gb_per_s": gb_per_s,
        "max_abs_difference": difference,
    }


# ---- decode step ---------------------------------------------------------------------------


def step_engines(loaded: LoadedModel, batch: int, context: int) -> dict[str, Callable[[], None]]:
    calls = {}
    for kernel in (attention.BMM, attention.NATIVE):
        runner = ModelRunner(
            loaded,
            num_slots=batch,
            max_context=context + 64,
            max_block=8,
            attention_kernel=kernel,
        )
        engine = TargetEngine(runner, GenerationLimits(max_tree_nodes=8, max_tree_depth=8))
        rng = random.Random(context)
        sequences = []
        for _ in range(batch):
            prompt = [rng.randrange(1000) for _ in range(context + 1)]
            seq = engine.open(prompt, SamplingParams(), max_new_tokens=10**6)
            engine.prefill(seq)
            sequences.append(seq)

        def step(engine: TargetEngine = engine, sequences: list[Any] = sequences) -> None:
            engine.verify([(seq, DraftTree()) for seq in sequences])
            for seq in sequences:
                engine.rewind(seq, context)

        calls[kernel] = step
    return calls


def step_case(loaded: LoadedModel, batch: int, context: int, repetitions: int) -> dict[str, Any]:
    with torch.inference_mode():
        times = alternate(step_engines(loaded, batch, context), repetitions)
    return {"batch": batch, "context": context, **summarise(times)}


# ---- report --------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# Decode attention: the native kernel against SDPA",
        "",
        "Written by `benchmarks/decode_attention.py` (`decode_attention.json` has every "
        "repetition). Medians of alternated repetitions, one torch thread.",
        "",
        f"- Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['logical_cores']} logical "
        f"cores, torch {m['torch']}; placement: {results['placement']}.",
        f"- Load average at the start: {', '.join(f'{x:.2f}' for x in m['load_average_start'])}.",
        "",
        "## Kernel: one decode step's attention, 30 layers",
        "",
        "SmolLM2-135M's geometry (9 query heads, 3 K/V heads, head dim 64), bf16, B sequences of "
        "S positions read in place from one pool. SDPA: one call per sequence and layer, the "
        "path a one-row block takes under the `sdpa` and `bmm` kernels. Bandwidth: K/V bytes "
        "read / time (a large tensor sum reads about 33 GB/s on this core).",
        "",
        "| B | S | SDPA ms | native ms | speed-up | SDPA GB/s | native GB/s | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in results["kernel"]:
        lines.append(
            f"| {case['batch']} | {case['length']} | {case['median_ms']['sdpa']:.2f} | "
            f"{case['median_ms']['native']:.2f} | {case['speedup']:.2f}x | "
            f"{case['gb_per_s']['sdpa']:.1f} | {case['gb_per_s']['native']:.1f} | "
            f"{case['max_abs_difference']:.1e} |"
        )
    floor = results["floor"]
    lines += [
        "",
        "## Decode step of the bundled target",
        "",
        "`TargetEngine.verify` with empty trees: B sequences after S tokens of context, bf16, "
        "the engine's attention kernel `bmm` (the CPU default before this kernel) against "
        "`native` (the default now); each side its own engine, stepped alternately. Both "
        "sides have the native RMSNorm and fused RoPE + KV write (bf16 forwards), so the "
        "difference is the attention kernel alone.",
        "",
        "| B | S | bmm ms | native ms | speed-up |",
        "|---|---|---|---|---|",
    ]
    for case in results["step"]:
        lines.append(
            f"| {case['batch']} | {case['context']} | {case['median_ms'][attention.BMM]:.1f} | "
            f"{case['median_ms'][attention.NATIVE]:.1f} | {case['speedup']:.2f}x |"
        )
    one = next(c for c in results["step"] if c["batch"] == 1)
    lines += [
        "",
        f"Weight floor of a one-token step: {floor['weight_mb']:.0f} MB of weights at "
        f"{floor['bandwidth_gb_s']:.1f} GB/s (median large copy, read + write) = "
        f"{floor['floor_ms']:.1f} ms; the native one-token step at {one['context']} positions "
        f"is {one['median_ms'][attention.NATIVE]:.1f} ms, "
        f"{one['median_ms'][attention.NATIVE] / floor['floor_ms']:.2f}x the floor.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_attention.md"))
    parser.add_argument("--quick", action="store_true", help="few cases and repetitions")
    parser.add_argument("--placement", default="this process pinned to core 0 (taskset -c 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if native.load() is None:
        raise SystemExit("the native kernel could not be compiled here (see the log)")
    kernel_cases = KERNEL_CASES[:2] if args.quick else KERNEL_CASES
    step_cases = STEP_CASES[:2] if args.quick else STEP_CASES
    repetitions = 3 if args.quick else 11
    results: dict[str, Any] = {"machine": machine(), "placement": args.placement}
    results["kernel"] = []
    for batch, length in kernel_cases:
        results["kernel"].append(kernel_case(batch, length, repetitions))
        print(f"kernel B={batch} S={length}: {results['kernel'][-1]['speedup']:.2f}x", flush=True)
    loaded = load_model(MODEL, "cpu", torch.bfloat16)
    source = torch.ones(COPY_BYTES // 4)  # written: untouched pages would read as one zero page
    target = torch.zeros_like(source)
    bandwidth = statistics.median(copy_bandwidth(source, target) for _ in range(5))
    weights = weight_bytes(loaded)
    results["floor"] = {
        "weight_mb": weights / 1e6,
        "bandwidth_gb_s": bandwidth / 1e9,
        "floor_ms": 1e3 * weights / bandwidth,
    }
    results["step"] = []
    for batch, context in step_cases:
        results["step"].append(step_case(loaded, batch, context, repetitions))
        print(f"step B={batch} S={context}: {results['step'][-1]['speedup']:.2f}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    args.out.write_text(markdown(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
