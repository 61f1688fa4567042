"""Logits to probabilities and samples, per request.

`SamplingParams` carries a request's temperature, top-p, top-k and seed; each request draws
from its own `torch.Generator`, so concurrent requests never perturb each other's streams.
Temperature 0 means greedy (argmax). Filtering follows the usual order: temperature, then
top-k, then top-p (the smallest set of most likely tokens whose mass reaches top_p; at least
one token is always kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from specedge.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k
    seed: int | None = None

    def __post_init__(self) -> None:
        """The one validation of sampling parameters, wherever they come from (HTTP, gRPC,
        the command line)."""
        if not math.isfinite(self.temperature) or not math.isfinite(self.top_p):
            raise InvalidRequestError(
                f"temperature and top_p must be finite, got {self.temperature}, {self.top_p}"
            )
        if not self.temperature >= 0.0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")

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


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:  # [n, V] -> [n, V]
    """Temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1.0 - params.top_p
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:  # [n, V] -> [n, V]
    """The distribution a request samples from (one-hot at the argmax when greedy)."""
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return filter_logits(logits, params).softmax(dim=-1)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> Tensor:
    """One token per row: [n, V] -> [n] int64."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
