"""A prepared GPU check: the engine on one CUDA GPU, with random bf16 weights shaped like
Qwen3-14B (the target) and Qwen3-1.7B / Qwen3-0.6B (drafts), so that no checkpoint is needed.

    bash benchmarks/gpu_check.sh [--out benchmarks/results/gpu_check.md]   # one GPU, < 10 min
    .venv/bin/python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check.md   # CPU, seconds

Writes a Markdown report and the raw numbers as JSON next to it (same name, `.json`):

- *Verification cost*: one `TargetEngine.verify` call (the batched forward over root + tree,
  the logits of every node, greedy samples, acceptance, KV compaction) for B sequences with
  trees of n nodes after a context of `--context` tokens, B = 1..64, n = 0..64; n = 0 is a
  batched decode step. Medians over repetitions in shuffled order, after one warm-up each.
- *Decode step*: the B = 1, n = 0 cell against the weight floor (weight bytes over the copy
  bandwidth of one large device tensor copy).
- *Draft steps*: each draft grows trees of the default shape (`TreeShape()`) for B sessions
  at once through `StepBatcher`, the batching the edge and server-side drafting use: the
  time per batched step and per tree.
- *Memory*: peak `torch.cuda.max_memory_allocated` per phase, and the sessions whose KV fits
  in 80 GB (`KVCache.bytes_per_position`) beside the target's weights and the transient
  memory of the largest verification, alone and with a draft on the same GPU.

Random weights cost the same as trained ones here (the greedy acceptance decides only how much
KV moves in compaction). They are drawn on the device, never on the host. `--tiny` runs the
same code on tiny models on the CPU, for the test suite (tests/bench/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from specedge.core.draft import DraftEngine, TreeBuilder
from specedge.core.draft_batch import StepBatcher
from specedge.core.limits import TreeShape
from specedge.core.model_runner import ModelRunner
from specedge.core.sampling import SamplingParams
from specedge.core.target import GenerationLimits, TargetEngine, TargetSequence
from specedge.core.tree import ROOT_PARENT, DraftTree
from specedge.model import attention
from specedge.model.config import ModelConfig
from specedge.model.kv_cache import KVCache
from specedge.model.loader import LoadedModel, empty_model, finish_model, resolve_device

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_check.md"
MEMORY_BUDGET = 80e9  # bytes: "an 80 GB GPU"
SESSION_CONTEXTS = (1024, 2048, 4096, 8192)
TREE_FANOUT = 4  # children per node of the verified trees (the work does not depend on it)


def qwen3(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    *,
    tied: bool,
    kv_heads: int = 8,
    head_dim: int = 128,
    vocab: int = 151936,
) -> ModelConfig:
    """A Qwen3 config of these sizes (q/k norms, RoPE theta 1e6, 40960 positions)."""
    return ModelConfig(
        "qwen3", vocab, hidden, intermediate, layers, heads, kv_heads, head_dim,
        rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=tied, qk_norm=True,
    )  # fmt: skip


TARGET = qwen3(5120, 17408, 40, 40, tied=False)  # Qwen3-14B
DRAFTS = {
    "Qwen3-1.7B": qwen3(2048, 6144, 28, 16, tied=True),
    "Qwen3-0.6B": qwen3(1024, 3072, 28, 16, tied=True),
}
TINY_TARGET = qwen3(64, 128, 2, 4, tied=False, kv_heads=2, head_dim=16, vocab=256)
TINY_DRAFTS = {"tiny-draft": qwen3(32, 64, 1, 2, tied=True, kv_heads=1, head_dim=16, vocab=256)}


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    target_name: str
    target: ModelConfig
    drafts: dict[str, ModelConfig]
    device: str
    dtype: str
    context: int
    batches: tuple[int, ...]
    tree_nodes: tuple[int, ...]
    draft_batches: tuple[int, ...]
    repetitions: int
    time_limit_s: float
    attention: str = attention.AUTO  # the kernel (`specedge.model.attention`)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.tiny:
        return Plan(
            target_name="tiny",
            target=TINY_TARGET,
            drafts=TINY_DRAFTS,
            device="cpu",
            dtype="float32",
            context=24,
            batches=(1, 4),
            tree_nodes=(0, 4, 8),
            draft_batches=(1, 2),
            repetitions=1,
            time_limit_s=args.time_limit,
            attention=args.attention,
        )
    return Plan(
        target_name="Qwen3-14B",
        target=TARGET,
        drafts=DRAFTS,
        device=args.device,
        dtype="bfloat16",
        context=args.context,
        batches=(1, 2, 4, 8, 16, 32, 64),
        tree_nodes=(0, 1, 2, 4, 8, 16, 32, 64),
        draft_batches=(1, 8, 32),
        repetitions=args.repetitions,
        time_limit_s=args.time_limit,
        attention=args.attention,
    )


# ---- device ------------------------------------------------------------------------------------
class Clock:
    """Wall-clock seconds of a call, the device's queued work included."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, call: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        call()
        self.sync()
        return time.perf_counter() - start


