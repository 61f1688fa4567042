"""An estimated device profile from published figures, for machines this project has not run
on (the paper's A100 server and RTX 4090 edges): a roofline model, labelled an estimate
wherever it is used.

A forward of n sequences with R rows in all (tokens: roots + tree nodes, or a prompt chunk),
each after c context tokens, takes

    overhead + max(memory, compute)
    memory  = (weight bytes + n x c x KV bytes per token) / (bandwidth x memory efficiency)
    compute = (2 x parameters x R + 4 x layers x heads x head dim x R x c) / (peak x efficiency)

weights read once per forward, each sequence's KV once, the linear layers' and attention's
multiply-adds at a fraction of the tensor cores' peak. The efficiencies and the per-forward
overhead (kernel launches, sampling, the host's share) are assumptions, stated in the
profile's notes; measured profiles (`specedge profile` on the device) replace all of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from specedge.core.goodput import CostPoint, LinearBatchCost
from specedge.sim.profile import DeviceProfile, SurfaceCost

BYTES_BF16 = 2


@dataclass(frozen=True)
class Accelerator:
    name: str
    bandwidth_gb_s: float  # published peak memory bandwidth
    bf16_tflops: float  # published dense BF16 tensor throughput
    memory_efficiency: float = 0.8  # assumed share of peak bandwidth a decode step reaches
    compute_efficiency: float = 0.6  # assumed share of peak tensor throughput
    overhead_s: float = 0.004  # assumed fixed cost per forward (launches, sampling, host)


@dataclass(frozen=True)
class ModelShape:
    name: str
    parameters: float  # all weights (embeddings included: the head reads them)
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * BYTES_BF16


# Published figures (vendor data sheets; model cards on the Hugging Face hub).
A100_40GB = Accelerator("NVIDIA A100 40GB SXM (estimate)", 1555.0, 312.0)
A100_80GB = Accelerator("NVIDIA A100 80GB SXM (estimate)", 2039.0, 312.0)
RTX_4090 = Accelerator("NVIDIA RTX 4090 (estimate)", 1008.0, 165.2)
QWEN3_14B = ModelShape("Qwen/Qwen3-14B", 14.8e9, 40, 40, 8, 128)
QWEN3_1_7B = ModelShape("Qwen/Qwen3-1.7B", 2.03e9, 28, 16, 8, 128)


@dataclass(frozen=True)
class RooflineCost:
    """`SurfaceCost`'s interface on the roofline (see the module docstring)."""

    device: Accelerator
    model: ModelShape

    def __call__(self, sequences: int, rows: int, context: float = 0.0) -> float:
        device, model = self.device, self.model
        weights = model.parameters * BYTES_BF16
        kv = sequences * context * model.kv_bytes_per_token
        memory = (weights + kv) / (device.bandwidth_gb_s * 1e9 * device.memory_efficiency)
        flops = 2 * model.parameters * rows
        flops += 4 * model.layers * model.heads * model.head_dim * rows * context
        compute = flops / (device.bf16_tflops * 1e12 * device.compute_efficiency)
        return device.overhead_s + max(memory, compute)

    def linear(self, context: float) -> LinearBatchCost:
        """The server's start-up cost model: a linear fit over a batch grid at `context`."""
        return SurfaceCost.fit(self.points((context,))).linear(context)

    def points(self, contexts: tuple[float, ...] = (128.0, 1024.0)) -> tuple[CostPoint, ...]:
        return tuple(
            CostPoint(n, n * (k + 1), int(c), self(n, n * (k + 1), c))
            for n in (1, 4, 16, 64)
            for k in (0, 8, 32)
            for c in contexts
        )


def estimate_profile(
    device: Accelerator,
    target: ModelShape,
    draft: ModelShape,
    *,
    rows_per_step: tuple[float, ...],
    rows_by_budget: dict[int, tuple[float, ...]] | None = None,
) -> DeviceProfile:
    """A profile of `device` running `target` (verification, prefill) and `draft` (draft
    steps), from the roofline; `rows_per_step` and `rows_by_budget` (rows per step of sized
    trees) from a measured profile (the tree shape's, not the device's)."""
    verify, drafting = RooflineCost(device, target), RooflineCost(device, draft)
    chunks = tuple(CostPoint(1, t, 0, verify(1, t, 0)) for t in (64, 256, 1024))
    draft_chunks = tuple(CostPoint(1, t, 0, drafting(1, t, 0)) for t in (64, 256, 1024))
    return DeviceProfile(
        device=device.name,
        target=target.name,
        draft=draft.name,
        dtype="bfloat16",
        verify=verify.points(),
        draft_step=drafting.points((128.0,)),
        prefill=chunks,
        draft_prefill=draft_chunks,
        draft_rows_per_step=rows_per_step,
        draft_rows_by_budget=dict(rows_by_budget or {}),
        estimate=True,
        notes=(
            f"an estimate, not a measurement: roofline of {device.name} from published "
            f"figures ({device.bandwidth_gb_s:g} GB/s, {device.bf16_tflops:g} BF16 TFLOPS), "
            f"assuming {device.memory_efficiency:.0%} of peak bandwidth, "
            f"{device.compute_efficiency:.0%} of peak compute and "
            f"{1000 * device.overhead_s:g} ms per forward",
        ),
        machine={"roofline": asdict(device), "target": asdict(target), "draft": asdict(draft)},
    )


def roofline_cost(machine: dict[str, Any], name: str) -> RooflineCost:
    """The roofline an estimate profile's `machine` describes, for its cost set `name`
    (verification and prefill run the target, draft steps and draft prefill the draft)."""
    device = Accelerator(**machine["roofline"])
    model = ModelShape(**machine["draft" if name.startswith("draft") else "target"])
    return RooflineCost(device, model)
