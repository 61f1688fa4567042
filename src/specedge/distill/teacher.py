"""Teacher data: the target's own continuations of the training prompts, with its logits.

A *sample* is one prompt's token ids (chat template applied), the tokens the target generated
after it (up to and including the first stop token) and, for every generated position, the
target's top-k logits at that position (teacher-forced: the logits the target produced while
generating). Samples are written in *shards* (one generate batch each) so an interrupted run
resumes with the shards it already has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from specedge.text import encode_chat


@dataclass
class TeacherSample:
    tokens: list[int]  # prompt + generated
    num_prompt: int
    topk_ids: Tensor  # [G, K] int32, target's top-k token ids at each generated position
    topk_logits: Tensor  # [G, K] bfloat16, their logits

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt


def load_teacher(directory: Path, device: str, dtype: torch.dtype) -> Any:
    """The target as a transformers causal LM (its `generate` batches with a KV cache)."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


@torch.inference_mode()
def generate_samples(
    teacher: Any,
    prompt_ids: Sequence[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    seed: int,
) -> list[TeacherSample]:
    """One batched (left-padded) target generation; keeps each row's top-k logits."""
    device = teacher.device
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    torch.manual_seed(seed)
    sampled = temperature > 0
    out = teacher.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=sampled,
        temperature=temperature if sampled else None,
        top_p=1.0 if sampled else None,
        top_k=0 if sampled else None,
        eos_token_id=list(stop_token_ids),
        pad_token_id=pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    # out.logits: one [B, V] tensor per step, raw (before temperature), i.e. teacher-forced.
    top = [torch.topk(step.float(), top_k, dim=-1) for step in out.logits]
    topk_ids = torch.stack([t.indices for t in top], dim=1).to(torch.int32).cpu()  # [B, G, K]
    topk_logits = torch.stack([t.values for t in top], dim=1).to(torch.bfloat16).cpu()
    generated = out.sequences[:, width:].cpu()  # [B, G]
    stops = set(stop_token_ids)
    samples = []
    for row, ids in enumerate(prompt_ids):
        tokens = generated[row].tolist()
        length = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
        samples.append(
            TeacherSample(
                tokens=list(ids) + tokens[:length],
                num_prompt=len(ids),
                topk_ids=topk_ids[row, :length].clone(),
                topk_logits=topk_logits[row, :length].clone(),
            )
        )
    return samples


def save_shard(path: Path, samples: Sequence[TeacherSample]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save([vars(s) for s in samples], tmp)
    tmp.replace(path)


def load_shards(directory: Path) -> list[list[TeacherSample]]:
    shards = []
    for path in sorted(directory.glob("shard-*.pt")):
        shards.append([TeacherSample(**record) for record in torch.load(path)])
    return shards
