"""Knowledge distillation of the student on teacher samples.

Loss: teacher-forced cross-entropy of the student's head distribution against the target's
top-k distribution (renormalised over the top-k tokens that are in the student's head), on
every generated position; equal to KL(teacher || student) up to the teacher's entropy.
*Agreement*: share of held-out generated positions where the student's argmax equals the
target's argmax (the greedy draft's hit rate on one token).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from specedge.distill.student import head_weight
from specedge.distill.teacher import TeacherSample

NOT_IN_HEAD = -1  # head index of a token the student's head does not cover


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
