"""Whether the server can verify: the model thread's health, as `/health` and the standard gRPC
health service report it.

The server is *degraded* (HTTP `/health` 503, gRPC health NOT_SERVING) while

- the model keeps failing: `max_failures` target forwards (verification batches or prefill
  chunks) raised since the last verification batch that succeeded; the next one that succeeds
  clears it (a working prefill alone does not: verification is what sessions wait for);
- the model thread is stuck: the job running there has run longer than `stuck_after` seconds,
  or `STUCK_FACTOR` times its modelled cost when that is longer (a hung device, a deadlock):
  it clears when the job ends.

A bad request never degrades the server: one sequence's sampling failure is that session's
(`core.target.SequenceFailure`), not a failed forward. While degraded the server still takes
sessions (a balancer moves traffic away; a session that succeeds is the recovery).
`ModelHealth` has no torch import and reads the clock it is given.

How busy a serving server is, the Load call's answer, is a separate question: its *busy
fraction* (`BusyWindow`) is the share of the last `BUSY_WINDOW_S` seconds the model thread
ran, read from the same busy-time counter `/metrics` exports.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal, TypeVar

from prometheus_client import Counter

from specedge.rpc.codec import HealthService

T = TypeVar("T")
# What a job on the model thread is: a verification batch (its failure counts, its success
# clears), a prefill chunk (its failure counts), or draft work (watched for being stuck only).
JobKind = Literal["verify", "prefill", "draft"]

STUCK_FACTOR = 100.0  # a job this many times slower than modelled is stuck (beyond the floor)
HEALTH_POLL_S = 0.25  # how often the gRPC health service is brought up to date
BUSY_WINDOW_S = 10.0  # the "recent" of the busy fraction
BUSY_SAMPLE_S = 0.5  # at most one sample of the busy time per this many seconds


class ModelHealth:
    """Failures and the running job of the one model thread. `watch` runs in that thread;
    `problem` may be read from any thread (the metrics endpoint's)."""

    def __init__(
        self,
        max_failures: int = 3,
        stuck_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert max_failures >= 1 and stuck_after > 0
        self.max_failures = max_failures
        self.stuck_after = stuck_after
        self._clock = clock
        self._lock = threading.Lock()
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self._running_since: float | None = None
        self._running_budget = 0.0  # seconds the running job may take before it is stuck

    def watch(self, job: Callable[[], T], modelled_s: float = 0.0, kind: JobKind = "verify") -> T:
        """Run `job` (in the model thread) as the running job, of `kind` (see `JobKind`)."""
        with self._lock:
            self._running_since = self._clock()
            self._running_budget = max(self.stuck_after, STUCK_FACTOR * modelled_s)
        try:
            result = job()
        except Exception as error:
            if kind != "draft":
                self._record(f"{type(error).__name__}: {error}")
            raise
        finally:
            with self._lock:
                self._running_since = None
        if kind == "verify":
            self._record(None)
        return result

    def _record(self, error: str | None) -> None:
        with self._lock:
            if error is None:
                self.consecutive_failures = 0
            else:
                self.consecutive_failures += 1
                self.last_error = error

    def problem(self) -> str | None:
        """Why the server is degraded, or None when it is healthy."""
        with self._lock:
            since, budget = self._running_since, self._running_budget
            failures, error = self.consecutive_failures, self.last_error
        if since is not None and (running := self._clock() - since) > budget:
            return f"the model thread is stuck: one job has run for {running:.1f} s"
        if failures >= self.max_failures:
            return f"{failures} model forwards failed in a row (latest: {error})"
        return None


async def publish_health(service: HealthService, healthy: Callable[[], bool]) -> None:
    """Keep the gRPC health service in step with `healthy()` until cancelled."""
    serving: bool | None = None
    while True:
        now = healthy()
        if now != serving:
            await service.set_serving(now)
            serving = now
        await asyncio.sleep(HEALTH_POLL_S)


class BusyWindow:
    """The model thread's busy fraction over about the last `window_s` seconds, from the
    cumulative busy time `busy_seconds()` (no second account of it is kept): each read
    samples it, and the fraction is the busy time since the oldest sample still in the window
    over the time since that sample (0 on the first read)."""

    def __init__(
        self,
        busy_seconds: Callable[[], float],
        window_s: float = BUSY_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert window_s > 0
        self._busy_seconds = busy_seconds
        self.window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()  # (time, busy seconds), oldest first

    def fraction(self) -> float:
        now, busy = self._clock(), self._busy_seconds()
        samples = self._samples
        if not samples or now - samples[-1][0] >= BUSY_SAMPLE_S:
            samples.append((now, busy))
        # Keep one sample at or before the window's start: the fraction spans the window.
        while len(samples) > 1 and samples[1][0] <= now - self.window_s:
            samples.popleft()
        since, busy_then = samples[0]
        if now <= since:
            return 0.0
        return min(1.0, max(0.0, (busy - busy_then) / (now - since)))


def counter_value(counter: Counter) -> float:
    """The current value of an unlabelled Prometheus counter."""
    (family,) = counter.collect()
    return next(sample.value for sample in family.samples if sample.name.endswith("_total"))
