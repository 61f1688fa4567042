"""`specedge distill`: training prompts, teacher data, training, export and model card, resumable.

*Prompt sources* (`--prompts`, comma-separated, mixed in one shuffled set; `distill.sources`):
`self`, requests the target writes through its own chat template (`distill.requests`, the
default); `templates`, the built-in composed prompts (`distill.prompts`); or a prompt file.

Work files live in `<out>/.distill/`: the self-generated requests (`requests.jsonl`,
`rejected.jsonl`), teacher shards, the chosen head tokens, the training checkpoint and
`state.json` (seconds spent so far). `--max-minutes` bounds the time spent on requests, teacher
data and training over all runs into the same directory: rerunning the command resumes, and a
larger `--max-minutes` continues training. Once teacher shards exist the request set is fixed
(more requests would change the held-out split the shards were made from).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from specedge.distill.card import measure_acceptance, write_card
from specedge.distill.requests import RequestSettings
from specedge.distill.sources import SELF, TEMPLATES, self_requests, split_prompts
from specedge.distill.student import (
    build_student,
    export_student,
    load_draft_student,
    select_head_tokens,
)
from specedge.distill.teacher import (
    TeacherSample,
    encode_prompts,
    generate_samples,
    load_shards,
    load_teacher,
    save_shard,
)
from specedge.distill.train import train_student
from specedge.errors import InvalidRequestError
from specedge.model.loader import (
    default_dtype,
    load_tokenizer,
    parse_dtype,
    resolve_device,
    resolve_model_dir,
    stop_token_ids,
)

WORK_DIR = ".distill"
SAMPLED_TEMPERATURE = 0.8  # teacher passes after the first (greedy) one sample at this
MAX_PASSES = 4


@dataclass(frozen=True)
class DistillConfig:
    target: str
    out: Path
    layers: int = 4
    frozen_layers: int = 0  # bottom layers kept equal to the target's (not stored)
    dtype: str | None = None  # teacher, autocast and stored weights (default: best for device)
    hidden: int | None = None
    init_from_target: bool = True
    init_from: str | None = None  # a draft to continue training (its layers, head and shares)
    prompts: str = SELF  # comma-separated sources: self, templates, or prompt files
    self_prompts: int = 2000  # self-generated requests to keep
    request_tokens: int = 128  # a self-generated request's token limit
    request_batch: int = 32
    exclude: tuple[Path, ...] = ()  # benchmark prompt files besides the bundled Spec-Bench
    max_minutes: float = 30.0
    device: str = "auto"  # resolved by `run_distill` (`loader.resolve_device`)
    seed: int = 0
    head_tokens: int = 8192  # 0 = full-vocabulary head
    max_teacher_tokens: int = 400_000
    data_fraction: float = 0.5  # share of --max-minutes teacher generation may take
    max_new_tokens: int = 128
    generate_batch: int = 64
    batch_tokens: int = 4096
    learning_rate: float = 5e-4
    heldout_fraction: float = 0.04
    top_k: int = 32  # teacher logits kept per position
    acceptance_prompts: int = 8
    acceptance_tokens: int = 96
    command: str = ""

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise InvalidRequestError(f"--layers must be >= 1, got {self.layers}")
        if self.max_minutes <= 0:
            raise InvalidRequestError(f"--max-minutes must be > 0, got {self.max_minutes}")
        if not 0 < self.data_fraction < 1:
            raise InvalidRequestError(f"data fraction must be in (0, 1), got {self.data_fraction}")
        if not 0 <= self.frozen_layers <= (self.layers + 1) // 2:
            raise InvalidRequestError(
                f"--frozen-layers must be in [0, {(self.layers + 1) // 2}] (the bottom half)"
            )
        if not self.sources:
            raise InvalidRequestError(
                f"--prompts is empty: give {SELF}, {TEMPLATES} or a file (comma-separated)"
            )
        _ = self.request_settings  # checked when built

    @property
    def sources(self) -> list[str]:
        return [source.strip() for source in self.prompts.split(",") if source.strip()]

    @property
    def request_settings(self) -> RequestSettings:
        return RequestSettings(
            count=self.self_prompts,
            max_tokens=self.request_tokens,
            batch=self.request_batch,
            seed=self.seed,
        )

    @property
    def budget_s(self) -> float:
        return 60.0 * self.max_minutes


def run_distill(config: DistillConfig) -> Path:
    """Distil a draft for `config.target` into `config.out`; returns the output directory."""
    work = config.out / WORK_DIR
    (work / "data").mkdir(parents=True, exist_ok=True)
    timing = _read_state(work)
    target_dir = resolve_model_dir(config.target)
    config = replace(config, device=resolve_device(config.device))
    dtype = parse_dtype(config.dtype) if config.dtype else default_dtype(config.device)
    tokenizer = load_tokenizer(target_dir)
    stops = stop_token_ids(tokenizer, target_dir)

    with _progress() as progress:
        requests = None
        if SELF in config.sources:
            with _timed(timing, "request_seconds", work):
                requests = self_requests(config, work, tokenizer, stops, dtype, timing, progress)
        generated = [request.text for request in requests.kept] if requests else []
        train_prompts, heldout_prompts = split_prompts(config, generated)
        teacher = load_teacher(target_dir, config.device, dtype)
        with _timed(timing, "data_seconds", work):
            _generate_data(
                config,
                teacher,
                tokenizer,
                stops,
                train_prompts,
                heldout_prompts,
                timing,
                work,
                progress,
            )
        shards = load_shards(work / "data")
        heldout = shards[0] if shards else []  # shard-00-0000: the held-out prompts
        train = [sample for shard in shards[1:] for sample in shard]
        if not train or not heldout:
            raise InvalidRequestError("no teacher data: raise --max-minutes")
        if config.init_from:
            student, shared, head_ids = load_draft_student(
                teacher, resolve_model_dir(config.init_from)
            )
            config = replace(
                config,
                layers=student.config.num_hidden_layers,
                hidden=student.config.hidden_size,
                frozen_layers=len({n.split(".")[2] for n in shared if ".layers." in n}),
            )
            head = _head_tokens(config, work, train, teacher.config.vocab_size, stops, head_ids)
        else:
            head = _head_tokens(config, work, train, teacher.config.vocab_size, stops)
            student, shared = build_student(
                teacher,
                config.layers,
                config.hidden,
                config.init_from_target,
                config.seed,
                config.frozen_layers,
            )
        student.to(config.device)
        spent = timing.get("data_seconds", 0.0) + timing.get("request_seconds", 0.0)
        budget = config.budget_s - spent
        state = train_student(config, student, head, train, heldout, budget, work, progress, dtype)
        timing["train_seconds"] = state.train_seconds
        _write_state(work, timing)
    del teacher
    full_vocab = len(head) == student.config.vocab_size
    export_student(
        student,
        config.out,
        shared=shared,
        target_name=_target_name(config.target),
        head_token_ids=None if full_vocab else head.tolist(),
        tokenizer=tokenizer,
        target_dir=target_dir,
        dtype=dtype,
    )
    acceptance = measure_acceptance(
        config.target,
        config.out,
        heldout_prompts[: config.acceptance_prompts],
        config.device,
        dtype,
        config.acceptance_tokens,
    )
    write_card(
        config,
        state,
        timing,
        acceptance,
        train_prompts,
        heldout_prompts,
        train,
        heldout,
        len(head),
        shared,
        requests,
    )
    return config.out


# ---- teacher data -----------------------------------------------------------------------------


def _generate_data(
    config: DistillConfig,
    teacher: Any,
    tokenizer: Any,
    stops: tuple[int, ...],
    train_prompts: list[str],
    heldout_prompts: list[str],
    timing: dict[str, float],
    work: Path,
    progress: Progress,
) -> None:
    """Shard 0 holds the held-out prompts' greedy samples; later shards one batch of training
    prompts each. Pass 0 is greedy, later passes sample, until the token or time budget (the
    held-out shard and the first training shard are made whatever the time)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    heldout_ids = encode_prompts(tokenizer, heldout_prompts)
    # Sort by length so that left padding stays short within a generate batch.
    train_ids = sorted(encode_prompts(tokenizer, train_prompts), key=len)
    jobs = [(0, 0, heldout_ids)]
    for pass_index in range(MAX_PASSES):
        for begin in range(0, len(train_ids), config.generate_batch):
            jobs.append(
                (
                    pass_index,
                    1 + begin // config.generate_batch,
                    train_ids[begin : begin + config.generate_batch],
                )
            )
    existing = load_shards(work / "data")
    tokens = sum(s.num_generated for shard in existing for s in shard)
    task = progress.add_task("teacher data", total=config.max_teacher_tokens, completed=tokens)
    start = time.perf_counter()
    spent = timing.get("data_seconds", 0.0) + timing.get("request_seconds", 0.0)
    for pass_index, batch_index, ids in jobs:
        path = work / "data" / f"shard-{pass_index:02d}-{batch_index:04d}.pt"
        if path.exists():
            continue
        elapsed = spent + time.perf_counter() - start
        over_time = elapsed >= config.data_fraction * config.budget_s
        # The held-out shard and the first training shard always: requests that ran past
        # their share of the time (those under way finish) must not leave nothing to train on.
        first = pass_index == 0 and batch_index <= 1
        if not first and (tokens >= config.max_teacher_tokens or over_time):
            break
        samples = generate_samples(
            teacher,
            ids,
            max_new_tokens=config.max_new_tokens,
            temperature=0.0 if pass_index == 0 else SAMPLED_TEMPERATURE,
            top_k=config.top_k,
            stop_token_ids=stops,
            pad_token_id=pad,
            seed=config.seed * 1000 + pass_index * 100 + batch_index,
        )
        save_shard(path, samples)
        tokens += sum(s.num_generated for s in samples)
        progress.update(task, completed=tokens)
    progress.update(task, total=tokens, completed=tokens)


