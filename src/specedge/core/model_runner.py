"""A loaded model with its KV cache: runs batched block forwards.

The runner is the one place that turns `TreeRow`s into a model forward: the batch layout
(tokens, positions, masks from `core.tree`'s topology, KV write locations) is built here. It
owns the KV slots of the sequences it serves; engines (target verification, draft growth)
decide what to feed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from specedge.core.limits import DEFAULT_PREFILL_CHUNK
from specedge.core.tree import ROOT_PARENT, ancestor_mask, depths
from specedge.model import attention
from specedge.model.kv_cache import KVCache
from specedge.model.loader import LoadedModel
from specedge.model.transformer import FlatBatch, SequenceBlock


@dataclass(frozen=True)
class TreeRow:
    """One sequence of a batched forward.

    The block's nodes occupy slot positions context_len .. context_len + len(parents) - 1; the
    first `num_cached` are already in the slot, `new_tokens` are the rest, written in order.
    """

    slot: int
    context_len: int
    parents: Sequence[int]
    new_tokens: Sequence[int]
    num_cached: int = 0

    def __post_init__(self) -> None:
        assert len(self.parents) == self.num_cached + len(self.new_tokens)


@dataclass
class ForwardInputs:
    """A flat batch for `Transformer.hidden_states`: every row's new tokens concatenated."""

    tokens: Tensor  # [T]
    positions: Tensor  # [T]
    batch: FlatBatch
    num_new: list[int] = field(default_factory=list)  # new tokens per row


def build_forward_inputs(
    rows: Sequence[TreeRow], kv: KVCache, kernel: str = attention.SDPA
) -> ForwardInputs:
    """Tokens, positions, masks and KV write locations for a batch of blocks, built once per
    forward: no padding, and a mask only where a row's block is not a single new token;
    `kernel` runs its attention (`specedge.model.attention`)."""
    device = kv.keys.device
    tokens: list[int] = []
    positions: list[Tensor] = []
    index: list[Tensor] = []
    blocks = []
    for row in rows:
        num_new, base = len(row.new_tokens), row.context_len
        block_end = base + len(row.parents)
        node_depths = torch.tensor(depths(row.parents), dtype=torch.long)
        positions.append(base + node_depths[row.num_cached :] - 1)
        tokens.extend(row.new_tokens)
        index.append(kv.physical(row.slot, base + row.num_cached, num_new))
        mask = None
        if len(row.parents) > 1:
            mask = torch.ones(num_new, block_end, dtype=torch.bool)
            mask[:, base:] = ancestor_mask(row.parents)[row.num_cached :]
            mask = mask.to(device)
        blocks.append(
            SequenceBlock(row.slot, len(tokens) - num_new, num_new, block_end, mask, base)
        )
    return ForwardInputs(
        tokens=torch.tensor(tokens, dtype=torch.long).to(device),
        positions=torch.cat(positions).to(device),
        batch=FlatBatch(tuple(blocks), torch.cat(index), kernel),
        num_new=[len(row.new_tokens) for row in rows],
    )


class ModelRunner:
    tensor_parallel = 1  # processes the model is split over (`server.tensor_parallel`)

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        num_slots: int,
        max_context: int,
        max_block: int,
        kv_blocks: int | None = None,
        attention_kernel: str = attention.AUTO,
    ) -> None:
        """`max_context`: longest committed context; `max_block`: most tokens laid out past
        it at once (tree nodes), so a slot holds up to max_context + max_block positions;
        `kv_blocks`: the KV pool's blocks (default: every slot at full length);
        `attention_kernel`: one of `specedge.model.attention.ATTENTION_KERNELS`."""
        self.loaded = loaded
        self.attention_kernel = attention.resolve_attention(attention_kernel, loaded.device)
        self.model = loaded.model
        self.config = loaded.config
        self.max_context = max_context
        self.max_block = max_block
        self.kv = self.new_kv_cache(num_slots, max_context + max_block, kv_blocks)
        self.num_forwards = 0

    def new_kv_cache(self, num_slots: int, max_len: int, num_blocks: int | None) -> KVCache:
        """The runner's KV pool, of the model's geometry (a tensor-parallel runner's holds
        its own rank's heads)."""
        return KVCache(
            self.config,
            num_slots=num_slots,
            max_len=max_len,
            device=self.device,
            dtype=self.loaded.dtype,
            num_blocks=num_blocks,
        )

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @torch.inference_mode()
    def forward(self, rows: Sequence[TreeRow]) -> list[Tensor]:
        """Hidden states of each row's new tokens: a list of [num_new_b, E]."""
        inputs = build_forward_inputs(rows, self.kv, self.attention_kernel)
        hidden = self.model.hidden_states(inputs.tokens, inputs.positions, inputs.batch, self.kv)
        self.num_forwards += 1
        return list(hidden.split(inputs.num_new))

    @torch.inference_mode()
    def logits(self, hidden: Tensor, upcast: bool = True) -> Tensor:  # [n, E] -> [n, V]
        """float32 logits, or in the model's dtype with `upcast=False` (`Transformer.logits`)."""
        return self.model.logits(hidden, upcast)

    @torch.inference_mode()
    def top_logprobs(self, hidden: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """[n, E] -> the k best log-probabilities per row and their token ids, [n, k] each."""
        return self.model.top_logprobs(hidden, k)

    def close(self) -> None:
        """Release what the runner holds besides memory (tensor parallelism's processes)."""

    def prefill(
        self, slot: int, tokens: Sequence[int], start: int, chunk: int = DEFAULT_PREFILL_CHUNK
    ) -> Tensor | None:
        """Write `tokens` as a chain from slot position `start`, `chunk` tokens per forward;
        commits the slot length and returns the last token's hidden state ([E]) if any."""
        last: Tensor | None = None
        for begin in range(0, len(tokens), chunk):
            piece = list(tokens[begin : begin + chunk])
            row = TreeRow(slot, start + begin, chain_parents(len(piece)), piece)
            last = self.forward([row])[0][-1]
            self.kv.set_length(slot, start + begin + len(piece))
        return last


def chain_parents(length: int) -> list[int]:
    """Block parents of a chain: each token follows the previous one."""
    return [ROOT_PARENT, *range(length - 1)]
