"""What the simulated draft achieves, taken from real runs: the request records
(`requests.jsonl`) that `specedge bench` writes.

A record holds, per request, its prompt and completion lengths, its rounds, how many of them
the server decoded itself (*streamed*, one token each), were cut to nothing or verified how
many nodes, and the proactive hits. Records keep per-request counts, not per-round ones, so
each simulated request draws one measured request (same temperature and prompt set; of the
same system where the records have it, else of any drafting system: SpecEdge and server-spec
grow the same trees, but SpecEdge sends trees only where they pay and lets the server decode
the rest, so its verified rounds are the easier ones: at T = 0 here alpha 0.62 against
server-spec's 0.53 for the same draft and prompts) and plays its rounds with
that request's *step acceptance* alpha: the probability that the target accepts the draft's
next token along the tree's best path. Alpha is the solution of

    1 + alpha + alpha^2 + ... + alpha^L = tokens per verified round of the record,

over its rounds that verified a tree (streamed and cut rounds, one token each, left out),
with L the mean nodes those rounds verified (at most the tree depth). A simulated tree's
nodes, best first, carry the estimates alpha^1 .. alpha^depth along that path (then zeros:
nodes off the path, taken never to be accepted); a round that verifies k of them accepts j
nodes with probability alpha^j (1 - alpha) (j < k), so the estimates are calibrated by
construction (the real edge calibrates them online, within 2% in the committed runs). A probe
(the draft's one guess while the server decodes) hits with probability alpha; a proactive bet
hits with the record's hit rate.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from specedge.bench.results import EDGE_SYSTEMS, REQUESTS_FILE, SERVER_SPEC
from specedge.errors import SpecEdgeError

DRAFTING_SYSTEMS = (*EDGE_SYSTEMS, SERVER_SPEC)  # their trees come from the same draft

K = TypeVar("K", bound=Hashable)


class AcceptanceError(SpecEdgeError):
    """No usable request records for the simulated settings."""


@dataclass(frozen=True)
class RequestSample:
    """One measured request, as the simulator replays it."""

    prompt_tokens: int
    tokens: int  # completion tokens (its length: it may have stopped before max tokens)
    alpha: float  # step acceptance, see the module docstring
    proactive_hit_rate: float
    category: str = ""

    def estimates(self, num_nodes: int, depth: int) -> tuple[float, ...]:
        """The estimates of a tree of `num_nodes` nodes, best first (non-increasing)."""
        path = min(num_nodes, depth)
        values = [self.alpha**j for j in range(1, path + 1)]
        return tuple(values) + (0.0,) * (num_nodes - path)

    def accepted(self, verified: int, depth: int, rng: random.Random) -> int:
        """Accepted draft tokens of a round that verified the first `verified` nodes."""
        accepted = 0
        while accepted < min(verified, depth) and rng.random() < self.alpha:
            accepted += 1
        return accepted


def step_acceptance(tokens_per_round: float, depth: int) -> float:
    """The alpha with 1 + alpha + ... + alpha^depth = `tokens_per_round` (bisection)."""
    target = min(max(tokens_per_round, 1.0), depth + 1.0 - 1e-9)
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if sum(middle**j for j in range(depth + 1)) < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


@dataclass(frozen=True)
class AcceptanceModel:
    """The usable records by temperature."""

    samples: dict[float, tuple[RequestSample, ...]]
    source: str
    # the same records by (system, temperature): a system's own requests where there are some
    by_system: dict[tuple[str, float], tuple[RequestSample, ...]] = field(default_factory=dict)

    def draw(
        self, temperature: float, rng: random.Random, system: str | None = None
    ) -> RequestSample:
        """A measured request of `temperature`: of `system` where the records have one, else
        of any drafting system."""
        pool = self.by_system.get((system, temperature)) if system else None
        pool = pool or self.samples.get(temperature)
        if not pool:
            known = ", ".join(f"{t:g}" for t in sorted(self.samples)) or "none"
            raise AcceptanceError(
                f"{self.source} has no drafting records at temperature {temperature:g} "
                f"(it has: {known}); simulate those temperatures or pass other records"
            )
        return rng.choice(pool)

    def mean_alpha(self, temperature: float) -> float:
        pool = self.samples.get(temperature, ())
        return sum(s.alpha for s in pool) / len(pool) if pool else 0.0

    @classmethod
    def from_records(
        cls,
        records: Iterable[dict[str, Any]],
        depth: int,
        *,
        prompt_set: str = "specbench",
        source: str = "records",
    ) -> AcceptanceModel:
        """Samples from request records (lines of `requests.jsonl`) of the drafting systems
        (SpecEdge and server-spec: the same draft and tree shape) on `prompt_set` that
        completed. A request whose rounds were all streamed says nothing of
        its trees: it gets the mean alpha of its temperature's other requests."""
        usable = [
            r
            for r in records
            if r.get("system") in DRAFTING_SYSTEMS
            and r.get("prompt_set", "specbench") == prompt_set
            and not r.get("error")
            and r.get("tokens", 0) > 0
        ]
        pooled = _grouped(usable, lambda r: float(r["temperature"]), depth)
        own = _grouped(usable, lambda r: (str(r["system"]), float(r["temperature"])), depth)
        return cls(pooled, source, own)

    @classmethod
    def from_bench(
        cls, directory: Path, depth: int, *, prompt_set: str = "specbench"
    ) -> AcceptanceModel:
        """The records of a `specedge bench` output directory."""
        path = directory / REQUESTS_FILE if directory.is_dir() else directory
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise AcceptanceError(
                f"cannot read request records {path}: {error.strerror} (give a `specedge bench` "
                "output directory or its requests.jsonl)"
            ) from None
        records = [json.loads(line) for line in lines if line.strip()]
        return cls.from_records(records, depth, prompt_set=prompt_set, source=str(path))


