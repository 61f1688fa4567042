"""Pipeline-aware batching of verification work (DESIGN.md section 6), as a plain state machine.

Terms. A *session* is one generation. It starts *prefilling*: its prompt is written into its KV
slot one bounded *prefill chunk* per executor iteration, so a long prompt never stalls running
sessions for more than one chunk. Then it alternates between *drafting* (the edge grows a tree:
nothing to do here), *pending* (its tree waits in the queue) and *in flight* (in the running
batch); a session has at most one request at a time. A request sent while the session is still
prefilling waits in the queue until the prefill is done.

`next_batch` takes every ready request in arrival order (FIFO, so no session can starve), up to
`max_batch` requests and `max_batch_tokens` verified tokens (root + nodes), plus at most one
prefill chunk of the oldest prefilling session. `complete` records that the batch's replies are
out; `complete_prefill` that its chunk is written.

The *turnaround* of a session is the time from a reply to its next request (edge drafting +
network); the scheduler keeps a moving average of it per session. `batch_delay` says how long
the executor may hold a partial batch because other sessions are predicted to arrive within
`max_wait` seconds; it is bounded, so a late edge never holds the others back for longer.

The scheduler never sleeps, never imports torch and knows nothing about models: the executor
(`verifier.py`) drives it, and tests drive it with fake results.
"""

from __future__ import annotations

from dataclasses import dataclass

from specedge.core.limits import DEFAULT_PREFILL_CHUNK

OVERDUE_GRACE_S = 0.005  # a predicted arrival this late is still expected
IMMINENT_S = 0.0005  # how soon an overdue arrival is expected


class SchedulerError(Exception):
    """A request the state machine cannot accept (an internal invariant of the caller broke)."""


@dataclass(frozen=True)
class SchedulerPolicy:
    max_batch: int = 16  # verification requests per batched forward
    max_batch_tokens: int = 4096  # verified tokens (root + nodes) per batched forward
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens per prefill forward
    max_wait: float = 0.02  # seconds a partial batch may wait for a predicted arrival
    timing_smoothing: float = 0.3  # weight of the newest turnaround in the moving average

    def __post_init__(self) -> None:
        assert self.max_batch >= 1 and self.max_batch_tokens >= 1 and self.prefill_chunk >= 1
        assert self.max_wait >= 0.0 and 0.0 < self.timing_smoothing <= 1.0


@dataclass(frozen=True)
class PrefillChunk:
    session_id: str
    start: int  # prompt tokens already written
    num_tokens: int


@dataclass(frozen=True)
class Batch:
    session_ids: tuple[str, ...]  # verification requests, in arrival order
    prefill: PrefillChunk | None = None

    @property
    def is_empty(self) -> bool:
        return not self.session_ids and self.prefill is None


@dataclass
class _Request:
    num_tokens: int
    arrived_at: float


@dataclass
class _SessionState:
    prefill_total: int
    prefill_done: int = 0
    request: _Request | None = None
    in_flight: bool = False  # its tree is in the running batch
    prefill_in_flight: bool = False  # its prefill chunk is in the running batch
    replied_at: float | None = None
    turnaround: float | None = None  # moving average, seconds

    @property
    def prefilling(self) -> bool:
        return self.prefill_done < self.prefill_total


