"""Speed of the bundled draft: single-token latency vs the target, and speculative vs
autoregressive `specedge generate` tokens/s on this machine.

1. Latency: one decode step (1 token over a 64-token context, forward + logits) of the target
   and of the draft, and one draft frontier step (8 tokens), same dtype, same process.
2. Tuning: in-process greedy tokens/s of a few tree shapes (with and without context lookup)
   on a few of the distillation's held-out prompts (never SpecBench), to pick
   budget/depth/width/beams/lookup for this CPU.
3. The user's view: `specedge generate --mode ar` (target alone) and `--mode spec` (bundled
   pair, tuned shape; and the tuned shape with context lookup if the tuning chose none) on
   the same SpecBench prompts, alternated, tokens/s from `--json`.

    python benchmarks/draft_speed.py   # writes benchmarks/results/draft_speed.{md,json}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from specedge.bench.prompts import SPECBENCH_FILE, load_prompts
from specedge.core.limits import TreeShape
from specedge.core.local import LocalGenerator
from specedge.core.model_runner import ModelRunner, TreeRow, chain_parents
from specedge.core.sampling import SamplingParams
from specedge.distill.run import DistillConfig
from specedge.distill.sources import TEMPLATES, split_prompts
from specedge.model.loader import LoadedModel, load_model, parse_dtype
from specedge.text import encode_prompt

ROOT = Path(__file__).resolve().parent
DATA = SPECBENCH_FILE
SHAPES = [  # (budget, depth, width, beams, lookup)
    (32, 6, 4, 8, 0),
    (16, 6, 4, 4, 0),
    (8, 6, 2, 2, 0),
    (8, 6, 2, 2, 6),
    (6, 5, 1, 1, 0),
    (6, 5, 1, 1, 5),
    (5, 4, 1, 1, 0),
    (5, 4, 1, 1, 4),
    (4, 3, 2, 1, 0),
    (4, 3, 2, 1, 3),
]


def step_latency(model: LoadedModel, num_new: int, repeats: int = 30) -> float:
    """Median seconds of one forward + logits of `num_new` chained tokens after 64."""
    runner = ModelRunner(model, num_slots=1, max_context=128, max_block=16)
    slot = runner.kv.allocate()
    runner.prefill(slot, list(range(1000, 1064)), 0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        row = TreeRow(slot, 64, chain_parents(num_new), list(range(2000, 2000 + num_new)))
        runner.logits(runner.forward([row])[0])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompts(count: int) -> list[str]:
    """`count` SpecBench prompts spread over the set."""
    records = load_prompts(DATA)
    return [r.text for r in records[:: len(records) // count][:count]]


def heldout_prompts(count: int) -> list[str]:
    """The bundled draft's held-out prompts (its distillation's defaults): tuning data that is
    neither the draft's training data nor SpecBench."""
    config = DistillConfig(target="smollm2-135m", out=Path(), prompts=TEMPLATES)
    return split_prompts(config)[1][:count]


