"""Draft depth calibration: pick the depth that keeps both the server and the edges busy.

With pipeline-aware scheduling the server alternates between groups of edges: while it verifies
one group, the other group's replies travel back, those edges draft their next trees, and the
trees travel to the server. An edge's cycle outside the server is therefore
`RTT + depth x draft_step`, and it should last about one verification of the other group:

    depth x draft_step + RTT ~= verify      ->      depth = round((verify - RTT) / draft_step)

Shallower trees leave the server idle between batches; deeper ones make the server wait for
drafts. The published example: 94.2 ms verify, 11 ms per draft step, 15 ms RTT -> depth 7.
(Proactive drafting fills the RTT itself, so it does not enter the balance.)

`measure_timings` times one verification and the draft steps of one tree with the real models,
each pinned to the core its role gets in the benchmark.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from specedge.bench.processes import Placement
from specedge.core.draft import DraftEngine
from specedge.core.limits import TreeShape
from specedge.core.model_runner import ModelRunner
from specedge.core.sampling import SamplingParams
from specedge.core.target import GenerationLimits, TargetEngine
from specedge.model.loader import LoadedModel

MIN_DEPTH = 1
MAX_DEPTH = 32


@dataclass(frozen=True)
class Timings:
    verify_ms: float  # one batched verification of `batch` trees of `budget` nodes
    draft_step_ms: float  # one draft forward of the tree growth
    batch: int
    budget: int


def suggest_depth(
    verify_ms: float,
    draft_step_ms: float,
    rtt_ms: float,
    *,
    min_depth: int = MIN_DEPTH,
    max_depth: int = MAX_DEPTH,
) -> int:
    """The depth whose drafting time plus the RTT matches one verification (module docstring),
    clamped to [min_depth, max_depth]."""
    if verify_ms <= 0 or draft_step_ms <= 0 or rtt_ms < 0:
        raise ValueError(
            "need verify_ms > 0, draft_step_ms > 0 and rtt_ms >= 0, got "
            f"{verify_ms}, {draft_step_ms}, {rtt_ms}"
        )
    if not 1 <= min_depth <= max_depth:
        raise ValueError(f"need 1 <= min_depth <= max_depth, got {min_depth}, {max_depth}")
    depth = round((verify_ms - rtt_ms) / draft_step_ms)
    return max(min_depth, min(max_depth, depth))


@contextlib.contextmanager
def pinned(cpus: Collection[int] | None) -> Iterator[None]:
    """Run the block on `cpus` (this thread only, as Linux affinity is per thread)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def measure_timings(
    target: LoadedModel,
    draft: LoadedModel,
    prompt_tokens: Sequence[int],
    shape: TreeShape,
    *,
    batch: int = 1,
    repeats: int = 3,
    target_cpus: Collection[int] | None = None,
    draft_cpus: Collection[int] | None = None,
) -> Timings:
    """Median over `repeats` rounds of: growing one tree of `shape` (per draft step) and
    verifying `batch` copies of it (greedy, no stop tokens). The first round warms up and is
    not counted."""
    max_context = len(prompt_tokens) + (repeats + 2) * (shape.depth + 2) + 8
    max_block = shape.max_block
    target_engine = TargetEngine(
        ModelRunner(target, num_slots=batch, max_context=max_context, max_block=max_block),
        GenerationLimits(max_tree_nodes=shape.budget, max_tree_depth=shape.depth),
    )
    draft_engine = DraftEngine(
        ModelRunner(draft, num_slots=1, max_context=max_context, max_block=max_block), shape
    )
    params = SamplingParams(temperature=0.0)
    sequences = [target_engine.open(prompt_tokens, params, max_context) for _ in range(batch)]
    draft_seq = draft_engine.open(prompt_tokens)
    verify_ms, step_ms = [], []
    with pinned(target_cpus):
        for seq in sequences:
            target_engine.prefill(seq)
    with pinned(draft_cpus):
        draft_engine.prefill(draft_seq)
    for _ in range(repeats + 1):
        with pinned(draft_cpus):
            start = time.perf_counter()
            builder = draft_engine.builder(draft_seq)
            builder.grow()
            sent = builder.sent_tree()
            step_ms.append(1000 * (time.perf_counter() - start) / max(builder.steps, 1))
        with pinned(target_cpus):
            start = time.perf_counter()
            results = target_engine.verify([(seq, sent.tree) for seq in sequences])
            verify_ms.append(1000 * (time.perf_counter() - start))
        # Greedy verification of one tree on one context: every sequence takes this path.
        draft_engine.advance(draft_seq, sent, results[0])
    for seq in sequences:
        target_engine.close(seq)
    draft_engine.close(draft_seq)
    return Timings(
        verify_ms=statistics.median(verify_ms[1:]),
        draft_step_ms=statistics.median(step_ms[1:]),
        batch=batch,
        budget=shape.budget,
    )


def calibrate_depth(
    target_name: str,
    draft_name: str,
    prompt: str,
    budget: int,
    rtt_ms: float,
    batch: int,
    placement: Placement,
    edges_per_core: int = 1,
) -> tuple[int, Timings]:
    """Load the pair, time them on their roles' cores (one torch thread) and suggest a depth.
    Timed with a tree of `budget` nodes grown to the deepest useful depth. When
    `edges_per_core` edges draft at once on one core (a benchmark on a small machine, unlike
    edges with a GPU each), each one's draft step takes that many times longer."""
    import torch

    from specedge.model.loader import load_model
    from specedge.text import encode_prompt

    torch.set_num_threads(1)
    target = load_model(target_name)
    draft = load_model(draft_name, dtype=target.dtype)
    shape = TreeShape(budget=budget, depth=min(budget, 8))
    prompt_tokens = encode_prompt(target.tokenizer, prompt, chat=True)
    timings = measure_timings(
        target,
        draft,
        prompt_tokens,
        shape,
        batch=batch,
        target_cpus=placement.server_cpus,
        draft_cpus=placement.edge_cpus,
    )
    shared_step_ms = timings.draft_step_ms * edges_per_core
    return suggest_depth(timings.verify_ms, shared_step_ms, rtt_ms), timings
