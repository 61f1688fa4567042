"""A loaded model with its KV cache: runs batched block forwards.

The runner is the one place that turns `TreeRow`s into a model forward. It owns the KV slots of
the sequences it serves; engines (target verification, draft growth) decide what to feed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from specedge.core.limits import DEFAULT_PREFILL_CHUNK
from specedge.core.tree import ROOT_PARENT, TreeRow, build_forward_inputs
from specedge.model.kv_cache import KVCache
from specedge.model.loader import LoadedModel


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        num_slots: int,
        max_context: int,
        max_block: int,
    ) -> None:
        """`max_context`: longest committed context; `max_block`: most tokens laid out past
        it at once (tree nodes, padding), so a slot holds max_context + max_block positions."""
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.max_context = max_context
        self.kv = KVCache(
            loaded.config,
            num_slots=num_slots,
            max_len=max_context + max_block,
            device=loaded.device,
            dtype=loaded.dtype,
        )
        self.num_forwards = 0

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @torch.inference_mode()
    def forward(self, rows: Sequence[TreeRow]) -> list[Tensor]:
        """Hidden states of each row's new tokens: a list of [num_new_b, E]."""
        inputs = build_forward_inputs(rows, self.device)
        hidden = self.model.hidden_states(
            inputs.tokens, inputs.positions, inputs.attn_mask, self.kv, inputs.kv_write
        )
        self.num_forwards += 1
        return [hidden[b, :num_new] for b, num_new in enumerate(inputs.num_new)]

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:  # [n, E] -> [n, V] float32
        return self.model.logits(hidden)

    @torch.inference_mode()
    def top_logprobs(self, hidden: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """[n, E] -> the k best log-probabilities per row and their token ids, [n, k] each."""
        return self.model.top_logprobs(hidden, k)

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
