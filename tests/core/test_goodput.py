"""Goodput-optimal prefixes: optimal against brute force on small hand-made and random trees
and cost models (linear, concave, step-shaped), cuts to nothing when nodes do not pay, keeps
everything when rows are free, and rejects estimates that break its preconditions."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from specedge.core.goodput import (
    BatchCostFunction,
    FittedBatchCost,
    LinearBatchCost,
    TreeSizer,
    select_prefixes,
)


def goodput(
    estimates: list[list[float]], verified: tuple[int, ...], cost: BatchCostFunction
) -> float:
    tokens = sum(1 + sum(values[:k]) for values, k in zip(estimates, verified, strict=True))
    return tokens / cost(len(estimates), len(estimates) + sum(verified))


def brute_force(estimates: list[list[float]], cost: BatchCostFunction) -> float:
    choices = itertools.product(*(range(len(values) + 1) for values in estimates))
    return max(goodput(estimates, verified, cost) for verified in choices)


def random_tree_estimates(rng: random.Random, size: int) -> list[float]:
    """Non-increasing acceptance estimates of a best-first tree of `size` nodes."""
    values, p = [], 1.0
    for _ in range(size):
        p *= rng.uniform(0.2, 1.0)
        values.append(p)
    return values


COSTS: dict[str, BatchCostFunction] = {
    "linear, rows dominate": LinearBatchCost(0.002, 0.0005, 0.004),
    "linear, fixed dominates": LinearBatchCost(0.030, 0.001, 0.0002),
    "concave (memory-bound, then compute-bound)": lambda n, rows: 0.02 + 0.001 * math.sqrt(rows),
    "step (a GPU's tile boundary)": lambda n, rows: 0.01 * (1 + rows // 8) + 0.0001 * n,
}


@pytest.mark.parametrize("cost_name", list(COSTS))
@pytest.mark.parametrize("seed", range(20))
def test_selection_is_optimal_against_brute_force(cost_name: str, seed: int) -> None:
    rng = random.Random(seed)
    cost = COSTS[cost_name]
    estimates = [random_tree_estimates(rng, rng.randint(0, 5)) for _ in range(rng.randint(1, 3))]
    selection = select_prefixes(estimates, cost)
    assert selection.goodput == pytest.approx(brute_force(estimates, cost), rel=1e-12)
    assert selection.goodput == pytest.approx(goodput(estimates, tuple(selection.verified), cost))
    assert all(0 <= k <= len(v) for k, v in zip(selection.verified, estimates, strict=True))


def test_hand_made_batch() -> None:
    """Rows cost 10 ms, a batch 10 ms: a node pays when its estimate beats the batch's current
    tokens per row; tree 0's strong chain is kept, tree 1's weak nodes are cut."""
    cost = LinearBatchCost(0.010, 0.0, 0.010)
    selection = select_prefixes([[0.9, 0.8, 0.1], [0.2, 0.1]], cost)
    assert selection.verified == [2, 0]
    assert selection.expected_tokens == pytest.approx(2 + 0.9 + 0.8)
    assert selection.seconds == pytest.approx(0.010 + 0.010 * 4)


def test_trees_that_do_not_pay_are_cut_to_nothing() -> None:
    """Compute-bound and a poor draft: every round becomes a plain decoding step."""
    cost = LinearBatchCost(0.0, 0.0, 0.010)
    selection = select_prefixes([[0.3, 0.1], [0.05]], cost)
    assert selection.verified == [0, 0]
    assert selection.goodput == pytest.approx(2 / 0.020)


def test_free_rows_verify_everything() -> None:
    cost = LinearBatchCost(0.020, 0.0, 0.0)
    assert select_prefixes([[0.9, 0.5, 0.01], [0.4]], cost).verified == [3, 1]


def test_ties_take_the_fewest_nodes() -> None:
    """A node whose estimate equals the batch's tokens per row adds nothing: left out."""
    cost = LinearBatchCost(0.0, 0.0, 1.0)
    assert select_prefixes([[1.0]], cost).verified == [0]  # 1 token / 1 row == 2 / 2


