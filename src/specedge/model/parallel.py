"""Tensor parallelism: one model split over the N ranks of a torch.distributed process group.

Terms: N = world size, r = a rank. A *shard* is a plain `Transformer` of the `local_config`,
which has 1/N of the query heads, key-value heads, feed-forward width and vocabulary; rank r
holds the r-th slice of each (Megatron's layout, as in gpt-fast's tp.py):
- column-parallel (output rows split): `wqkv`, its q, k and v heads each split, so that a rank
  holds whole heads and every query head stays with its key-value head; `w13`, its gate and up
  halves each split;
- row-parallel (input columns split): `wo` and `w2`, whose partial products are summed over the
  ranks (an all-reduce after each);
- vocab-parallel: `embed_tokens` (each rank looks up its own rows, zeros elsewhere, summed) and
  `lm_head` (each rank computes its vocabulary's logits, gathered); a tied head stays tied, as
  both hold the same vocabulary range;
- replicated: the norms.
Every rank then holds the same hidden states after every layer, and the same logits.

The model code knows nothing of this: `parallelize` adds the collectives from outside (forward
hooks and one embedding module). `build_shard` makes each rank's shard as the loader makes a
model (`empty_model`, weights written, `finish_model`, which prepacks them for oneDNN), the
weights sliced by `shard_tensor` on rank 0 and scattered to the ranks.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from specedge.errors import SpecEdgeError
from specedge.model.config import ModelConfig
from specedge.model.loader import empty_model, finish_model
from specedge.model.transformer import Transformer, TransformerBlock

ProcessGroup = Any  # a torch.distributed ProcessGroup; None is the default group


class TensorParallelError(SpecEdgeError):
    """The model cannot be split this way, or a rank was lost (the message says what to do)."""


def local_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The geometry of one rank's shard (and of its KV cache): heads, key-value heads,
    feed-forward width and vocabulary divided by `world_size`."""
    if config.head_token_ids is not None:
        raise TensorParallelError(
            "tensor parallelism splits a target model; this one has a reduced LM head "
            "(a distilled draft): serve it without --tensor-parallel"
        )
    sizes = {
        "key-value heads": config.num_kv_heads,
        "query heads": config.num_heads,
        "feed-forward width": config.intermediate_size,
        "vocabulary": config.vocab_size,
    }
    for what, size in sizes.items():
        if size % world_size:
            raise TensorParallelError(
                f"--tensor-parallel {world_size} does not divide the model's {size} {what}; "
                f"pick a divisor of {config.num_kv_heads} (its key-value heads)"
            )
    return replace(
        config,
        num_heads=config.num_heads // world_size,
        num_kv_heads=config.num_kv_heads // world_size,
        intermediate_size=config.intermediate_size // world_size,
        vocab_size=config.vocab_size // world_size,
    )


def shard_tensor(
    name: str, tensor: Tensor, config: ModelConfig, rank: int, world_size: int
) -> Tensor:
    """Rank `rank`'s slice of the full model's weight `name` (our names, see the module
    docstring); a view where the slice is one piece, the tensor itself where replicated."""

    def piece(part: Tensor, dim: int) -> Tensor:
        return part.chunk(world_size, dim=dim)[rank]

    if name in ("embed_tokens.weight", "lm_head.weight"):
        return piece(tensor, 0)  # [V/N, E]
    if name.endswith(("attention.wqkv.weight", "attention.wqkv.bias")):
        q_dim = config.num_heads * config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        q, k, v = tensor.split([q_dim, kv_dim, kv_dim])
        return torch.cat([piece(q, 0), piece(k, 0), piece(v, 0)])  # [(H + 2 H_kv) D / N, ...]
    if name.endswith("feed_forward.w13.weight"):
        gate, up = tensor.chunk(2)
        return torch.cat([piece(gate, 0), piece(up, 0)])  # [2 I / N, E]
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return piece(tensor, 1)  # [E, H D / N] or [E, I / N]
    return tensor  # norms


def build_shard(
    full: Transformer | None,
    config: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    group: ProcessGroup = None,
) -> Transformer:
    """This rank's shard of the model, ready to run with the other ranks (`parallelize`).
    Collective: every rank of `group` calls it, rank 0 with the `full` model (on `device`, in
    `dtype`), which sends each rank its slices one weight at a time, straight into the
    shard's parameters (so no rank holds more than its shard and one weight's slices)."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    assert (full is not None) == (rank == 0), "rank 0, and only rank 0, holds the full model"
    shard = empty_model(local_config(config, world_size), str(device), dtype)
    full_state = full.state_dict() if full is not None else {}
    for name, received in shard.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the embeddings' rows, received under their own name
        pieces = None
        if full is not None:
            pieces = [
                shard_tensor(name, full_state[name], config, r, world_size).contiguous()
                for r in range(world_size)
            ]
        dist.scatter(received, pieces, src=0, group=group)
    return parallelize(finish_model(shard, str(device), dtype), group)


class VocabParallelEmbedding(nn.Embedding):
    """A rank's rows `vocab_start ..` of the embedding table: tokens outside them embed to
    zeros, and the sum over the ranks is every token's embedding."""

    def __init__(self, shard: nn.Embedding, vocab_start: int, group: ProcessGroup) -> None:
        super().__init__(shard.num_embeddings, shard.embedding_dim, device="meta")
        self.weight = shard.weight  # the same parameter, so a tied head stays tied
        self.vocab_start = vocab_start
        self.group = group

    def forward(self, tokens: Tensor) -> Tensor:  # [T] -> [T, E]
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0)
        dist.all_reduce(x, group=self.group)
        return x


def parallelize(shard: Transformer, group: ProcessGroup = None) -> Transformer:
    """Make a shard (a `Transformer` of `local_config`, holding this rank's slices) one rank
    of the whole model: vocab-parallel embedding, an all-reduce after every row-parallel
    projection, the logits gathered over the vocabulary. In place; returns the shard."""
    rank = dist.get_rank(group)
    shard.embed_tokens = VocabParallelEmbedding(
        shard.embed_tokens, rank * shard.embed_tokens.num_embeddings, group
    )
    for layer in shard.layers:
        assert isinstance(layer, TransformerBlock)
        for row_parallel in (layer.attention.wo, layer.feed_forward.w2):
            row_parallel.register_forward_hook(partial(_sum_over_ranks, group=group))
    shard.lm_head.register_forward_hook(partial(_gather_vocabulary, group=group))
    return shard


def _sum_over_ranks(
    module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, *, group: ProcessGroup
) -> None:  # output: [T, E], this rank's partial product, summed in place
    dist.all_reduce(output, group=group)


def _gather_vocabulary(
    module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, *, group: ProcessGroup
) -> Tensor:  # [..., V/N] -> [..., V], ranks' vocabulary slices in order
    pieces = [torch.empty_like(output) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, output.contiguous(), group=group)
    return torch.cat(pieces, dim=-1)
