"""Acceptance of the bundled draft on SpecBench: mean tokens per verification round.

For each SpecBench prompt (first turn, chat template), temperature and context lookup length,
runs tree speculative decoding in-process (`LocalGenerator`) with the target and (a) the
distilled draft, (b) an untrained shallow draft (the target's embeddings, head and layers
[0, 1, L-2, L-1], no training), and reports tokens per round (accepted + bonus) per category
and overall. `--lookups 0 12` measures each draft alone and with context lookup side by side.

    python benchmarks/draft_acceptance.py --every 8 --baseline-every 24

writes benchmarks/results/draft_acceptance.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from specedge.bench.prompts import SPECBENCH_FILE, load_prompts
from specedge.core.limits import TreeShape
from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.distill.student import layer_sources
from specedge.model.loader import (
    LoadedModel,
    build_model,
    load_model,
    parse_dtype,
)
from specedge.model.weights import convert_hf_state_dict, read_state_dict
from specedge.text import encode_prompt

ROOT = Path(__file__).resolve().parent
DATA = SPECBENCH_FILE


def shallow_untrained_draft(target: LoadedModel, num_layers: int = 4) -> LoadedModel:
    """The target's embeddings, final norm, head and layers [0, 1, L-2, L-1], untrained."""
    config = replace(target.config, num_layers=num_layers)
    hf = read_state_dict(target.directory)
    state = convert_hf_state_dict(hf, target.config)
    sources = layer_sources(target.config.num_layers, num_layers)
    picked = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for dst, src in enumerate(sources):
        for key, value in state.items():
            if key.startswith(f"layers.{src}."):
                picked[f"layers.{dst}." + key.removeprefix(f"layers.{src}.")] = value
    model = build_model(config, picked, "cpu", target.dtype)
    return replace(target, name="shallow-untrained", model=model, config=config)


def read_prompts(every: int) -> list[dict[str, str]]:
    return [
        {"id": p.prompt_id, "category": p.category, "prompt": p.text}
        for p in load_prompts(DATA)[::every]
    ]


def run(
    target: LoadedModel,
    draft: LoadedModel,
    prompts: list[dict[str, str]],
    temperature: float,
    shape: TreeShape,
    max_tokens: int,
) -> dict[str, object]:
    # Whole trees of the budget (`adaptive=False`): the draft's acceptance, not what goodput
    # sizing on this CPU would verify of it (since 5d4b7db the generator sizes trees by
    # default, which cut the budget-32 trees here and the tokens per round with them).
    generator = LocalGenerator(target, draft, shape, adaptive=False)
    per_category: dict[str, list[float]] = defaultdict(list)
    rounds = tokens = 0
    start = time.perf_counter()
    for index, record in enumerate(prompts):
        ids = encode_prompt(target.tokenizer, record["prompt"], chat=True)
        params = SamplingParams(temperature=temperature, seed=index)
        output = generator.generate(ids, params, max_tokens, target.stop_token_ids)
        per_category[record["category"]].append(output.stats.tokens_per_round)
        rounds += output.stats.rounds
        tokens += output.completion_tokens
    every_prompt = [v for values in per_category.values() for v in values]
    return {
        "draft": draft.name,
        "lookup": shape.lookup,
        "temperature": temperature,
        "num_prompts": len(prompts),
        "mean_tokens_per_round": statistics.fmean(every_prompt),
        "pooled_tokens_per_round": tokens / max(rounds, 1),
        "per_category": {k: statistics.fmean(v) for k, v in sorted(per_category.items())},
        "seconds": time.perf_counter() - start,
    }


def write_report(results: list[dict[str, object]], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "draft_acceptance.json").write_text(
        json.dumps({"settings": vars(args), "results": results}, indent=2) + "\n"
    )
    categories = sorted({c for r in results for c in r["per_category"]})  # type: ignore[attr-defined]
    header = "| draft | lookup | T | prompts | mean | pooled | " + " | ".join(categories) + " |"
    lines = [
        "# Draft acceptance on SpecBench",
        "",
        f"Mean tokens per verification round (accepted + bonus; mean over prompts; pooled = "
        f"all tokens / all rounds) of tree speculative decoding, target `{args.target}`, tree "
        f"budget {args.budget}, depth {args.depth}, decay {args.decay}, context lookup chain "
        f"length as in the "
        f"`lookup` column (0 = the draft model alone), {args.max_tokens} new tokens, chat "
        "template, "
        f"first turn of each prompt, dtype {args.dtype}. Distilled draft: every "
        f"{args.every}th SpecBench prompt; "
        f"untrained shallow draft (target layers [0, 1, L-2, L-1] + target embeddings/head, "
        f"no training): every {args.baseline_every}th. Per-category columns are means over "
        "that category's prompts in the subsample (few prompts each: indicative only).",
        "",
        header,
        "|" + "---|" * (6 + len(categories)),
    ]
    for r in results:
        cells = [f"{r['per_category'].get(c, float('nan')):.2f}" for c in categories]  # type: ignore[attr-defined]
        lines.append(
            f"| {r['draft']} | {r.get('lookup', 0)} | {r['temperature']} | {r['num_prompts']} | "
            f"**{r['mean_tokens_per_round']:.2f}** | {r['pooled_tokens_per_round']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", args.note, ""] if args.note else [""]
    (out / "draft_acceptance.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--draft", default="smollm2-135m-draft")
    parser.add_argument("--every", type=int, default=8, help="take every n-th prompt")
    parser.add_argument("--baseline-every", type=int, default=24)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--decay", type=float, default=TreeShape.decay)
    parser.add_argument("--lookups", type=int, nargs="+", default=[0, TreeShape.lookup])
    parser.add_argument("--note", default="", help="appended to the report")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--which", choices=["both", "draft", "baseline"], default="both")
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument(
        "--report-only", action="store_true", help="re-render the report (e.g. a new --note)"
    )
    args = parser.parse_args()
    if args.report_only:
        write_report(other_results(Path(args.out), []), args)
        return
    dtype = parse_dtype(args.dtype)
    target = load_model(args.target, dtype=dtype)
    drafts = []
    if args.which in ("both", "draft"):
        drafts.append((load_model(args.draft, dtype=dtype), read_prompts(args.every)))
    if args.which in ("both", "baseline"):
        drafts.append((shallow_untrained_draft(target), read_prompts(args.baseline_every)))
    shape = TreeShape(budget=args.budget, depth=args.depth, decay=args.decay)
    mine: list[dict[str, object]] = []
    for draft, prompts in drafts:
        for lookup in args.lookups:
            for temperature in args.temperatures:
                result = run(
                    target, draft, prompts, temperature, replace(shape, lookup=lookup),
                    args.max_tokens,
                )  # fmt: skip
                print(json.dumps(result), flush=True)
                mine.append(result)
                write_report(other_results(Path(args.out), mine) + mine, args)


def key(result: dict[str, object]) -> tuple[object, ...]:
    return result["draft"], result.get("lookup", 0), result["temperature"]


def other_results(out: Path, mine: list[dict[str, object]]) -> list[dict[str, object]]:
    """Results already in the report for other settings (an earlier run, or a concurrent one
    on the other core: it is re-read before every write)."""
    path = out / "draft_acceptance.json"
    if not path.exists():
        return []
    done = {key(r) for r in mine}
    return [r for r in json.loads(path.read_text())["results"] if key(r) not in done]


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
