"""Context lookup: draft tokens copied from the sequence's own text (prompt lookup decoding).

Answers often repeat their prompt (summaries, extraction, RAG, code edits) or themselves (lists,
small models' loops), and a small draft model copies poorly. When the last `n` tokens of the
context (the root included) occurred earlier, the tokens that followed that occurrence are a
free guess at what comes next. The draft tree takes that *lookup chain* as extra candidates
(`TreeBuilder`), scored by how often this sequence's lookups have come true so far
(`LookupStats`), so they compete for the budget with the model's proposals on equal terms.

Losslessness is untouched: the target verifies every node, whatever proposed it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_NGRAM = 4  # longest context suffix matched
MIN_NGRAM = 1


def lookup_chain(
    context: Sequence[int],
    length: int,
    max_ngram: int = MAX_NGRAM,
    min_ngram: int = MIN_NGRAM,
    ends: Sequence[int] | None = None,
) -> tuple[list[int], int]:
    """The up to `length` tokens that followed an earlier occurrence of the longest suffix of
    `context` (between `min_ngram` and `max_ngram` tokens; the most recent occurrence with the
    most tokens after it), and that suffix's length; ([], 0) when no suffix recurs. `ends`:
    the positions before the last where the last token occurs, ascending, if the caller keeps
    them (`TokenPositions`), else found by a scan of the context."""
    size = len(context)
    if length < 1 or size < 2:
        return [], 0
    best_end, best_key = -1, (0, 0)
    # Occurrences end at `end` < size - 1 (a token must follow). Prefer the longest match,
    # then the longest continuation (up to `length`), then the most recent.
    last = context[-1]
    if ends is None:
        ends = [i for i, token in enumerate(context[: size - 1]) if token == last]
    for end in reversed(ends):
        n = 0
        while n < max_ngram and n <= end and context[end - n] == context[size - 1 - n]:
            n += 1
        key = (n, min(length, size - 1 - end))
        if key > best_key:
            best_end, best_key = end, key
            if key == (max_ngram, length):
                break
    best_n = best_key[0]
    if best_n < min_ngram:
        return [], 0
    return list(context[best_end + 1 : best_end + 1 + length]), best_n


@dataclass
class TokenPositions:
    """Where each token of a growing context occurs, kept up to date as the context grows, so
    that a lookup every step costs the occurrences of one token, not a scan of the context."""

    positions: dict[int, list[int]] = field(default_factory=dict)
    indexed: int = 0  # context[:indexed] is in `positions`

    def ends(self, context: Sequence[int]) -> list[int]:
        """`lookup_chain`'s `ends` for `context` (this object's context, grown since)."""
        for i in range(self.indexed, len(context) - 1):
            self.positions.setdefault(context[i], []).append(i)
        self.indexed = max(self.indexed, len(context) - 1)
        return self.positions.get(context[-1], []) if context else []


@dataclass
class LookupStats:
    """How often a sequence's lookup chain tokens came true, per matched suffix length, as
    counts seeded with one hit in two tries (a prior of 1/2 that the sequence's own record
    overrides within a few rounds)."""

    hits: dict[int, float] = field(default_factory=dict)
    tries: dict[int, float] = field(default_factory=dict)

    def log_p(self, ngram: int) -> float:
        """Estimated log-probability that a chain token is right given its parent is."""
        return math.log((self.hits.get(ngram, 0.0) + 1.0) / (self.tries.get(ngram, 0.0) + 2.0))

    def record(self, chain: Sequence[int], ngram: int, emitted_tokens: Sequence[int]) -> None:
        """Score a chain against what the target emitted after the same root: token i was
        tried iff tokens 0..i-1 were right, and is right iff the target emitted it there."""
        if not chain:
            return
        right, tried = 0, 0
        for guess, token in zip(chain, emitted_tokens, strict=False):
            tried += 1
            if guess != token:
                break
            right += 1
        self.tries[ngram] = self.tries.get(ngram, 0.0) + tried
        self.hits[ngram] = self.hits.get(ngram, 0.0) + right
