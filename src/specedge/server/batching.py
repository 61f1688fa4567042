"""The verification executor's batch-level decisions (DESIGN.md sections 6 and 12), apart from
the model and the event loop: how long to hold a partial batch, how much of each tree to
verify, and what each finished batch teaches. `VerificationExecutor` calls these with real
trees and measured times; `specedge simulate` (`specedge.sim`) with simulated ones, so both run
the same policy.

Terms. The *cost model* (`batch_cost`) is a `FittedBatchCost`: the modelled seconds of a
verification forward by (sequences, rows), refitted from every batch. The *idle allowance* is
the server's recent wait per batch for trees while sessions were open (less its prefill and
draft work, smoothed): time that would be spent idle anyway, which the goodput selection counts
as free, so a server waiting for its users verifies larger trees and a saturated one only what
pays. `stream_step_seconds` is what a recent batch would take with one session decoding instead of
verifying its tree (what the stream policy compares a round's duration with).

No torch, no clock: every call gets `now`.
"""

from __future__ import annotations

from collections.abc import Sequence

from specedge.core.goodput import FittedBatchCost, select_prefixes
from specedge.server.scheduler import Scheduler

IDLE_SMOOTHING = 0.2  # weight of the newest gap in the idle allowance (and the recent averages)
MAX_IDLE_ALLOWANCE_S = 0.25  # a long pause (no users) is not spare capacity per batch


class GoodputBatching:
    def __init__(self, scheduler: Scheduler, batch_cost: FittedBatchCost, goodput: bool) -> None:
        """`goodput=False` verifies every tree whole and holds batches by the scheduler's
        plain rule (the fixed-size behaviour, for experiments)."""
        self.scheduler = scheduler
        self.batch_cost = batch_cost
        self.goodput = goodput
        self.idle_allowance = 0.0
        self.last_batch_end: float | None = None  # None: no batch since sessions were open
        self.busy_since_batch = 0.0  # prefill and draft time since the last batch ended
        # Smoothed per verified sequence: tokens emitted and rows verified (the batch wait's
        # guess of what an arriving sequence adds).
        self.recent_tokens_per_round = 1.0
        self.recent_rows_per_round = 1.0
        self.recent_sequences = 1.0  # per verification batch, smoothed
        self.recent_rows = 1.0

    def batch_delay(self, now: float) -> float:
        """How long to hold the ready trees for predicted arrivals. With goodput selection,
        only as long as it pays: waiting w for j more sequences is worth it when
        (tokens now + j more) / (the bigger batch's modelled time + w) beats tokens now / the
        batch's time now; a forward's fixed cost is shared by more sequences. Otherwise the
        scheduler's rule: wait for every arrival predicted within `max_wait`."""
        scheduler = self.scheduler
        if not self.goodput:
            return scheduler.batch_delay(now)
        ready = scheduler.ready_tokens()
        if not ready or len(ready) >= scheduler.policy.max_batch:
            return 0.0
        arrivals = scheduler.expected_arrivals(now, scheduler.policy.max_wait)
        if not arrivals:
            return 0.0
        per_round, rows = self.recent_tokens_per_round, self.recent_rows_per_round
        sequences, total_rows = len(ready), sum(ready)
        best_ratio = sequences * per_round / self.batch_cost(sequences, total_rows)
        best_delay = 0.0
        for more, arrival in enumerate(arrivals, start=1):
            wait = arrival - now
            seconds = self.batch_cost(sequences + more, total_rows + round(more * rows)) + wait
            ratio = (sequences + more) * per_round / seconds
            if ratio > best_ratio:
                best_ratio, best_delay = ratio, wait
        return best_delay

    def stream_step_seconds(self, session_rows: float) -> float:
        """The modelled time of a recent batch with a session of `session_rows` rows per round
        (root + verified nodes, smoothed) decoding one token instead: what a step costs that
        session if the server decodes it itself."""
        sequences = max(1.0, self.recent_sequences)
        rows = max(sequences, self.recent_rows - max(0.0, session_rows - 1.0))
        return self.batch_cost(round(sequences), round(rows))

    def note_idle(self, now: float) -> None:
        """A batch starts: fold the wait since the last one (less prefill and draft time) into
        the idle allowance."""
        if self.last_batch_end is not None:
            gap = max(0.0, now - self.last_batch_end - self.busy_since_batch)
            gap = min(gap, MAX_IDLE_ALLOWANCE_S)
            self.idle_allowance += IDLE_SMOOTHING * (gap - self.idle_allowance)
        self.busy_since_batch = 0.0

    def no_sessions(self) -> None:
        """Every session closed: a pause with no users is not spare capacity."""
        self.last_batch_end = None

    def select(
        self, estimates: Sequence[Sequence[float] | None], num_nodes: Sequence[int]
    ) -> list[int]:
        """How many leading nodes of each tree (`num_nodes[i]` nodes, `estimates[i]` per node
        or None) the batch verifies: the goodput-optimal prefix of each tree with estimates
        (`core.goodput.select_prefixes`, the idle allowance counted as free), every node of
        each other tree."""
        keep = list(num_nodes)
        chosen = [
            i
            for i, values in enumerate(estimates)
            if self.goodput and values is not None and num_nodes[i] > 0
        ]
        if not chosen:
            return keep
        fixed = [i for i in range(len(num_nodes)) if i not in set(chosen)]
        fixed_rows = sum(num_nodes[i] + 1 for i in fixed)
        idle = self.idle_allowance

        def cost(sequences: int, rows: int) -> float:
            return self.batch_cost(sequences + len(fixed), rows + fixed_rows) + idle

        selection = select_prefixes(
            [estimates[i] or () for i in chosen], cost, fixed_tokens=float(len(fixed))
        )
        for i, verified in zip(chosen, selection.verified, strict=True):
            keep[i] = verified
        return keep

    def record(
        self, num_sequences: int, rows: int, elapsed: float, emitted: Sequence[int], now: float
    ) -> None:
        """A batch of `num_sequences` trees and `rows` rows ended at `now` after `elapsed`
        seconds (0: its forward failed); `emitted`: tokens of each round that completed."""
        self.last_batch_end = now
        if elapsed > 0.0:
            self.batch_cost.observe(num_sequences, rows, elapsed)
            self.recent_sequences += IDLE_SMOOTHING * (num_sequences - self.recent_sequences)
            self.recent_rows += IDLE_SMOOTHING * (rows - self.recent_rows)
        if not emitted:
            return
        self.recent_tokens_per_round += IDLE_SMOOTHING * (
            sum(emitted) / len(emitted) - self.recent_tokens_per_round
        )
        self.recent_rows_per_round += IDLE_SMOOTHING * (
            rows / num_sequences - self.recent_rows_per_round
        )
