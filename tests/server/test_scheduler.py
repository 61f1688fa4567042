"""The batching state machine, driven with fake arrivals and fake results (no model)."""

from __future__ import annotations

import collections

import pytest

from specedge.server.scheduler import (
    Batch,
    PrefillChunk,
    Scheduler,
    SchedulerError,
    SchedulerPolicy,
)


def ready_scheduler(num_sessions: int, **policy: float) -> Scheduler:
    """Sessions s0..s{n-1} with nothing to prefill."""
    scheduler = Scheduler(SchedulerPolicy(**policy))  # type: ignore[arg-type]
    for i in range(num_sessions):
        scheduler.add_session(f"s{i}", prefill_tokens=0)
    return scheduler


def test_single_request_round_trip() -> None:
    scheduler = ready_scheduler(1)
    assert not scheduler.has_work()
    scheduler.add_request("s0", num_tokens=33, now=0.0)
    assert scheduler.has_work()
    batch = scheduler.next_batch(now=0.0)
    assert batch == Batch(("s0",), None)
    assert not scheduler.has_work()
    scheduler.complete(batch, now=0.1)
    assert not scheduler.has_work() and scheduler.num_queued == 0


def test_batch_takes_every_ready_request_in_arrival_order_up_to_max_batch() -> None:
    scheduler = ready_scheduler(5, max_batch=3)
    for i, session_id in enumerate(["s3", "s0", "s4", "s1", "s2"]):
        scheduler.add_request(session_id, num_tokens=9, now=float(i))
    first = scheduler.next_batch(now=5.0)
    assert first.session_ids == ("s3", "s0", "s4")
    second = scheduler.next_batch(now=5.0)
    assert second.session_ids == ("s1", "s2")
    assert scheduler.next_batch(now=5.0).is_empty


def test_token_budget_is_strict_fifo_and_always_takes_one() -> None:
    scheduler = ready_scheduler(4, max_batch=8, max_batch_tokens=40)
    scheduler.add_request("s0", num_tokens=50, now=0.0)  # alone over budget: still served
    scheduler.add_request("s1", num_tokens=20, now=1.0)
    scheduler.add_request("s2", num_tokens=30, now=2.0)
    scheduler.add_request("s3", num_tokens=5, now=3.0)
    assert scheduler.next_batch(now=4.0).session_ids == ("s0",)
    # s2 does not fit after s1; s3 would, but it must not overtake s2.
    assert scheduler.next_batch(now=4.0).session_ids == ("s1",)
    assert scheduler.next_batch(now=4.0).session_ids == ("s2", "s3")


def test_fairness_every_session_served_equally_under_overload() -> None:
    """Five edges that re-submit as soon as they are answered, two batch slots: service
    rotates, nobody waits more than ceil(5 / 2) batches, everyone gets the same share."""
    scheduler = ready_scheduler(5, max_batch=2)
    now = 0.0
    for i in range(5):
        scheduler.add_request(f"s{i}", num_tokens=17, now=now)
    served: collections.Counter[str] = collections.Counter()
    last_served = {f"s{i}": 0 for i in range(5)}
    for iteration in range(1, 101):
        now += 0.01
        batch = scheduler.next_batch(now)
        assert len(batch.session_ids) == 2
        scheduler.complete(batch, now)
        for session_id in batch.session_ids:
            assert iteration - last_served[session_id] <= 3
            last_served[session_id] = iteration
            served[session_id] += 1
            scheduler.add_request(session_id, num_tokens=17, now=now)
    assert set(served.values()) == {40}


def test_one_request_per_session_at_a_time() -> None:
    scheduler = ready_scheduler(1)
    scheduler.add_request("s0", num_tokens=3, now=0.0)
    with pytest.raises(SchedulerError):
        scheduler.add_request("s0", num_tokens=3, now=0.0)  # still queued
    batch = scheduler.next_batch(now=0.0)
    with pytest.raises(SchedulerError):
        scheduler.add_request("s0", num_tokens=3, now=0.0)  # in flight
    scheduler.complete(batch, now=0.1)
    scheduler.add_request("s0", num_tokens=3, now=0.2)
    with pytest.raises(SchedulerError):
        scheduler.add_request("nobody", num_tokens=3, now=0.2)
    with pytest.raises(SchedulerError):
        scheduler.add_session("s0", prefill_tokens=0)


def test_prefill_runs_one_bounded_chunk_per_batch_beside_verification() -> None:
    scheduler = ready_scheduler(2, max_batch=4, prefill_chunk=256)
    scheduler.add_session("new", prefill_tokens=600)
    # The new session's edge sends its first tree before the prefill is done: it waits.
    scheduler.add_request("new", num_tokens=33, now=0.0)
    chunks = []
    for iteration in range(3):
        for session_id in ("s0", "s1"):
            scheduler.add_request(session_id, num_tokens=33, now=float(iteration))
        batch = scheduler.next_batch(now=float(iteration))
        assert batch.session_ids == ("s0", "s1")  # running sessions are never held back
        assert batch.prefill is not None
        chunks.append(batch.prefill)
        scheduler.complete(batch, now=iteration + 0.5)
        done = scheduler.complete_prefill(batch.prefill)
        assert done == (iteration == 2)
    assert chunks == [
        PrefillChunk("new", 0, 256),
        PrefillChunk("new", 256, 256),
        PrefillChunk("new", 512, 88),
    ]
    batch = scheduler.next_batch(now=3.0)
    assert batch == Batch(("new",), None)


