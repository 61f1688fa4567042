"""The training prompts of a `specedge distill` run, from its `--prompts` sources.

Sources (comma-separated, mixed into one seeded shuffle before the held-out split): `self`,
requests the target writes through its own chat template (`distill.requests`, judged by
`distill.filters`; the default); `templates`, the built-in composed prompts
(`distill.prompts`); anything else names a prompt file (one a line, or JSON Lines with a
`prompt` field).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.progress import Progress

from specedge.bench.prompts import SPECBENCH_FILE
from specedge.distill.card import write_data_card
from specedge.distill.filters import RequestFilter, benchmark_runs, read_benchmark_texts
from specedge.distill.prompts import builtin_prompts, read_prompts
from specedge.distill.requests import (
    PreQuery,
    RequestLog,
    RequestStats,
    generate_requests,
    replay,
)
from specedge.errors import InvalidRequestError
from specedge.model.loader import load_model

if TYPE_CHECKING:
    from specedge.distill.run import DistillConfig

SELF, TEMPLATES = "self", "templates"  # the prompt sources that are not files
REQUEST_SHARE = 0.5  # of the data budget (--max-minutes x data_fraction) sampling requests may take


def split_prompts(
    config: DistillConfig, generated: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """The training and held-out prompts of a run: a seeded shuffle of every source's prompts
    (`generated`: the self-generated requests); the held-out ones also tune tree shapes, never
    SpecBench."""
    prompts: list[str] = []
    for source in config.sources:
        if source == SELF:
            prompts += generated
        elif source == TEMPLATES:
            prompts += builtin_prompts(seed=config.seed)
        else:
            prompts += read_prompts(Path(source))
    prompts = list(dict.fromkeys(prompts))  # one copy of a prompt two sources share
    if len(prompts) < 2:
        raise InvalidRequestError(
            f"{len(prompts)} training prompts from --prompts {config.prompts}: need at least 2 "
            "(raise --max-minutes or --self-prompts, or add templates or a file)"
        )
    random.Random(config.seed).shuffle(prompts)
    num_heldout = max(1, round(config.heldout_fraction * len(prompts)))
    return prompts[num_heldout:], prompts[:num_heldout]


def self_requests(
    config: DistillConfig,
    work: Path,
    tokenizer: Any,
    stops: tuple[int, ...],
    dtype: torch.dtype,
    timing: dict[str, float],
    progress: Progress,
) -> RequestStats:
    """The run's self-generated requests: those logged in `work`, and (while no teacher shard
    exists) more sampled from the target until --self-prompts are kept or their share of
    the time budget is spent; writes the data card."""
    settings = config.request_settings
    pre_query = PreQuery.from_tokenizer(tokenizer, stops)
    texts = [t for path in (SPECBENCH_FILE, *config.exclude) for t in read_benchmark_texts(path)]
    request_filter = RequestFilter(pre_query.markers, benchmark_runs(texts))
    log = RequestLog(work)
    stats, next_index = replay(log, request_filter)
    task = progress.add_task("self-generated requests", total=settings.count)
    spent = timing.get("sampling_seconds", 0.0)  # sampling only: loading the target is not
    budget = REQUEST_SHARE * config.data_fraction * config.budget_s
    start = time.perf_counter()

    def keep_sampling(stats: RequestStats) -> bool:
        progress.update(task, completed=len(stats.kept), description=_describe_requests(stats))
        timing["sampling_seconds"] = spent + time.perf_counter() - start
        return timing["sampling_seconds"] < budget

    frozen = any((work / "data").glob("shard-*.pt"))
    if not frozen and keep_sampling(stats) and not settings.satisfied(stats):
        target = load_model(config.target, config.device, dtype)
        start = time.perf_counter()
        generate_requests(
            target, pre_query, settings, request_filter, log, stats, next_index, keep_sampling
        )
        del target
    keep_sampling(stats)
    write_data_card(config.out, stats, settings, config.target)
    return stats


def _describe_requests(stats: RequestStats) -> str:
    return f"self-generated requests  kept {len(stats.kept)} of {stats.generated} sampled"
