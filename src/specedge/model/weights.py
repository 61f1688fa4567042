"""Checkpoint tensors into a model's parameters, streamed one tensor at a time.

A *source tensor* is one tensor of a checkpoint under its Hugging Face name (the `model.` prefix
dropped); a *placement* says where it goes: rows `offset .. offset + rows - 1` of one of our
parameters, after picking the source rows `pick` (a reduced LM head). Fused parameters are
several placements side by side: `wqkv` holds q, k and v (rows H*D, H_kv*D, H_kv*D), `w13`
holds gate and up. `hf_placements` is the one definition of that mapping; `convert_hf_state_dict`
(in-memory) and `copy_weights` (streamed) both follow it.

Streaming keeps host memory at about one tensor: the checkpoint's names and shapes are read from
the safetensors headers and checked first (a bad checkpoint fails before any copy), then each
tensor is read (`safe_open`, memory-mapped), copied into its rows on the model's device and
dropped. A fused weight therefore never exists whole on the host.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from specedge.errors import ModelLoadError
from specedge.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
HF_PREFIX = "model."
# Source tensors that carry nothing a model needs: rotary tables (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Placement:
    """Rows `offset .. offset + rows - 1` of our parameter `name` (all rows when `rows` is None)
    take the source tensor, or its rows `pick` when given. `name` None: we have no parameter
    for it: the source may be absent, and if present must be all zeros (a zero bias is no
    bias)."""

    name: str | None
    offset: int = 0
    rows: int | None = None
    pick: tuple[int, ...] | None = None


Placements = Mapping[str, Sequence[Placement]]  # source name -> where it goes


def hf_placements(config: ModelConfig) -> dict[str, tuple[Placement, ...]]:
    """Hugging Face Llama-family names (without `model.`) -> our parameters."""
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    ffn = config.intermediate_size
    out: dict[str, tuple[Placement, ...]] = {"norm.weight": (Placement("norm.weight"),)}
    out.update(_head_placements(config))
    for i in range(config.num_layers):
        theirs, ours = f"layers.{i}.", f"layers.{i}."
        attn = theirs + "self_attn."
        wqkv = ours + "attention.wqkv"
        offsets = {"q": (0, q_rows), "k": (q_rows, kv_rows), "v": (q_rows + kv_rows, kv_rows)}
        for part, (offset, rows) in offsets.items():
            out[attn + f"{part}_proj.weight"] = (Placement(wqkv + ".weight", offset, rows),)
            if config.qkv_bias:
                out[attn + f"{part}_proj.bias"] = (Placement(wqkv + ".bias", offset, rows),)
        out[attn + "o_proj.weight"] = (Placement(ours + "attention.wo.weight"),)
        # Llama's and Qwen3's `attention_bias` also biases o_proj, where ours has no bias.
        out[attn + "o_proj.bias"] = (Placement(None),)
        if config.qk_norm:
            out[attn + "q_norm.weight"] = (Placement(ours + "attention.q_norm.weight"),)
            out[attn + "k_norm.weight"] = (Placement(ours + "attention.k_norm.weight"),)
        w13 = ours + "feed_forward.w13.weight"
        out[theirs + "mlp.gate_proj.weight"] = (Placement(w13, 0, ffn),)
        out[theirs + "mlp.up_proj.weight"] = (Placement(w13, ffn, ffn),)
        out[theirs + "mlp.down_proj.weight"] = (Placement(ours + "feed_forward.w2.weight"),)
        out[theirs + "input_layernorm.weight"] = (Placement(ours + "attention_norm.weight"),)
        out[theirs + "post_attention_layernorm.weight"] = (Placement(ours + "ffn_norm.weight"),)
    return out


def state_placements(config: ModelConfig, names: Iterable[str]) -> dict[str, tuple[Placement, ...]]:
    """Our own parameter `names` (a state dict with a full-vocabulary head, none when tied) ->
    our parameters: each to itself, except the head's rows for a reduced head."""
    out: dict[str, tuple[Placement, ...]] = {
        name: (Placement(name),) for name in names if name != "lm_head.weight"
    }
    out.update(_head_placements(config))
    return out


def _head_placements(config: ModelConfig) -> dict[str, tuple[Placement, ...]]:
    """The embeddings and the LM head: a tied head is the embeddings (the same parameter, or
    their rows `head_token_ids` for a reduced head); a reduced head takes its tokens' rows."""
    embed = Placement("embed_tokens.weight")
    pick = config.head_token_ids
    head = Placement("lm_head.weight", pick=pick)
    if not config.tie_word_embeddings:
        return {"embed_tokens.weight": (embed,), "lm_head.weight": (head,)}
    return {"embed_tokens.weight": (embed,) if pick is None else (embed, head)}


