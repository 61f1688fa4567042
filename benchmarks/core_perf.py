"""Core performance report: decode speed against transformers, the memory-bandwidth floor, and
the cost of one batched verification as a function of batch and tree size.

    .venv/bin/python benchmarks/core_perf.py [--quick] [--out benchmarks/results/core_perf.md]
    .venv/bin/python benchmarks/core_perf.py --baseline-src ../old/src --baseline-label OLD \
        --out benchmarks/results/verify_side_by_side.md   # verification, two checkouts

Writes a Markdown report and the raw numbers as JSON next to it (same name, `.json`). On a
machine shared with other work, `--threads 1` measures more steadily than torch's default.

- *Autoregressive decoding*: our engine (`LocalGenerator` without a draft) against
  transformers' `generate` on SmolLM2-135M, batch 1, greedy, a fixed number of new tokens after
  a chat prompt (EOS ignored by both), in fp32 and bf16. Repetitions are interleaved (ours,
  theirs, theirs, ours, ...) so that load from other processes hits both alike; we report
  medians, by wall-clock and by CPU time (which leaves out time other processes held the
  cores). The *floor* is the time to stream the weights once from memory at the bandwidth of a
  large tensor copy measured between the repetitions: its inverse bounds decode tokens/s.
- *Verification cost*: one `TargetEngine.verify` call (batched forward over root + tree, logits
  of every node, greedy samples, acceptance, KV compaction) for B sequences with random trees of
  n nodes after a context of about `CONTEXT` tokens; n = 0 is a batched decode step. Ratios are
  to the single-token step (B = 1, n = 0) of the same dtype.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM

from specedge.core.local import LocalGenerator
from specedge.core.model_runner import ModelRunner
from specedge.core.sampling import SamplingParams
from specedge.core.target import GenerationLimits, TargetEngine
from specedge.core.tree import DraftTree
from specedge.model.loader import LoadedModel, load_model
from specedge.text import encode_prompt

MODEL = "smollm2-135m"
PROMPT = "Explain in a few paragraphs how a CPU cache works and why it matters for performance."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONTEXT = 256
BATCH_SIZES = (1, 2, 4, 8, 16)
TREE_SIZES = (0, 8, 16, 32, 64)  # draft nodes; 0 = a decode step
COPY_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Settings:
    new_tokens: int
    ar_repetitions: int
    verify_repetitions: int
    batch_sizes: tuple[int, ...]
    tree_sizes: tuple[int, ...]


FULL = Settings(128, 9, 5, BATCH_SIZES, TREE_SIZES)
QUICK = Settings(32, 2, 1, (1, 16), (0, 64))


# ---- machine ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {  # the first processor's entry wins
        key.strip(): value.strip()
        for key, value in reversed(
            [line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line]
        )
    }
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "cpu": fields.get("model name", platform.processor() or "unknown"),
        "cpu_flags": [flag for flag in wanted if flag in flags],
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }


def copy_bandwidth(source: torch.Tensor, target: torch.Tensor) -> float:
    """Bytes moved per second (read + write) by one large tensor copy."""
    start = time.perf_counter()
    target.copy_(source)
    elapsed = time.perf_counter() - start
    return 2 * source.numel() * source.element_size() / elapsed


def weight_bytes(loaded: LoadedModel) -> int:
    """Bytes of weights one decode step reads (tied embeddings counted once: the head reads
    them all, the embedding lookup one row)."""
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in loaded.model.parameters()}
    return sum(unique.values())


@dataclass
class Timings:
    """Wall-clock and CPU seconds (all threads of this process) of repeated calls. On a shared
    machine CPU time leaves out the time other processes held the cores."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def measure(self, call: Callable[[], Any]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        call()
        self.cpu.append(time.process_time() - cpu)
        self.wall.append(time.perf_counter() - wall)


# ---- autoregressive decoding -----------------------------------------------------------------


@dataclass
class DecodeRun:
    """One system decoding in one dtype: a callable that generates and returns the tokens."""

    system: str
    dtype: str
    generate: Callable[[], list[int]]
    timings: Timings = field(default_factory=Timings)
    tokens: list[int] | None = None


def ours(loaded: LoadedModel, prompt: list[int], new_tokens: int) -> Callable[[], list[int]]:
    generator = LocalGenerator(loaded, max_context=len(prompt) + new_tokens + 8)
    greedy = SamplingParams(temperature=0.0)
    return lambda: generator.generate(prompt, greedy, new_tokens, stop_token_ids=()).token_ids


