"""The distilled draft's model card (`README.md`), its data card (`data_card.md`: the
self-generated requests) and the acceptance the model card reports.

Acceptance is measured the way users will see it: greedy tree speculative decoding of the
held-out prompts (never trained on) with our own engine, target and fresh draft both loaded
through the model loader, reporting tokens per verification round (accepted + bonus).
"""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from specedge.distill.filters import BENCHMARK_OVERLAP, BENCHMARK_RUN, KEPT, REJECTIONS
from specedge.distill.teacher import TeacherSample

if TYPE_CHECKING:
    from specedge.distill.requests import RequestSettings, RequestStats
    from specedge.distill.run import DistillConfig
    from specedge.distill.train import TrainState

ACCEPTANCE_TOKENS = 96
ACCEPTANCE_BUDGET = 32
DATA_CARD = "data_card.md"
HELDOUT_FILE = "heldout_prompts.jsonl"  # the prompts the measurements used, one JSON a line
CARD_EXAMPLES = 10  # kept requests quoted in the data card
HISTOGRAM_BINS = 8
TEMPLATED_SOURCE = (
    "prompts composed by `specedge/distill/prompts.py`: instruction templates (writing, "
    "role-play, reasoning, coding, explanations), German-to-English translation of sentences "
    "composed there, factual questions, arithmetic word problems, and summaries of / questions "
    "on passages of text that ships with Python (standard-library docstrings, the language "
    "reference in `pydoc_data.topics`); none is taken from an evaluation set, and none shares "
    "an 8-word run with SpecBench (tested)"
)


@dataclass(frozen=True)
class Acceptance:
    num_prompts: int
    max_tokens: int
    budget: int
    tokens_per_round: float  # mean over prompts


def measure_acceptance(
    target: str,
    draft_dir: Path,
    prompts: Sequence[str],
    device: str,
    dtype: torch.dtype,
    max_tokens: int = ACCEPTANCE_TOKENS,
) -> Acceptance:
    from specedge.core.limits import TreeShape
    from specedge.core.local import LocalGenerator
    from specedge.core.sampling import SamplingParams
    from specedge.model.loader import load_model
    from specedge.text import encode_prompt

    target_model = load_model(target, device, dtype)
    # Absolute: a relative --out named like an alias ("smollm2-135m-draft") must load the new
    # draft, not the bundled one.
    draft_model = load_model(str(draft_dir.resolve()), device, dtype)
    # The draft model's own trees: no context lookup, which would credit the model with
    # tokens copied from the context; whole trees of the budget, not goodput-sized ones.
    shape = TreeShape(budget=ACCEPTANCE_BUDGET, lookup=0)
    generator = LocalGenerator(target_model, draft_model, shape, adaptive=False)
    chat = bool(getattr(target_model.tokenizer, "chat_template", None))
    per_prompt = []
    for prompt in prompts:
        ids = encode_prompt(target_model.tokenizer, prompt, chat=chat)
        output = generator.generate(
            ids, SamplingParams(temperature=0.0), max_tokens, target_model.stop_token_ids
        )
        per_prompt.append(output.stats.tokens_per_round)
    return Acceptance(
        num_prompts=len(per_prompt),
        max_tokens=max_tokens,
        budget=ACCEPTANCE_BUDGET,
        tokens_per_round=statistics.fmean(per_prompt) if per_prompt else 0.0,
    )


