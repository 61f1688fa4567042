"""Goodput-optimal verification: how much of each ready tree a batch should verify
(DESIGN.md section 12; the building block of issue 11, not yet wired into the executor).

Each tree node carries an *acceptance estimate*: the probability that the target accepts the
whole path to it. A round of a sequence emits 1 + (accepted nodes) tokens, so verifying the
first k nodes of a tree is expected to emit 1 + sum of their estimates. A batch of n sequences
verifying R rows in total (each sequence's root plus its verified nodes) costs `cost(n, R)`
seconds of server time. The *goodput* of a choice of prefixes is

    sum over sequences (1 + sum of verified estimates) / cost(n, n + verified nodes),

expected emitted tokens per second of server time. A tree may be cut to nothing: that
sequence's round is a plain decoding step.

Estimates never rise along a path (a path's acceptance is a product of per-step
probabilities), and an edge sends its nodes best-first, so within a tree they are
non-increasing in the sent order. Then the best k nodes of the batch, for any total k, are the
k largest estimates over all trees, each tree contributing a prefix, and since the cost depends
on k only, the optimum is the best of the N + 1 totals: O(N log N) for N nodes.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BatchCostFunction = Callable[[int, int], float]  # (sequences, rows) -> seconds, rows > 0


@dataclass(frozen=True)
class LinearBatchCost:
    """A verification forward's modelled time: fixed + per sequence + per row. On a
    compute-bound device the row term dominates; on a GPU at small batch the fixed term."""

    fixed_s: float
    per_sequence_s: float
    per_row_s: float

    def __call__(self, sequences: int, rows: int) -> float:
        return self.fixed_s + self.per_sequence_s * sequences + self.per_row_s * rows


@dataclass(frozen=True)
class Selection:
    verified: list[int]  # per tree: how many of its leading nodes to verify
    expected_tokens: float  # expected emitted tokens of the batch
    seconds: float  # modelled time of the batch

    @property
    def goodput(self) -> float:
        """Expected emitted tokens per second of server time."""
        return self.expected_tokens / self.seconds


def select_prefixes(estimates: Sequence[Sequence[float]], cost: BatchCostFunction) -> Selection:
    """The prefix of each tree (estimates in sent order, non-increasing, each in [0, 1]) that
    maximises the batch's goodput under `cost`; among equal goodputs, the fewest nodes."""
    for tree, values in enumerate(estimates):
        if any(not 0.0 <= p <= 1.0 for p in values):
            raise ValueError(f"tree {tree}: acceptance estimates must lie in [0, 1]")
        if any(later > earlier for earlier, later in zip(values, values[1:], strict=False)):
            raise ValueError(f"tree {tree}: acceptance estimates must not rise in sent order")
    sequences = len(estimates)
    if sequences == 0:
        raise ValueError("a batch needs at least one sequence")
    # Merge the trees' nodes by estimate, largest first (each tree's in its own order).
    order = heapq.merge(*(_nodes(tree, values) for tree, values in enumerate(estimates)))
    expected = float(sequences)  # every round emits at least one token
    best = Selection([0] * sequences, expected, cost(sequences, sequences))
    if not best.seconds > 0:
        raise ValueError(f"the cost model gives {best.seconds} s for a batch; it must be > 0")
    taken = [0] * sequences
    for nodes, (negative_p, tree) in enumerate(order, start=1):
        taken[tree] += 1
        expected -= negative_p
        seconds = cost(sequences, sequences + nodes)
        if expected * best.seconds > best.expected_tokens * seconds:  # a strictly better ratio
            best = Selection(list(taken), expected, seconds)
    return best


def _nodes(tree: int, values: Sequence[float]) -> list[tuple[float, int]]:
    """A tree's nodes as (-estimate, tree) in sent order, for a largest-first merge."""
    return [(-p, tree) for p in values]
