"""Calibrated acceptance estimates (DESIGN.md section 12): what a drafter's raw estimate that
the target accepts the path to a node is really worth, learned online from verdicts.

A small draft's probabilities are miscalibrated (at T = 0 the target accepts a token the
draft gives 0.3 far more or less often than 30% of the time, depending on the pair and the
prompts), and the server's goodput selection is only as good as the estimates it ranks. So
each drafter keeps an `AcceptanceCalibrator`: raw estimates fall into bins by their base-2
logarithm (1, 1/2, 1/4, ...); each bin counts how many verified nodes of that bin the target
accepted, with older rounds weighted down, and starts from a prior of a few pseudo-observations
at raw^gamma, one exponent fitted to every bin's record (least squares of log rate on log raw):
a bin the verifier never tried (its nodes were always cut) still moves with the others, so an
underconfident draft gets its deep nodes verified and learnt from. The calibrated map is the
bins' rates made non-decreasing in the raw estimate (pool-adjacent-violators, i.e. isotonic
regression over the bins) and interpolated linearly in log raw estimate between bin centres,
so it never reorders nodes: a child's calibrated estimate stays at or below its parent's, and
a tree sent best-first by raw estimate is still best-first after calibration.

Temperatures behave differently (greedy acceptance is all-or-nothing per token), so each
temperature regime has its own bins. Only verified nodes teach: a node the verifier cut was
never tried.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

NUM_BINS = 12  # raw estimates 1 .. 2^-11 and below
PRIOR_WEIGHT = 4.0  # pseudo-observations at the prior per bin
GAMMA_RANGE = (0.1, 3.0)  # the prior's exponent: raw^gamma
FORGETTING = 0.998  # per observed node of the regime: a window of roughly 500 nodes


def temperature_regime(temperature: float) -> str:
    """The calibration regime of a temperature: greedy, or three bands of sampling."""
    if temperature == 0.0:
        return "greedy"
    if temperature <= 0.5:
        return "low"
    if temperature <= 1.0:
        return "mid"
    return "high"


def _bin(raw: float) -> int:
    if raw <= 0.0:
        return NUM_BINS - 1
    return min(NUM_BINS - 1, max(0, int(math.floor(-math.log2(min(raw, 1.0))))))


def _centre(index: int) -> float:
    """A bin's representative raw estimate: the geometric middle of [2^-(i+1), 2^-i]."""
    return 2.0 ** -(index + 0.5)


@dataclass
class _Bins:
    hits: list[float] = field(default_factory=lambda: [0.0] * NUM_BINS)
    trials: list[float] = field(default_factory=lambda: [0.0] * NUM_BINS)
    curve: list[float] = field(default_factory=list)  # calibrated value at each bin centre

    def __post_init__(self) -> None:
        self.curve = self._fit()

    def observe(self, raw: float, accepted: bool) -> None:
        index = _bin(raw)
        for i in range(NUM_BINS):
            self.hits[i] *= FORGETTING
            self.trials[i] *= FORGETTING
        self.hits[index] += float(accepted)
        self.trials[index] += 1.0

    def refit(self) -> None:
        self.curve = self._fit()

    def _gamma(self) -> float:
        """The exponent of the prior raw^gamma: weighted least squares through the origin of
        log(observed rate) on log(bin centre); 1 (the raw estimate) before any data."""
        numerator = denominator = 0.0
        for i in range(NUM_BINS):
            if self.trials[i] <= 0.0:
                continue
            rate = min(0.99, max(0.01, self.hits[i] / self.trials[i]))
            x = math.log(_centre(i))
            numerator += self.trials[i] * math.log(rate) * x
            denominator += self.trials[i] * x * x
        if denominator <= 0.0:
            return 1.0
        return min(GAMMA_RANGE[1], max(GAMMA_RANGE[0], numerator / denominator))

    def _fit(self) -> list[float]:
        """Per-bin rates with the prior, made non-increasing in bin index (bin 0 holds the
        highest raw estimates) by pool-adjacent-violators."""
        gamma = self._gamma()
        rates = [
            (self.hits[i] + PRIOR_WEIGHT * _centre(i) ** gamma) / (self.trials[i] + PRIOR_WEIGHT)
            for i in range(NUM_BINS)
        ]
        weights = [self.trials[i] + PRIOR_WEIGHT for i in range(NUM_BINS)]
        blocks: list[list[float]] = []  # [value, weight, count]
        for rate, weight in zip(rates, weights, strict=True):
            blocks.append([rate, weight, 1])
            while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
                value, w, n = blocks.pop()
                last = blocks[-1]
                total = last[1] + w
                last[0] = (last[0] * last[1] + value * w) / total
                last[1] = total
                last[2] += n
        curve: list[float] = []
        for value, _, count in blocks:
            curve += [value] * int(count)
        return curve

    def value(self, raw: float) -> float:
        """The curve interpolated linearly in log2(raw) between bin centres (constant beyond
        the first and last centres)."""
        if raw <= 0.0:
            return self.curve[-1]
        x = -math.log2(min(raw, 1.0)) - 0.5  # bin centres sit at x = 0, 1, 2, ...
        if x <= 0.0:
            return self.curve[0]
        if x >= NUM_BINS - 1:
            return self.curve[-1]
        low = int(math.floor(x))
        frac = x - low
        return (1.0 - frac) * self.curve[low] + frac * self.curve[low + 1]


class AcceptanceCalibrator:
    """Raw acceptance estimates -> calibrated, per temperature regime, learned from verdicts.
    One per drafter (an edge's sessions share it: the same draft and target)."""

    def __init__(self) -> None:
        self._regimes: dict[str, _Bins] = {}
        self.observed_nodes = 0

    def _bins(self, temperature: float) -> _Bins:
        return self._regimes.setdefault(temperature_regime(temperature), _Bins())

    def calibrate(self, raw: Sequence[float], temperature: float) -> tuple[float, ...]:
        """Calibrated estimates of `raw` (same order; non-increasing where `raw` is)."""
        bins = self._bins(temperature)
        return tuple(min(1.0, max(0.0, bins.value(r))) for r in raw)

    def observe(
        self,
        raw: Sequence[float],  # in sent order
        num_verified: int,
        accepted: Collection[int],  # tree indices of the accepted nodes
        temperature: float,
    ) -> None:
        """Learn from a verdict: each of the first `num_verified` nodes was accepted or not."""
        if num_verified <= 0:
            return
        bins = self._bins(temperature)
        accepted = set(accepted)
        for node in range(min(num_verified, len(raw))):
            bins.observe(raw[node], node in accepted)
        bins.refit()
        self.observed_nodes += num_verified