def _grouped(
    records: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], K], depth: int
) -> dict[K, tuple[RequestSample, ...]]:
    """The samples of `records` grouped by `key` (each group fits its own fallback alpha)."""
    groups: dict[K, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return {k: _samples(group, depth) for k, group in groups.items()}


def _samples(records: Sequence[dict[str, Any]], depth: int) -> tuple[RequestSample, ...]:
    fitted = [_record_alpha(record, depth) for record in records]
    known = [a for a in fitted if a is not None]
    fallback = sum(known) / len(known) if known else 0.0
    attempts = sum(r.get("proactive_attempts", 0) for r in records)
    pooled_hits = sum(r.get("proactive_hits", 0) for r in records) / attempts if attempts else 0.0
    samples = []
    for record, alpha in zip(records, fitted, strict=True):
        tried = record.get("proactive_attempts", 0)
        samples.append(
            RequestSample(
                prompt_tokens=max(1, int(record.get("prompt_tokens", 1))),
                tokens=int(record["tokens"]),
                alpha=fallback if alpha is None else alpha,
                proactive_hit_rate=record.get("proactive_hits", 0) / tried
                if tried
                else pooled_hits,
                category=str(record.get("category", "")),
            )
        )
    return tuple(samples)


def _record_alpha(record: dict[str, Any], depth: int) -> float | None:
    """A record's step acceptance from its verified rounds (speculative, not cut to nothing),
    over the path its verified nodes could cover (`depth`, or fewer where the record says how
    many nodes its rounds verified); None when it had no such round."""
    streamed, cut = record.get("streamed_rounds", 0), record.get("cut_rounds", 0)
    verified_rounds = record.get("rounds", 0) - streamed - cut
    verified_tokens = record["tokens"] - streamed - cut  # streamed and cut rounds emit one each
    if verified_rounds <= 0 or verified_tokens < verified_rounds:
        return None
    path = depth
    if record.get("verified_nodes"):
        path = min(depth, max(1, round(record["verified_nodes"] / verified_rounds)))
    return step_acceptance(verified_tokens / verified_rounds, path)