@pytest.mark.parametrize(
    ("estimates", "message"),
    [
        ([[0.5, 0.6]], "must not rise"),
        ([[1.5]], r"\[0, 1\]"),
        ([[-0.1]], r"\[0, 1\]"),
        ([], "at least one sequence"),
    ],
)
def test_bad_estimates_are_rejected(estimates: list[list[float]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_prefixes(estimates, LinearBatchCost(0.01, 0.0, 0.01))


def test_a_cost_model_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        select_prefixes([[0.5]], LinearBatchCost(0.0, 0.0, 0.0))


# ---- the fitted cost model ---------------------------------------------------------------------
def test_fitted_cost_recovers_a_linear_device_from_noisy_batches() -> None:
    rng = random.Random(0)
    device = LinearBatchCost(0.012, 0.0008, 0.0031)
    prior = LinearBatchCost(0.05, 0.0, 0.001)  # wrong on purpose
    fitted = FittedBatchCost(prior)
    assert fitted.current == prior  # defined before the first batch
    for _ in range(400):
        sequences = rng.randint(1, 16)
        rows = sequences + rng.randint(0, 32 * sequences)
        fitted.observe(sequences, rows, device(sequences, rows) * rng.uniform(0.97, 1.03))
    for sequences, rows in [(1, 1), (4, 40), (16, 528)]:
        assert fitted(sequences, rows) == pytest.approx(device(sequences, rows), rel=0.05)


def test_fitted_cost_stays_sane_on_equal_batches() -> None:
    """Batches all of one size cannot separate the coefficients: the prior keeps the system
    solvable and the fit still predicts that size."""
    fitted = FittedBatchCost(LinearBatchCost(0.01, 0.001, 0.001))
    for _ in range(50):
        fitted.observe(4, 36, 0.05)
    assert fitted(4, 36) == pytest.approx(0.05, rel=0.05)
    coefficients = fitted.current
    assert min(coefficients.fixed_s, coefficients.per_sequence_s, coefficients.per_row_s) >= 0


def test_fitted_cost_follows_a_device_that_slows_down() -> None:
    fitted = FittedBatchCost(LinearBatchCost(0.0, 0.0, 0.001), forgetting=0.9)
    for rows in range(1, 200):
        fitted.observe(1, 1 + rows % 20, 0.001 * (1 + rows % 20))
    for rows in range(1, 200):  # the device became twice as slow per row
        fitted.observe(1, 1 + rows % 20, 0.002 * (1 + rows % 20))
    assert fitted(1, 10) == pytest.approx(0.020, rel=0.05)


def test_fixed_tokens_count_in_every_candidate() -> None:
    """Batch members outside the selection (trees verified whole) add their expected tokens to
    every candidate: with many of them a marginal node no longer pays."""
    cost = LinearBatchCost(fixed_s=1.0, per_sequence_s=0.0, per_row_s=0.2)
    alone = select_prefixes([[0.5]], cost)
    assert alone.verified == [1]  # (1 + 0.5) / 1.4 > 1 / 1.2
    crowded = select_prefixes([[0.5]], lambda n, rows: cost(n + 4, rows + 4), fixed_tokens=4.0)
    assert crowded.verified == [0]  # (5 + 0.5) / 2.2 < 5 / 2.0


def test_tree_sizer_follows_what_is_verified() -> None:
    sizer = TreeSizer(32)
    assert sizer.next_size() == 32  # starts at the cap; the verifier cuts
    for _ in range(20):
        sizer.observe(0)
    assert sizer.next_size() == 2  # a probe
    for _ in range(20):
        sizer.observe(10)
    assert sizer.next_size() == 17  # 1.5 x 10 + 2 of headroom
    for _ in range(20):
        sizer.observe(32)
    assert sizer.next_size() == 32  # never past the cap
