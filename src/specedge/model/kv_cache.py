"""KV cache of per-sequence slots.

A *slot* holds the keys and values of one sequence at slot positions 0..max_len-1. Its *length*
is the number of committed positions; a forward appends its new tokens contiguously from a given
start (usually the length, or past the tree nodes already drafted), and nothing is committed
until the owner says so. `compact` keeps a chosen set of positions (prefix + accepted path) and
moves only the positions that change place, never the whole slot.

Layout per layer: [num_slots, H_kv, max_len, D].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specedge.errors import CapacityError
from specedge.model.config import ModelConfig


@dataclass(frozen=True)
class KVWrite:
    """Where a batched forward writes: row b's N new tokens go to slot `slots[b]` at
    positions `starts[b] .. starts[b] + N - 1` (padding included, so keep room for it)."""

    slots: tuple[int, ...]
    starts: tuple[int, ...]


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (num_slots, config.num_kv_heads, max_len, config.head_dim)
        self.keys = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)
        ]
        self.values = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)
        ]
        self.num_slots = num_slots
        self.max_len = max_len
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    # ---- slots -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Take a free slot (length 0); raises CapacityError when all are in use."""
        if not self._free:
            raise CapacityError(f"all {self.num_slots} KV slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        assert slot not in self._free, f"slot {slot} freed twice"
        self.lengths[slot] = 0
        self._free.append(slot)

    def set_length(self, slot: int, length: int) -> None:
        """Commit (or roll back to) `length` positions of the slot."""
        assert 0 <= length <= self.max_len
        self.lengths[slot] = length

    # ---- tensor traffic (called by the model) --------------------------------------------
    def write(self, layer: int, kv_write: KVWrite, k: Tensor, v: Tensor) -> None:
        """Store new keys/values. k, v: [B, N, H_kv, D]."""
        num_new = k.shape[1]
        keys, values = self.keys[layer], self.values[layer]
        for row, (slot, start) in enumerate(zip(kv_write.slots, kv_write.starts, strict=True)):
            assert start + num_new <= self.max_len, "KV slot overflow"
            keys[slot, :, start : start + num_new] = k[row].transpose(0, 1)
            values[slot, :, start : start + num_new] = v[row].transpose(0, 1)

    def read(self, layer: int, slots: Sequence[int], length: int) -> tuple[Tensor, Tensor]:
        """Keys and values of positions 0..length-1 of each slot: two [B, H_kv, S, D]."""
        keys, values = self.keys[layer], self.values[layer]
        first, end = slots[0], slots[0] + len(slots)
        if list(slots) == list(range(first, end)):  # consecutive slots: a view, no copy
            return keys[first:end, :, :length], values[first:end, :, :length]
        index = torch.tensor(slots, device=keys.device)
        return keys[index, :, :length], values[index, :, :length]

    # ---- compaction ------------------------------------------------------------------------
    def compact(self, slot: int, start: int, kept_positions: Sequence[int]) -> None:
        """Move `kept_positions` (ascending, all >= start) to start, start+1, ... and commit
        the slot's length to start + len(kept_positions). Positions already in place stay."""
        moves = [
            (source, start + i) for i, source in enumerate(kept_positions) if source != start + i
        ]
        assert all(src > dst for src, dst in moves), "kept positions must be ascending"
        if moves:
            src = torch.tensor([m[0] for m in moves], device=self.keys[0].device)
            dst = torch.tensor([m[1] for m in moves], device=self.keys[0].device)
            for keys, values in zip(self.keys, self.values, strict=True):
                keys[slot, :, dst] = keys[slot, :, src]
                values[slot, :, dst] = values[slot, :, src]
        self.set_length(slot, start + len(kept_positions))
