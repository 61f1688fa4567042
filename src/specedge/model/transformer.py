"""A lean decoder-only transformer for the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3).

Terms: T = new tokens of the whole batch, H / H_kv = query / key-value heads, D = head dim,
E = hidden size, V = vocabulary, S = KV positions one sequence attends.

Batches are *flat*: every sequence's new tokens are concatenated into [T] rows, with no
padding, and `FlatBatch` says which rows belong to which sequence, where their keys and values
go in the KV pool, and what they attend. The model knows nothing about trees or sessions: a
sequence's rows attend its slot positions 0..S-1 through an explicit boolean mask, or all of
them when the mask is None (a one-token decode step). Whoever builds the batch decides what
attends to what (see `specedge.core.model_runner`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specedge.model import attention, native
from specedge.model.attention import PreparedMask
from specedge.model.config import ModelConfig
from specedge.model.kv_cache import KVCache


class Linear(nn.Linear):
    """`nn.Linear` with a bf16 CPU fast path, equal to `F.linear` bit for bit.

    oneDNN multiplies with the weight reordered once into its blocked layout (`pack`), instead
    of on every call as `F.linear` does. For one row (a decode step) that streams the weights
    at memory bandwidth, 2x faster than `F.linear` and 4x faster than `torch.mv` on an AVX512
    CPU; for 2-132 rows (trees, draft steps, prefill chunks) 1.4-1.9x faster than `F.linear`
    (see benchmarks/results/core_perf.md). The packed copy doubles the memory of the weights,
    so only CPU bf16 inference models get it (`build_model`).
    """

    packed_weight: Tensor | None = None  # oneDNN-blocked copy of `weight`, see `pack`

    def pack(self) -> bool:
        """Keep a oneDNN-blocked copy of the (final, frozen) weight; False, changing nothing,
        where this torch build cannot."""
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
            probe = torch.zeros(2, self.in_features, dtype=self.weight.dtype)
            torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
        except (AttributeError, RuntimeError, NotImplementedError):
            return False
        self.packed_weight = packed
        return True

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        if self.packed_weight is None or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(
            rows, self.packed_weight, self.bias, "none", [], ""
        )
        return out.view(*x.shape[:-1], self.out_features)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # [..., dim] -> [..., dim]
        # F.rms_norm normalises bf16/fp16 inputs in float32 and rounds once, exactly as the
        # reference implementations' explicit upcast does (without the copy). They then scale
        # in the input dtype: a separate rounding in bf16, the same product in fp32, where
        # F.rms_norm can apply the weight itself (one kernel fewer).
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        if not torch.is_grad_enabled():  # the same two roundings in one native call
            normed = native.rms_norm(x, self.weight, self.eps)
            if normed is not None:
                return normed
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


def rope_inv_freq(config: ModelConfig) -> Tensor:  # [D/2] float32
    """Inverse RoPE frequencies, with Llama-3 frequency-dependent scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: Tensor) -> Tensor:  # [..., D] -> [..., D]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass(frozen=True)
class SequenceBlock:
    """One sequence's rows of a flat batch: rows `first_row .. first_row + num_rows - 1`
    attend positions 0..kv_len-1 of KV slot `slot` (their own keys included, written first),
    as `mask` says ([num_rows, kv_len] bool), or all of them when `mask` is None. The mask's
    columns before `mask_start` are all True (the context before a tree or chunk)."""

    slot: int
    first_row: int
    num_rows: int
    kv_len: int
    mask: Tensor | None = None
    mask_start: int = 0


@dataclass(frozen=True)
class FlatBatch:
    """What a flat forward needs besides tokens and positions."""

    sequences: tuple[SequenceBlock, ...]
    write_index: Tensor  # [T] int64: the KV pool index of each row's keys and values
    attention: str = attention.SDPA  # the kernel (`specedge.model.attention`), never "auto"


