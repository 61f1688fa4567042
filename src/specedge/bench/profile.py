"""`specedge profile`: measure on this device what `specedge simulate` needs, and write it as a
profile JSON (`specedge.sim.profile.DeviceProfile`).

- verification: `TargetEngine.verify` over sequences x tree nodes x context, measured by the
  server's own start-up profiler (`server.cost_profile.measure_verify_costs`), once per
  context;
- draft steps: batched draft steps of 1..S sessions growing real trees of the edge's default
  shape (every builder's rows of a step in one `ModelRunner.forward`, as
  `core.draft_batch.StepBatcher` runs them), and how many rows each step of a tree forwards;
- prefill: prompt chunks of the target and of the draft, by chunk size and start position.

Every point is the median of `repeats` timed calls after an untimed one, on throwaway
sequences of random tokens; a time budget stops the grid early (the largest points last). Pin
the process to one core (`taskset -c 0`) and keep the machine quiet for steady numbers.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from specedge.bench.config import coerce_value
from specedge.config_file import (
    DEFAULT_DEVICE,
    DEVICE_HELP,
    MODEL_HELP,
    check_nonempty,
    check_ranges,
    flag_and_key,
    setting,
)
from specedge.core.goodput import CostPoint
from specedge.errors import InvalidRequestError
from specedge.sim.profile import DeviceProfile, SurfaceCost


@dataclass(frozen=True)
class ProfileSettings:
    target: str = setting("smollm2-135m", f"Target model: {MODEL_HELP}.")
    draft: str = setting("smollm2-135m-draft", "Draft model.")
    out: str = setting("sim-profile.json", "Profile JSON to write.")
    device: str = setting(DEFAULT_DEVICE, DEVICE_HELP)
    dtype: str | None = setting(None, "float32|bfloat16|float16 (default: best for the device).")
    threads: int = setting(1, "torch threads (the benchmark's processes run one).", minimum=1)
    sequences: tuple[int, ...] = setting((1, 2, 4, 8, 16), "Batch sizes to verify.", minimum=1)
    nodes: tuple[int, ...] = setting((0, 4, 8, 16, 32), "Tree nodes per sequence.", minimum=0)
    contexts: tuple[int, ...] = setting((128, 512, 1024), "Context tokens.", minimum=1)
    draft_sessions: tuple[int, ...] = setting((1, 2, 4, 8), "Sessions per draft step.", minimum=1)
    prefill_chunks: tuple[int, ...] = setting((16, 64, 256), "Prefill chunk sizes.", minimum=1)
    repeats: int = setting(3, "Timed calls per point.", minimum=1)
    budget_s: float = setting(600.0, "Time budget of the whole profile, seconds.", minimum=1)

    def validate(self) -> ProfileSettings:
        lists = ("sequences", "nodes", "contexts", "draft_sessions", "prefill_chunks")
        check_nonempty(self, lists, InvalidRequestError)
        return self


QUICK = {
    "sequences": (1, 2),
    "nodes": (0, 4),
    "contexts": (32,),
    "draft_sessions": (1, 2),
    "prefill_chunks": (8, 16),
    "repeats": 1,
}


def load_profile_settings(flags: dict[str, Any], *, quick: bool = False) -> ProfileSettings:
    """Defaults < the QUICK grid (`quick`) < flags (comma-separated lists for tuples)."""
    values: dict[str, Any] = dict(QUICK) if quick else {}
    for name, value in flags.items():
        if value is None:
            continue
        try:
            values[name] = coerce_value(_FIELD_TYPES[name], value)
        except (TypeError, ValueError) as error:
            where = flag_and_key(name, ProfileSettings)
            raise InvalidRequestError(f"{where}: bad value {value!r} ({error})") from None
    settings = replace(ProfileSettings(), **values)
    check_ranges(settings, InvalidRequestError)
    return settings.validate()


def run_profile(settings: ProfileSettings, console: Console | None = None) -> Path:
    """Measure (see the module docstring) and write the profile; returns its path."""
    import torch

    from specedge.core.draft import DraftEngine
    from specedge.core.limits import TreeShape
    from specedge.core.model_runner import ModelRunner
    from specedge.core.sampling import SamplingParams
    from specedge.core.target import GenerationLimits, TargetEngine
    from specedge.model.loader import load_model, parse_dtype
    from specedge.server.cost_profile import measure_verify_costs

    console = console or Console(stderr=True)
    settings.validate()
    torch.set_num_threads(settings.threads)
    dtype = parse_dtype(settings.dtype) if settings.dtype else None
    target = load_model(settings.target, settings.device, dtype)
    draft = load_model(settings.draft, settings.device, target.dtype)
    deadline = time.perf_counter() + settings.budget_s
    shape = TreeShape()
    max_nodes = max(settings.nodes)
    # Room for the largest context twice over (the profiler uses at most half of it) and the
    # tokens every timed verification commits.
    growth = (settings.repeats + 2) * (max_nodes + 2) * len(settings.nodes)
    max_context = 2 * max(settings.contexts) + growth + 64
    slots = max(settings.sequences)
    engine = TargetEngine(
        ModelRunner(target, num_slots=slots, max_context=max_context, max_block=max_nodes + 8),
        GenerationLimits(max_tree_nodes=max(max_nodes, 1), max_tree_depth=max(max_nodes, 1)),
    )
    draft_slots = max(settings.draft_sessions)
    draft_engine = DraftEngine(
        ModelRunner(
            draft,
            num_slots=draft_slots,
            max_context=max(settings.contexts) + max(settings.prefill_chunks) + 64,
            max_block=shape.max_block,
        ),
        shape,
    )
    verify_points = len(settings.sequences) * len(settings.nodes) * len(settings.contexts)
    draft_points = len(settings.draft_sessions) * shape.depth
    prefill_points = 2 * len(settings.prefill_chunks)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("profiling", total=verify_points + draft_points + prefill_points)

        def advance(description: str) -> None:
            progress.update(task, advance=1, description=description)

        verify: list[CostPoint] = []
        for context in settings.contexts:
            verify += measure_verify_costs(
                engine,
                settings.sequences,
                settings.nodes,
                context=context,
                repeats=settings.repeats,
                deadline=deadline,
                on_point=lambda p: advance(
                    f"verify: {p.sequences} x {p.rows // p.sequences - 1} nodes, {p.context} ctx"
                ),
            )
        params = SamplingParams()
        prefill = _chunk_points(
            lambda prompt: engine.open(prompt, params, max_new_tokens=8),
            engine.prefill_chunk,
            engine.close,
            engine.vocab_size,
            settings.prefill_chunks,
            settings.repeats,
            lambda: advance("prefill"),
        )
        draft_prefill = _chunk_points(
            draft_engine.open,
            draft_engine.prefill,
            draft_engine.close,
            draft.config.vocab_size,
            settings.prefill_chunks,
            settings.repeats,
            lambda: advance("draft prefill"),
        )
        steps, rows_per_step = _draft_step_points(
            draft_engine,
            settings.draft_sessions,
            min(settings.contexts),
            settings.repeats,
            deadline,
            lambda: advance("draft steps"),
        )
        rows_by_budget = _rows_by_budget(draft_engine, min(settings.contexts))
    profile = DeviceProfile(
        device=_describe_device(engine.runner.device, settings.threads),
        target=settings.target,
        draft=settings.draft,
        dtype=str(target.dtype).removeprefix("torch."),
        verify=tuple(verify),
        draft_step=tuple(steps),
        prefill=tuple(prefill),
        draft_prefill=tuple(draft_prefill),
        draft_rows_per_step=tuple(rows_per_step),
        draft_rows_by_budget=rows_by_budget,
        machine=_machine(settings.threads),
        created_at=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        notes=(f"measured by `specedge profile` in {settings.budget_s:g} s at most",),
    )
    path = Path(settings.out)
    profile.save(path)
    console.print(describe(profile))
    return path


def describe(profile: DeviceProfile) -> str:
    """The fitted surfaces of a measured profile in words."""
    verify, step = SurfaceCost.fit(profile.verify), SurfaceCost.fit(profile.draft_step)
    prefill = SurfaceCost.fit(profile.prefill)
    draft_prefill = SurfaceCost.fit(profile.draft_prefill)
    return "\n".join(
        [
            f"device: {profile.device}",
            f"verify: {1000 * verify.fixed_s:.2f} ms + {1000 * verify.per_sequence_s:.2f} ms/seq + "
            f"{1000 * verify.per_row_s:.3f} ms/row + "
            f"{1e6 * verify.per_row_context_s:.3f} us/row/context token",
            f"draft step: {1000 * step.fixed_s:.2f} ms + {1000 * step.per_sequence_s:.2f} ms/seq + "
            f"{1000 * step.per_row_s:.3f} ms/row; rows per step "
            + ", ".join(f"{r:.1f}" for r in profile.draft_rows_per_step),
            f"prefill: {1000 * prefill.fixed_s:.2f} ms + {1000 * prefill.per_row_s:.3f} ms/token; "
            f"draft {1000 * draft_prefill.fixed_s:.2f} ms + "
            f"{1000 * draft_prefill.per_row_s:.3f} ms/token",
            *(
                f"sized tree of {budget}: rows per step " + ", ".join(f"{r:.1f}" for r in rows)
                for budget, rows in sorted(profile.draft_rows_by_budget.items())
            ),
        ]
    )


def _chunk_points(
    open_prompt: Callable[[list[int]], Any],
    prefill: Callable[[Any, int], Any],
    close: Callable[[Any], None],
    vocab: int,
    chunks: Sequence[int],
    repeats: int,
    advance: Callable[[], None],
) -> list[CostPoint]:
    """One prefill chunk of each size from the start of a fresh random prompt (opened before,
    closed after each timed call)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    points = []
    for chunk in chunks:
        prompt = torch.randint(0, vocab, (chunk + 1,), generator=generator).tolist()
        times = []
        for repeat in range(repeats + 1):
            seq = open_prompt(prompt)
            start = time.perf_counter()
            prefill(seq, chunk)
            elapsed = time.perf_counter() - start
            close(seq)
            if repeat:
                times.append(elapsed)
        points.append(CostPoint(1, chunk, 0, statistics.median(times)))
        advance()
    return points