def convert_hf_state_dict(hf: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Hugging Face names -> ours, in memory (fused weights concatenated; a full-vocabulary
    head, none when tied): what `copy_weights` writes, as a state dict."""
    hf = {name.removeprefix(HF_PREFIX): tensor for name, tensor in hf.items()}
    parts: dict[str, list[tuple[int, Tensor]]] = defaultdict(list)
    for source, placements in hf_placements(replace(config, head_token_ids=None)).items():
        for placement in placements:
            if placement.name is not None:
                parts[placement.name].append((placement.offset, hf[source]))
    return {
        name: pieces[0][1] if len(pieces) == 1 else torch.cat([t for _, t in sorted(pieces)])
        for name, pieces in parts.items()
    }


# ---- files -------------------------------------------------------------------------------------
def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a model directory: those its index names when it has one (a folder
    may hold other safetensors, such as Mistral's `consolidated.safetensors`), else all."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [file.name for file in files if not file.is_file()]
        if absent:
            raise ModelLoadError(f"{index} names missing weight files: {', '.join(absent)}")
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {directory}")
    return files


def tensor_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Names (without `model.`) and shapes of a file's tensors, from its header alone."""
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        names: list[str] = handle.keys()  # a safe_open handle is no mapping
        return {
            name.removeprefix(HF_PREFIX): tuple(handle.get_slice(name).get_shape())
            for name in names
        }


def read_tensors(reads: Mapping[Path, Iterable[str]]) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for the named tensors of each file (names without `model.`), one at a
    time: nothing here keeps a tensor once the consumer moves on."""
    for file, names in reads.items():
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            stored_names: list[str] = handle.keys()
            stored = {name.removeprefix(HF_PREFIX): name for name in stored_names}
            for name in names:
                yield name, handle.get_tensor(stored[name])


def read_state_dict(directory: Path) -> dict[str, Tensor]:
    """Every tensor of a model directory at once (Hugging Face names, `model.` dropped): for
    tools that rearrange whole checkpoints; loading a model streams instead."""
    files = safetensors_files(directory)
    return dict(read_tensors({file: tensor_shapes(file) for file in files}))


# ---- copying -----------------------------------------------------------------------------------
def check_shapes(
    model: nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    placements: Placements,
    where: str,
) -> None:
    """Raise ModelLoadError unless the source tensors `shapes` fill every parameter of `model`
    exactly: none missing, none without a place, each the shape its placements need."""
    params = dict(model.named_parameters())
    unknown = sorted(name for name in shapes if name not in placements and not _ignored(name))
    if unknown:
        raise ModelLoadError(
            f"{where} has tensors the model has no parameter for: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''} (an unsupported variant of its architecture?)"
        )
    missing = sorted(
        name
        for name, placements_of in placements.items()
        if name not in shapes and any(p.name is not None for p in placements_of)
    )
    if missing:
        raise ModelLoadError(
            f"{where} lacks {len(missing)} tensor(s) the config needs: {', '.join(missing[:5])}"
        )
    for name, placements_of in placements.items():
        if name not in shapes:
            continue  # an optional source (see Placement), absent
        shape = tuple(shapes[name])
        for placement in placements_of:
            if not _fits(placement, params, shape):
                raise ModelLoadError(
                    f"{where}: {name} has shape {list(shape)}, which does not fit "
                    f"{placement.name}: weights and config.json do not match"
                )
    filled = {p.name for ps in placements.values() for p in ps if p.name is not None}
    assert filled == set(params), f"placements miss {sorted(set(params) - filled)[:3]}"


def _ignored(name: str) -> bool:
    """Source tensors a model needs nothing from: rotary tables (recomputed from the config)
    and the head of a tied checkpoint that stores it anyway (the embeddings are the head)."""
    return name.endswith(IGNORED_SUFFIXES) or name == "lm_head.weight"


def _fits(placement: Placement, params: Mapping[str, Tensor], shape: tuple[int, ...]) -> bool:
    if placement.name is None:
        return True  # no parameter: checked for zeros when read
    target = params[placement.name].shape
    if placement.pick is not None:  # the rows of a reduced head, out of the full vocabulary
        return shape[1:] == tuple(target[1:]) and max(placement.pick) < shape[0]
    rows = placement.rows if placement.rows is not None else target[0]
    return shape == (rows, *target[1:]) and placement.offset + rows <= target[0]


def copy_weights(
    model: nn.Module, tensors: Iterable[tuple[str, Tensor]], placements: Placements
) -> None:
    """Copy each source tensor into its placements in `model` (on the model's device, in its
    dtype), checked beforehand by `check_shapes`. Raises ModelLoadError for a non-zero
    tensor that has no parameter (an output-projection bias)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors:
            for placement in placements.get(name, ()):
                if placement.name is None:
                    if bool(tensor.any()):
                        raise ModelLoadError(
                            f"{name} is not zero, and specedge's attention has no output "
                            "projection bias: this checkpoint is not supported"
                        )
                    continue
                source = tensor if placement.pick is None else tensor[list(placement.pick)]
                param = params[placement.name]
                rows = placement.rows if placement.rows is not None else param.shape[0]
                param.narrow(0, placement.offset, rows).copy_(source)
