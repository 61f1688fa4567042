"""Paged KV cache: fixed-size blocks from one pool, a block table per sequence.

A *slot* is one sequence's handle. It holds the keys and values of slot positions
0..capacity-1, in blocks of `block_size` positions taken from a pool shared by all slots, so a
50-token request takes the blocks it needs and no more (`allocate(capacity)`). Its *length* is
the number of committed positions; a forward writes its new tokens past it (tree nodes, a
prefill chunk), and nothing is committed until the owner says so. `compact` keeps a chosen set
of positions (prefix + accepted path) and moves only the positions that change place.

Layout: one tensor per side for all layers, [num_layers, H_kv, num_blocks * block_size, D],
head-major, so that a slot whose blocks are consecutive in the pool is a [H_kv, S, D] *view*
that attention reads in place. The allocator hands out the best-fitting run of free blocks, so
that is the common case; a slot that had to take scattered blocks (a fragmented pool) is read
through one gather per layer instead. Capacity is reserved whole at allocation: a running
sequence never waits for memory, and admission is a plain count of free blocks.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specedge.errors import CapacityError
from specedge.model.config import ModelConfig

DEFAULT_BLOCK_SIZE = 16  # positions per block: small enough that a short request wastes little
DEFAULT_MEMORY_FRACTION = 0.5  # of the free memory, for a pool sized by default


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory a new allocation could take now: free device memory on CUDA, the kernel's
    MemAvailable on the host."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def pool_blocks(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    num_slots: int,
    max_len: int,
    memory_gb: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> int:
    """Blocks of a pool of `memory_gb` GB (default: `DEFAULT_MEMORY_FRACTION` of the free
    memory), never more than `num_slots` slots of `max_len` positions can use."""
    block_bytes = KVCache.bytes_per_position(config, dtype) * block_size
    most = num_slots * math.ceil(max_len / block_size)
    budget = (
        memory_gb * 1e9
        if memory_gb is not None
        else DEFAULT_MEMORY_FRACTION * free_memory_bytes(device)
    )
    return max(1, min(most, int(budget // block_bytes)))


@dataclass(frozen=True)
class Run:
    """Consecutive pool blocks `start .. start + length - 1`."""

    start: int
    length: int


class BlockPool:
    """Free blocks as sorted, merged runs. `take(n)` prefers the smallest run that holds all n
    (so a slot's blocks are consecutive), else takes the largest runs first (fewest pieces)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._starts: list[int] = [0] if num_blocks else []
        self._lengths: list[int] = [num_blocks] if num_blocks else []
        self.num_free = num_blocks

    def take(self, count: int) -> list[Run]:
        assert 0 < count <= self.num_free
        fitting = [i for i, length in enumerate(self._lengths) if length >= count]
        if fitting:
            best = min(fitting, key=lambda i: self._lengths[i])
            return [self._cut(best, count)]
        runs = []
        while count:
            largest = max(range(len(self._lengths)), key=lambda i: self._lengths[i])
            runs.append(self._cut(largest, min(count, self._lengths[largest])))
            count -= runs[-1].length
        return sorted(runs, key=lambda run: run.start)

    def give_back(self, runs: Sequence[Run]) -> None:
        for run in runs:
            self._insert(run)

    def _cut(self, index: int, count: int) -> Run:
        run = Run(self._starts[index], count)
        if self._lengths[index] == count:
            del self._starts[index], self._lengths[index]
        else:
            self._starts[index] += count
            self._lengths[index] -= count
        self.num_free -= count
        return run

    def _insert(self, run: Run) -> None:
        index = bisect.bisect(self._starts, run.start)
        before = index - 1
        assert before < 0 or self._starts[before] + self._lengths[before] <= run.start, (
            "freed twice"
        )
        assert index == len(self._starts) or run.start + run.length <= self._starts[index]
        start, length = run.start, run.length
        if index < len(self._starts) and start + length == self._starts[index]:
            length += self._lengths[index]  # merge with the next run
            del self._starts[index], self._lengths[index]
        if before >= 0 and self._starts[before] + self._lengths[before] == start:
            self._lengths[before] += length  # merge with the previous run
        else:
            self._starts.insert(index, start)
            self._lengths.insert(index, length)
        self.num_free += run.length


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        num_blocks: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        """`num_slots`: most sequences at once; `max_len`: most positions one slot may hold;
        `num_blocks`: the pool (default: every slot at `max_len`, the memory of contiguous
        per-slot caches)."""
        self.block_size = block_size
        self.num_blocks = (
            num_blocks if num_blocks is not None else num_slots * self.blocks_for(max_len)
        )
        if self.num_blocks < 1:
            raise CapacityError("the KV pool has no blocks; give it more memory")
        shape = (
            config.num_layers,
            config.num_kv_heads,
            self.num_blocks * block_size,
            config.head_dim,
        )
        # Blocks are written before they are read, so the pool needs no zeroing (and untouched
        # memory stays unbacked until used).
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.num_slots = num_slots
        self.max_len = max_len
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._pool = BlockPool(self.num_blocks)
        self._runs: list[list[Run]] = [[] for _ in range(num_slots)]
        self._capacity = [0] * num_slots
        self._table: list[Tensor | None] = [None] * num_slots  # physical index per position

    @staticmethod
    def bytes_per_position(config: ModelConfig, dtype: torch.dtype) -> int:
        """Keys and values of one position in every layer."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element

    def blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.block_size)

    # ---- slots -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Free slot handles (sequences that could still be opened, memory permitting)."""
        return len(self._free)

    @property
    def num_free_blocks(self) -> int:
        return self._pool.num_free

    def can_allocate(self, capacity: int | None = None) -> bool:
        need = self.blocks_for(self.max_len if capacity is None else capacity)
        return bool(self._free) and need <= self._pool.num_free

    def allocate(self, capacity: int | None = None) -> int:
        """Take a free slot (length 0) holding `capacity` positions (default `max_len`);
        raises CapacityError when no slot or not enough free blocks are left."""
        capacity = self.max_len if capacity is None else min(capacity, self.max_len)
        if not self._free:
            raise CapacityError(f"all {self.num_slots} KV slots are in use")
        need = self.blocks_for(max(capacity, 1))
        if need > self._pool.num_free:
            raise CapacityError(
                f"the KV cache is full: {need} blocks needed, {self._pool.num_free} of "
                f"{self.num_blocks} free"
            )
        slot = self._free.pop()
        runs = self._pool.take(need)
        self._runs[slot] = runs
        self._capacity[slot] = need * self.block_size
        self._table[slot] = None if len(runs) == 1 else self._physical_table(runs, self.keys.device)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        assert slot not in self._free, f"slot {slot} freed twice"
        self._pool.give_back(self._runs[slot])
        self._runs[slot], self._capacity[slot], self._table[slot] = [], 0, None
        self.lengths[slot] = 0
        self._free.append(slot)

    def capacity(self, slot: int) -> int:
        return self._capacity[slot]

    def is_contiguous(self, slot: int) -> bool:
        return self._table[slot] is None

    def contiguous_start(self, slot: int) -> int | None:
        """The pool position of the slot's position 0 when its blocks are consecutive, else
        None."""
        return self._first_position(slot) if self._table[slot] is None else None

    def _first_position(self, slot: int) -> int:
        """The pool position of the slot's first block's first position."""
        return self._runs[slot][0].start * self.block_size

    def set_length(self, slot: int, length: int) -> None:
        """Commit (or roll back to) `length` positions of the slot."""
        assert 0 <= length <= self._capacity[slot]
        self.lengths[slot] = length

    # ---- addressing --------------------------------------------------------------------------
    def physical(self, slot: int, start: int, count: int) -> Tensor:  # [count] int64
        """Pool indices of slot positions start .. start + count - 1."""
        assert start + count <= self._capacity[slot], "KV slot overflow"
        table = self._table[slot]
        if table is None:
            base = self._first_position(slot)
            return torch.arange(base + start, base + start + count, device=self.keys.device)
        return table[start : start + count]

    def _physical_table(self, runs: Sequence[Run], device: torch.device) -> Tensor:
        pieces = [
            torch.arange(run.start * self.block_size, (run.start + run.length) * self.block_size)
            for run in runs
        ]
        return torch.cat(pieces).to(device)

    # ---- tensor traffic (called by the model) --------------------------------------------
    def write(self, layer: int, index: Tensor, k: Tensor, v: Tensor) -> None:
        """Store new keys/values at pool `index` ([T]); k, v: [T, H_kv, D]."""
        self.keys[layer].index_copy_(1, index, k.transpose(0, 1))
        self.values[layer].index_copy_(1, index, v.transpose(0, 1))

    def read(self, layer: int, slot: int, length: int) -> tuple[Tensor, Tensor]:
        """Keys and values of the slot's positions 0..length-1: two [H_kv, S, D], views of
        the pool when the slot's blocks are consecutive, else gathered."""
        table = self._table[slot]
        if table is None:
            base = self._first_position(slot)
            return (
                self.keys[layer, :, base : base + length],
                self.values[layer, :, base : base + length],
            )
        index = table[:length]
        return self.keys[layer].index_select(1, index), self.values[layer].index_select(1, index)

    # ---- compaction ------------------------------------------------------------------------
    def compact(self, slot: int, start: int, kept_positions: Sequence[int]) -> None:
        """Move `kept_positions` (ascending, all >= start) to start, start+1, ... and commit
        the slot's length to start + len(kept_positions). Positions already in place stay;
        the moves of every layer are one indexed copy per side."""
        moves = [
            (source, start + i) for i, source in enumerate(kept_positions) if source != start + i
        ]
        assert all(src > dst for src, dst in moves), "kept positions must be ascending"
        if moves:
            src = self._pool_index(slot, [m[0] for m in moves])
            dst = self._pool_index(slot, [m[1] for m in moves])
            self.keys[:, :, dst] = self.keys[:, :, src]
            self.values[:, :, dst] = self.values[:, :, src]
        self.set_length(slot, start + len(kept_positions))

    def _pool_index(self, slot: int, positions: Sequence[int]) -> Tensor:
        index = torch.tensor(positions, device=self.keys.device)
        assert int(max(positions)) < self._capacity[slot], "KV slot overflow"
        table = self._table[slot]
        if table is None:
            return index + self._first_position(slot)
        return table[index]
