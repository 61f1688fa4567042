"""What a self-generated training request must pass before the target answers it.

A *candidate* is the text the target wrote as a user turn (`distill.requests`); it is *kept*
or rejected for the first of these reasons, checked in this order:

- `empty`: no words at all;
- `template_echo`: the text holds a special token or a marker of the chat template (the model
  wrote a role switch instead of a request);
- `unfinished`: the target did not end its turn within the token limit (a request cut off
  mid-sentence);
- `too_short`: fewer than `min_words` words;
- `benchmark_overlap`: it shares a run of `BENCHMARK_RUN` consecutive words with a benchmark
  prompt set (Spec-Bench at least), so that no training request can teach the draft an
  evaluation prompt;
- `duplicate`: its *normalised* text (NFKC, lower case, every run of non-alphanumerics one
  space) equals a kept request's;
- `near_duplicate`: the Jaccard similarity of its word `SHINGLE`-grams with a kept request's
  reaches `near_duplicate`.

Words are always those of the normalised text, on both sides of every comparison.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from specedge.errors import InvalidRequestError

KEPT = "kept"
EMPTY = "empty"
UNFINISHED = "unfinished"
TEMPLATE_ECHO = "template_echo"
TOO_SHORT = "too_short"
BENCHMARK_OVERLAP = "benchmark_overlap"
DUPLICATE = "duplicate"
NEAR_DUPLICATE = "near_duplicate"
REJECTIONS = (
    EMPTY,
    TEMPLATE_ECHO,
    UNFINISHED,
    TOO_SHORT,
    BENCHMARK_OVERLAP,
    DUPLICATE,
    NEAR_DUPLICATE,
)

BENCHMARK_RUN = 8  # words in a row a training request may not share with a benchmark prompt
SHINGLE = 3  # words per shingle of the near-duplicate test
_NON_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """NFKC, lower case, every run of non-alphanumeric characters one space, trimmed."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def word_runs(words: Sequence[str], length: int) -> set[tuple[str, ...]]:
    """Every run of `length` consecutive words."""
    return {tuple(words[i : i + length]) for i in range(len(words) - length + 1)}


def read_benchmark_texts(path: Path) -> list[str]:
    """Every prompt text of a benchmark file: all `turns` of a Spec-Bench line, a `prompt`
    field, or a plain line; a directory stands for its `*.jsonl` files."""
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        return [text for file in files for text in read_benchmark_texts(file)]
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise InvalidRequestError(f"cannot read --exclude {path}: {error.strerror}") from None
    texts: list[str] = []
    for line in filter(str.strip, lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            texts.append(line)
            continue
        if isinstance(record, dict):
            texts.extend(str(turn) for turn in record.get("turns", []))
            if "prompt" in record:
                texts.append(str(record["prompt"]))
        else:
            texts.append(line)
    return texts


def benchmark_runs(texts: Iterable[str], length: int = BENCHMARK_RUN) -> set[tuple[str, ...]]:
    """The word runs a training request must not share (normalised words)."""
    runs: set[tuple[str, ...]] = set()
    for text in texts:
        runs |= word_runs(normalise(text).split(), length)
    return runs


@dataclass(frozen=True)
class FilterSettings:
    min_words: int = 3
    near_duplicate: float = 0.6  # Jaccard similarity of shingles that counts as a copy


class RequestFilter:
    """Judges candidates in order and remembers the kept ones (the duplicate tests compare
    against every request kept so far, through an index from shingle to kept requests)."""

    def __init__(
        self,
        markers: Iterable[str],
        excluded_runs: set[tuple[str, ...]],
        settings: FilterSettings | None = None,
    ) -> None:
        self.markers = tuple(m for m in markers if m)
        self.excluded_runs = excluded_runs
        self.settings = settings or FilterSettings()
        self._normalised: set[str] = set()
        self._shingle_counts: list[int] = []  # per kept request: its number of shingles
        self._index: dict[tuple[str, ...], list[int]] = {}

    def judge(self, text: str, finished: bool) -> str:
        """KEPT (and remembered) or the first rejection reason (module docstring)."""
        words = normalise(text).split()
        if not words:
            return EMPTY
        if any(marker in text for marker in self.markers):
            return TEMPLATE_ECHO
        if not finished:
            return UNFINISHED
        if len(words) < self.settings.min_words:
            return TOO_SHORT
        if not self.excluded_runs.isdisjoint(word_runs(words, BENCHMARK_RUN)):
            return BENCHMARK_OVERLAP
        key = " ".join(words)
        if key in self._normalised:
            return DUPLICATE
        shingles = word_runs(words, SHINGLE)
        if self._is_near_duplicate(shingles):
            return NEAR_DUPLICATE
        self.remember(key, shingles)
        return KEPT

    def remember(self, key: str, shingles: set[tuple[str, ...]]) -> None:
        number = len(self._shingle_counts)
        self._normalised.add(key)
        self._shingle_counts.append(len(shingles))
        for shingle in shingles:
            self._index.setdefault(shingle, []).append(number)

    def _is_near_duplicate(self, shingles: set[tuple[str, ...]]) -> bool:
        shared: Counter[int] = Counter()
        for shingle in shingles:
            shared.update(self._index.get(shingle, ()))
        for number, common in shared.items():
            union = len(shingles) + self._shingle_counts[number] - common
            if common / union >= self.settings.near_duplicate:
                return True
        return False