def write_card(
    config: DistillConfig,
    state: TrainState,
    timing: dict[str, float],
    acceptance: Acceptance,
    train_prompts: Sequence[str],
    heldout_prompts: Sequence[str],
    train: Sequence[TeacherSample],
    heldout: Sequence[TeacherSample],
    num_head_tokens: int,
    shared: Sequence[str],
    requests: RequestStats | None = None,
) -> None:
    out = config.out
    stored_mb = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6
    described = {
        "self": f"{len(requests.kept) if requests else 0} requests the target wrote itself "
        f"(see `{DATA_CARD}`)",
        "templates": TEMPLATED_SOURCE,
    }
    sources = "; ".join(described.get(source, f"`{source}`") for source in config.sources)
    source = f"{len(train_prompts) + len(heldout_prompts)} prompts from: {sources}"
    train_tokens = sum(s.num_generated for s in train)
    lines = [
        f"# Distilled draft for `{config.target}`",
        "",
        "A small draft model for speculative decoding with SpecEdge, trained by knowledge "
        "distillation on the target's own generations.",
        "",
        "## Command",
        "",
        "```",
        config.command or f"specedge distill --target {config.target} --out {out}",
        "```",
        "",
        "## Model",
        "",
        f"- {config.layers} decoder layers ({config.frozen_layers} frozen at the bottom), "
        f"hidden size {config.hidden or 'as the target'}; "
        + (
            f"training continued from the draft `{config.init_from}`"
            if config.init_from
            else "layers initialised from the target's layers (bottom and top halves)"
            if config.init_from_target
            else "random initialisation"
        ),
        f"- LM head over {num_head_tokens} tokens (the most frequent in the teacher data); "
        "the draft never proposes the others, the target verifies every token",
        f"- shared with the target, frozen and not stored: {', '.join(shared) or 'nothing'} "
        "(`specedge_draft.json`; the SpecEdge loader takes them from the target)",
        f"- stored weights: {stored_mb:.1f} MB",
        "",
        "## Data",
        "",
        f"- prompts: {source}",
        f"- training: {len(train)} target generations, {train_tokens} generated tokens "
        "(greedy over all prompts first, then sampled at temperature 0.8 while the data "
        f"budget lasts), up to "
        f"{config.max_new_tokens} new tokens each, top-{config.top_k} target logits kept",
        f"- held out: {len(heldout_prompts)} prompts ({sum(s.num_generated for s in heldout)} "
        f"greedy target tokens, listed in `{HELDOUT_FILE}`), used only for the measurements "
        "below",
        *([] if requests is None else ["", *request_summary(requests)]),
        "",
        "## Training",
        "",
        f"- self-generated requests {timing.get('request_seconds', 0.0) / 60:.1f} min, "
        f"teacher data {timing.get('data_seconds', 0.0) / 60:.1f} min, training "
        f"{state.train_seconds / 60:.1f} min ({state.step} steps, {state.epoch} full epochs, "
        f"{state.tokens_seen} scored tokens); budget --max-minutes {config.max_minutes:g}",
        f"- loss: cross-entropy against the target's top-{config.top_k} distribution "
        f"(teacher-forced); AdamW, lr {config.learning_rate:g}, seed {config.seed}",
        f"- machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"device {config.device}, torch {torch.__version__}",
        "",
        "## Measured",
        "",
        f"- held-out top-1 agreement with the target: {100 * state.agreement:.1f}%",
        f"- tokens per verification round (accepted + bonus), greedy, tree budget "
        f"{acceptance.budget}, draft model only (no context lookup), {acceptance.max_tokens} "
        f"new tokens, {acceptance.num_prompts} held-out prompts: "
        f"{acceptance.tokens_per_round:.2f}",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    records = (json.dumps({"prompt": prompt}, ensure_ascii=False) for prompt in heldout_prompts)
    (out / HELDOUT_FILE).write_text("".join(record + "\n" for record in records))


# ---- the data card ----------------------------------------------------------------------------


def request_summary(stats: RequestStats) -> list[str]:
    """Counts by verdict and the duplicate rate, as Markdown lines."""
    lines = [
        "| candidates sampled | kept | "
        + " | ".join(f"{reason.replace('_', ' ')}" for reason in REJECTIONS)
        + " |",
        "|---" * (len(REJECTIONS) + 2) + "|",
        f"| {stats.generated} | {stats.counts[KEPT]} | "
        + " | ".join(str(stats.counts[reason]) for reason in REJECTIONS)
        + " |",
        "",
        f"- duplicate rate (exact or near copies of a kept request, of all sampled): "
        f"{100 * stats.duplicate_rate:.1f}%",
        f"- benchmark overlap (a shared {BENCHMARK_RUN}-word run with Spec-Bench or an "
        f"--exclude file, dropped): {stats.counts[BENCHMARK_OVERLAP]}",
    ]
    return lines


def length_histogram(lengths: Sequence[int], max_tokens: int) -> list[str]:
    """Kept request lengths in tokens, in `HISTOGRAM_BINS` equal bins up to `max_tokens`."""
    width = max(1, -(-max_tokens // HISTOGRAM_BINS))
    counts = [0] * HISTOGRAM_BINS
    for length in lengths:
        counts[min((length - 1) // width, HISTOGRAM_BINS - 1)] += 1
    scale = max(counts) / 40 if max(counts) > 40 else 1
    lines = ["| tokens | requests | |", "|---|---|---|"]
    for number, count in enumerate(counts):
        bar = "#" * round(count / scale)
        lines.append(f"| {number * width + 1}-{(number + 1) * width} | {count} | `{bar}` |")
    return lines


def _quote(text: str, limit: int = 300) -> str:
    """One line, cut at `limit` characters; `(nothing)` for blank text."""
    text = " ".join(text.split())
    return (text[:limit] + " ...") if len(text) > limit else text or "(nothing)"


def write_data_card(out: Path, stats: RequestStats, settings: RequestSettings, target: str) -> None:
    """`<out>/data_card.md`: how the requests were made, counts, lengths, examples."""
    kept = stats.kept
    lines = [
        f"# Self-generated training requests for `{target}`",
        "",
        "User requests the target wrote itself: its chat template up to the start of a user "
        f"turn (the pre-query template), sampled at temperature {settings.temperature:g}, "
        f"top-p {settings.top_p:g}, at most {settings.max_tokens} tokens, seed "
        f"{settings.seed} (`specedge/distill/requests.py`), then filtered "
        "(`specedge/distill/filters.py`: empty, template echo, unfinished, too short, "
        f"benchmark overlap, exact and near duplicates), until {settings.count} were kept or "
        "the time was up. The kept requests are `.distill/requests.jsonl`, the rejected "
        "`.distill/rejected.jsonl`.",
        "",
        "## Counts",
        "",
        *request_summary(stats),
        "",
        "## Length of the kept requests",
        "",
        *length_histogram([request.num_tokens for request in kept], settings.max_tokens),
        "",
        f"## Examples: the first {min(CARD_EXAMPLES, len(kept))} kept",
        "",
        *(f"{n}. {_quote(request.text)}" for n, request in enumerate(kept[:CARD_EXAMPLES], 1)),
        "",
        "## Examples: the first rejected of each reason",
        "",
        *(
            f"- {reason.replace('_', ' ')}: {_quote(stats.examples[reason])}"
            for reason in REJECTIONS
            if reason in stats.examples
        ),
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / DATA_CARD).write_text("\n".join(lines))
