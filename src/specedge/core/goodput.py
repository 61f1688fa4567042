"""Goodput-optimal verification: how much of each ready tree a batch should verify
(DESIGN.md section 12): the server's executor, the in-process verifier and server-side
drafting all choose with `select_prefixes`, and drafters size their trees with `TreeSizer`.

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
class CostPoint:
    """One measured forward: `sequences` sequences of `rows` rows in all (each sequence's root
    plus its nodes, or a prompt chunk's tokens) after about `context` tokens each, in
    `seconds` (a median of repeats). What cost models are fitted to."""

    sequences: int
    rows: int
    context: int
    seconds: float


# Before any profile or batch: a guess of the right order for a small model on a CPU core.
UNPROFILED_BATCH_COST = LinearBatchCost(fixed_s=0.010, per_sequence_s=0.0, per_row_s=0.001)


@dataclass(frozen=True)
class Selection:
    verified: list[int]  # per tree: how many of its leading nodes to verify
    expected_tokens: float  # expected emitted tokens of the batch
    seconds: float  # modelled time of the batch

    @property
    def goodput(self) -> float:
        """Expected emitted tokens per second of server time."""
        return self.expected_tokens / self.seconds


def select_prefixes(
    estimates: Sequence[Sequence[float]],
    cost: BatchCostFunction,
    *,
    fixed_tokens: float = 0.0,
) -> Selection:
    """The prefix of each tree (estimates in sent order, non-increasing, each in [0, 1]) that
    maximises the batch's goodput under `cost`; among equal goodputs, the fewest nodes.
    `fixed_tokens`: expected tokens of batch members outside the selection (whose rows the
    caller's `cost` adds), counted in every candidate's goodput."""
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
    expected = float(sequences) + fixed_tokens  # every round emits at least one token
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


class FittedBatchCost:
    """A `LinearBatchCost` kept current from observed batches (sequences, rows, seconds): least
    squares with older batches weighted down by `forgetting` per observation, pulled towards
    `prior` with the weight of `prior_weight` observations, so that it is defined from the
    first batch on and a run of equal-sized batches cannot make it singular."""

    def __init__(
        self, prior: LinearBatchCost, forgetting: float = 0.99, prior_weight: float = 0.1
    ) -> None:
        if not 0.0 < forgetting <= 1.0 or prior_weight <= 0.0:
            raise ValueError("forgetting must be in (0, 1] and prior_weight > 0")
        self.prior = prior
        self.forgetting = forgetting
        self.prior_weight = prior_weight
        self.observations = 0
        self._count = 0.0  # the observations' total weight
        self._xx = [[0.0] * 3 for _ in range(3)]  # weighted sum of x x^T, x = (1, n, rows)
        self._xy = [0.0] * 3  # weighted sum of x * seconds
        self._current = prior

    def observe(self, sequences: int, rows: int, seconds: float) -> None:
        x = (1.0, float(sequences), float(rows))
        for i in range(3):
            self._xy[i] = self.forgetting * self._xy[i] + x[i] * seconds
            for j in range(3):
                self._xx[i][j] = self.forgetting * self._xx[i][j] + x[i] * x[j]
        self._count = self.forgetting * self._count + 1.0
        self.observations += 1
        self._current = self._fit()

    def __call__(self, sequences: int, rows: int) -> float:
        return self._current(sequences, rows)

    @property
    def current(self) -> LinearBatchCost:
        return self._current

    def _fit(self) -> LinearBatchCost:
        """Least squares plus `prior_weight` pseudo-observations at the prior along each
        coefficient (ridge towards the prior, scaled by that coefficient's mean x^2)."""
        prior = (self.prior.fixed_s, self.prior.per_sequence_s, self.prior.per_row_s)
        a = [row[:] for row in self._xx]
        b = list(self._xy)
        for i in range(3):
            weight = self.prior_weight * max(self._xx[i][i] / self._count, 1e-12)
            a[i][i] += weight
            b[i] += weight * prior[i]
        fixed, per_sequence, per_row = _solve3(a, b)
        return LinearBatchCost(max(fixed, 0.0), max(per_sequence, 0.0), max(per_row, 0.0))


def _solve3(a: list[list[float]], b: list[float]) -> tuple[float, float, float]:
    """Solve a 3x3 system by Gaussian elimination with partial pivoting (`a` is positive
    definite here, so a pivot never vanishes)."""
    m = [row[:] + [rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, 3):
            factor = m[r][col] / m[col][col]
            for c in range(col, 4):
                m[r][c] -= factor * m[col][c]
    x = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        x[r] = (m[r][3] - sum(m[r][c] * x[c] for c in range(r + 1, 3))) / m[r][r]
    return x[0], x[1], x[2]


class TreeSizer:
    """How many nodes a drafter drafts next (DESIGN.md section 12): about what the verifier
    recently verified of its trees, with headroom so the size can grow back when the verifier
    wants more (`headroom` times the smoothed count plus `extra`), and at least `minimum`
    nodes, a cheap probe that lets the verifier say when speculation pays again. Drafting
    less than the cap is also sending sooner: a tree of k nodes needs at most k draft steps."""

    def __init__(
        self,
        cap: int,
        *,
        headroom: float = 1.5,
        extra: int = 2,
        minimum: int = 2,
        smoothing: float = 0.5,
    ) -> None:
        if cap < 0 or minimum < 0 or headroom < 1.0 or not 0.0 < smoothing <= 1.0:
            raise ValueError("cap, minimum >= 0, headroom >= 1 and smoothing in (0, 1]")
        self.cap = cap
        self.headroom = headroom
        self.extra = extra
        self.minimum = minimum
        self.smoothing = smoothing
        self.verified = float(cap)  # smoothed verified nodes per round; starts at the cap

    def next_size(self) -> int:
        wanted = round(self.headroom * self.verified) + self.extra
        return max(min(self.minimum, self.cap), min(self.cap, wanted))

    def observe(self, num_verified: int) -> None:
        self.verified += self.smoothing * (num_verified - self.verified)