def _draft_step_points(
    engine: Any,
    sessions: Sequence[int],
    context: int,
    repeats: int,
    deadline: float,
    advance: Callable[[], None],
) -> tuple[list[CostPoint], list[float]]:
    """Batched draft steps of `sessions` builders growing trees of the engine's shape, per
    step index; and the mean rows one builder forwards at each step."""
    import torch

    generator = torch.Generator().manual_seed(3)
    vocab = engine.runner.loaded.config.vocab_size
    points: list[CostPoint] = []
    rows_by_step: dict[int, list[int]] = {}
    opened: list[Any] = []
    try:
        for count in sessions:
            while len(opened) < count:
                prompt = torch.randint(0, vocab, (context,), generator=generator).tolist()
                seq = engine.open(prompt)
                while not engine.prefill(seq):
                    pass
                opened.append(seq)
            times: dict[int, list[float]] = {}
            rows_at: dict[int, int] = {}
            for repeat in range(repeats + 1):
                builders = [engine.builder(seq) for seq in opened[:count]]
                for step in range(engine.shape.depth):
                    plans = [(b, b.plan_step()) for b in builders]
                    live = [(b, p) for b, p in plans if p is not None]
                    if not live:
                        break
                    forwarded = [p.row for _, p in live if p.row is not None]
                    start = time.perf_counter()
                    hidden = engine.runner.forward(forwarded) if forwarded else []
                    states = iter(hidden)
                    for builder, plan in live:
                        builder.finish_step(plan, next(states) if plan.row is not None else None)
                    elapsed = time.perf_counter() - start
                    rows = sum(len(row.new_tokens) for row in forwarded)
                    if repeat:
                        times.setdefault(step, []).append(elapsed)
                        rows_at[step] = rows
                        if count == 1:
                            rows_by_step.setdefault(step, []).append(rows)
            for step, values in sorted(times.items()):
                points.append(CostPoint(count, rows_at[step], context, statistics.median(values)))
                advance()
            if time.perf_counter() > deadline:
                break
    finally:
        for seq in opened:
            engine.close(seq)
    per_step = [statistics.mean(rows_by_step[s]) for s in sorted(rows_by_step)] or [1.0]
    return points, per_step