class Memory:
    """Peak allocated device memory since the last `reset` (None on the CPU)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return int(torch.cuda.max_memory_allocated()) if self.cuda else None

    def now(self) -> int | None:
        return int(torch.cuda.memory_allocated()) if self.cuda else None


def copy_bandwidth(device: str, clock: Clock, num_bytes: int) -> float:
    """Bytes per second read + written by one large tensor copy on `device` (best of 5)."""
    source = torch.ones(num_bytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    seconds = min(clock.time(lambda: target.copy_(source)) for _ in range(5))
    return 2 * num_bytes / seconds


def describe_device(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory}
    else:
        info["gpu"] = None
    return info


# ---- models ------------------------------------------------------------------------------------
def random_model(
    name: str, config: ModelConfig, device: str, dtype: torch.dtype, seed: int
) -> LoadedModel:
    """A model of `config` with seeded random weights drawn on `device` (norm weights 1 +- 0.1,
    matrices of std 1/sqrt(fan_in)), ready for inference; no tokenizer."""
    model = empty_model(config, device, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    for param_name, param in model.named_parameters():
        if param_name.endswith("norm.weight"):
            param.normal_(1.0, 0.1, generator=generator)
        elif param.dim() == 1:
            param.normal_(0.0, 0.02, generator=generator)
        else:
            param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
    return LoadedModel(
        name=name,
        model=finish_model(model, device, dtype),
        tokenizer=None,
        config=config,
        stop_token_ids=(),
        directory=Path("/nonexistent") / name,
    )


def weight_bytes(loaded: LoadedModel) -> int:
    """Bytes of weights a decode step reads (a tied head counted once)."""
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in loaded.model.parameters()}
    return sum(unique.values())


def release_cached_memory() -> None:
    """Give the memory of deleted tensors back, so that the next phase's peak is its own."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- verification ------------------------------------------------------------------------------