def chain_batch(
    kv: KVCache, chains: Sequence[tuple[int, int, int]], kernel: str = attention.SDPA
) -> FlatBatch:
    """A batch of causal chains: (slot, start, count) writes `count` tokens at slot positions
    start.. and each attends everything before it (a prefill, a decode step)."""
    sequences, index, row = [], [], 0
    for slot, start, count in chains:
        end = start + count
        mask = None
        if count > 1:
            mask = torch.ones(count, end, dtype=torch.bool, device=kv.keys.device)
            mask[:, start:] = torch.ones(count, count, dtype=torch.bool).tril()
        sequences.append(SequenceBlock(slot, row, count, end, mask, start))
        index.append(kv.physical(slot, start, count))
        row += count
    return FlatBatch(tuple(sequences), torch.cat(index), kernel)


# The blocks the native kernel attends (see NativeRows): decode steps always; blocks of up to
# NATIVE_MAX_ROWS rows spanning up to NATIVE_MAX_ROW_POSITIONS (rows x positions). Measured on
# one core of this project's machine, batch 8 of the bundled target, verification time native /
# bmm: at 256 positions 0.75 (4 rows), 0.87 (16), 0.92 (32), 1.05 (64), even at about 50 rows
# (15k row-positions); at 1,500 positions 0.65 (4), 0.79 (8), 1.03 (16), 1.11 (32), even at
# about 15 rows (22k).
NATIVE_MAX_ROWS = 48
NATIVE_MAX_ROW_POSITIONS = 16384


@dataclass(frozen=True)
class NativeRows:
    """The rows the native kernel attends, one call per layer: every row of each sequence whose
    slot's pool blocks are consecutive and whose block is a decode step or small (decode
    steps, small trees, lookup chains; `takes`), each over its own span of the slot with its
    mask from the block's `mask_start` on. The kernel reads a row's keys once per row; larger
    blocks (prefill chunks, large trees at long contexts) are faster as two batched products
    (`attention.BMM`), which share each key among all the block's rows."""

    sequences: frozenset[int]  # indices into FlatBatch.sequences
    rows: Tensor  # [N] int64: each entry's row
    starts: Tensor  # [N] int64: the pool position of its slot position 0
    lengths: Tensor  # [N] int64: the slot positions up to its last attended one
    masks: Tensor | None = None  # uint8, flat: the masked entries' mask bytes
    mask_starts: Tensor | None = None  # [N] int64: where each one's mask begins (>= length: none)
    mask_offsets: Tensor | None = None  # [N] int64: where its bytes begin in `masks`

    @staticmethod
    def takes(block: SequenceBlock) -> bool:
        return block.num_rows == 1 or (
            block.num_rows <= NATIVE_MAX_ROWS
            and block.num_rows * block.kv_len <= NATIVE_MAX_ROW_POSITIONS
        )

    @classmethod
    def of(cls, batch: FlatBatch, kv: KVCache) -> NativeRows | None:
        chosen: list[int] = []
        rows: list[int] = []
        starts: list[int] = []
        lengths: list[int] = []
        mask_starts: list[int] = []
        mask_offsets: list[int] = []
        masks: list[Tensor] = []
        offset = 0
        for index, block in enumerate(batch.sequences):
            start = kv.contiguous_start(block.slot)
            if start is None or not cls.takes(block):
                continue
            chosen.append(index)
            rows += range(block.first_row, block.first_row + block.num_rows)
            starts += [start] * block.num_rows
            if block.mask is None:  # a decode step: its whole slot, no mask
                lengths += [block.kv_len] * block.num_rows
                mask_starts += [block.kv_len] * block.num_rows
                mask_offsets += [0] * block.num_rows
                continue
            tail = block.mask[:, block.mask_start :].to(torch.uint8)  # [n, w]
            width = tail.shape[1]
            # Each row's span ends at its last attended position (a chain row's own).
            last = (width - 1 - tail.flip(1).argmax(1)).tolist()
            lengths += [block.mask_start + end + 1 for end in last]
            mask_starts += [block.mask_start] * block.num_rows
            mask_offsets += [offset + width * r for r in range(block.num_rows)]
            masks.append(tail.reshape(-1))
            offset += tail.numel()
        if not chosen:
            return None

        def longs(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long)

        return cls(
            frozenset(chosen),
            longs(rows),
            longs(starts),
            longs(lengths),
            torch.cat(masks) if masks else None,
            longs(mask_starts) if masks else None,
            longs(mask_offsets) if masks else None,
        )


