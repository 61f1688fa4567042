"""Draft steps of many sessions in one forward (DESIGN.md section 12, "edges draft what will be
verified"): an edge serving several requests, or a server drafting for its own API sessions,
batches the draft steps that are ready at the same moment.

A small draft's forward costs about the same for one row as for eight (reading the weights
dominates), so drafting eight sessions one step at a time costs eight forwards where one would
do. `StepBatcher.step(builder)` queues a builder's next step and, unless a flush of at least
that priority is already queued, submits one *flush* job to the model thread; the flush takes
every step queued by then, plans each (`TreeBuilder.plan_step`), runs all their rows in one
`ModelRunner.forward`, and finishes each (`TreeBuilder.finish_step`). A step whose `guard`
says no by then (a proactive step whose verdict has landed) is skipped and returns False.

The flush runs where the caller's model jobs run (the edge's worker thread, the server's model
thread) at the priority of its most urgent step: a critical step never waits behind proactive
work, and proactive steps ride along a critical flush for free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specedge.core.draft import StepPlan, TreeBuilder
from specedge.core.model_runner import ModelRunner

Submit = Callable[[Callable[[], None], int], concurrent.futures.Future[None]]  # (job, priority)


@dataclass
class _QueuedStep:
    builder: TreeBuilder
    guard: Callable[[], bool] | None
    priority: int
    future: asyncio.Future[bool]
    loop: asyncio.AbstractEventLoop


class StepBatcher:
    """Batches the draft steps of builders sharing `runner` (see the module docstring).
    `submit(job, priority)` queues a job on the model thread (lower priority runs first)."""

    def __init__(self, runner: ModelRunner, submit: Submit) -> None:
        self.runner = runner
        self._submit = submit
        self._lock = threading.Lock()
        self._pending: list[_QueuedStep] = []
        self._queued: list[int] = []  # priorities of flushes queued and not started
        self.flushes = 0
        self.steps = 0  # steps forwarded (flushes < steps: batching happened)

    async def step(
        self, builder: TreeBuilder, priority: int = 0, guard: Callable[[], bool] | None = None
    ) -> bool:
        """Run `builder`'s next draft step in the next flush; what `TreeBuilder.step` returns
        (False too when `guard()` is false when the flush starts)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        with self._lock:
            self._pending.append(_QueuedStep(builder, guard, priority, future, loop))
            submit = not any(queued <= priority for queued in self._queued)
            if submit:
                self._queued.append(priority)
        if submit:
            self._submit(lambda: self._flush(priority), priority)
        return await future

    def _flush(self, priority: int) -> None:
        with self._lock:
            self._queued.remove(priority)
            steps, self._pending = self._pending, []
        if not steps:
            return
        results: list[bool | BaseException] = [False] * len(steps)
        planned: list[tuple[int, StepPlan]] = []
        for index, queued in enumerate(steps):
            try:
                if queued.future.cancelled() or (queued.guard is not None and not queued.guard()):
                    continue
                plan = queued.builder.plan_step()
                if plan is not None:
                    planned.append((index, plan))
            except Exception as error:  # one session's failure is its own
                results[index] = error
        forwarded = [(index, plan) for index, plan in planned if plan.row is not None]
        try:
            hidden: list[torch.Tensor] = []
            if forwarded:
                hidden = self.runner.forward([plan.row for _, plan in forwarded if plan.row])
                self.flushes += 1
                self.steps += len(forwarded)
            states = {index: h for (index, _), h in zip(forwarded, hidden, strict=True)}
            for index, plan in planned:
                try:
                    results[index] = steps[index].builder.finish_step(plan, states.get(index))
                except Exception as error:
                    results[index] = error
        except Exception as error:  # the forward itself failed: every planned step fails
            for index, _ in planned:
                results[index] = error
        for queued, result in zip(steps, results, strict=True):
            queued.loop.call_soon_threadsafe(_resolve, queued.future, result)


def _resolve(future: asyncio.Future[bool], result: bool | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