def _rows_by_budget(engine: Any, context: int, trees: int = 4) -> dict[int, tuple[float, ...]]:
    """The mean rows per step of `trees` trees sized to each power of two up to the shape's
    budget (and the budget itself), shaped as `ModelDrafter.draft` shapes a sized tree
    (`TreeShape.sized`); no timing, a few forwards each."""
    import torch

    generator = torch.Generator().manual_seed(4)
    vocab = engine.runner.loaded.config.vocab_size
    full = engine.shape
    budgets = sorted({*(1 << k for k in range(full.budget.bit_length())), full.budget})
    rows: dict[int, list[list[int]]] = {budget: [] for budget in budgets}
    for _ in range(trees):
        prompt = torch.randint(0, vocab, (context,), generator=generator).tolist()
        seq = engine.open(prompt)
        try:
            while not engine.prefill(seq):
                pass
            for budget in budgets:
                builder = engine.builder(seq)
                builder.shape = full.sized(budget)
                per_step = []
                while (plan := builder.plan_step()) is not None:
                    hidden = engine.runner.forward([plan.row]) if plan.row is not None else [None]
                    builder.finish_step(plan, hidden[0])
                    per_step.append(len(plan.row.new_tokens) if plan.row is not None else 0)
                rows[budget].append(per_step)
        finally:
            engine.close(seq)
    table = {}
    for budget, trees_rows in rows.items():
        steps = max(len(r) for r in trees_rows)
        table[budget] = tuple(
            statistics.mean(r[step] if step < len(r) else 0 for r in trees_rows)
            for step in range(steps)
        )
    return table


def _describe_device(device: Any, threads: int) -> str:
    if str(device).startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{_cpu_name()}, {threads} thread{'s' if threads > 1 else ''}"


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def _machine(threads: int) -> dict[str, Any]:
    import os

    import torch

    return {
        "CPU": _cpu_name(),
        "cores": os.cpu_count(),
        "torch threads": threads,
        "torch": torch.__version__,
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
    }


_FIELD_TYPES = {f.name: str(f.type) for f in fields(ProfileSettings)}
