"""Knowledge distillation of the student on teacher samples.

Loss: teacher-forced cross-entropy of the student's head distribution against the target's
top-k distribution (renormalised over the top-k tokens that are in the student's head), on
every generated position; equal to KL(teacher || student) up to the teacher's entropy.
*Agreement*: share of held-out generated positions where the student's argmax equals the
target's argmax (the greedy draft's hit rate on one token).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor

from specedge.distill.student import head_weight
from specedge.distill.teacher import TeacherSample

if TYPE_CHECKING:
    from specedge.distill.run import DistillConfig

logger = logging.getLogger(__name__)

NOT_IN_HEAD = -1  # head index of a token the student's head does not cover
CHECKPOINT_EVERY_S = 120.0
EVAL_EVERY_S = 60.0


@dataclass
class TrainState:
    """Everything a resumed run needs besides weights and optimizer state."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_seconds: float = 0.0
    tokens_seen: int = 0
    loss: float = math.nan
    agreement: float = math.nan


@dataclass(frozen=True)
class BatchResult:
    loss: Tensor  # [] mean over scored positions
    num_positions: int
    num_agree: int


def head_index_map(head_token_ids: Tensor, vocab_size: int) -> Tensor:  # [V] int64
    """Position of each vocabulary token in the head, NOT_IN_HEAD for the others."""
    index = torch.full((vocab_size,), NOT_IN_HEAD, dtype=torch.long)
    index[head_token_ids] = torch.arange(len(head_token_ids))
    return index


def make_batches(samples: Sequence[TeacherSample], batch_tokens: int, seed: int) -> list[list[int]]:
    """Sample indices grouped by length into batches of <= batch_tokens padded tokens, in a
    seeded random order (the same seed gives the same batches, so a resumed epoch continues)."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].tokens))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = len(samples[i].tokens)
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    random.Random(seed).shuffle(batches)
    return batches


def batch_loss(
    student: object,
    batch: Sequence[TeacherSample],
    head_token_ids: Tensor,  # [K_head]
    head_index: Tensor,  # [V]
    device: str,
    autocast_dtype: torch.dtype | None,
) -> BatchResult:
    """Distillation loss and top-1 agreement of `student` on one batch of samples."""
    width = max(len(s.tokens) - 1 for s in batch)
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    rows, cols = [], []
    for b, sample in enumerate(batch):
        inputs = sample.tokens[:-1]  # the last token is never an input we score from
        input_ids[b, : len(inputs)] = torch.tensor(inputs)
        attention_mask[b, : len(inputs)] = 1
        # Hidden state at position p predicts token p + 1: generated token g sits at
        # num_prompt + g, so it is predicted at num_prompt + g - 1.
        positions = torch.arange(sample.num_prompt - 1, len(sample.tokens) - 1)
        rows.append(torch.full_like(positions, b))
        cols.append(positions)
    teacher_ids = torch.cat([s.topk_ids for s in batch]).long()  # [n, K]
    teacher_logits = torch.cat([s.topk_logits for s in batch]).float()  # [n, K]
    with torch.autocast(
        "cuda" if device.startswith("cuda") else "cpu",
        dtype=autocast_dtype or torch.bfloat16,
        enabled=autocast_dtype is not None,
    ):
        hidden = student.model(  # type: ignore[attr-defined]
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
        ).last_hidden_state  # [B, T, E]
        hidden = hidden[torch.cat(rows).to(device), torch.cat(cols).to(device)]  # [n, E]
        logits = hidden @ head_weight(student, head_token_ids.to(device)).T  # [n, K_head]
    log_q = F.log_softmax(logits.float(), dim=-1)
    mapped = head_index[teacher_ids].to(device)  # [n, K]
    valid = mapped != NOT_IN_HEAD
    scored = valid.any(dim=-1)
    teacher_p = F.softmax(teacher_logits.to(device).masked_fill(~valid, -math.inf), dim=-1)
    cross = -(teacher_p * log_q.gather(-1, mapped.clamp(min=0))).masked_fill(~valid, 0.0)
    loss = cross.sum(dim=-1)[scored].mean()
    agree = log_q.argmax(dim=-1) == mapped[:, 0]
    return BatchResult(loss, int(scored.sum()), int(agree.sum()))


@torch.no_grad()
def agreement(
    student: object,
    samples: Sequence[TeacherSample],
    head_token_ids: Tensor,
    head_index: Tensor,
    device: str,
    autocast_dtype: torch.dtype | None,
    batch_tokens: int,
) -> float:
    """Top-1 agreement with the target over every generated position of `samples`."""
    total = agree = 0
    for indices in make_batches(samples, batch_tokens, seed=0):
        result = batch_loss(
            student,
            [samples[i] for i in indices],
            head_token_ids,
            head_index,
            device,
            autocast_dtype,
        )
        total += sum(samples[i].num_generated for i in indices)
        agree += result.num_agree
    return agree / max(total, 1)


def learning_rate(base: float, step: int, progress: float, warmup_steps: int = 20) -> float:
    """Linear warm-up, then cosine decay to a tenth of `base` over training time `progress`."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---- the training loop --------------------------------------------------------------------------


def train_student(
    config: DistillConfig,
    student: Any,
    head: Tensor,  # [K_head] int64
    train: list[TeacherSample],
    heldout: list[TeacherSample],
    budget: float,
    work: Path,
    progress: Progress,
    dtype: torch.dtype,
) -> TrainState:
    """Train until `budget` seconds of training (over all runs) are spent; checkpoints into
    `work` as it goes and resumes from the checkpoint there."""
    autocast = dtype if dtype != torch.float32 else None
    head_index = head_index_map(head, student.config.vocab_size)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    state = _load_checkpoint(work, student, optimizer) or TrainState()
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
