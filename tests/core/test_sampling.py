"""Sampling: temperature / top-k / top-p kept sets equal transformers' logits warpers (ties and
extreme values included), samples follow `probabilities`, seeded generators are deterministic
and independent, invalid parameters are rejected, temperatures below the floor decode greedily,
no accepted parameters produce NaN, and a row with NaN logits draws the invalid token alone."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specedge.core.sampling import (
    INVALID_TOKEN,
    MIN_TEMPERATURE,
    TOP_P_CANDIDATES,
    SamplingParams,
    filter_logits,
    greedy_tokens,
    invert_cdf,
    make_generator,
    probabilities,
    sample,
    sample_at,
)
from specedge.errors import InvalidRequestError

VOCAB = 50


def reference_filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """transformers' warpers in generate()'s order: temperature, top-k, top-p."""
    dummy_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(params.temperature)(dummy_ids, logits.clone())
    if params.top_k > 0:
        scores = TopKLogitsWarper(params.top_k)(dummy_ids, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(dummy_ids, scores)
    return scores


def random_logits(
    seed: int, rows: int = 64, vocab: int = VOCAB, ties: bool = False
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(rows, vocab, generator=generator)
    if ties:  # few distinct values: many exact ties at every rank
        logits = logits.round()
    return logits


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
@pytest.mark.parametrize("top_k", [0, 1, 3, 10, VOCAB - 1, VOCAB, VOCAB + 5])
@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.5, 0.1])
@pytest.mark.parametrize("ties", [False, True])
def test_kept_sets_match_transformers(
    temperature: float, top_k: int, top_p: float, ties: bool
) -> None:
    logits = random_logits(seed=top_k * 7 + int(100 * top_p), ties=ties)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    ours = filter_logits(logits, params)
    reference = reference_filter(logits, params)
    kept = torch.isfinite(ours)
    theirs = torch.isfinite(reference)
    scaled = reference_filter(logits, replace(params, top_p=1.0))  # temperature, top-k
    if ties and top_p < 1.0:
        # transformers keeps whichever of the tokens tied at the top-p boundary its sort put
        # first; we keep them all: every token (of those top-k left) as likely as its least
        # likely kept one.
        boundary = reference.masked_fill(~theirs, math.inf).amin(dim=-1, keepdim=True)
        theirs = scaled.isfinite() & (scaled >= boundary)
    assert torch.equal(kept, theirs)
    torch.testing.assert_close(ours[kept], scaled[kept])
    assert kept.any(dim=-1).all(), "every row keeps at least one token"


@pytest.mark.parametrize("top_p", [0.37, 0.83, 0.97])  # off round masses: float sums
def test_top_p_over_a_large_vocabulary_matches_transformers(top_p: float) -> None:
    """Rows whose boundary lies beyond the first TOP_P_CANDIDATES tokens (flat ones) are
    searched further; peaked rows within them: both as transformers keeps them."""
    first = TOP_P_CANDIDATES[0]
    vocab = 8 * first
    generator = torch.Generator().manual_seed(11)
    spread = torch.tensor([0.05, 0.5, 2.0, 6.0]).repeat_interleave(8)[:, None]  # flat to peaked
    logits = spread * torch.randn(len(spread), vocab, generator=generator)
    params = SamplingParams(temperature=1.0, top_p=top_p)
    kept = torch.isfinite(filter_logits(logits, params))
    assert torch.equal(kept, torch.isfinite(reference_filter(logits, params)))
    counts = kept.sum(dim=-1)
    assert counts.max() > first >= counts.min(), "both searches must be exercised"


def test_top_p_is_the_smallest_set_reaching_the_mass() -> None:
    """Independently of transformers: top-p keeps the most likely tokens, in order, until their
    mass reaches top_p (the published prototype sorted the wrong way and kept the least likely)."""
    logits = random_logits(seed=3, rows=32)
    for top_p in (0.2, 0.6, 0.9):
        kept = torch.isfinite(filter_logits(logits, SamplingParams(1.0, top_p=top_p)))
        probs = logits.softmax(dim=-1)
        for row in range(logits.shape[0]):
            order = probs[row].argsort(descending=True)
            mass = probs[row][order].cumsum(dim=0)
            num_kept = int((mass < top_p).sum()) + 1  # up to and including the crossing token
            assert set(order[:num_kept].tolist()) == set(kept[row].nonzero().flatten().tolist())


def test_top_k_keeps_the_k_largest_and_all_ties_at_the_boundary() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, 3.0, -2.0, 4.0]])
    kept = torch.isfinite(filter_logits(logits, SamplingParams(1.0, top_k=2)))
    assert kept[0].tolist() == [False, True, False, False, False, False, True]
    kept = torch.isfinite(filter_logits(logits, SamplingParams(1.0, top_k=3)))
    assert kept[0].tolist() == [False, True, True, True, True, False, True]  # tie at rank 3


def test_tiny_top_p_keeps_only_the_most_likely_token() -> None:
    logits = random_logits(seed=4)
    probs = probabilities(logits, SamplingParams(temperature=1.0, top_p=1e-9))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), VOCAB).float())
    # Even when the top two are almost tied.
    near_tie = torch.tensor([[2.0, 2.0 - 1e-6, 0.0]])
    assert probabilities(near_tie, SamplingParams(1.0, top_p=0.01)).tolist() == [[1.0, 0.0, 0.0]]


def test_probabilities() -> None:
    logits = random_logits(seed=5)
    params = SamplingParams(temperature=0.7, top_p=0.8, top_k=12)
    probs = probabilities(logits, params)
    torch.testing.assert_close(probs.sum(-1), torch.ones(logits.shape[0]))
    expected = reference_filter(logits, params).softmax(-1)
    torch.testing.assert_close(probs, expected)
    assert ((probs > 0).sum(-1) <= 12).all()
    greedy = probabilities(logits, SamplingParams(temperature=0.0))
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(
        greedy.sum(-1), torch.ones(64)
    )


def test_greedy_sample_is_argmax_and_ignores_the_generator() -> None:
    logits = random_logits(seed=6)
    generator = make_generator(0)
    state = generator.get_state()
    assert torch.equal(sample(logits, SamplingParams(0.0), generator), logits.argmax(-1))
    assert torch.equal(generator.get_state(), state)


def test_samples_follow_probabilities() -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    params = SamplingParams(temperature=1.3, top_p=0.9, top_k=6)
    probs = probabilities(logits, params)[0]
    num_samples = 20_000
    draws = sample(logits.expand(num_samples, -1), params, make_generator(7))
    counts = torch.bincount(draws, minlength=8)
    kept = probs > 0
    assert counts[~kept].sum() == 0, "a filtered token was sampled"
    result = chisquare(counts[kept].numpy(), (num_samples * probs[kept]).double().numpy())
    assert result.pvalue > 1e-3


def test_same_seed_same_samples_different_seed_different_samples() -> None:
    logits = random_logits(seed=8, rows=200)
    params = SamplingParams(temperature=1.0, seed=42)
    first = sample(logits, params, make_generator(params.seed))
    again = sample(logits, params, make_generator(params.seed))
    other = sample(logits, params, make_generator(43))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_generators_are_independent() -> None:
    """Draws from one request's generator do not depend on other requests' draws."""
    logits = random_logits(seed=9, rows=4)
    params = SamplingParams(temperature=1.0)
    alone = make_generator(1)
    expected = [sample(logits, params, alone) for _ in range(20)]
    mine, theirs = make_generator(1), make_generator(2)
    interleaved = []
    for _ in range(20):
        sample(logits, params, theirs)
        interleaved.append(sample(logits, params, mine))
        sample(logits.repeat(3, 1), params, theirs)
    assert all(torch.equal(a, b) for a, b in zip(expected, interleaved, strict=True))


def test_unseeded_generators_differ() -> None:
    logits = random_logits(seed=10, rows=200)
    params = SamplingParams(temperature=1.0)
    assert not torch.equal(
        sample(logits, params, make_generator(None)), sample(logits, params, make_generator(None))
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"temperature": -1e-40}, "temperature must be >= 0"),
        ({"temperature": math.nan}, "temperature must be finite"),
        ({"temperature": math.inf}, "temperature must be finite"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": -0.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": math.nan}, "top_p must be finite"),
        ({"top_p": math.inf}, "top_p must be finite"),
        ({"top_k": -1}, "top_k must be >= 0"),
    ],
)
def test_invalid_params_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-8, MIN_TEMPERATURE / 2])
def test_temperatures_below_the_floor_decode_greedily(temperature: float) -> None:
    """Dividing by such a temperature overflows float32 (softmax NaN); below the documented
    floor the parameters say greedy instead, and every path samples the argmax."""
    params = SamplingParams(temperature=temperature, top_p=0.9, seed=3)
    assert params.greedy and params.temperature == 0.0
    logits = random_logits(seed=12)
    assert torch.equal(sample_at(logits, params, 3, range(64)), logits.argmax(-1))
    assert torch.equal(sample(logits, params, make_generator(3)), logits.argmax(-1))
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy


@pytest.mark.parametrize("temperature", [MIN_TEMPERATURE, 0.01, 1.0, 2.0, 1e6])
@pytest.mark.parametrize("top_p", [1e-9, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [0, 1, VOCAB + 1])
def test_accepted_parameters_never_produce_nan(
    temperature: float, top_p: float, top_k: int
) -> None:
    """The whole accepted range, on logits as wide as a bf16 model's (about +-1e4), ties
    included: every row is a distribution and every draw a real token."""
    logits = random_logits(seed=13, ties=True) * 3000
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    probs = probabilities(logits, params)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(logits.shape[0]))
    drawn = sample_at(logits, params, 5, range(logits.shape[0]))
    assert ((drawn >= 0) & (drawn < VOCAB)).all()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_row_with_nan_logits_draws_the_invalid_token_alone(temperature: float) -> None:
    """A model that gives one row NaN logits: that row draws INVALID_TOKEN (the caller fails
    its sequence), every other row draws what it draws without the broken row."""
    logits = random_logits(seed=14, rows=6)
    params = SamplingParams(temperature=temperature, seed=1)
    clean = sample_at(logits, params, 9, range(6))
    logits[2, 7] = math.nan
    drawn = sample_at(logits, params, 9, range(6))
    assert drawn[2] == INVALID_TOKEN
    keep = torch.arange(6) != 2
    assert torch.equal(drawn[keep], clean[keep])


@pytest.mark.parametrize("vocab", [49152, 151936, 1000, 97])
def test_greedy_tokens_equal_argmax_with_ties(vocab: int) -> None:
    """The two-level argmax is `argmax` exactly, first maximum included, for vocabularies
    with chunk divisors (SmolLM2's, Qwen's) and without (a prime)."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(12, vocab, generator=generator).round(decimals=1)  # many ties
    logits[3] = 0.0  # a row of ties only: the first index
    logits[4, -1] = 100.0  # the last column
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
    assert torch.equal(greedy_tokens(logits.bfloat16()), logits.bfloat16().argmax(dim=-1))


@pytest.mark.parametrize("vocab", [49152, 1000, 97])
def test_invert_cdf_equals_a_whole_vocabulary_search_and_skips_zero_probability(
    vocab: int,
) -> None:
    """The two-level inverse CDF picks the token a float64 cumulative sum over the whole
    vocabulary picks (up to summation rounding at exact boundaries, so: almost always), and
    never one of probability zero, even at u next to 1 with zero-probability tails."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(64, vocab, generator=generator) * 3
    logits[:, vocab // 2 :] = -math.inf  # filtered tail: zero probability
    probs = logits.softmax(dim=-1)
    u = torch.rand(64, generator=generator, dtype=torch.float64)
    u[:4] = torch.tensor([0.0, 1e-300, 1 - 1e-16, math.nextafter(1.0, 0.0)])
    cdf = probs.double().cumsum(dim=-1)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    actual = invert_cdf(probs, u)
    assert (actual == expected.clamp(max=vocab - 1)).float().mean() >= 0.95
    assert (probs.gather(1, actual[:, None]) > 0).all()
