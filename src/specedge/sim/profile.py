"""A device profile: what the simulator needs to know about the machines it simulates, measured
by `specedge profile` (`specedge.bench.profile`) or estimated from published figures
(`specedge.sim.roofline`).

Terms. A *cost point* (`core.goodput.CostPoint`) is one measured forward: sequences,
rows in all, context tokens per sequence, seconds. The profile holds three sets of them:

- `verify`: batched verification forwards of the target (`TargetEngine.verify`) over the
  grid sequences x tree size x context; rows = sequences + tree nodes (each root verifies too);
- `draft_step`: batched draft steps (`TreeBuilder` rows of several sessions in one
  `ModelRunner.forward`), by sessions and rows; `draft_rows_per_step[j]` is the mean rows one
  tree's step j forwards (the root step forwards 1), and `draft_rows_by_budget[b][j]` the same
  for a tree sized to `b` nodes (a sized tree stops when its best `b` nodes are all expanded,
  so a small tree takes fewer and narrower steps than the full shape);
- `prefill` / `draft_prefill`: prompt chunks of the target / the draft, by tokens.

Each set is summarised by a least-squares `SurfaceCost`: fixed + per sequence + per row + per
row x context token, the terms clipped at zero; the simulator reads times from it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from specedge.core.goodput import CostPoint, LinearBatchCost
from specedge.errors import SpecEdgeError

PROFILE_VERSION = 1


class ProfileError(SpecEdgeError):
    """A profile file that cannot be used (missing, not a profile, an unknown version)."""


class ForwardCost(Protocol):
    """Seconds of a forward of `sequences` sequences, `rows` rows in all, after `context`
    tokens each."""

    def __call__(self, sequences: int, rows: int, context: float = 0.0) -> float: ...

    def linear(self, context: float) -> LinearBatchCost:
        """The (sequences, rows) cost model at a fixed context."""
        ...


@dataclass(frozen=True)
class SurfaceCost:
    """Seconds of a forward: fixed + per sequence + per row + per (row x context token)."""

    fixed_s: float
    per_sequence_s: float
    per_row_s: float
    per_row_context_s: float = 0.0

    def __call__(self, sequences: int, rows: int, context: float = 0.0) -> float:
        return (
            self.fixed_s
            + self.per_sequence_s * sequences
            + self.per_row_s * rows
            + self.per_row_context_s * rows * context
        )

    def linear(self, context: float) -> LinearBatchCost:
        """The (sequences, rows) cost model at a fixed context (what the server profiles)."""
        return LinearBatchCost(
            self.fixed_s, self.per_sequence_s, self.per_row_s + self.per_row_context_s * context
        )

    @classmethod
    def fit(cls, points: Sequence[CostPoint]) -> SurfaceCost:
        """Least squares of the relative errors over `points`; a term whose coefficient comes
        out negative is dropped and the rest refitted (times never fall as work grows). Terms
        the points cannot tell apart (one context measured, say) stay at zero."""
        if not points:
            raise ProfileError("no cost points to fit")
        raw = [
            [1.0] * len(points),
            [float(p.sequences) for p in points],
            [float(p.rows) for p in points],
            [float(p.rows * p.context) for p in points],
        ]
        # A term the points do not vary independently stays out: one context measured says
        # nothing of the context term, one batch size nothing of the per-sequence one.
        varied = [
            True,
            len({p.sequences for p in points}) > 1,
            len(set(raw[2])) > 1,
            len({p.context for p in points}) > 1 and len(set(raw[3])) > 1,
        ]
        active = [i for i in range(4) if varied[i]]
        # Relative errors: each point weighted by 1 / its time, so that a one-token step is
        # fitted as closely as a batch a hundred times longer.
        weights = [1.0 / max(p.seconds, 1e-9) for p in points]
        columns = [[x * w for x, w in zip(column, weights, strict=True)] for column in raw]
        target = [p.seconds * w for p, w in zip(points, weights, strict=True)]
        while True:
            solved = _least_squares([columns[i] for i in active], target)
            negative = [i for i, value in zip(active, solved, strict=True) if value < 0 and i]
            if not negative:
                break
            active.remove(negative[0])
        coefficients = [0.0] * 4
        for i, value in zip(active, solved, strict=True):
            coefficients[i] = max(value, 0.0)
        return cls(*coefficients)


@dataclass(frozen=True)
class DeviceProfile:
    """The measured costs of one device (see the module docstring)."""

    device: str  # what was measured: "Intel Xeon, 1 thread", "NVIDIA H100", ...
    target: str
    draft: str
    dtype: str
    verify: tuple[CostPoint, ...]
    draft_step: tuple[CostPoint, ...]
    prefill: tuple[CostPoint, ...]
    draft_prefill: tuple[CostPoint, ...]
    draft_rows_per_step: tuple[float, ...] = (1.0,)
    draft_rows_by_budget: dict[int, tuple[float, ...]] = field(default_factory=dict)
    estimate: bool = False  # True: computed from published figures, not measured
    notes: tuple[str, ...] = ()
    machine: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    version: int = PROFILE_VERSION

    @cached_property
    def verify_cost(self) -> ForwardCost:
        return self._cost("verify")

    @cached_property
    def draft_step_cost(self) -> ForwardCost:
        return self._cost("draft_step")

    @cached_property
    def prefill_cost(self) -> ForwardCost:
        return self._cost("prefill")

    @cached_property
    def draft_prefill_cost(self) -> ForwardCost:
        return self._cost("draft_prefill")

    def _cost(self, name: str) -> ForwardCost:
        """The fit of the named points, or, for an estimate from published figures, the
        roofline itself (`sim.roofline`)."""
        if "roofline" in self.machine:
            from specedge.sim.roofline import roofline_cost

            return roofline_cost(self.machine, name)
        points: tuple[CostPoint, ...] = getattr(self, name)
        return SurfaceCost.fit(points)

    def rows_of_step(self, step: int) -> float:
        """Rows one tree's draft step `step` (0 = the root step) forwards."""
        rows = self.draft_rows_per_step
        return rows[min(step, len(rows) - 1)]

    def tree_rows(self, size: int, budget: int, depth: int) -> tuple[float, ...]:
        """Rows per draft step of a tree sized to `size` nodes (of a shape with `budget`
        nodes and `depth` steps), one entry per step it runs: from the measured table,
        interpolated step by step between the measured budgets around `size` (steps averaging
        under half a row are steps most trees never run); without a table, `depth` steps of
        the full shape (no more steps than nodes for a tree smaller than the budget, as
        `ModelDrafter.draft` grows it)."""
        if size <= 0:
            return ()
        table = self.draft_rows_by_budget
        if table:
            below = max((b for b in table if b <= size), default=min(table))
            above = min((b for b in table if b >= size), default=max(table))
            low, high = table[below], table[above]
            share = 0.0 if above == below else (size - below) / (above - below)
            steps = max(len(low), len(high))
            rows = (
                (low[j] if j < len(low) else 0.0) * (1.0 - share)
                + (high[j] if j < len(high) else 0.0) * share
                for j in range(steps)
            )
            return tuple(r for r in rows if r >= 0.5)
        steps = min(depth, size) if size < budget else depth
        return tuple(self.rows_of_step(step) for step in range(steps))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> DeviceProfile:
        try:
            data = json.loads(path.read_text())
        except OSError as error:
            raise ProfileError(
                f"cannot read the profile {path}: {error.strerror} (write one with "
                "`specedge profile --out FILE`)"
            ) from None
        except ValueError as error:
            raise ProfileError(f"{path} is not a profile JSON file: {error}") from None
        if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"{path} is not a version {PROFILE_VERSION} profile; write it again with "
                "`specedge profile`"
            )
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceProfile:
        sets = ("verify", "draft_step", "prefill", "draft_prefill")
        values = dict(data)
        for name in sets:
            values[name] = tuple(CostPoint(**point) for point in data[name])
        values["draft_rows_per_step"] = tuple(data.get("draft_rows_per_step", (1.0,)))
        by_budget = data.get("draft_rows_by_budget", {})
        values["draft_rows_by_budget"] = {int(b): tuple(rows) for b, rows in by_budget.items()}
        values["notes"] = tuple(data.get("notes", ()))
        try:
            return cls(**values)
        except TypeError as error:
            raise ProfileError(f"not a profile: {error}") from None


def _least_squares(columns: Sequence[Sequence[float]], target: Sequence[float]) -> list[float]:
    """The coefficients minimising |sum_i c_i columns[i] - target|^2 (normal equations, a
    small ridge for stability)."""
    size = len(columns)
    a = [[sum(x * y for x, y in zip(ci, cj, strict=True)) for cj in columns] for ci in columns]
    b = [sum(x * y for x, y in zip(ci, target, strict=True)) for ci in columns]
    for i in range(size):
        a[i][i] += 1e-12 * max(a[i][i], 1.0)
    return _solve(a, b)


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting."""
    size = len(b)
    m = [row[:] + [rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, size):
            factor = m[r][col] / m[col][col]
            for c in range(col, size + 1):
                m[r][c] -= factor * m[col][c]
    x = [0.0] * size
    for r in reversed(range(size)):
        x[r] = (m[r][size] - sum(m[r][c] * x[c] for c in range(r + 1, size))) / m[r][r]
    return x
