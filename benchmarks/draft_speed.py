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
    python benchmarks/draft_speed.py --draft new=smollm2-135m-draft --draft old=OLD_DIR
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
from specedge.distill.card import HELDOUT_FILE
from specedge.distill.run import DistillConfig
from specedge.distill.sources import TEMPLATES, split_prompts
from specedge.model.loader import LoadedModel, load_model, parse_dtype, resolve_model_dir
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


def heldout_prompts(draft_dir: Path, count: int) -> list[str]:
    """The draft's held-out prompts (`heldout_prompts.jsonl`, written by `specedge distill`;
    for a draft without it, its distillation's defaults): tuning data that is neither the
    draft's training data nor SpecBench."""
    listed = draft_dir / HELDOUT_FILE
    if listed.exists():
        return [json.loads(line)["prompt"] for line in listed.read_text().splitlines()][:count]
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


def spec_flags(shape: tuple[int, ...], draft: str = "smollm2-135m-draft") -> list[str]:
    budget, depth, width, beams, lookup = shape
    return [
        "--draft", draft, "--mode", "spec", "--budget", str(budget),
        "--depth", str(depth), "--width", str(width), "--beams", str(beams),
        "--lookup", str(lookup),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune-prompts", type=int, default=4)
    parser.add_argument("--cli-prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--draft",
        action="append",
        default=[],
        help="LABEL=DRAFT (repeatable; default: the bundled draft): drafts measured side by "
        "side, tuned on the first one's held-out prompts, their generate runs alternated",
    )
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--note", default="", help="how the machine was used, for the report")
    args = parser.parse_args()
    drafts = dict(d.partition("=")[::2] for d in args.draft) or {"bundled": "smollm2-135m-draft"}
    dtype = parse_dtype("bfloat16")
    target = load_model("smollm2-135m", dtype=dtype)
    texts = heldout_prompts(resolve_model_dir(next(iter(drafts.values()))), args.tune_prompts)
    latency: dict[str, dict[str, float]] = {}
    tuning: dict[str, list[dict]] = {}
    variants: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (draft, shape)
    for label, name in drafts.items():
        draft = load_model(name, dtype=dtype)
        latency[label] = {
            "target_1_token_ms": 1e3 * step_latency(target, 1),
            "draft_1_token_ms": 1e3 * step_latency(draft, 1),
            "draft_8_tokens_ms": 1e3 * step_latency(draft, 8),
            "target_33_tokens_ms": 1e3 * step_latency(target, 33),
        }
        latency[label]["draft_over_target_1_token"] = (
            latency[label]["draft_1_token_ms"] / latency[label]["target_1_token_ms"]
        )
        print(json.dumps({label: latency[label]}), flush=True)
        tuning[label] = tune(target, draft, texts, 96)
        best = max(tuning[label][1:], key=lambda r: r["tokens_per_s"])["shape"]
        budget, depth, width, beams, lookup = best
        variants[f"{label}: spec"] = (name, best)
        if lookup == 0:
            variants[f"{label}: spec + lookup"] = (name, (budget, depth, width, beams, depth))
    rates: dict[str, list[float]] = {"ar": [], **{name: [] for name in variants}}
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.jsonl"
        prompt_file.write_text(
            "".join(json.dumps({"prompt": p}) + "\n" for p in prompts(args.cli_prompts))
        )
        for _ in range(args.repeats):
            rates["ar"].append(cli_rate(["--mode", "ar"], prompt_file))
            for name, (draft_name, shape) in variants.items():
                rates[name].append(cli_rate(spec_flags(shape, draft_name), prompt_file))
            print(json.dumps({name: runs[-1] for name, runs in rates.items()}), flush=True)
    ar = statistics.fmean(rates["ar"])
    cli = {
        name: {
            "draft": variants[name][0] if name in variants else None,
            "shape": variants[name][1] if name in variants else None,
            "tokens_per_s": statistics.fmean(runs),
            "runs": runs,
            "speedup": statistics.fmean(runs) / ar,
        }
        for name, runs in rates.items()
    }
    report = {
        "drafts": drafts,
        "latency": latency,
        "tuning": tuning,
        "cli": cli,
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "draft_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    described = ", ".join(f"`{label}` = `{name}`" for label, name in drafts.items())
    lines = [
        "# Draft speed on this CPU (bf16)",
        "",
        f"Drafts: {described}. torch threads: {torch.get_num_threads()}. {args.note} Ratios "
        "come from the same process (latency) or alternated runs (generate).",
        "",
        "## Single-step latency (64-token context, forward + logits, median)",
        "",
        "| draft | target, 1 token | draft, 1 token | draft / target | draft, 8 tokens (a "
        "frontier step) | target, 33 tokens (a budget-32 verify) |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in latency.items():
        lines.append(
            f"| {label} | {row['target_1_token_ms']:.1f} ms | {row['draft_1_token_ms']:.1f} ms "
            f"| **{row['draft_over_target_1_token']:.3f}** | {row['draft_8_tokens_ms']:.1f} ms "
            f"| {row['target_33_tokens_ms']:.1f} ms |"
        )
    lines += [
        "",
        f"## Tree shape tuning (in-process, greedy, 96 new tokens, {args.tune_prompts} held-out "
        f"prompts of the `{next(iter(drafts))}` draft's distillation)",
        "",
        "| budget, depth, width, beams, lookup | "
        + " | ".join(f"{label} tokens/s | {label} tokens/round" for label in drafts)
        + " |",
        "|---|" + "---|---|" * len(drafts),
    ]
    first = next(iter(tuning.values()))
    for index, row in enumerate(first):
        name = "AR (target alone)" if row["shape"] is None else ", ".join(map(str, row["shape"]))
        cells = [
            f"{rows[index]['tokens_per_s']:.1f} | {rows[index]['tokens_per_round']:.2f}"
            for rows in tuning.values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## `specedge generate`, 128 new tokens, chat, temperature 0, bf16, "
        f"{args.cli_prompts} SpecBench prompts, {args.repeats} alternated repeats",
        "",
        "| mode | flags | tokens/s | runs | vs ar |",
        "|---|---|---|---|---|",
    ]
    for name, row in cli.items():
        flags = "--mode ar" if row["shape"] is None else " ".join(spec_flags(row["shape"])[4:])
        runs = " / ".join(f"{r:.1f}" for r in row["runs"])
        lines.append(
            f"| {name} | `{flags}` | {row['tokens_per_s']:.1f} | {runs} "
            f"| **{row['speedup']:.2f}x** |"
        )
    lines.append("")
    (out / "draft_speed.md").write_text("\n".join(lines))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
