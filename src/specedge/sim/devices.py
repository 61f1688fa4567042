"""Simulated accelerators: a device runs one job at a time, the most urgent first (first come,
first served within a priority), as the server's model thread and the edge's draft worker do;
a `StepBatcher` batches the draft steps queued by the time its flush starts into one forward,
as `core.draft_batch.StepBatcher` does (a flush is submitted unless one of at least that
priority is already queued; a step whose guard says no by then is skipped).

Waiting jobs sit in a heap (SimPy's own resources cost more per job than a simulation of
10,000 edges can afford). Times come from the profile's fitted surfaces, spread by +-`noise`
(uniform, relative) when asked; the device counts its busy seconds.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import simpy

from specedge.sim.profile import ForwardCost

CRITICAL = 0  # priorities, lower first (edge.worker.Priority's order)
PROACTIVE = 1


class Device:
    def __init__(self, env: simpy.Environment, rng: random.Random, noise: float = 0.0) -> None:
        self.env = env
        self.rng = rng
        self.noise = noise
        self.busy_s = 0.0
        self._running = False
        self._waiting: list[tuple[int, int, simpy.Event]] = []  # (priority, arrival, wake-up)
        self._arrivals = 0

    def spread(self, seconds: float) -> float:
        if not self.noise:
            return seconds
        return seconds * (1.0 + self.rng.uniform(-self.noise, self.noise))

    def run(
        self, seconds: Callable[[], float], priority: int = CRITICAL
    ) -> Generator[Any, Any, float]:
        """Hold the device for `seconds()` (evaluated when the job starts); returns them."""
        if self._running:
            turn = self.env.event()
            self._arrivals += 1
            heapq.heappush(self._waiting, (priority, self._arrivals, turn))
            yield turn  # handed over by the job before, the device still marked running
        self._running = True
        elapsed = self.spread(seconds())
        self.busy_s += elapsed
        if elapsed > 0.0:
            yield self.env.timeout(elapsed)
        if self._waiting:
            heapq.heappop(self._waiting)[2].succeed()
        else:
            self._running = False
        return elapsed


@dataclass(eq=False)  # each step is its own, whatever its numbers
class _QueuedStep:
    rows: float
    context: float
    guard: Callable[[], bool] | None
    done: simpy.Event


class StepBatcher:
    """Draft steps of many sessions on one device (see the module docstring). `on_busy` hears
    of each flush's seconds (the server counts draft time as busy between batches)."""

    def __init__(
        self,
        device: Device,
        cost: ForwardCost,
        on_busy: Callable[[float], None] | None = None,
    ) -> None:
        self.device = device
        self.cost = cost
        self.on_busy = on_busy
        self._pending: list[_QueuedStep] = []
        self._queued: list[int] = []
        self.flushes = 0
        self.steps = 0

    def step(
        self,
        rows: float,
        context: float = 0.0,
        priority: int = CRITICAL,
        guard: Callable[[], bool] | None = None,
    ) -> Generator[Any, Any, bool]:
        """Run one draft step of `rows` rows in the next flush; False when skipped. The step
        that submits a flush runs it (it would wait for it anyway)."""
        done = self.device.env.event()
        self._pending.append(_QueuedStep(rows, context, guard, done))
        if not any(queued <= priority for queued in self._queued):
            self._queued.append(priority)
            yield from self._flush(priority)
        ran: bool = yield done
        return ran

    def _flush(self, priority: int) -> Generator[Any, Any, None]:
        taken: list[_QueuedStep] = []
        live: list[_QueuedStep] = []

        def seconds() -> float:
            self._queued.remove(priority)
            taken.extend(self._pending)
            self._pending.clear()
            live.extend(s for s in taken if s.guard is None or s.guard())
            if not live:
                return 0.0
            rows = sum(s.rows for s in live)
            context = sum(s.context for s in live) / len(live)
            return self.cost(len(live), round(rows), context)

        elapsed = yield from self.device.run(seconds, priority)
        if live:
            self.flushes += 1
            self.steps += len(live)
        if self.on_busy is not None and elapsed:
            self.on_busy(elapsed)
        for step in taken:
            step.done.succeed(step in live)
