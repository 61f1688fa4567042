"""Exporting a loaded model as a Hugging Face model folder.

An *export* is a folder that transformers' `from_pretrained`, vLLM and our own loader all read:
- `config.json`: the Hugging Face config of the model's `ModelConfig` (the inverse of
  `ModelConfig.from_hf`), written by the installed transformers' config class;
- `model.safetensors`: the weights under Hugging Face parameter names, the inverse of
  `weights.convert_hf_state_dict` (the fused `wqkv` split back into q/k/v, `w13` into gate/up),
  with no `lm_head.weight` when the head is tied to the embeddings;
- the tokenizer's files (`save_pretrained`);
- `generation_config.json`: the source folder's when it has one, else the stop tokens.

A model with a reduced LM head (a distilled draft) has no Hugging Face equivalent and is
refused. An export is written into a staging folder beside its destination and moved into
place whole, so a failed export leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from specedge.errors import SpecEdgeError
from specedge.model.config import ModelConfig
from specedge.model.loader import LoadedModel, cache_root, load_model, resolve_model_dir

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# Families whose Hugging Face attention has a q/k/v bias switch (`attention_bias`), which also
# adds an o_proj bias; Qwen2 always has q/k/v biases and no o_proj bias.
_ATTENTION_BIAS_FAMILIES = ("llama", "qwen3")


class ExportError(SpecEdgeError):
    """A model cannot be exported, or not to that folder (the message says what to do)."""


def hf_config(config: ModelConfig, dtype: torch.dtype, tokenizer: Any = None) -> Any:
    """The transformers `PretrainedConfig` that `ModelConfig.from_hf` reads back as `config`.
    Token ids (bos, eos, pad) come from `tokenizer` where it has them in the vocabulary."""
    from transformers import AutoConfig

    if config.head_token_ids is not None:
        raise ExportError(
            "this model has a reduced LM head (a distilled draft: logits for "
            f"{len(config.head_token_ids)} of {config.vocab_size} tokens), which no Hugging Face "
            "architecture can express; export its target instead"
        )
    if config.qkv_bias and config.model_type not in (*_ATTENTION_BIAS_FAMILIES, "qwen2"):
        raise ExportError(f"a {config.model_type} model with q/k/v biases has no HF equivalent")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta}
        rope.update(vars(config.rope_scaling))
    fields: dict[str, Any] = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "dtype": str(dtype).removeprefix("torch."),
    }
    if config.model_type in _ATTENTION_BIAS_FAMILIES:
        fields["attention_bias"] = config.qkv_bias
    if config.model_type == "mistral":
        fields["sliding_window"] = config.sliding_window
    elif config.model_type in ("qwen2", "qwen3"):
        # Our model caps the context at the window instead of sliding it: within the cap, every
        # layer sliding (max_window_layers 0) attends exactly as it does.
        fields["use_sliding_window"] = config.sliding_window is not None
        fields["sliding_window"] = config.sliding_window
        fields["max_window_layers"] = 0 if config.sliding_window is not None else config.num_layers
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and 0 <= value < config.vocab_size:  # added tokens may not be
            fields[name] = value
    return AutoConfig.for_model(config.model_type, **fields)


def to_hf_state_dict(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our parameter names -> Hugging Face's, the inverse of `weights.convert_hf_state_dict`:
    `wqkv` split into q/k/v (rows H*D, H_kv*D, H_kv*D), `w13` into gate/up, no `lm_head.weight`
    for a tied head. Tensors are made contiguous (safetensors stores no views)."""
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    out = {
        "model.embed_tokens.weight": state["embed_tokens.weight"],
        "model.norm.weight": state["norm.weight"],
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        attn = theirs + "self_attn."
        qkv = state[ours + "attention.wqkv.weight"].split([q_rows, kv_rows, kv_rows])
        for name, weight in zip("qkv", qkv, strict=True):
            out[attn + f"{name}_proj.weight"] = weight
        if config.qkv_bias:
            biases = state[ours + "attention.wqkv.bias"].split([q_rows, kv_rows, kv_rows])
            for name, bias in zip("qkv", biases, strict=True):
                out[attn + f"{name}_proj.bias"] = bias
        wo = state[ours + "attention.wo.weight"]
        out[attn + "o_proj.weight"] = wo
        if config.qkv_bias and config.model_type in _ATTENTION_BIAS_FAMILIES:
            out[attn + "o_proj.bias"] = wo.new_zeros(wo.shape[0])  # ours has none: zero
        if config.qk_norm:
            out[attn + "q_norm.weight"] = state[ours + "attention.q_norm.weight"]
            out[attn + "k_norm.weight"] = state[ours + "attention.k_norm.weight"]
        gate, up = state[ours + "feed_forward.w13.weight"].split(config.intermediate_size)
        out[theirs + "mlp.gate_proj.weight"] = gate
        out[theirs + "mlp.up_proj.weight"] = up
        out[theirs + "mlp.down_proj.weight"] = state[ours + "feed_forward.w2.weight"]
        out[theirs + "input_layernorm.weight"] = state[ours + "attention_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "ffn_norm.weight"]
    return {name: tensor.detach().contiguous() for name, tensor in out.items()}


def export_model(loaded: LoadedModel, directory: Path, *, force: bool = False) -> Path:
    """Write `loaded` as a Hugging Face folder at `directory` (module docstring), in the
    model's dtype. An existing non-empty `directory` is an error unless `force`, which
    replaces it whole. Returns `directory`."""
    directory = Path(directory).expanduser()
    check_destination(directory, force)
    if not callable(getattr(loaded.tokenizer, "save_pretrained", None)):
        raise ExportError(
            f"the tokenizer of {loaded.name!r} ({type(loaded.tokenizer).__name__}) cannot be "
            "saved: export needs a transformers tokenizer"
        )
    config = hf_config(loaded.config, loaded.dtype, loaded.tokenizer)
    state = to_hf_state_dict(dict(loaded.model.state_dict()), loaded.config)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file({k: v.cpu() for k, v in state.items()}, staging / WEIGHTS_FILE)
        config.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        _write_generation_config(loaded, staging)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("exported %s to %s", loaded.name, directory)
    return directory


def cached_export(name: str, dtype: torch.dtype) -> Path:
    """The export of model `name` in `dtype`, made once and kept in the cache folder (keyed by
    the source folder, its files' sizes and times, and the dtype)."""
    source = resolve_model_dir(name)
    stamp = sorted(
        (path.name, path.stat().st_size, path.stat().st_mtime_ns)
        for path in source.iterdir()
        if path.is_file()
    )
    key = hashlib.sha256(json.dumps([str(source.resolve()), stamp, str(dtype)]).encode())
    dtype_name = str(dtype).removeprefix("torch.")
    target = cache_root() / "export" / f"{source.name}-{dtype_name}-{key.hexdigest()[:12]}"
    if (target / WEIGHTS_FILE).exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / WEIGHTS_FILE).exists():
            logger.info("exporting %s in %s (first use; cached in %s)", name, dtype_name, target)
            export_model(load_model(name, dtype=dtype), target, force=True)
    return target


def check_destination(directory: Path, force: bool) -> None:
    """Raise ExportError unless `directory` is new, empty, or to be replaced (`force`)."""
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory} exists and is not a folder; choose another destination")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ExportError(
            f"{directory} is not empty; choose an empty or new folder, or pass --force to "
            "replace it (its contents are deleted)"
        )


def _write_generation_config(loaded: LoadedModel, directory: Path) -> None:
    """The source's generation_config.json (its sampling defaults and stop tokens), else one
    naming the stop tokens; none when neither is known."""
    source = loaded.directory / GENERATION_CONFIG_FILE
    if source.is_file():
        shutil.copyfile(source, directory / GENERATION_CONFIG_FILE)
        return
    if not loaded.stop_token_ids:
        return
    stops = list(loaded.stop_token_ids)
    generation: dict[str, Any] = {"eos_token_id": stops[0] if len(stops) == 1 else stops}
    bos = getattr(loaded.tokenizer, "bos_token_id", None)
    if isinstance(bos, int):
        generation["bos_token_id"] = bos
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