def fanout_tree(rng: random.Random, vocab_size: int, num_nodes: int) -> DraftTree:
    """A tree of `num_nodes` random tokens, TREE_FANOUT children per node, breadth first."""
    parents = [ROOT_PARENT if i < TREE_FANOUT else i // TREE_FANOUT - 1 for i in range(num_nodes)]
    return DraftTree(tuple(rng.randrange(vocab_size) for _ in parents), tuple(parents))


def open_sequences(
    engine: TargetEngine, count: int, context: int, rng: random.Random
) -> list[TargetSequence]:
    """`count` prefilled sequences of `context` tokens plus a root."""
    sequences = []
    for _ in range(count):
        prompt = [rng.randrange(engine.vocab_size) for _ in range(context + 1)]
        seq = engine.open(prompt, SamplingParams(), max_new_tokens=engine.runner.max_context)
        engine.prefill(seq)
        sequences.append(seq)
    return sequences


def verification_table(
    loaded: LoadedModel, plan: Plan, clock: Clock, memory: Memory, deadline: float
) -> dict[str, Any]:
    """Seconds of `TargetEngine.verify` per (batch, tree nodes), the peak memory, the KV pool."""
    rng = random.Random(0)
    max_batch, max_nodes = max(plan.batches), max(plan.tree_nodes)
    runner = ModelRunner(
        loaded,
        num_slots=max_batch,
        max_context=plan.context + max_nodes + 2,
        max_block=max_nodes + 8,
        attention_kernel=plan.attention,
    )
    engine = TargetEngine(runner, GenerationLimits(max_nodes, max(max_nodes, 1)))
    sequences = open_sequences(engine, max_batch, plan.context, rng)
    cells = [(b, n) for b in plan.batches for n in plan.tree_nodes]
    seconds: dict[tuple[int, int], list[float]] = {cell: [] for cell in cells}
    memory.reset()
    for repetition in range(plan.repetitions + 1):  # the first is a warm-up
        for batch, num_nodes in rng.sample(cells, len(cells)):
            if time.perf_counter() > deadline:
                break
            work = [(s, fanout_tree(rng, engine.vocab_size, num_nodes)) for s in sequences[:batch]]
            elapsed = clock.time(lambda: engine.verify(work))  # noqa: B023
            for seq in sequences[:batch]:
                engine.rewind(seq, plan.context)
            if repetition:
                seconds[(batch, num_nodes)].append(elapsed)
    kv_bytes = runner.kv.keys.numel() * runner.kv.keys.element_size() * 2
    return {"seconds": seconds, "peak_bytes": memory.peak(), "kv_pool_bytes": kv_bytes}


# ---- drafting ----------------------------------------------------------------------------------
def draft_rounds(
    loaded: LoadedModel, batch: int, plan: Plan, clock: Clock, deadline: float
) -> dict[str, Any]:
    """Trees of the default shape grown for `batch` sessions at once through `StepBatcher`:
    seconds per round (all trees), batched steps per round and sessions' steps per round."""
    rng = random.Random(1)
    shape = TreeShape()
    runner = ModelRunner(
        loaded,
        num_slots=batch,
        max_context=plan.context + 2,
        max_block=shape.max_block,
        attention_kernel=plan.attention,
    )
    engine = DraftEngine(runner, shape)
    sequences = []
    for _ in range(batch):
        seq = engine.open([rng.randrange(loaded.config.vocab_size) for _ in range(plan.context)])
        engine.prefill(seq)
        sequences.append(seq)
    rounds: list[dict[str, float]] = []
    for repetition in range(plan.repetitions + 1):  # the first is a warm-up
        if time.perf_counter() > deadline:
            break
        builders = [engine.builder(seq) for seq in sequences]  # each round from the same root
        batchers: list[StepBatcher] = []
        elapsed = clock.time(
            lambda: batchers.append(asyncio.run(_grow_together(runner, builders)))  # noqa: B023
        )
        (batcher,) = batchers
        if repetition:
            rounds.append({"seconds": elapsed, "flushes": batcher.flushes, "steps": batcher.steps})
    return {"batch": batch, "rounds": rounds}


async def _grow_together(runner: ModelRunner, builders: list[TreeBuilder]) -> StepBatcher:
    """Grow every builder to its end, their ready steps batched into shared forwards."""
    loop = asyncio.get_running_loop()

    def submit(job: Callable[[], None], priority: int) -> concurrent.futures.Future[None]:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            job()
            done.set_result(None)

        loop.call_soon(run)  # after every builder has queued its step
        return done

    batcher = StepBatcher(runner, submit)

    async def grow(builder: TreeBuilder) -> None:
        while await batcher.step(builder):
            pass

    await asyncio.gather(*(grow(builder) for builder in builders))
    return batcher


# ---- the run -----------------------------------------------------------------------------------
def run(plan: Plan) -> dict[str, Any]:
    started = time.perf_counter()
    deadline = started + plan.time_limit_s
    dtype = getattr(torch, plan.dtype)
    clock, memory = Clock(plan.device), Memory(plan.device)
    results: dict[str, Any] = {"plan": asdict(plan), "machine": describe_device(plan.device)}
    copy_size = 2**31 if plan.device.startswith("cuda") else 2**26
    bandwidth = copy_bandwidth(plan.device, clock, copy_size)
    results["copy_bandwidth_bytes_per_s"] = bandwidth

    memory.reset()
    build = time.perf_counter()
    target = random_model(plan.target_name, plan.target, plan.device, dtype, seed=0)
    clock.sync()
    target_info = {
        "weight_bytes": weight_bytes(target),
        "build_seconds": time.perf_counter() - build,
        "allocated_bytes": memory.now(),
        "kv_bytes_per_position": KVCache.bytes_per_position(plan.target, dtype),
    }
    # The verification table gets most of the time; the drafts what is left.
    verification_deadline = started + 0.6 * plan.time_limit_s
    verification = verification_table(target, plan, clock, memory, verification_deadline)
    del target
    release_cached_memory()
    results["target"] = target_info | {
        "verification_peak_bytes": verification["peak_bytes"],
        "kv_pool_bytes": verification["kv_pool_bytes"],
    }
    results["verification"] = [
        {"batch": b, "tree_nodes": n, "seconds": s} for (b, n), s in verification["seconds"].items()
    ]
    results["drafts"] = {}
    for seed, (name, config) in enumerate(plan.drafts.items(), start=1):
        memory.reset()
        draft = random_model(name, config, plan.device, dtype, seed=seed)
        results["drafts"][name] = {
            "weight_bytes": weight_bytes(draft),
            "kv_bytes_per_position": KVCache.bytes_per_position(config, dtype),
            "max_block": TreeShape().max_block,
            "rounds": [draft_rounds(draft, b, plan, clock, deadline) for b in plan.draft_batches],
            "peak_bytes": memory.peak(),
        }
        del draft
        release_cached_memory()
    results["seconds"] = time.perf_counter() - started
    results["timed_out"] = time.perf_counter() > deadline
    return results


# ---- report ------------------------------------------------------------------------------------
def median_ms(seconds: list[float]) -> float | None:
    return 1000 * statistics.median(seconds) if seconds else None


def sessions_that_fit(results: dict[str, Any], draft: str | None) -> dict[int, int]:
    """Sessions of each context whose KV fits in MEMORY_BUDGET beside the target's weights,
    the largest verification's transient memory (when measured) and, with `draft`, the
    draft's weights and KV (server-side drafting)."""
    target, plan = results["target"], results["plan"]
    transient = 0
    if target["verification_peak_bytes"] is not None:
        transient = max(
            0,
            target["verification_peak_bytes"] - target["allocated_bytes"] - target["kv_pool_bytes"],
        )
    room = MEMORY_BUDGET - target["weight_bytes"] - transient
    verify_block = max(plan["tree_nodes"]) + 8
    drafting = results["drafts"][draft] if draft is not None else None
    if drafting is not None:
        room -= drafting["weight_bytes"]
    fit = {}
    for context in SESSION_CONTEXTS:
        per_session = target["kv_bytes_per_position"] * (context + verify_block)
        if drafting is not None:
            per_session += drafting["kv_bytes_per_position"] * (context + drafting["max_block"])
        fit[context] = max(0, int(room // per_session))
    return fit


def gb(num_bytes: int | None) -> str:
    return "n/a (CPU)" if num_bytes is None else f"{num_bytes / 1e9:.2f} GB"


def markdown(results: dict[str, Any]) -> str:
    plan, machine, target = results["plan"], results["machine"], results["target"]
    cells = {
        (v["batch"], v["tree_nodes"]): median_ms(v["seconds"]) for v in results["verification"]
    }
    bandwidth = results["copy_bandwidth_bytes_per_s"]
    step = cells.get((1, 0))
    floor_ms = 1000 * target["weight_bytes"] / bandwidth
    lines = [
        "# GPU check",
        "",
        "Written by `benchmarks/gpu_check.py` (`bash benchmarks/gpu_check.sh`); raw numbers in the "
        "JSON file of the same name. Random weights shaped like the named models, "
        f"{plan['dtype']}, on {machine['gpu'] or 'the CPU'} ({machine['device']}); torch "
        f"{machine['torch']}, CUDA {machine['cuda']}; attention kernel "
        f"{attention.resolve_attention(plan['attention'], machine['device'])}; "
        f"{results['seconds']:.0f} s"
        + (" (stopped at the time limit: some cells are empty)" if results["timed_out"] else "")
        + ".",
        "",
        f"## Verification cost: {plan['target_name']}, ms per `TargetEngine.verify` call",
        "",
        f"B sequences after {plan['context']} tokens of context, each verifying a root plus a "
        f"tree of n nodes ({TREE_FANOUT} children per node); n = 0 is a batched decode step. "
        f"Median of up to {plan['repetitions']} calls after a warm-up.",
        "",
        "| B \\ n | " + " | ".join(str(n) for n in plan["tree_nodes"]) + " |",
        "|---|" + "---|" * len(plan["tree_nodes"]),
    ]
    for batch in plan["batches"]:
        row = [cells.get((batch, n)) for n in plan["tree_nodes"]]
        lines.append(f"| {batch} | " + " | ".join(_ms(ms) for ms in row) + " |")
    lines += [
        "",
        "## Decode step",
        "",
        f"- one sequence, one token: {_ms(step)} ms; weight floor {floor_ms:.2f} ms "
        f"({target['weight_bytes'] / 1e9:.2f} GB of weights at the copy bandwidth of "
        f"{bandwidth / 1e9:.0f} GB/s, read + write)"
        + (f": {step / floor_ms:.1f}x the floor" if step else ""),
        f"- random weights built on the device in {target['build_seconds']:.1f} s",
        "",
        "## Draft rounds (default tree shape, sessions drafting together)",
        "",
        "| draft | sessions | ms per round | batched steps per round | ms per batched step |",
        "|---|---|---|---|---|",
    ]
    for name, info in results["drafts"].items():
        for entry in info["rounds"]:
            rounds = entry["rounds"]
            if not rounds:
                lines.append(f"| {name} | {entry['batch']} | – | – | – |")
                continue
            ms = median_ms([r["seconds"] for r in rounds])
            flushes = statistics.median(r["flushes"] for r in rounds)
            per_step = ms / flushes if ms is not None and flushes else None
            lines.append(
                f"| {name} | {entry['batch']} | {_ms(ms)} | {flushes:g} | {_ms(per_step)} |"
            )
    lines += [
        "",
        "## Memory",
        "",
        f"- {plan['target_name']}: weights {gb(target['weight_bytes'])}, allocated after "
        f"building {gb(target['allocated_bytes'])}; peak during the verification table "
        f"{gb(target['verification_peak_bytes'])} (KV pool of {gb(target['kv_pool_bytes'])} "
        "included)",
    ]
    for name, info in results["drafts"].items():
        lines.append(
            f"- {name}: weights {gb(info['weight_bytes'])}, peak while drafting "
            f"{gb(info['peak_bytes'])}"
        )
    names = [None, *results["drafts"]]
    lines += [
        "",
        f"Sessions whose KV fits in {MEMORY_BUDGET / 1e9:.0f} GB beside the weights and the "
        "largest verification's transient memory, each holding its context plus one tree "
        f"(`KVCache.bytes_per_position`: {target['kv_bytes_per_position'] / 1024:.0f} "
        "KiB per position for the target):",
        "",
        "| context | "
        + " | ".join("target alone" if n is None else f"+ {n} draft" for n in names)
        + " |",
        "|---|" + "---|" * len(names),
    ]
    fits = [sessions_that_fit(results, name) for name in names]
    for context in SESSION_CONTEXTS:
        lines.append(f"| {context} | " + " | ".join(str(f[context]) for f in fits) + " |")
    return "\n".join(lines) + "\n"


def _ms(ms: float | None) -> str:
    return "–" if ms is None else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


# ---- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report path")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (for CI)")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument("--context", type=int, default=512, help="context tokens per sequence")
    parser.add_argument("--repetitions", type=int, default=5, help="timed calls per cell")
    parser.add_argument(
        "--attention",
        choices=attention.ATTENTION_KERNELS,
        default=attention.AUTO,
        help="attention kernel (serve --attention)",
    )
    parser.add_argument(
        "--time-limit", type=float, default=480.0, help="seconds before cells are skipped"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    if not args.tiny:
        if not torch.cuda.is_available():
            print(
                f"error: this torch ({torch.__version__}, CUDA {torch.version.cuda}) sees no "
                "CUDA GPU; install a CUDA build of torch, or run with --tiny",
                file=sys.stderr,
            )
            return 2
        resolve_device(plan.device)
    results = run(plan)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(results))
    args.out.with_suffix(".json").write_text(json.dumps(_jsonable(results), indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.json').name}")
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    sys.exit(main())
