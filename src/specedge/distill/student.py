"""The student (draft) model: a few-layer decoder of the target's family, and its export.

The student is a transformers causal LM built from the target's config with fewer layers
(optionally a different hidden size). With the target's hidden size it reuses the target's
input embeddings (and LM head when untied) frozen; those tensors are not stored in the exported
directory but named in `specedge_draft.json`, and the loader takes them from the target.

*Head tokens*: a reduced LM head over the most frequent tokens of the teacher data. The draft
then only ever proposes those tokens; the target still verifies, so output is unaffected.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from specedge.distill.teacher import TeacherSample
from specedge.errors import InvalidRequestError

DRAFT_META_FILE = "specedge_draft.json"
SHARED_EMBEDDINGS = "model.embed_tokens.weight"
SHARED_HEAD = "lm_head.weight"


def layer_sources(num_target_layers: int, num_layers: int) -> list[int]:
    """Target layers a student of `num_layers` starts from: the bottom half and the top half
    (e.g. 4 of 30 -> [0, 1, 28, 29]); the first layers read embeddings, the last feed the head."""
    bottom = (num_layers + 1) // 2
    top = num_layers - bottom
    return list(range(bottom)) + list(range(num_target_layers - top, num_target_layers))


def build_student(
    teacher: Any,
    num_layers: int,
    hidden_size: int | None,
    init_from_target: bool,
    seed: int,
    frozen_layers: int = 0,
) -> tuple[Any, list[str]]:
    """A float32 student and the HF names of the tensors it shares (frozen) with the target:
    the embeddings and, with `frozen_layers` > 0, that many bottom layers copied from the
    target's own bottom layers (same names, so the loader takes them from the target too)."""
    from transformers import AutoModelForCausalLM

    target_config = teacher.config
    config = copy.deepcopy(target_config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:num_layers]
    same_width = hidden_size in (None, target_config.hidden_size)
    if not same_width:
        assert hidden_size is not None
        head_dim = getattr(target_config, "head_dim", None) or (
            target_config.hidden_size // target_config.num_attention_heads
        )
        ratio = target_config.num_attention_heads // target_config.num_key_value_heads
        config.hidden_size = hidden_size
        config.head_dim = head_dim
        config.num_key_value_heads = max(1, hidden_size // head_dim // ratio)
        config.num_attention_heads = config.num_key_value_heads * ratio
        config.intermediate_size = (
            hidden_size * target_config.intermediate_size // (target_config.hidden_size)
        )
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shared: list[str] = []
    if same_width:
        target_state = teacher.state_dict()
        init = {
            SHARED_EMBEDDINGS: target_state[SHARED_EMBEDDINGS],
            "model.norm.weight": target_state["model.norm.weight"],
        }
        shared.append(SHARED_EMBEDDINGS)
        if not config.tie_word_embeddings:
            init[SHARED_HEAD] = target_state[SHARED_HEAD]
            shared.append(SHARED_HEAD)
        if init_from_target:
            sources = layer_sources(target_config.num_hidden_layers, num_layers)
            for dst, src in enumerate(sources):
                prefix = f"model.layers.{src}."
                for key, value in target_state.items():
                    if key.startswith(prefix):
                        init[f"model.layers.{dst}." + key.removeprefix(prefix)] = value
                        if dst < frozen_layers and src == dst:
                            shared.append(key)
        student.load_state_dict({k: v.float() for k, v in init.items()}, strict=False)
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name not in shared)
    return student.train(), shared


def load_draft_student(teacher: Any, draft_dir: Path) -> tuple[Any, list[str], list[int]]:
    """A float32 student holding an exported draft (training continues from it): its own
    tensors from its directory, the ones it shares from the target; returns it, the shared
    names (kept frozen) and its head tokens (the whole vocabulary if its head is full)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    meta_path = draft_dir / DRAFT_META_FILE
    if not meta_path.is_file():
        raise InvalidRequestError(f"--init-from {draft_dir} has no {DRAFT_META_FILE}: not a draft")
    meta = json.loads(meta_path.read_text())
    config = AutoConfig.from_pretrained(draft_dir)
    if config.vocab_size != teacher.config.vocab_size:
        raise InvalidRequestError(
            f"--init-from {draft_dir} has a vocabulary of {config.vocab_size}, the target "
            f"{teacher.config.vocab_size}: a draft of another target"
        )
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shared = list(meta.get("shared_from_target", []))
    target_state = teacher.state_dict()
    state = {name: target_state[name] for name in shared}
    state.update(load_file(draft_dir / "model.safetensors"))
    missing = student.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)[0]
    tied = {SHARED_HEAD} if config.tie_word_embeddings else set()
    if set(missing) - tied:
        raise InvalidRequestError(f"--init-from {draft_dir} lacks {sorted(missing)[:3]}")
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name not in shared)
    head = [int(t) for t in meta.get("head_token_ids") or range(config.vocab_size)]
    return student.train(), shared, head


def select_head_tokens(
    samples: Sequence[TeacherSample], vocab_size: int, count: int, always: Sequence[int]
) -> list[int]:
    """The `count` most frequent tokens among the teacher's generated and top-1 tokens, plus
    `always` (stop tokens); ties and the remainder go to low ids (BPE ranks: more frequent)."""
    if count <= 0 or count >= vocab_size:
        return list(range(vocab_size))
    counts: Counter[int] = Counter()
    for sample in samples:
        counts.update(sample.tokens[sample.num_prompt :])
        counts.update(sample.topk_ids[:, 0].tolist())
    chosen = dict.fromkeys(always)
    for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(chosen) >= count:
            break
        chosen.setdefault(token)
    for token in range(vocab_size):
        if len(chosen) >= count:
            break
        chosen.setdefault(token)
    return sorted(chosen)


def head_weight(student: Any, head_token_ids: Tensor) -> Tensor:  # [K, E]
    """Rows of the student's output embedding for the head tokens."""
    weight: nn.Parameter = student.get_output_embeddings().weight
    return weight[head_token_ids]


def export_student(
    student: Any,
    out_dir: Path,
    *,
    shared: Sequence[str],
    target_name: str,
    head_token_ids: Sequence[int] | None,
    tokenizer: Any,
    target_dir: Path,
    dtype: torch.dtype,
) -> None:
    """Write config.json, model.safetensors (own tensors only, in `dtype`), tokenizer files
    and `specedge_draft.json` (target, shared tensors, head tokens) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        key: value.detach().to(dtype).contiguous()
        for key, value in student.state_dict().items()
        if key not in shared and not (key == SHARED_HEAD and student.config.tie_word_embeddings)
    }
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = copy.deepcopy(student.config)
    config.dtype = dtype
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    generation = target_dir / "generation_config.json"
    if generation.is_file():
        (out_dir / generation.name).write_text(generation.read_text())
    meta: dict[str, Any] = {"target": target_name, "shared_from_target": list(shared)}
    if head_token_ids is not None:
        meta["head_token_ids"] = list(head_token_ids)
    (out_dir / DRAFT_META_FILE).write_text(json.dumps(meta) + "\n")
