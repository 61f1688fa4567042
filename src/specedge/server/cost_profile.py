"""The start-up cost profile of verification (DESIGN.md section 12): what one batched
verification forward costs by sequences and rows, measured on this machine before the server
takes sessions, then kept current by the executor from every batch (`FittedBatchCost`).

The profile runs `TargetEngine.verify` itself (forward, LM head, sampling, acceptance,
compaction) over a small grid of batch sizes and tree sizes on throwaway sequences, a few
repeats each, within a time budget, and fits fixed + per_sequence x sequences + per_row x rows
by least squares. The result is cached per model, model shape, device, dtype, torch version,
thread count, tensor-parallel ranks, attention kernel and specedge version in the user cache
folder (`SPECEDGE_CACHE_DIR`, else `XDG_CACHE_HOME/specedge`, else `~/.cache/specedge`);
`specedge serve --profile-cost` measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

import specedge
from specedge.core.goodput import CostPoint, FittedBatchCost, LinearBatchCost
from specedge.core.sampling import SamplingParams
from specedge.core.target import TargetEngine, TargetSequence
from specedge.core.tree import DraftTree

logger = logging.getLogger(__name__)

PROFILE_BUDGET_S = 30.0  # the most a start-up profile may take
PROFILE_CONTEXT = 128  # context tokens of each throwaway sequence
PROFILE_REPEATS = 3  # timed forwards per grid point (after one untimed)
PROFILE_SEQUENCES = (1, 2, 4, 8)
PROFILE_NODES = (0, 8, 32)  # tree nodes per sequence


def cache_dir() -> Path:
    explicit = os.environ.get("SPECEDGE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "specedge"


def profile_key(engine: TargetEngine, model_name: str) -> str:
    """What a profile depends on: the model and its shape, the device, dtype, torch, threads,
    and the ranks the model is split over (named only when split, which keeps the keys of
    earlier profiles)."""
    runner = engine.runner
    described: dict[str, object] = {
        "model": model_name,
        "config": repr(runner.config),
        "device": str(runner.device),
        "dtype": str(runner.loaded.dtype),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # The code that runs the forward: a new release or kernel costs differently.
        "specedge": specedge.__version__,
        "attention": runner.attention_kernel,
    }
    if runner.tensor_parallel > 1:
        described["tensor_parallel"] = runner.tensor_parallel
    described_json = json.dumps(described, sort_keys=True)
    return hashlib.sha256(described_json.encode()).hexdigest()[:16]


def load_or_profile(
    engine: TargetEngine, model_name: str, *, refresh: bool = False
) -> LinearBatchCost:
    """The cached profile of this engine, or a fresh one (then cached)."""
    path = cache_dir() / "cost" / f"{profile_key(engine, model_name)}.json"
    if not refresh:
        try:
            cached = LinearBatchCost(**json.loads(path.read_text())["cost"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        else:
            logger.info("verification cost profile from %s: %s", path, _describe(cached))
            return cached
    started = time.perf_counter()
    cost = profile_batch_cost(engine)
    logger.info(
        "verification cost profiled in %.1f s: %s", time.perf_counter() - started, _describe(cost)
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": model_name, "cost": asdict(cost)}, indent=1))
    except OSError as error:  # a read-only home is no reason not to serve
        logger.warning("could not cache the cost profile at %s: %s", path, error)
    return cost


def profile_batch_cost(engine: TargetEngine, budget_s: float = PROFILE_BUDGET_S) -> LinearBatchCost:
    """Measure verification forwards over the grid (within `budget_s`, smallest batches
    first) on throwaway sequences and fit the linear cost model."""
    fit = FittedBatchCost(LinearBatchCost(0.0, 0.0, 0.0), forgetting=1.0, prior_weight=1e-6)
    deadline = time.perf_counter() + budget_s
    for point in measure_verify_costs(engine, PROFILE_SEQUENCES, PROFILE_NODES, deadline=deadline):
        fit.observe(point.sequences, point.rows, point.seconds)
    return fit.current


def measure_verify_costs(
    engine: TargetEngine,
    sequences: Sequence[int],
    nodes: Sequence[int],
    *,
    context: int = PROFILE_CONTEXT,
    repeats: int = PROFILE_REPEATS,
    deadline: float = math.inf,
    on_point: Callable[[CostPoint], None] | None = None,
) -> list[CostPoint]:
    """Time `TargetEngine.verify` for each count of `sequences` (ascending) x tree size in
    `nodes` on throwaway sequences of about `context` tokens, `repeats` timed forwards per
    point after one untimed; stops at `deadline` (`time.perf_counter()`) or when the
    contexts are full. Prefill of the throwaway prompts is not timed here."""
    runner = engine.runner
    sequences_grid = [n for n in sequences if n <= runner.kv.num_slots]
    nodes_grid = [k for k in nodes if k <= engine.limits.max_tree_nodes]
    context = max(1, min(context, runner.max_context // 2))
    generator = torch.Generator().manual_seed(0)
    vocab = engine.vocab_size
    points: list[CostPoint] = []
    opened: list[TargetSequence] = []
    try:
        for count in sequences_grid:
            while len(opened) < count:
                prompt = torch.randint(0, vocab, (context,), generator=generator).tolist()
                seq = engine.open(prompt, SamplingParams(), max_new_tokens=runner.max_context)
                engine.prefill(seq)
                opened.append(seq)
            for num_nodes in nodes_grid:
                times = []
                for repeat in range(repeats + 1):
                    batch = [(seq, _chain(num_nodes, vocab, generator)) for seq in opened[:count]]
                    if any(
                        len(seq.committed) + num_nodes + 2 > runner.max_context for seq, _ in batch
                    ):
                        break  # the throwaway contexts are full: enough measurements
                    start = time.perf_counter()
                    engine.verify(batch)
                    if repeat:  # the first of each point warms caches up
                        times.append(time.perf_counter() - start)
                if times:
                    point = CostPoint(
                        count, count * (num_nodes + 1), context, statistics.median(times)
                    )
                    points.append(point)
                    if on_point is not None:
                        on_point(point)
                if time.perf_counter() > deadline:
                    return points
    finally:
        for seq in opened:
            engine.close(seq)
    return points


def _chain(nodes: int, vocab: int, generator: torch.Generator) -> DraftTree:
    """A random tree of `nodes` nodes, four children per node (a verification's rows cost the
    same whatever the topology: the mask changes, not the work). The target rejects it at the
    root, so on a CPU, where the LM head runs along the walks, each accepted node of a real
    round adds a head call the profile leaves out; the live fit of observed batches has it."""
    tokens = torch.randint(0, vocab, (nodes,), generator=generator).tolist()
    parents = [-1 if i < 4 else i // 4 - 1 for i in range(nodes)]
    return DraftTree(tuple(tokens), tuple(parents))


def _describe(cost: LinearBatchCost) -> str:
    return (
        f"{1000 * cost.fixed_s:.2f} ms + {1000 * cost.per_sequence_s:.2f} ms/sequence + "
        f"{1000 * cost.per_row_s:.3f} ms/row"
    )
