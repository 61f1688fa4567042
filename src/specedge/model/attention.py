"""The attention kernels behind `Attention.attend`: one sequence's new rows against its KV slot.

Terms as in `specedge.model.transformer`: n = the sequence's new rows, S = positions it
attends, g = H / H_kv query heads per K/V head. A forward prepares each sequence's mask once
(`prepare`), then every layer calls `attend` with the keys and values read in place from the
pool. Two kernels, chosen per forward (`FlatBatch.attention`, `serve --attention`):

- `sdpa`: `scaled_dot_product_attention`. Grouped-query heads are folded into their K/V
  head's rows ([H_kv, g n, D] against [H_kv, S, D]), the product `enable_gqa` defines,
  through the dense kernel: on CPU `enable_gqa` takes a path 6x slower for a decode step
  (benchmarks/results/core_perf.md). A multi-row block gets an additive [1, 1, g n, S] mask.
- `flex`: FlexAttention (`torch.nn.attention.flex_attention`), compiled once with dynamic
  shapes; a block mask from the boolean mask, grouped-query heads native (no K/V repeat, no
  dense mask). On this project's CPU machines it is slower than `sdpa` (a decode step's
  attention 0.9 against 0.26 ms per layer, a 32-node tree's 8.8 against 1.2), so `auto`
  takes `sdpa`; FlexAttention is written for GPUs, where no one has measured it here yet.
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

AUTO = "auto"
SDPA = "sdpa"
FLEX = "flex"
ATTENTION_KERNELS = (AUTO, SDPA, FLEX)


def resolve_attention(name: str) -> str:
    """The kernel `name` selects: `auto` is `sdpa` (see the module docstring)."""
    if name not in ATTENTION_KERNELS:
        raise ValueError(
            f"unknown attention kernel {name!r}: expected {', '.join(ATTENTION_KERNELS)}"
        )
    return SDPA if name == AUTO else name


@dataclass(frozen=True)
class PreparedMask:
    """A sequence's mask in the form its kernel takes: an additive SDPA mask or a block mask;
    None for both when its rows attend every position (a one-token decode step)."""

    bias: Tensor | None = None  # [1, 1, g n, S], sdpa
    block_mask: Any = None  # flex_attention.BlockMask, flex


def prepare(kernel: str, mask: Tensor | None, group: int, dtype: torch.dtype) -> PreparedMask:
    """`mask` ([n, S] bool, None = attend all) for `attend`, once per forward, not per layer."""
    if mask is None:
        return PreparedMask()
    if kernel == SDPA:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        bias.masked_fill_(~mask, -math.inf)
        return PreparedMask(bias=bias.repeat(group, 1)[None, None])
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
    out = F.scaled_dot_product_attention(
        folded[None],  # [1, H_kv, g n, D]
        keys[None],  # [1, H_kv, S, D]
        values[None],
        attn_mask=prepared.bias,
    )[0]
    return out.view(num_heads, num_rows, head_dim)


@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    """flex_attention compiled once (uncompiled it materialises the scores), with dynamic
    shapes, so that new lengths do not recompile."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)  # type: ignore[return-value]