@dataclass(frozen=True)
class LayerInputs:
    """What every layer of one forward shares, derived once from the forward's arguments."""

    cos: Tensor  # [T, 1, D]
    sin: Tensor  # [T, 1, D]
    masks: tuple[PreparedMask, ...]  # per sequence, in the form the kernel takes
    batch: FlatBatch
    kv: KVCache
    native: NativeRows | None = None  # the native kernel's rows (kernel `native` only)
    fused_rope: bool = False  # RoPE and the KV write in one native call (bf16 CPU)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        qkv_dim = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.wqkv = Linear(config.hidden_size, qkv_dim, bias=config.qkv_bias)
        self.wo = Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x: Tensor, inputs: LayerInputs) -> Tensor:  # [T, E] -> [T, E]
        num_rows = x.shape[0]
        num_heads, num_kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.wqkv(x)  # [T, (H + 2 H_kv) D]
        # Queries and keys side by side, so that RoPE is one set of element-wise kernels.
        qk = qkv[:, : (num_heads + num_kv_heads) * head_dim]
        qk = qk.view(num_rows, num_heads + num_kv_heads, head_dim)
        v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(num_rows, num_kv_heads, head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([num_heads, num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        if inputs.fused_rope:
            q = native.rope_store(
                qk,
                v,
                inputs.cos,
                inputs.sin,
                inputs.batch.write_index,
                inputs.kv.keys[self.layer_index],
                inputs.kv.values[self.layer_index],
                num_heads,
            )
        else:
            qk = qk * inputs.cos + rotate_half(qk) * inputs.sin
            q, k = qk.split([num_heads, num_kv_heads], dim=1)  # [T, H, D], [T, H_kv, D]
            inputs.kv.write(self.layer_index, inputs.batch.write_index, k, v)
        if inputs.native is not None:
            return self.wo(self.attend_native(q, inputs).view(num_rows, num_heads * head_dim))
        out = self.attend(q.transpose(0, 1), inputs)  # [H, T, D]
        return self.wo(out.transpose(0, 1).reshape(num_rows, num_heads * head_dim))

    def attend_native(self, q: Tensor, inputs: LayerInputs) -> Tensor:  # [T, H, D] -> same
        """The native kernel's batch: its rows in one call, written in place into the output,
        and the other sequences (large trees, prefill chunks) one by one as `bmm`."""
        rows = inputs.native
        assert rows is not None
        out = q.new_empty(q.shape)
        layer = self.layer_index
        native.row_attention(
            q,
            inputs.kv.keys[layer],
            inputs.kv.values[layer],
            rows.rows,
            rows.starts,
            rows.lengths,
            out,
            self.num_heads,
            rows.masks,
            rows.mask_starts,
            rows.mask_offsets,
        )
        for index, (block, mask) in enumerate(
            zip(inputs.batch.sequences, inputs.masks, strict=True)
        ):
            if index in rows.sequences:
                continue
            span = slice(block.first_row, block.first_row + block.num_rows)
            attended = self.attend_block(q[span].transpose(0, 1), block, mask, inputs)
            out[span] = attended.transpose(0, 1)
        return out

    def attend(self, q: Tensor, inputs: LayerInputs) -> Tensor:  # [H, T, D] -> [H, T, D]
        """Each sequence's queries against its own keys and values, read in place from the
        pool (`KVCache.read`), by the batch's kernel (`specedge.model.attention`)."""
        outputs = [
            self.attend_block(
                q[:, block.first_row : block.first_row + block.num_rows], block, mask, inputs
            )
            for block, mask in zip(inputs.batch.sequences, inputs.masks, strict=True)
        ]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def attend_block(
        self, rows: Tensor, block: SequenceBlock, mask: PreparedMask, inputs: LayerInputs
    ) -> Tensor:  # [H, n, D] -> [H, n, D]
        """One sequence's rows against its keys and values, read in place from the pool, by
        the batch's kernel."""
        keys, values = inputs.kv.read(self.layer_index, block.slot, block.kv_len)
        return attention.attend(inputs.batch.attention, rows, keys, values, mask)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w13 = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.w2 = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # [T, E] -> [T, E]
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, layer_index)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, inputs: LayerInputs) -> Tensor:  # [T, E] -> [T, E]
        x = x + self.attention(self.attention_norm(x), inputs)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    inv_freq: Tensor  # [D/2] float32 buffer
    head_token_ids: Tensor | None  # [K_head] int64 buffer, for a reduced head

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        head = config.head_token_ids
        self.lm_head = Linear(config.hidden_size, len(head or ()) or config.vocab_size, bias=False)
        if config.tie_word_embeddings and head is None:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        head_ids = torch.tensor(head) if head is not None else None  # [K_head] int64
        self.register_buffer("head_token_ids", head_ids, persistent=False)

    def hidden_states(
        self,
        tokens: Tensor,  # [T] int64
        positions: Tensor,  # [T] int64
        batch: FlatBatch,
        kv: KVCache,
    ) -> Tensor:  # [T, E], after the final norm
        x = self.embed_tokens(tokens)
        group = self.config.num_heads // self.config.num_kv_heads
        freqs = positions.unsqueeze(-1).float() * self.inv_freq  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [T, 1, D]
        rows = self._native_rows(batch, kv)
        taken = rows.sequences if rows is not None else frozenset()
        inputs = LayerInputs(
            cos=angles.cos().to(x.dtype),
            sin=angles.sin().to(x.dtype),
            masks=tuple(  # the native kernel's sequences take their masks as they are
                PreparedMask()
                if index in taken
                else attention.prepare(batch.attention, block.mask, group, x.dtype)
                for index, block in enumerate(batch.sequences)
            ),
            batch=batch,
            kv=kv,
            native=rows,
            fused_rope=not torch.is_grad_enabled()
            and kv.keys.dtype == x.dtype
            and native.fuses_rope(x.dtype, x.device),
        )
        for layer in self.layers:
            x = layer(x, inputs)
        return self.norm(x)

    def _native_rows(self, batch: FlatBatch, kv: KVCache) -> NativeRows | None:
        config = self.config
        if batch.attention != attention.NATIVE or not native.supports(
            config.num_heads, config.num_kv_heads, config.head_dim, kv.keys.dtype
        ):
            return None
        return NativeRows.of(batch, kv)

    def logits(self, hidden: Tensor, upcast: bool = True) -> Tensor:  # [..., E] -> [..., V]
        """The head's logits, in float32 (or, `upcast=False`, in the model's dtype: enough for
        an argmax, and it skips converting a [T, V] tensor)."""
        logits = self.lm_head(hidden)
        if upcast:
            logits = logits.float()
        if self.head_token_ids is None:
            return logits
        # Reduced head: scatter its [..., K_head] logits into the vocabulary, -inf elsewhere.
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), -math.inf)
        return full.index_copy_(-1, self.head_token_ids, logits)

    def top_logprobs(self, hidden: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The `k` largest log-probabilities of each row ([..., k] float32) and their token
        ids; equal to `logits(...).log_softmax(-1).topk(k)` but, with a reduced head, computed
        over the head's columns only (the -inf columns add nothing to the softmax)."""
        logprobs = self.lm_head(hidden).float().log_softmax(dim=-1)
        top = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
        if self.head_token_ids is None:
            return top.values, top.indices
        return top.values, self.head_token_ids[top.indices]

    def forward(
        self, tokens: Tensor, positions: Tensor, batch: FlatBatch, kv: KVCache
    ) -> Tensor:  # [T] -> [T, V] float32
        return self.logits(self.hidden_states(tokens, positions, batch, kv))
