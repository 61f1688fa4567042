"""Logits to probabilities and samples, per request.

`SamplingParams` carries a request's temperature, top-p, top-k and seed; each request draws
from its own stream (`sample_at`: one uniform per sequence position, from the seed), so
concurrent requests never perturb each other's streams and a seeded request's output does not
depend on how much speculation its rounds verified. `sample` draws from a `torch.Generator`.
Temperature 0 means greedy (argmax). Filtering follows the usual order: temperature, then
top-k, then top-p (the smallest set of most likely tokens whose mass reaches top_p; at least
one token is always kept).

Accepted ranges (checked once, in `SamplingParams`, wherever the parameters come from): a
finite temperature >= 0, where anything below `MIN_TEMPERATURE` decodes greedily (logits
divided by 1e-40 overflow to inf and softmax gives NaN); a finite top_p in (0, 1]; top_k >= 0
(`NO_TOP_K` disables it, as does any k at or above the vocabulary). Within these ranges the
filtered logits are finite and every row keeps a token, so no request can produce NaN; a row
that still has no distribution (the model's own logits NaN) samples `INVALID_TOKEN`, which its
caller turns into a failure of that sequence alone.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specedge.errors import InvalidRequestError

# Temperatures below this decode greedily (vLLM's floor too): the largest logit gap of a real
# model divided by it stays far inside float32, and the distribution is one-hot in all but
# exact ties anyway.
MIN_TEMPERATURE = 1e-5
NO_TOP_K = 0  # top_k that keeps every token
INVALID_TOKEN = -1  # what `sample_at` draws from a row with no distribution (NaN logits)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # below MIN_TEMPERATURE: stored as 0, greedy
    top_p: float = 1.0
    top_k: int = NO_TOP_K
    seed: int | None = None

    def __post_init__(self) -> None:
        """The one validation of sampling parameters, wherever they come from (HTTP, gRPC,
        the command line); see the module docstring for the accepted ranges."""
        if not math.isfinite(self.temperature):
            raise InvalidRequestError(f"temperature must be finite, got {self.temperature}")
        if not math.isfinite(self.top_p):
            raise InvalidRequestError(f"top_p must be finite, got {self.top_p}")
        if not self.temperature >= 0.0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(
                f"top_k must be >= 0 ({NO_TOP_K} disables it), got {self.top_k}"
            )
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)  # one greedy spelling downstream

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


_MASK64 = (1 << 64) - 1


def stream_seed(seed: int | None) -> int:
    """A request's sampling stream: its seed, or a fresh random one."""
    return secrets.randbits(63) if seed is None else seed & _MASK64