def _head_tokens(
    config: DistillConfig,
    work: Path,
    train: list[TeacherSample],
    vocab_size: int,
    stops: tuple[int, ...],
    fixed: list[int] | None = None,
) -> torch.Tensor:  # [K_head] int64, sorted
    """The head tokens chosen on the first run (`fixed`: those of the draft training
    continues from)."""
    path = work / "head_tokens.json"
    if path.exists():
        return torch.tensor(json.loads(path.read_text()))
    head = fixed or select_head_tokens(train, vocab_size, config.head_tokens, stops)
    path.write_text(json.dumps(head))
    return torch.tensor(head)


# ---- bookkeeping ------------------------------------------------------------------------------


def _target_name(target: str) -> str:
    """Aliases and hub ids stay as given; local paths become absolute."""
    path = Path(target).expanduser()
    return str(path.resolve()) if path.exists() else target


def _read_state(work: Path) -> dict[str, float]:
    path = work / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _write_state(work: Path, timing: dict[str, float]) -> None:
    (work / "state.json").write_text(json.dumps(timing) + "\n")


@contextmanager
def _timed(timing: dict[str, float], key: str, work: Path) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - start
        _write_state(work, timing)


@contextmanager
def _progress() -> Iterator[Progress]:
    columns: list[Any] = [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
    with Progress(*columns) as progress:
        yield progress
