"""How a drafter judges, while the server decodes its session, whether trees would pay again
(`core.round_loop.ProbeScore`): the rounds a chain of its guesses would have made, replayed
over the streamed tokens, and a backoff for phases of trees that did not pay."""

from __future__ import annotations

import pytest

from specedge.core.round_loop import MAX_BACKOFF, MIN_PROBES, PROBE_WINDOW, ProbeScore


def scored(hits: str, depth: int = 6) -> ProbeScore:
    """A score that observed `hits` ('1' a hit, '0' a miss) in one streamed phase."""
    score = ProbeScore(depth)
    for hit in hits:
        score.observe(hit == "1")
    return score


def test_runs_of_hits_replay_as_rounds() -> None:
    # Rounds: 1110 (3 accepted + 1), 0 (1), 10 (1 + 1), 0 (1): 8 tokens in 4 rounds; the
    # trailing 11 is a round the window cut short.
    assert scored("1110010011").tokens_per_round() == pytest.approx(8 / 4)


def test_the_depth_caps_a_round() -> None:
    # Depth 2: 11|1 0|... a chain of two guesses accepts at most two, the verifier adds one.
    assert scored("1111110", depth=2).tokens_per_round() == pytest.approx(7 / 3)


def test_clustered_hits_promise_less_than_their_mean_rate_says() -> None:
    """Half the tokens hit, in one long run: 1 / (1 - h) = 2 tokens a round, but most rounds
    start at a miss and emit one token."""
    hits = "0" * 24 + "1" * 24
    score = scored(hits)
    assert score.tokens_per_round() < 1 / (1 - 0.5)
    assert score.tokens_per_round() == pytest.approx((24 + 3 * 7) / (24 + 3))


def test_trees_are_wanted_above_the_threshold_after_enough_probes() -> None:
    good = "1110" * (MIN_PROBES // 4 + 1)  # 4 tokens a round
    assert scored(good).wants_trees(3.5)
    assert not scored(good).wants_trees(4.5)
    assert not scored(good[: MIN_PROBES - 1]).wants_trees(1.5)


def test_each_streamed_phase_after_trees_needs_twice_the_probes() -> None:
    score = ProbeScore(6)
    needed = []
    for _ in range(MAX_BACKOFF + 2):
        probes = 0
        while not score.wants_trees(1.5):
            score.observe(True)
            probes += 1
        needed.append(probes)
        score.trees_verified()  # the trees did not pay: streamed again
    # A run of hits fills the first round only once depth + 1 probes are in.
    expected = [max(MIN_PROBES * 2**i, 7) for i in range(MAX_BACKOFF + 1)]
    assert needed == [*expected, expected[-1]]
    assert len(score.hits) <= PROBE_WINDOW