def position_uniform(stream: int, position: int) -> float:
    """The uniform in [0, 1) a request's stream gives the token at `position` (splitmix64 of
    the pair): a function of where the token goes, not of how many draws came before."""
    z = (stream * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


def sample_at(
    logits: Tensor, params: SamplingParams, stream: int, positions: Sequence[int]
) -> Tensor:
    """One token per row, row i drawn for sequence position `positions[i]`: [n, V] -> [n]
    int64. Each draw inverts the row's distribution at the position's own uniform
    (`position_uniform`), so the token a request gets at a position depends only on its seed,
    the position and the distribution there: a seeded request's output is the same whether a
    round verified a big tree, a cut one or none (autoregressive decoding). Each emitted token
    is still an exact draw from the target's distribution at the emitted prefix, with
    independent uniforms across positions: verification stays lossless.

    A row without a distribution (NaN logits from the model) draws `INVALID_TOKEN`: checked on
    the device, so the round keeps its one device-to-host copy."""
    if params.greedy:
        tokens = greedy_tokens(logits)
        return torch.where(logits.amax(dim=-1).isnan(), INVALID_TOKEN, tokens)
    probs = filter_logits(logits, params).softmax(dim=-1)
    u = torch.tensor(
        [position_uniform(stream, p) for p in positions], dtype=torch.float64, device=probs.device
    )
    tokens = invert_cdf(probs, u)
    return torch.where(probs.sum(dim=-1).isfinite(), tokens, INVALID_TOKEN)


TOP_P_CANDIDATES = (256, 4096)  # most likely tokens searched, in turn, for the top-p boundary


def _chunk_size(vocab: int) -> int:
    """Columns per chunk of the two-level searches below: the largest divisor of the
    vocabulary in [64, 1024], or the whole vocabulary when it has none."""
    return next((c for c in range(1024, 63, -1) if vocab % c == 0), vocab)


def greedy_tokens(logits: Tensor) -> Tensor:  # [n, V] -> [n] int64
    """`logits.argmax(-1)` (the first maximum of each row), in two levels: the chunks'
    maxima, then the best chunk's argmax. torch's CPU argmax over a whole vocabulary is
    unvectorised, about 9x slower than `amax`; a 17-node tree's samples took 1.7 ms."""
    rows, vocab = logits.shape
    chunk = _chunk_size(vocab)
    if chunk == vocab:
        return logits.argmax(dim=-1)
    blocks = logits.contiguous().view(rows, vocab // chunk, chunk)
    best = blocks.amax(dim=-1).argmax(dim=-1)  # the first chunk holding the row's maximum
    index = torch.arange(rows, device=logits.device)
    return best * chunk + blocks[index, best].argmax(dim=-1)


def invert_cdf(probs: Tensor, u: Tensor) -> Tensor:  # [n, V], [n] float64 -> [n] int64
    """The first token whose cumulative probability exceeds `u` times the row's mass, with
    float64 cumulative sums in two levels (chunk masses, then one chunk's cumulative sum)
    instead of over a float64 copy of the whole vocabulary. Never a zero-probability token:
    the chosen chunk has mass, and inside it the search stops where the sum last grew."""
    rows, vocab = probs.shape
    chunk = _chunk_size(vocab)
    blocks = probs.contiguous().view(rows, vocab // chunk, chunk)
    cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)  # [n, chunks]
    mass = cdf[:, -1]
    # Scaled by each row's mass and kept below it, so the chosen chunk is one that has mass.
    targets = torch.minimum(u * mass, torch.nextafter(mass, torch.zeros_like(mass)))
    best = torch.searchsorted(cdf, targets[:, None], right=True)[:, 0]
    best = best.clamp_(max=cdf.shape[-1] - 1)
    before = torch.where(best > 0, cdf.gather(1, (best - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    index = torch.arange(rows, device=probs.device)
    inside = blocks[index, best].double().cumsum(dim=-1)  # [n, chunk]
    last = inside[:, -1]
    rest = torch.minimum(targets - before, torch.nextafter(last, torch.zeros_like(last)))
    within = torch.searchsorted(inside, rest[:, None], right=True)[:, 0]
    return best * chunk + within.clamp_(max=chunk - 1)


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:  # [n, V] -> [n, V]
    """Temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        logits = logits.masked_fill(_outside_top_p(logits, params.top_p), float("-inf"))
    return logits


def _outside_top_p(logits: Tensor, top_p: float) -> Tensor:  # [n, V] -> [n, V] bool
    """The tokens top-p removes: the most likely tokens are kept, in order, up to and including
    the one whose mass reaches `top_p`, and every token as likely as that one (ties at the
    boundary are all kept, as top-k keeps them).

    Most rows reach the mass within their few most likely tokens, so the search takes the
    `TOP_P_CANDIDATES` most likely first (`topk` of 256 of a 49k vocabulary: 0.07 ms here,
    against 3.3 ms to sort the row, which was most of a sampled row's cost), then more for
    the rows still short of the mass, and sorts whole only the flattest rows."""
    probs = logits.softmax(dim=-1)
    vocab = probs.shape[-1]
    threshold = probs.new_empty(probs.shape[0], 1)
    todo = torch.arange(probs.shape[0], device=probs.device)
    for candidates in (*TOP_P_CANDIDATES, vocab):
        head = probs[todo].topk(min(candidates, vocab), dim=-1).values  # [m, k] descending
        reached = head.sum(dim=-1) >= top_p if candidates < vocab else head[:, 0] >= 0
        threshold[todo[reached]] = _crossing(head[reached], top_p)
        todo = todo[~reached]
        if len(todo) == 0:
            break
    return probs < threshold


def _crossing(descending: Tensor, top_p: float) -> Tensor:  # [n, k] -> [n, 1]
    """The probability of the token at which each row's cumulative mass reaches `top_p` (the
    last token when it never does)."""
    rank = (descending.cumsum(dim=-1) < top_p).sum(dim=-1, keepdim=True)
    return descending.gather(-1, rank.clamp_(max=descending.shape[-1] - 1))


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:  # [n, V] -> [n, V]
    """The distribution a request samples from (one-hot at the argmax when greedy)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return filter_logits(logits, params).softmax(dim=-1)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> Tensor:
    """One token per row: [n, V] -> [n] int64."""
    if params.greedy:
        return greedy_tokens(logits)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
