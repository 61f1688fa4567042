"""Benchmark prompts: the Spec-Bench question set (JSON Lines: `question_id`, `category`,
`turns`), first turn only, sampled evenly across categories.

Even sampling takes prompts from the categories in turn (in order of first appearance), and
within a category spreads its picks over the whole list, so 16 prompts from 13 categories
cover all 13 and never take only a category's first few.

The Spec-Bench file ships with the package (`assets/specbench/`, with its source and licence):
`--prompts specbench`, the default, needs no file beside the checkout. `--prompts random` is
the worst case for speculation: random text, what load generators send by default (vLLM's
`random` dataset, genai-perf's synthetic prompts), where neither the draft nor the context
lookup can predict the answer. `--prompts long` stacks Spec-Bench's longest first turns (its
RAG and summarization documents) into prompts of about 1,500 tokens, for serving at long
context.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from specedge import ASSETS_DIR
from specedge.errors import InvalidRequestError

SPECBENCH = "specbench"  # the name of the bundled prompt set
SPECBENCH_FILE = ASSETS_DIR / "specbench" / "specbench_prompts.jsonl"
RANDOM_TEXT = "random"  # generated random-text prompts (`random_text_prompts`)
RANDOM_PROMPTS = 64
RANDOM_WORDS = (48, 160)  # words per random prompt
LONG_CONTEXT = "long"  # Spec-Bench documents stacked to about 1,500 tokens (`long_prompts`)
LONG_CATEGORIES = ("rag", "summarization")
LONG_CHARACTERS = (5_600, 6_800)  # about 1,300-1,700 tokens of English (Llama tokenizers)


@dataclass(frozen=True)
class BenchPrompt:
    prompt_id: str
    category: str
    text: str


def random_text_prompts(count: int = RANDOM_PROMPTS, seed: int = 0) -> list[BenchPrompt]:
    """Prompts of random lower-case "words" (2-9 letters), seeded: text no model has seen,
    so its continuation is as unpredictable as the synthetic prompts of load generators."""
    rng = random.Random(seed)
    prompts = []
    for number in range(count):
        words = rng.randint(*RANDOM_WORDS)
        text = " ".join(
            "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(words)
        )
        prompts.append(BenchPrompt(f"random-{number}", RANDOM_TEXT, text))
    return prompts


def long_prompts(characters: tuple[int, int] = LONG_CHARACTERS) -> list[BenchPrompt]:
    """Spec-Bench's RAG and summarization first turns packed (first fit, longest first) into
    prompts of `characters` (min, max) characters, joined by blank lines; documents longer
    than the maximum, and packs that stay short of the minimum, are left out. Deterministic."""
    shortest, longest = characters
    documents = [p.text for p in load_prompts(SPECBENCH) if p.category in LONG_CATEGORIES]
    packs: list[list[str]] = []
    for document in sorted(documents, key=len, reverse=True):
        if len(document) > longest:
            continue
        pack = next((p for p in packs if _joined_length([*p, document]) <= longest), None)
        if pack is None:
            packs.append(pack := [])
        pack.append(document)
    full = [pack for pack in packs if _joined_length(pack) >= shortest]
    return [BenchPrompt(f"long-{i}", LONG_CONTEXT, "\n\n".join(p)) for i, p in enumerate(full)]


def _joined_length(parts: Sequence[str]) -> int:
    return sum(map(len, parts)) + 2 * (len(parts) - 1)  # blank lines between


def prompt_file(source: str | Path) -> Path:
    """The file behind a `--prompts` value: the bundled set's name, or a path."""
    return SPECBENCH_FILE if str(source) == SPECBENCH else Path(source)


def load_prompts(source: str | Path) -> list[BenchPrompt]:
    """Every question's first turn of a prompt file (or the bundled set, by name). Lines may
    also be `{"prompt": ...}` (category "default"). `random` generates random text, `long`
    stacks Spec-Bench documents (`long_prompts`)."""
    if str(source) == RANDOM_TEXT:
        return random_text_prompts()
    if str(source) == LONG_CONTEXT:
        return long_prompts()
    path = prompt_file(source)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise InvalidRequestError(
            f"cannot read the prompt file {path}: {error.strerror}; pass --prompts FILE "
            f"(or {SPECBENCH}, the bundled set)"
        ) from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record["turns"][0] if "turns" in record else record["prompt"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise InvalidRequestError(
                f"{path}:{number}: expected a JSON object with `turns` (Spec-Bench) or `prompt`"
            ) from None
        prompt_id = str(record.get("question_id", number))
        prompts.append(BenchPrompt(prompt_id, str(record.get("category", "default")), str(text)))
    if not prompts:
        raise InvalidRequestError(f"{path} holds no prompts")
    return prompts


def sample_prompts(
    prompts: Sequence[BenchPrompt], num_prompts: int, categories: Sequence[str] = ()
) -> list[BenchPrompt]:
    """`num_prompts` prompts (fewer if the set is smaller) of the given categories (all when
    empty), evenly across categories (module docstring). Deterministic."""
    by_category: dict[str, list[BenchPrompt]] = {}
    for prompt in prompts:
        by_category.setdefault(prompt.category, []).append(prompt)
    unknown = sorted(set(categories) - set(by_category))
    if unknown:
        raise InvalidRequestError(
            f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
            f"the prompt file has {', '.join(by_category)}"
        )
    chosen = [c for c in by_category if not categories or c in categories]
    available = sum(len(by_category[c]) for c in chosen)
    num_prompts = min(num_prompts, available)
    # Picks per category: round-robin, skipping exhausted categories.
    counts = dict.fromkeys(chosen, 0)
    while sum(counts.values()) < num_prompts:
        for category in chosen:
            if sum(counts.values()) < num_prompts and counts[category] < len(by_category[category]):
                counts[category] += 1
    picked: dict[str, list[BenchPrompt]] = {}
    for category, count in counts.items():
        items = by_category[category]
        picked[category] = [items[(i * len(items)) // count] for i in range(count)]
    # Interleave so that any prefix of the list is balanced too.
    result = []
    for i in range(max(counts.values(), default=0)):
        result += [picked[c][i] for c in chosen if i < len(picked[c])]
    return result