def tune(target: LoadedModel, draft: LoadedModel, texts: list[str], max_tokens: int) -> list[dict]:
    rows = []
    for shape in [None, *SHAPES]:
        tree = None
        if shape:
            budget, depth, width, beams, lookup = shape
            tree = TreeShape(budget, depth, width, beams, lookup=lookup)
        generator = LocalGenerator(target, draft if shape else None, tree)
        rates, per_round = [], []
        for text in texts:
            ids = encode_prompt(target.tokenizer, text, chat=True)
            out = generator.generate(ids, SamplingParams(), max_tokens, target.stop_token_ids)
            rates.append(out.stats.tokens_per_s)
            per_round.append(out.stats.tokens_per_round)
        row = {
            "shape": shape,
            "tokens_per_s": statistics.fmean(rates),
            "tokens_per_round": statistics.fmean(per_round),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def cli_rate(args: list[str], prompt_file: Path) -> float:
    command = [
        sys.executable,
        "-m",
        "specedge.cli",
        "generate",
        "--model",
        "smollm2-135m",
        "--prompt-file",
        str(prompt_file),
        "--chat",
        "--json",
        "--dtype",
        "bfloat16",
        "--max-tokens",
        "128",
        *args,
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    tokens = sum(r["completion_tokens"] for r in results)
    seconds = sum(r["completion_tokens"] / r["stats"]["tokens_per_s"] for r in results)
    return tokens / seconds


def spec_flags(shape: tuple[int, ...]) -> list[str]:
    budget, depth, width, beams, lookup = shape
    return [
        "--draft", "smollm2-135m-draft", "--mode", "spec", "--budget", str(budget),
        "--depth", str(depth), "--width", str(width), "--beams", str(beams),
        "--lookup", str(lookup),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune-prompts", type=int, default=4)
    parser.add_argument("--cli-prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--note", default="", help="how the machine was used, for the report")
    args = parser.parse_args()
    dtype = parse_dtype("bfloat16")
    target = load_model("smollm2-135m", dtype=dtype)
    draft = load_model("smollm2-135m-draft", dtype=dtype)
    latency = {
        "target_1_token_ms": 1e3 * step_latency(target, 1),
        "draft_1_token_ms": 1e3 * step_latency(draft, 1),
        "draft_8_tokens_ms": 1e3 * step_latency(draft, 8),
        "target_33_tokens_ms": 1e3 * step_latency(target, 33),
    }
    latency["draft_over_target_1_token"] = (
        latency["draft_1_token_ms"] / latency["target_1_token_ms"]
    )
    print(json.dumps(latency), flush=True)
    tuning = tune(target, draft, heldout_prompts(args.tune_prompts), 96)
    best = max(tuning[1:], key=lambda r: r["tokens_per_s"])["shape"]
    budget, depth, width, beams, lookup = best
    variants = {"spec": best}
    if lookup == 0:
        variants["spec + lookup"] = (budget, depth, width, beams, depth)
    rates: dict[str, list[float]] = {"ar": [], **{name: [] for name in variants}}
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.jsonl"
        prompt_file.write_text(
            "".join(json.dumps({"prompt": p}) + "\n" for p in prompts(args.cli_prompts))
        )
        for _ in range(args.repeats):
            rates["ar"].append(cli_rate(["--mode", "ar"], prompt_file))
            for name, shape in variants.items():
                rates[name].append(cli_rate(spec_flags(shape), prompt_file))
            print(json.dumps({name: runs[-1] for name, runs in rates.items()}), flush=True)
    ar = statistics.fmean(rates["ar"])
    cli = {
        name: {
            "shape": variants.get(name),
            "tokens_per_s": statistics.fmean(runs),
            "runs": runs,
            "speedup": statistics.fmean(runs) / ar,
        }
        for name, runs in rates.items()
    }
    report = {"latency": latency, "tuning": tuning, "cli": cli, "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "draft_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Draft speed on this CPU (bf16)",
        "",
        f"torch threads: {torch.get_num_threads()}. {args.note} Ratios come from the same "
        "process (latency) or alternated runs (generate).",
        "",
        "## Single-step latency (64-token context, forward + logits, median)",
        "",
        f"- target, 1 token: {latency['target_1_token_ms']:.1f} ms",
        f"- draft, 1 token: {latency['draft_1_token_ms']:.1f} ms "
        f"(**{latency['draft_over_target_1_token']:.3f}** of the target)",
        f"- draft, 8 tokens (a frontier step): {latency['draft_8_tokens_ms']:.1f} ms",
        f"- target, 33 tokens (a budget-32 verify): {latency['target_33_tokens_ms']:.1f} ms",
        "",
        f"## Tree shape tuning (in-process, greedy, 96 new tokens, {args.tune_prompts} held-out "
        "prompts of the distillation)",
        "",
        "| budget, depth, width, beams, lookup | tokens/s | tokens/round |",
        "|---|---|---|",
    ]
    for row in tuning:
        name = "AR (target alone)" if row["shape"] is None else ", ".join(map(str, row["shape"]))
        lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {row['tokens_per_round']:.2f} |")
    lines += [
        "",
        f"## `specedge generate`, 128 new tokens, chat, temperature 0, bf16, "
        f"{args.cli_prompts} SpecBench prompts, {args.repeats} alternated repeats",
        "",
        "| mode | tokens/s | runs | vs ar |",
        "|---|---|---|---|",
    ]
    for row in cli.values():
        flags = "--mode ar" if row["shape"] is None else " ".join(spec_flags(row["shape"])[4:])
        runs = " / ".join(f"{r:.1f}" for r in row["runs"])
        lines.append(
            f"| `{flags}` | {row['tokens_per_s']:.1f} | {runs} | **{row['speedup']:.2f}x** |"
        )
    lines.append("")
    (out / "draft_speed.md").write_text("\n".join(lines))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
