"""Device profiles with exactly known costs, for the simulator's tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from specedge.core.goodput import CostPoint
from specedge.sim.profile import DeviceProfile


def linear_profile(
    verify: tuple[float, float, float] = (0.030, 0.001, 0.0005),
    draft_step: tuple[float, float, float] = (0.005, 0.0005, 0.0002),
    prefill: tuple[float, float] = (0.010, 0.0002),
    draft_prefill: tuple[float, float] = (0.004, 0.0001),
    rows_per_step: tuple[float, ...] = (1.0, 4.0, 8.0),
) -> DeviceProfile:
    """A profile whose points lie exactly on fixed + per sequence + per row surfaces."""

    def points(cost: tuple[float, float, float], sizes: tuple[int, ...]) -> tuple[CostPoint, ...]:
        fixed, per_sequence, per_row = cost
        return tuple(
            CostPoint(n, n * (k + 1), 128, fixed + per_sequence * n + per_row * n * (k + 1))
            for n in (1, 2, 4, 8)
            for k in sizes
        )

    def chunks(cost: tuple[float, float]) -> tuple[CostPoint, ...]:
        return tuple(CostPoint(1, t, 0, cost[0] + cost[1] * t) for t in (16, 64, 256))

    return DeviceProfile(
        device="test device",
        target="tiny",
        draft="tiny-draft",
        dtype="float32",
        verify=points(verify, (0, 8, 32)),
        draft_step=points(draft_step, (0, 3, 7)),
        prefill=chunks(prefill),
        draft_prefill=chunks(draft_prefill),
        draft_rows_per_step=rows_per_step,
    )


def write_records(path: Path, alpha_tokens_per_round: float, count: int = 8, **fields: Any) -> Path:
    """A requests.jsonl of `count` SpecEdge requests of 64 tokens whose speculative rounds
    emitted `alpha_tokens_per_round` tokens each (no streamed or cut rounds)."""
    rounds = round(64 / alpha_tokens_per_round)
    lines = []
    for temperature in (0.0, 0.7):
        for index in range(count):
            record = {
                "system": "specedge",
                "clients": 1,
                "rtt_ms": 15.0,
                "temperature": temperature,
                "prompt_set": "specbench",
                "category": "qa",
                "prompt_id": str(index),
                "prompt_tokens": 50,
                "tokens": 64,
                "rounds": rounds,
                "streamed_rounds": 0,
                "proactive_hits": 0,
                "proactive_attempts": rounds,
                **fields,
            }
            lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path