def test_prefills_of_several_new_sessions_are_fifo() -> None:
    scheduler = Scheduler(SchedulerPolicy(prefill_chunk=100))
    scheduler.add_session("a", prefill_tokens=150)
    scheduler.add_session("b", prefill_tokens=50)
    order = []
    while scheduler.has_work():
        chunk = scheduler.next_batch(now=0.0).prefill
        assert chunk is not None
        order.append((chunk.session_id, chunk.num_tokens))
        scheduler.complete_prefill(chunk)
    assert order == [("a", 100), ("a", 50), ("b", 50)]


def test_request_of_prefilling_session_is_not_ready_work() -> None:
    scheduler = Scheduler(SchedulerPolicy(prefill_chunk=100))
    scheduler.add_session("a", prefill_tokens=100)
    scheduler.add_request("a", num_tokens=5, now=0.0)
    batch = scheduler.next_batch(now=0.0)
    assert batch.session_ids == () and batch.prefill == PrefillChunk("a", 0, 100)
    assert not scheduler.has_work()  # the chunk is in flight; the tree waits for it
    assert scheduler.complete_prefill(batch.prefill)
    assert scheduler.has_work()
    assert scheduler.next_batch(now=0.1).session_ids == ("a",)


def test_remove_session_drops_queued_request_and_prefill() -> None:
    scheduler = ready_scheduler(2)
    scheduler.add_session("new", prefill_tokens=500)
    scheduler.add_request("s0", num_tokens=4, now=0.0)
    scheduler.add_request("s1", num_tokens=4, now=0.1)
    scheduler.remove_session("s0")
    scheduler.remove_session("new")
    scheduler.remove_session("new")  # idempotent
    assert scheduler.num_sessions == 1
    assert scheduler.next_batch(now=1.0) == Batch(("s1",), None)


def test_session_removed_while_in_flight_is_ignored_on_completion() -> None:
    scheduler = ready_scheduler(2)
    scheduler.add_session("new", prefill_tokens=10)
    scheduler.add_request("s0", num_tokens=4, now=0.0)
    scheduler.add_request("s1", num_tokens=4, now=0.0)
    batch = scheduler.next_batch(now=0.0)
    assert batch.prefill is not None
    scheduler.remove_session("s0")  # e.g. the edge died during the forward
    scheduler.remove_session("new")
    scheduler.complete(batch, now=0.1)
    assert not scheduler.complete_prefill(batch.prefill)
    scheduler.add_request("s1", num_tokens=4, now=0.2)
    assert scheduler.next_batch(now=0.2).session_ids == ("s1",)
    with pytest.raises(SchedulerError):
        scheduler.add_request("s0", num_tokens=4, now=0.2)


def measured(scheduler: Scheduler, session_id: str, turnaround: float) -> None:
    """Give a session one measured turnaround and leave it drafting after a reply at t=0."""
    scheduler.add_request(session_id, num_tokens=4, now=-10.0)
    scheduler.complete(scheduler.next_batch(now=-10.0), now=-10.0 - turnaround)
    scheduler.add_request(session_id, num_tokens=4, now=-10.0)
    scheduler.complete(scheduler.next_batch(now=-10.0), now=0.0)


def test_turnaround_is_measured_from_reply_to_next_request() -> None:
    scheduler = ready_scheduler(1, timing_smoothing=0.5)
    measured(scheduler, "s0", turnaround=0.010)
    assert scheduler.predicted_arrival("s0") == pytest.approx(0.010)
    scheduler.add_request("s0", num_tokens=4, now=0.030)  # this round took 30 ms
    assert scheduler.predicted_arrival("s0") is None  # not drafting now
    scheduler.complete(scheduler.next_batch(now=0.030), now=0.040)
    assert scheduler.predicted_arrival("s0") == pytest.approx(0.040 + 0.020)


def test_batch_delay_waits_for_predicted_arrivals_within_bound() -> None:
    scheduler = ready_scheduler(4, max_batch=4, max_wait=0.002)
    measured(scheduler, "s1", turnaround=0.0095)
    measured(scheduler, "s2", turnaround=0.0100)
    measured(scheduler, "s3", turnaround=0.0500)  # far outside the window: not waited for
    scheduler.add_request("s0", num_tokens=4, now=0.0090)
    assert scheduler.batch_delay(now=0.0090) == pytest.approx(0.0010)  # until s2 is due
    assert scheduler.batch_delay(now=0.0099) == pytest.approx(0.0001)
    scheduler.add_request("s1", num_tokens=4, now=0.0096)
    assert scheduler.batch_delay(now=0.0096) == pytest.approx(0.0004)
    # Past every prediction: overdue edges are not waited for.
    assert scheduler.batch_delay(now=0.0101) == 0.0


def test_batch_delay_is_zero_when_full_empty_or_disabled() -> None:
    scheduler = ready_scheduler(3, max_batch=2, max_wait=0.002)
    measured(scheduler, "s2", turnaround=0.001)
    assert scheduler.batch_delay(now=0.0) == 0.0  # nothing ready: nothing to hold
    scheduler.add_request("s0", num_tokens=4, now=0.0)
    assert scheduler.batch_delay(now=0.0) == pytest.approx(0.001)
    scheduler.add_request("s1", num_tokens=4, now=0.0)
    assert scheduler.batch_delay(now=0.0) == 0.0  # full
    disabled = ready_scheduler(3, max_batch=2, max_wait=0.0)
    measured(disabled, "s2", turnaround=0.001)
    disabled.add_request("s0", num_tokens=4, now=0.0)
    assert disabled.batch_delay(now=0.0) == 0.0


def test_batch_delay_never_exceeds_max_wait() -> None:
    scheduler = ready_scheduler(2, max_batch=2, max_wait=0.003)
    measured(scheduler, "s1", turnaround=0.003)
    scheduler.add_request("s0", num_tokens=4, now=0.0)
    for now in (0.0, 0.001, 0.002, 0.003):
        assert 0.0 <= scheduler.batch_delay(now) <= 0.003