class Scheduler:
    def __init__(self, policy: SchedulerPolicy | None = None) -> None:
        self.policy = policy or SchedulerPolicy()
        self._sessions: dict[str, _SessionState] = {}
        # Insertion-ordered: pending requests by arrival, prefilling sessions by opening.
        self._queue: dict[str, None] = {}
        self._prefill_queue: dict[str, None] = {}

    # ---- sessions ------------------------------------------------------------------------------
    def add_session(self, session_id: str, prefill_tokens: int) -> None:
        """A new session whose first `prefill_tokens` prompt tokens must be prefilled."""
        if session_id in self._sessions:
            raise SchedulerError(f"session {session_id} already exists")
        self._sessions[session_id] = _SessionState(prefill_total=prefill_tokens)
        if prefill_tokens > 0:
            self._prefill_queue[session_id] = None

    def remove_session(self, session_id: str) -> None:
        """Forget a session (closed, finished or evicted), dropping its queued work. If it is in
        flight, the running batch's `complete` ignores it."""
        self._sessions.pop(session_id, None)
        self._queue.pop(session_id, None)
        self._prefill_queue.pop(session_id, None)

    def add_request(self, session_id: str, num_tokens: int, now: float) -> None:
        """A verification request of `num_tokens` tokens (root + tree nodes) arrives."""
        state = self._sessions.get(session_id)
        if state is None:
            raise SchedulerError(f"unknown session {session_id}")
        if state.request is not None or state.in_flight:
            raise SchedulerError(f"session {session_id} already has a request in progress")
        if state.replied_at is not None:
            sample = now - state.replied_at
            weight = self.policy.timing_smoothing
            previous = sample if state.turnaround is None else state.turnaround
            state.turnaround = weight * sample + (1.0 - weight) * previous
        state.request = _Request(num_tokens, now)
        self._queue[session_id] = None

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    def has_work(self) -> bool:
        """True when `next_batch` would return a non-empty batch."""
        return bool(self._ready_ids(limit=1)) or self._next_prefill_id() is not None

    def predicted_arrival(self, session_id: str) -> float | None:
        """When the session's next request is expected (None while unknown or not drafting)."""
        state = self._sessions.get(session_id)
        if state is None or state.request is not None or state.in_flight:
            return None
        if state.replied_at is None or state.turnaround is None:
            return None
        return state.replied_at + state.turnaround

    def ready_tokens(self) -> list[int]:
        """Verified tokens (root + nodes) of each ready request the next batch would take."""
        return [
            request.num_tokens
            for session_id in self._ready_ids(limit=self.policy.max_batch)
            if (request := self._sessions[session_id].request) is not None
        ]

    def expected_arrivals(
        self, now: float, horizon: float, grace: float = OVERDUE_GRACE_S
    ) -> list[float]:
        """Predicted arrival times within `horizon` seconds, soonest first, as many as the
        next batch has room for. A session overdue by less than `grace` (a server-side
        decoding session whose next step is being submitted) counts as arriving in a moment."""
        room = self.policy.max_batch - len(self._ready_ids(limit=self.policy.max_batch))
        arrivals = sorted(
            max(arrival, now + IMMINENT_S)
            for session_id in self._sessions
            if (arrival := self.predicted_arrival(session_id)) is not None
            and now - grace <= arrival <= now + horizon
        )
        return arrivals[: max(room, 0)]

    def batch_delay(self, now: float) -> float:
        """Seconds to hold the next batch open for predicted arrivals: 0 when the batch is full,
        empty, or nobody is expected within `max_wait`; never more than `max_wait`."""
        policy = self.policy
        num_ready = len(self._ready_ids(limit=policy.max_batch))
        if policy.max_wait <= 0.0 or num_ready == 0 or num_ready >= policy.max_batch:
            return 0.0
        expected = sorted(
            arrival
            for session_id in self._sessions
            if (arrival := self.predicted_arrival(session_id)) is not None
            and now <= arrival <= now + policy.max_wait
        )
        if not expected:
            return 0.0
        # Wait for as many of the expected arrivals as the batch has room for.
        last = expected[: policy.max_batch - num_ready][-1]
        return min(last - now, policy.max_wait)

    # ---- batches -------------------------------------------------------------------------------
    def next_batch(self, now: float) -> Batch:
        """Take the ready requests (FIFO, within the caps) and one prefill chunk; mark them in
        flight. The batch may be empty (check `has_work` first)."""
        session_ids = self._ready_ids(limit=self.policy.max_batch)
        taken: list[str] = []
        num_tokens = 0
        for session_id in session_ids:
            request = self._sessions[session_id].request
            assert request is not None
            # Strict FIFO: stop at the first request that does not fit; always take one.
            if taken and num_tokens + request.num_tokens > self.policy.max_batch_tokens:
                break
            taken.append(session_id)
            num_tokens += request.num_tokens
        for session_id in taken:
            state = self._sessions[session_id]
            state.request = None
            state.in_flight = True
            del self._queue[session_id]
        return Batch(tuple(taken), self._take_prefill_chunk())

    def complete(self, batch: Batch, now: float) -> None:
        """The batch's verification replies went out at `now`: those sessions are drafting."""
        for session_id in batch.session_ids:
            state = self._sessions.get(session_id)
            if state is not None:  # None: removed while in flight
                state.in_flight = False
                state.replied_at = now

    def complete_prefill(self, chunk: PrefillChunk) -> bool:
        """The chunk is written; True when the session's prefill is now done."""
        state = self._sessions.get(chunk.session_id)
        if state is None:
            return False
        assert state.prefill_in_flight and state.prefill_done == chunk.start
        state.prefill_in_flight = False
        state.prefill_done += chunk.num_tokens
        if state.prefilling:
            return False
        del self._prefill_queue[chunk.session_id]
        return True

    # ---- internals -----------------------------------------------------------------------------
    def _ready_ids(self, limit: int) -> list[str]:
        ready = []
        for session_id in self._queue:
            if not self._sessions[session_id].prefilling:
                ready.append(session_id)
                if len(ready) == limit:
                    break
        return ready

    def _next_prefill_id(self) -> str | None:
        for session_id in self._prefill_queue:
            if not self._sessions[session_id].prefill_in_flight:
                return session_id
        return None

    def _take_prefill_chunk(self) -> PrefillChunk | None:
        session_id = self._next_prefill_id()
        if session_id is None:
            return None
        state = self._sessions[session_id]
        size = min(self.policy.prefill_chunk, state.prefill_total - state.prefill_done)
        state.prefill_in_flight = True
        return PrefillChunk(session_id, state.prefill_done, size)