def theirs(loaded: LoadedModel, prompt: list[int], new_tokens: int) -> Callable[[], list[int]]:
    model = AutoModelForCausalLM.from_pretrained(loaded.directory, dtype=loaded.dtype).eval()
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    config.pad_token_id = loaded.tokenizer.pad_token_id or loaded.stop_token_ids[0]
    ids = torch.tensor([prompt])

    def generate() -> list[int]:
        with torch.inference_mode():
            output = model.generate(
                ids, attention_mask=torch.ones_like(ids), generation_config=config
            )
        return [int(t) for t in output[0, len(prompt) :]]

    return generate


def bench_decoding(
    models: dict[str, LoadedModel], settings: Settings
) -> tuple[list[DecodeRun], list[float]]:
    prompt = encode_prompt(models["fp32"].tokenizer, PROMPT, chat=True)
    runs = []
    for dtype, loaded in models.items():
        runs.append(DecodeRun("specedge", dtype, ours(loaded, prompt, settings.new_tokens)))
        runs.append(DecodeRun("transformers", dtype, theirs(loaded, prompt, settings.new_tokens)))
    for run in runs:  # warm-up: first-call allocations, oneDNN primitive caches
        run.tokens = run.generate()
    source = torch.ones(COPY_BYTES // 4)
    target = torch.empty_like(source)
    bandwidths = []
    for repetition in range(settings.ar_repetitions):
        order = runs if repetition % 2 == 0 else runs[::-1]
        for run in order:
            run.timings.measure(run.generate)
        bandwidths.extend(copy_bandwidth(source, target) for _ in range(3))
        print(f"  decode repetition {repetition + 1}/{settings.ar_repetitions}", file=sys.stderr)
    return runs, bandwidths


# ---- kernels ---------------------------------------------------------------------------------


def bench_matrix_vector(loaded: LoadedModel, repetitions: int) -> dict[str, list[float]]:
    """Seconds for one decode step's weight products (every projection and the head) on one
    row: through `F.linear` (the matrix-matrix path), `torch.mv` and, where the model holds
    them, oneDNN's prepacked weights (`Linear.pack`, what our `Linear` takes), interleaved."""
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    rows = {m.in_features: torch.randn(1, m.in_features, dtype=loaded.dtype) for m in linears}
    kernels: dict[str, Callable[[torch.nn.Linear, torch.Tensor], torch.Tensor]] = {
        "linear": lambda m, x: F.linear(x, m.weight),
        "mv": lambda m, x: torch.mv(m.weight, x[0]),
    }
    if all(getattr(m, "packed_weight", None) is not None for m in linears):
        kernels["packed"] = lambda m, x: torch.ops.mkldnn._linear_pointwise(
            x, m.packed_weight, None, "none", [], ""
        )
    seconds: dict[str, list[float]] = {name: [] for name in kernels}
    with torch.inference_mode():
        for repetition in range(repetitions + 1):  # the first is a warm-up
            for name, kernel in kernels.items():
                start = time.perf_counter()
                for module in linears:
                    kernel(module, rows[module.in_features])
                if repetition:
                    seconds[name].append(time.perf_counter() - start)
    return seconds


# ---- verification ----------------------------------------------------------------------------


def random_tree(
    rng: random.Random, vocab_size: int, num_nodes: int, path: Sequence[int] = ()
) -> DraftTree:
    """A random tree in parents-first order: half the nodes extend the previous node, the rest
    hang under a random earlier node (or the root); siblings are distinct (random tokens). With
    `path`, the first nodes are that chain (the target's own continuation, so that the walk
    accepts it: verification with a planted path)."""
    tokens: list[int] = list(path[:num_nodes])
    parents: list[int] = list(range(-1, len(tokens) - 1))
    while len(tokens) < num_nodes:
        node = len(tokens)
        parent = node - 1 if node and rng.random() < 0.5 else rng.randrange(-1, node)
        token = rng.randrange(vocab_size)
        siblings = [tokens[i] for i in range(node) if parents[i] == parent]
        if token not in siblings:
            tokens.append(token)
            parents.append(parent)
    return DraftTree(tuple(tokens), tuple(parents))


def bench_verification(
    loaded: LoadedModel, settings: Settings, rng: random.Random, planted: Sequence[int] = (0,)
) -> dict[tuple[int, int, int], Timings]:
    """Timings of `TargetEngine.verify` calls for every (batch, tree size, planted path): with
    a planted path of p > 0 nodes (trees of more than p nodes), each tree starts with the
    target's own next p tokens, so every walk accepts p nodes, as a good draft's do."""
    max_batch, max_nodes = max(settings.batch_sizes), max(settings.tree_sizes)
    runner = ModelRunner(
        loaded, num_slots=max_batch, max_context=CONTEXT + max_nodes + 2, max_block=max_nodes + 8
    )
    engine = TargetEngine(runner, GenerationLimits(max_tree_nodes=max_nodes, max_tree_depth=64))
    vocab = loaded.config.vocab_size
    sequences = []
    for _ in range(max_batch):
        prompt = [rng.randrange(vocab) for _ in range(CONTEXT + 1)]
        seq = engine.open(prompt, SamplingParams(), max_new_tokens=10**6)
        engine.prefill(seq)
        sequences.append(seq)
    for _ in range(max(1, *planted)):  # decode steps: the warm-up, and each context's continuation
        engine.verify([(seq, DraftTree()) for seq in sequences])
    paths = [seq.committed[CONTEXT + 1 :] for seq in sequences]
    for seq in sequences:
        rewind(engine, seq)
    configs = [
        (b, n, p)
        for b in settings.batch_sizes
        for n in settings.tree_sizes
        for p in planted
        if p == 0 or n > p
    ]
    timings = {config: Timings() for config in configs}
    for _ in range(settings.verify_repetitions):
        for batch, num_nodes, path in rng.sample(configs, len(configs)):
            trees = [random_tree(rng, vocab, num_nodes, paths[i][:path]) for i in range(batch)]
            work = list(zip(sequences[:batch], trees, strict=True))
            timings[(batch, num_nodes, path)].measure(lambda: engine.verify(work))  # noqa: B023
            for seq in sequences[:batch]:
                rewind(engine, seq)
    return timings


def rewind(engine: TargetEngine, seq: Any) -> None:
    """`TargetEngine.rewind` to CONTEXT, or, in an older checkout measured side by side
    (`--baseline-src`, whose engine predates it), the same steps written out."""
    if hasattr(engine, "rewind"):
        engine.rewind(seq, CONTEXT)
        return
    del seq.committed[CONTEXT + 1 :]
    seq.prefilled = CONTEXT
    seq.finish_reason = None
    engine.runner.kv.set_length(seq.slot, CONTEXT)


# ---- report ----------------------------------------------------------------------------------


def summarise(
    machine_info: dict[str, Any],
    settings: Settings,
    models: dict[str, LoadedModel],
    runs: list[DecodeRun],
    bandwidths: list[float],
    kernels: dict[str, dict[str, list[float]]],
    verify: dict[str, dict[tuple[int, int], Timings]],
) -> dict[str, Any]:
    bandwidth = statistics.median(bandwidths)
    decode: dict[str, Any] = {}
    for dtype, loaded in models.items():
        mine, peer = (
            next(r for r in runs if r.dtype == dtype and r.system == s)
            for s in ("specedge", "transformers")
        )
        mine_wall, peer_wall = (
            statistics.median(mine.timings.wall),
            statistics.median(peer.timings.wall),
        )
        mine_cpu, peer_cpu = (
            statistics.median(mine.timings.cpu),
            statistics.median(peer.timings.cpu),
        )
        decode[dtype] = {
            "specedge_tokens_per_s": settings.new_tokens / mine_wall,
            "transformers_tokens_per_s": settings.new_tokens / peer_wall,
            "ratio": peer_wall / mine_wall,
            "cpu_time_ratio": peer_cpu / mine_cpu,
            "specedge_seconds": mine.timings.wall,
            "transformers_seconds": peer.timings.wall,
            "specedge_cpu_seconds": mine.timings.cpu,
            "transformers_cpu_seconds": peer.timings.cpu,
            "weight_bytes": weight_bytes(loaded),
            "floor_tokens_per_s": bandwidth / weight_bytes(loaded),
            "tokens_agreeing": common_prefix(mine.tokens or [], peer.tokens or []),
        }
    verification = []
    for dtype, table in verify.items():
        step = statistics.median(table[(1, 0)].wall)
        for (batch, num_nodes), timings in sorted(table.items()):
            verification.append(
                {
                    "dtype": dtype,
                    "batch": batch,
                    "tree_nodes": num_nodes,
                    "context": CONTEXT,
                    "ms_median": 1000 * statistics.median(timings.wall),
                    "ratio_to_step": statistics.median(timings.wall) / step,
                    "cpu_ms_median": 1000 * statistics.median(timings.cpu),
                    "ms_all": [1000 * s for s in timings.wall],
                }
            )
    machine_info = dict(machine_info, load_average_end=os.getloadavg())
    return {
        "machine": machine_info,
        "settings": asdict(settings),
        "model": MODEL,
        "prompt": PROMPT,
        "copy_bandwidth_gb_per_s": {
            "median": bandwidth / 1e9,
            "max": max(bandwidths) / 1e9,
            "all": [b / 1e9 for b in bandwidths],
        },
        "decode": decode,
        "matrix_vector_ms": {
            dtype: {name: 1000 * statistics.median(s) for name, s in by_kernel.items()}
            for dtype, by_kernel in kernels.items()
        },
        "verification": verification,
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def markdown(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    bw = results["copy_bandwidth_gb_per_s"]
    lines = [
        "# Core performance",
        "",
        "Written by `benchmarks/core_perf.py`; raw numbers in `core_perf.json` next to this file.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['logical_cores']} logical cores",
        f"- torch {m['torch']} ({m['torch_cpu_capability']}), {m['torch_threads']} threads; "
        f"transformers {m['transformers']}; Python {m['python']}",
        f"- load average (1, 5, 15 min) at start {fmt_load(m['load_average_start'])}, at end "
        f"{fmt_load(m['load_average_end'])} (above 1 per core, other processes were "
        "competing for the CPU)",
        f"- copy bandwidth (256 MiB tensor copy, read + write): median {bw['median']:.1f} GB/s, "
        f"best {bw['max']:.1f} GB/s",
        "",
        "## Autoregressive decoding",
        "",
        f"{results['model']}, batch 1, greedy, {s['new_tokens']} new tokens after a chat prompt "
        f"(EOS ignored), prefill included; median of {s['ar_repetitions']} interleaved "
        "repetitions. Ratio: specedge over transformers, by wall-clock time and by CPU time of "
        "the process (which leaves out the time other processes held the cores). Floor: weight "
        "bytes / median copy bandwidth, as a tokens/s upper bound. Agreeing: leading tokens "
        "equal in both outputs (in bf16 the two implementations round differently somewhere, "
        "which sooner or later changes a greedy choice).",
        "",
        "| dtype | specedge tok/s | transformers tok/s | ratio | ratio (CPU time) "
        "| floor tok/s | weights MB | agreeing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dtype, d in results["decode"].items():
        lines.append(
            f"| {dtype} | {d['specedge_tokens_per_s']:.1f} | {d['transformers_tokens_per_s']:.1f} "
            f"| **{d['ratio']:.2f}x** | {d['cpu_time_ratio']:.2f}x | {d['floor_tokens_per_s']:.1f} "
            f"| {d['weight_bytes'] / 1e6:.0f} | {d['tokens_agreeing']}/{s['new_tokens']} |"
        )
    lines += [
        "",
        "One decode step's weight products on one row (every projection of every layer and the "
        "head; ms, median), through `F.linear` (the matrix-matrix path), `torch.mv` (the "
        "matrix-vector kernel) and oneDNN with prepacked weights (`Linear.pack`), which our "
        "`Linear` takes for every CPU bf16 product; fp32 keeps `F.linear`.",
        "",
        "| dtype | F.linear ms | torch.mv ms | packed ms |",
        "|---|---|---|---|",
    ]
    for dtype, k in results["matrix_vector_ms"].items():
        packed = f"{k['packed']:.1f}" if "packed" in k else "-"
        lines.append(f"| {dtype} | {k['linear']:.1f} | {k['mv']:.1f} | {packed} |")
    lines += [
        "",
        "## Verification cost",
        "",
        f"One `TargetEngine.verify` call: B sequences, each root + a random tree of n nodes after "
        f"~{CONTEXT} context tokens (forward, logits of every node, greedy samples, acceptance, "
        "KV compaction); n = 0 is a batched decode step. Median ms, and in parentheses the ratio "
        f"to the single-token step (B = 1, n = 0); {s['verify_repetitions']} repetitions, "
        "configurations shuffled.",
    ]
    for dtype in results["decode"]:
        rows = [r for r in results["verification"] if r["dtype"] == dtype]
        batches = sorted({r["batch"] for r in rows})
        step = next(r["ms_median"] for r in rows if r["batch"] == 1 and r["tree_nodes"] == 0)
        lines += [
            "",
            f"### {dtype}: single-token step {step:.1f} ms",
            "",
            "| n \\ B | " + " | ".join(map(str, batches)) + " |",
            "|---" * (len(batches) + 1) + "|",
        ]
        for num_nodes in sorted({r["tree_nodes"] for r in rows}):
            cells = [
                f"{r['ms_median']:.1f} ({r['ratio_to_step']:.1f}x)"
                for b in batches
                for r in rows
                if r["batch"] == b and r["tree_nodes"] == num_nodes
            ]
            lines.append(f"| {num_nodes} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fmt_load(load: list[float] | tuple[float, ...]) -> str:
    return ", ".join(f"{x:.1f}" for x in load)


# ---- side by side with another checkout ------------------------------------------------------

AB_BATCH_SIZES = (1, 8, 16)
AB_TREE_SIZES = (0, 8, 16, 32)
AB_PLANTED = (0, 3)  # accepted nodes per tree: random trees, and trees holding the target's path


def verification_worker(out: Path, repetitions: int, seed: int) -> None:
    """One process's bf16 verification timings (whatever `specedge` is on sys.path), as JSON."""
    loaded = load_model(MODEL, dtype=torch.bfloat16)
    settings = Settings(0, 0, repetitions, AB_BATCH_SIZES, AB_TREE_SIZES)
    timings = bench_verification(loaded, settings, random.Random(seed), AB_PLANTED)
    rows = [
        {"batch": b, "tree_nodes": n, "planted": p, "ms": [1000 * w for w in t.wall]}
        for (b, n, p), t in timings.items()
    ]
    out.write_text(json.dumps(rows))


def side_by_side(baseline_src: Path, label: str, rounds: int, out: Path) -> None:
    """bf16 verification costs of this checkout and of `baseline_src` (another checkout's
    `src`), measured in alternating processes (baseline, ours, ours, baseline, ...) so that
    load from other processes hits both alike; a Markdown table of medians and speed-ups."""
    ours_src = Path(__file__).resolve().parents[1] / "src"
    samples: dict[str, dict[tuple[int, int, int], list[float]]] = {label: {}, "this checkout": {}}
    order = [(label, baseline_src), ("this checkout", ours_src)]
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(rounds):
            for name, src in order if round_index % 2 == 0 else order[::-1]:
                result = Path(scratch) / "worker.json"
                env = dict(os.environ, PYTHONPATH=str(src))
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(result),
                    "--seed",
                    str(round_index),
                ]
                command += ["--threads", str(torch.get_num_threads())]
                subprocess.run(command, env=env, check=True)
                for row in json.loads(result.read_text()):
                    key = (row["batch"], row["tree_nodes"], row["planted"])
                    samples[name].setdefault(key, []).extend(row["ms"])
                print(f"  round {round_index + 1}/{rounds}: {name} done", file=sys.stderr)
    base, mine = samples[label], samples["this checkout"]
    lines = [
        "# Verification cost, side by side",
        "",
        f"Written by `benchmarks/core_perf.py --baseline-src ...`: bf16 `TargetEngine.verify` "
        f"(B sequences, root + a random tree of n nodes after ~{CONTEXT} context tokens), "
        f"median ms over {rounds} alternating processes per checkout; baseline: {label}. "
        "Accepted: nodes every walk accepts (0: random trees, which the target rejects at the "
        "root; 3: each tree starts with the target's own next three tokens).",
        "",
        f"- CPU: {machine()['cpu']}, {torch.get_num_threads()} torch thread(s); "
        f"load average at end {fmt_load(os.getloadavg())}",
        "",
        f"| B | n | accepted | {label} ms | this checkout ms | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for key in sorted(base):
        before, after = statistics.median(base[key]), statistics.median(mine[key])
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {before:.1f} | {after:.1f} "
            f"| {before / after:.2f}x |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                name: {f"{b}x{n}+{p}": ms for (b, n, p), ms in t.items()}
                for name, t in samples.items()
            },
            indent=1,
        )
    )
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repetitions")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/core_perf.md"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--baseline-src", type=Path, help="another checkout's src/: verification side by side"
    )
    parser.add_argument("--baseline-label", default="baseline", help="its name in the report")
    parser.add_argument("--rounds", type=int, default=4, help="processes per checkout")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        verification_worker(args.worker, repetitions=3, seed=args.seed)
        return
    if args.baseline_src:
        side_by_side(args.baseline_src, args.baseline_label, args.rounds, args.out)
        return
    settings = QUICK if args.quick else FULL
    machine_info = machine()
    models = {name: load_model(MODEL, dtype=dtype) for name, dtype in DTYPES.items()}
    print("decoding ...", file=sys.stderr)
    runs, bandwidths = bench_decoding(models, settings)
    kernels = {
        name: bench_matrix_vector(loaded, settings.ar_repetitions)
        for name, loaded in models.items()
    }
    verify = {}
    for name, loaded in models.items():
        print(f"verification ({name}) ...", file=sys.stderr)
        timings = bench_verification(loaded, settings, random.Random(0))
        verify[name] = {(b, n): t for (b, n, _), t in timings.items()}
    results = summarise(machine_info, settings, models, runs, bandwidths, kernels, verify)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
