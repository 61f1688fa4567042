"""`specedge distill`: teacher data, training, export and model card, resumable.

Work files live in `<out>/.distill/`: teacher shards, the chosen head tokens, the training
checkpoint and `state.json` (seconds spent so far). `--max-minutes` bounds the time spent on
teacher data plus training over all runs into the same directory: rerunning the command
resumes, and a larger `--max-minutes` continues training.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from specedge.distill.card import measure_acceptance, write_card
from specedge.distill.prompts import builtin_prompts, read_prompts
from specedge.distill.student import build_student, export_student, select_head_tokens
from specedge.distill.teacher import (
    TeacherSample,
    encode_prompts,
    generate_samples,
    load_shards,
    load_teacher,
    save_shard,
)
from specedge.distill.train import (
    TrainState,
    agreement,
    batch_loss,
    head_index_map,
    learning_rate,
    make_batches,
)
from specedge.errors import InvalidRequestError
from specedge.model.loader import (
    default_dtype,
    load_tokenizer,
    parse_dtype,
    resolve_device,
    resolve_model_dir,
    stop_token_ids,
)

logger = logging.getLogger(__name__)

WORK_DIR = ".distill"
SAMPLED_TEMPERATURE = 0.8  # teacher passes after the first (greedy) one sample at this
MAX_PASSES = 4
CHECKPOINT_EVERY_S = 120.0
EVAL_EVERY_S = 60.0


@dataclass(frozen=True)
class DistillConfig:
    target: str
    out: Path
    layers: int = 4
    frozen_layers: int = 0  # bottom layers kept equal to the target's (not stored)
    dtype: str | None = None  # teacher, autocast and stored weights (default: best for device)
    hidden: int | None = None
    init_from_target: bool = True
    prompts: Path | None = None
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
    teacher = load_teacher(target_dir, config.device, dtype)
    train_prompts, heldout_prompts = split_prompts(config)

    with _progress() as progress:
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
        state = _train(config, student, head, train, heldout, timing, work, progress, dtype)
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
    )
    return config.out


# ---- teacher data -----------------------------------------------------------------------------


def split_prompts(config: DistillConfig) -> tuple[list[str], list[str]]:
    """The training and held-out prompts of a run (a seeded shuffle of --prompts or the
    built-in set); the held-out ones also tune tree shapes, never SpecBench."""
    prompts = read_prompts(config.prompts) if config.prompts else builtin_prompts(seed=config.seed)
    prompts = list(prompts)
    random.Random(config.seed).shuffle(prompts)
    num_heldout = max(1, round(config.heldout_fraction * len(prompts)))
    return prompts[num_heldout:], prompts[:num_heldout]


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
    prompts each. Pass 0 is greedy, later passes sample, until the token or time budget."""
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
    start, spent = time.perf_counter(), timing.get("data_seconds", 0.0)
    for pass_index, batch_index, ids in jobs:
        path = work / "data" / f"shard-{pass_index:02d}-{batch_index:04d}.pt"
        if path.exists():
            continue
        elapsed = spent + time.perf_counter() - start
        over_time = elapsed >= config.data_fraction * config.budget_s
        if batch_index > 0 and (tokens >= config.max_teacher_tokens or over_time):
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
) -> torch.Tensor:  # [K_head] int64, sorted
    path = work / "head_tokens.json"
    if path.exists():
        return torch.tensor(json.loads(path.read_text()))
    head = select_head_tokens(train, vocab_size, config.head_tokens, stops)
    path.write_text(json.dumps(head))
    return torch.tensor(head)


# ---- training ---------------------------------------------------------------------------------


def _train(
    config: DistillConfig,
    student: Any,
    head: torch.Tensor,
    train: list[TeacherSample],
    heldout: list[TeacherSample],
    timing: dict[str, float],
    work: Path,
    progress: Progress,
    dtype: torch.dtype,
) -> TrainState:
    """Train until the time budget is spent; checkpoints as it goes and resumes from one."""
    autocast = dtype if dtype != torch.float32 else None
    head_index = head_index_map(head, student.config.vocab_size)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    state = _load_checkpoint(work, student, optimizer) or TrainState()
    budget = config.budget_s - timing.get("data_seconds", 0.0)
    task = progress.add_task("training", total=max(budget, 1.0), completed=int(state.train_seconds))

    def evaluate() -> None:
        student.eval()
        state.agreement = agreement(
            student, heldout, head, head_index, config.device, autocast, config.batch_tokens
        )
        student.train()

    start, spent = time.perf_counter(), state.train_seconds
    last_eval = last_checkpoint = start
    loss_avg: float | None = None
    while True:
        batches = make_batches(train, config.batch_tokens, seed=config.seed + state.epoch)
        while state.batch_in_epoch < len(batches):
            state.train_seconds = spent + time.perf_counter() - start
            if state.train_seconds >= budget:
                break
            lr = learning_rate(config.learning_rate, state.step, state.train_seconds / budget)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = [train[i] for i in batches[state.batch_in_epoch]]
            result = batch_loss(student, batch, head, head_index, config.device, autocast)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            value = float(result.loss.detach())
            loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
            state.loss = loss_avg
            state.step += 1
            state.batch_in_epoch += 1
            state.tokens_seen += result.num_positions
            now = time.perf_counter()
            if now - last_eval >= EVAL_EVERY_S:
                evaluate()
                last_eval = now
            if now - last_checkpoint >= CHECKPOINT_EVERY_S:
                _save_checkpoint(work, student, optimizer, state)
                last_checkpoint = now
            progress.update(
                task, completed=min(state.train_seconds, budget), description=_describe(state)
            )
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            continue
        break
    evaluate()
    _save_checkpoint(work, student, optimizer, state)
    progress.update(task, completed=budget, description=_describe(state))
    timing["train_seconds"] = state.train_seconds
    _write_state(work, timing)
    return state


def _describe(state: TrainState) -> str:
    return (
        f"training  step {state.step}  epoch {state.epoch}  loss {state.loss:.3f}  "
        f"held-out agreement {100 * state.agreement:.1f}%"
    )


def _save_checkpoint(work: Path, student: Any, optimizer: Any, state: TrainState) -> None:
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    payload = {
        "student": {k: v for k, v in student.state_dict().items() if k in trainable},
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
    }
    tmp = work / "checkpoint.tmp"
    torch.save(payload, tmp)
    tmp.replace(work / "checkpoint.pt")


def _load_checkpoint(work: Path, student: Any, optimizer: Any) -> TrainState | None:
    path = work / "checkpoint.pt"
    if not path.exists():
        return None
    payload = torch.load(path)
    student.load_state_dict(payload["student"], strict=False)
    optimizer.load_state_dict(payload["optimizer"])
    logger.info("resuming from %s", path)
    return TrainState(**payload["state"])


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
