"""The edge's one model thread.

All draft-model work of an edge (prefill chunks, draft steps, KV commits, slot allocation) runs
as *jobs* on one thread shared by every session, one draft step per job, so the asyncio event
loop stays free for network I/O and a session notices its reply between two of its steps. Jobs
run by priority, then in submission order: work on a session's critical path (growing the
tree it is about to send, committing a reply) goes before proactive drafting, which only bets
on the future, and clean-up goes last, after any job a session left queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Priority(enum.IntEnum):
    CRITICAL = 0  # the next tree and the commit of a reply
    PROACTIVE = 1  # betting on the reply while it is in flight
    CLEANUP = 2  # freeing a finished session's slot


class DraftWorker:
    def __init__(self, name: str = "specedge-draft") -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.num_jobs = 0

    def submit(self, job: Callable[[], T], priority: Priority) -> concurrent.futures.Future[T]:
        """Queue `job`; a job cancelled before it starts is skipped."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((priority, next(self._order), (job, future)))
        return future

    async def run(self, job: Callable[[], T], priority: Priority = Priority.CRITICAL) -> T:
        """Run `job` on the model thread and await its result. If the caller is cancelled, a job
        that has not started yet is skipped (one already running finishes on its own)."""
        future = self.submit(job, priority)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def close(self) -> None:
        """Stop the thread after the jobs already queued."""
        self._queue.put((len(Priority), next(self._order), None))
        self._thread.join()

    def _run(self) -> None:
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = job()
            except BaseException as error:  # handed to the awaiting coroutine
                future.set_exception(error)
            else:
                future.set_result(result)
            self.num_jobs += 1
