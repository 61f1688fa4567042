"""The edge's one model thread: jobs run one at a time by priority (critical, proactive,
clean-up) then in submission order; a job whose caller was cancelled before it started is
skipped; a job's exception reaches its caller."""

from __future__ import annotations

import asyncio
import threading

import pytest

from specedge.edge.worker import DraftWorker, Priority


def test_priority_then_submission_order() -> None:
    worker = DraftWorker()
    gate = threading.Event()
    order: list[str] = []
    try:
        blocker = worker.submit(gate.wait, Priority.CRITICAL)  # holds the thread
        jobs = [
            ("cleanup", Priority.CLEANUP),
            ("proactive-1", Priority.PROACTIVE),
            ("critical-1", Priority.CRITICAL),
            ("proactive-2", Priority.PROACTIVE),
            ("critical-2", Priority.CRITICAL),
        ]
        futures = [worker.submit(lambda n=name: order.append(n), p) for name, p in jobs]
        gate.set()
        for future in [blocker, *futures]:
            future.result(timeout=5)
    finally:
        worker.close()
    assert order == ["critical-1", "critical-2", "proactive-1", "proactive-2", "cleanup"]


def test_cancelled_caller_skips_its_queued_job_and_errors_propagate() -> None:
    worker = DraftWorker()
    gate = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        worker.submit(gate.wait, Priority.CRITICAL)
        waiting = asyncio.ensure_future(worker.run(lambda: ran.append("late"), Priority.PROACTIVE))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.set()
        assert await worker.run(lambda: 7) == 7
        with pytest.raises(ZeroDivisionError):
            await worker.run(lambda: 1 // 0)

    try:
        asyncio.run(main())
    finally:
        worker.close()
    assert ran == []
