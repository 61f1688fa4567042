"""The attention kernels behind `Attention.attend`: one sequence's new rows against its KV slot.

Terms as in `specedge.model.transformer`: n = the sequence's new rows, S = positions it
attends, g = H / H_kv query heads per K/V head. A forward prepares each sequence's mask once
(`prepare`), then every layer calls `attend` with the keys and values read in place from the
pool. Two kernels, chosen per forward (`FlatBatch.attention`, `serve --attention`):

- `sdpa`: `scaled_dot_product_attention`. Grouped-query heads are folded into their K/V
  head's rows ([H_kv, g n, D] against [H_kv, S, D]), the product `enable_gqa` defines,
  through the dense kernel: on CPU `enable_gqa` takes a path 6x slower for a decode step
  (benchmarks/results/core_perf.md). A multi-row block gets an additive [1, 1, g n, S] mask.
- `bmm` (what `auto` takes on the CPU): a masked block as two batched products around a float32
  softmax, `BMM_CHUNK` folded rows at a time (their scores stay in cache). torch's CPU SDPA
  kernel runs a masked block at a fraction of the products' speed (it does not fuse the
  softmax): on one core of this project's machine a 33-row tree against 290 positions takes
  0.17 ms a layer against 0.32, a 256-row prefill chunk against 1,500 positions 5.3 ms against
  10.4. A block without a mask (a one-token decode step) still goes through SDPA, which is
  faster for one row (0.03 ms against 0.06).
- `native` (what `auto` takes on the CPU where a C compiler is at hand): the decode steps and
  small blocks (trees, lookup chains) of the whole batch in one call per layer to a C kernel
  (`specedge.model.native`) that reads each sequence's keys and values in place, for all the
  query heads of a group, each row with its mask over its block: 4x SDPA's speed for decode
  steps at 300 and 1,500 positions on one core (benchmarks/results/decode_attention.md);
  large blocks (prefill chunks, large trees at long contexts) as `bmm`
  (`transformer.NativeRows`). `Attention.forward` runs it (it needs the batch).
- `flex`: FlexAttention (`torch.nn.attention.flex_attention`), compiled once with dynamic
  shapes; a block mask from the boolean mask, grouped-query heads native (no K/V repeat, no
  dense mask). On this project's CPU machines it is slower than `sdpa` (a decode step's
  attention 0.9 against 0.26 ms per layer, a 32-node tree's 8.8 against 1.2); FlexAttention
  is written for GPUs, where no one has measured it here yet.

`auto` is `native` on the CPU (`bmm` where the C kernel cannot be compiled) and `sdpa`
elsewhere (CUDA's SDPA kernels are fused).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from specedge.model import native

AUTO = "auto"
SDPA = "sdpa"
BMM = "bmm"
NATIVE = "native"
FLEX = "flex"
ATTENTION_KERNELS = (AUTO, SDPA, BMM, NATIVE, FLEX)
BMM_CHUNK = 192  # folded query rows per product: of 96-384 the fastest here (0.4 MB a head
#   of float32 scores per 500 keys)


def resolve_attention(name: str, device: torch.device | str = "cpu") -> str:
    """The kernel `name` selects on `device`: `auto` is `native` on the CPU (`bmm` where it
    cannot be compiled), else `sdpa` (see the module docstring)."""
    if name not in ATTENTION_KERNELS:
        raise ValueError(
            f"unknown attention kernel {name!r}: expected {', '.join(ATTENTION_KERNELS)}"
        )
    on_cpu = torch.device(device).type == "cpu"
    if name == NATIVE and not on_cpu:
        raise ValueError("attention kernel 'native' runs on the CPU only; use sdpa or flex")
    if name == NATIVE and native.load() is None:
        raise ValueError(
            "attention kernel 'native' could not be compiled here (a C compiler is needed, "
            "$CC or cc; see the log); use bmm or sdpa"
        )
    if name != AUTO:
        return name
    if not on_cpu:
        return SDPA
    return NATIVE if native.load() is not None else BMM


@dataclass(frozen=True)
class PreparedMask:
    """A sequence's mask in the form its kernel takes: an additive SDPA mask or a block mask;
    None for both when its rows attend every position (a one-token decode step)."""

    bias: Tensor | None = None  # [1, 1, g n, S] in the model's dtype (sdpa); [g n, S] float32 (bmm)
    block_mask: Any = None  # flex_attention.BlockMask, flex


def prepare(kernel: str, mask: Tensor | None, group: int, dtype: torch.dtype) -> PreparedMask:
    """`mask` ([n, S] bool, None = attend all) for `attend`, once per forward, not per layer."""
    if mask is None:
        return PreparedMask()
    if kernel in (SDPA, BMM, NATIVE):
        bias_dtype = dtype if kernel == SDPA else torch.float32  # bmm adds it to float32 scores
        bias = torch.zeros(mask.shape, dtype=bias_dtype, device=mask.device)
        bias.masked_fill_(~mask, -math.inf)
        bias = bias.repeat(group, 1)  # row j n + r: query head j of the group, row r
        return PreparedMask(bias=bias[None, None] if kernel == SDPA else bias)
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch: Tensor, head: Tensor, q_index: Tensor, kv_index: Tensor) -> Tensor:
        return mask[q_index, kv_index]

    num_rows, length = mask.shape
    block_mask = create_block_mask(
        mask_mod, None, None, num_rows, length, device=str(mask.device), _compile=False
    )
    return PreparedMask(block_mask=block_mask)


def attend(
    kernel: str,
    rows: Tensor,  # [H, n, D]
    keys: Tensor,  # [H_kv, S, D]
    values: Tensor,  # [H_kv, S, D]
    prepared: PreparedMask,
) -> Tensor:  # [H, n, D]
    num_heads, num_rows, head_dim = rows.shape
    num_kv_heads = keys.shape[0]
    if kernel == FLEX:
        out = _compiled_flex()(
            rows[None],
            keys[None],
            values[None],
            block_mask=prepared.block_mask,
            enable_gqa=num_heads != num_kv_heads,
        )
        return out[0]
    group = num_heads // num_kv_heads
    folded = rows.reshape(num_kv_heads, group * num_rows, head_dim)
    if kernel in (BMM, NATIVE) and prepared.bias is not None:
        return _bmm_attend(folded, keys, values, prepared.bias).view(num_heads, num_rows, head_dim)
    out = F.scaled_dot_product_attention(
        folded[None],  # [1, H_kv, g n, D]
        keys[None],  # [1, H_kv, S, D]
        values[None],
        attn_mask=prepared.bias,
    )[0]
    return out.view(num_heads, num_rows, head_dim)


def _bmm_attend(
    folded: Tensor,  # [H_kv, g n, D]
    keys: Tensor,  # [H_kv, S, D]
    values: Tensor,  # [H_kv, S, D]
    bias: Tensor,  # [g n, S] float32, -inf where masked
) -> Tensor:  # [H_kv, g n, D]
    """softmax(q k^T / sqrt(D) + bias) v, `BMM_CHUNK` rows at a time: the scores in float32,
    rounded once to the model's dtype for the second product (as SDPA's CPU kernel does).
    Every row attends at least its own position, so no row is all -inf."""
    scale = 1.0 / math.sqrt(folded.shape[-1])
    keys_t = keys.transpose(1, 2)  # [H_kv, D, S], a view
    outputs = []
    for start in range(0, folded.shape[1], BMM_CHUNK):
        stop = start + BMM_CHUNK
        scores = torch.bmm(folded[:, start:stop], keys_t).float()  # [H_kv, c, S]
        scores.mul_(scale).add_(bias[start:stop])
        torch.softmax(scores, dim=-1, out=scores)
        outputs.append(torch.bmm(scores.to(values.dtype), values))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    """flex_attention compiled once (uncompiled it materialises the scores), with dynamic
    shapes, so that new lengths do not recompile."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)  # type: ignore[return-value]
