"""When the server decodes a session itself (`server.streaming.StreamPolicy`), judged against
what a streamed step would cost (`GoodputBatching.stream_step_seconds`), not the tree batches
the session's speculation makes; the lookup chains its streamed steps verify
(`server.streaming.StreamLookup`)."""

from __future__ import annotations

import pytest

from specedge.core.goodput import FittedBatchCost, LinearBatchCost
from specedge.core.lookup import LookupStats
from specedge.core.tree import DraftTree
from specedge.rpc.codec import TreeVerified, VerifyTree
from specedge.server.batching import GoodputBatching
from specedge.server.scheduler import Scheduler
from specedge.server.streaming import MIN_ROUNDS, StreamLookup, StreamPolicy

# A one-core CPU server's shape: a decoding step of one sequence 16 ms, each row 0.64 ms more.
COST = LinearBatchCost(fixed_s=0.0136, per_sequence_s=0.0018, per_row_s=0.00064)


def batching_after(batches: list[tuple[int, int]]) -> GoodputBatching:
    """Batching whose cost model and recent batch shape come from `batches` (sequences, rows),
    each timed exactly as `COST` says."""
    batching = GoodputBatching(Scheduler(), FittedBatchCost(COST), goodput=True)
    for now, (sequences, rows) in enumerate(batches * 20):
        batching.record(sequences, rows, COST(sequences, rows), [1] * sequences, float(now))
    return batching


def speculate(policy: StreamPolicy, rounds: int, nodes: int, emitted: int, seconds: float) -> None:
    """`rounds` rounds of `nodes`-node trees, all verified, each emitting `emitted` tokens and
    lasting `seconds` (reply to reply)."""
    now = 0.0
    policy.observe(None, TreeVerified(0, [1], 0, None), now)  # the first reply starts the clock
    for number in range(1, rounds + 1):
        now += seconds
        tree = VerifyTree(number, [5] * nodes, list(range(-1, nodes - 1)))
        reply = TreeVerified(number, [5] * emitted, emitted - 1, None, num_verified=nodes)
        policy.observe(tree, reply, now)


def test_a_streamed_step_is_the_recent_batch_less_the_sessions_tree() -> None:
    alone = batching_after([(1, 10)])  # one session verifying 9-node trees
    assert alone.stream_step_seconds(10.0) == pytest.approx(COST(1, 1))
    shared = batching_after([(4, 20)])  # four sessions, 5 rows each
    assert shared.stream_step_seconds(5.0) == pytest.approx(COST(4, 16))
    streaming = batching_after([(4, 4)])  # everyone decoding already
    assert streaming.stream_step_seconds(1.0) == pytest.approx(COST(4, 4))


def test_trees_slower_than_decoding_stream_though_faster_than_their_own_batches() -> None:
    """3 tokens per 60 ms round is 20 ms a token against 16 ms decoded on the server; but the
    9-node tree batch itself takes 22 ms, and against it (the old rule) the trees looked worth
    their round trip."""
    batching = batching_after([(1, 10)])
    policy = StreamPolicy()
    speculate(policy, MIN_ROUNDS, nodes=9, emitted=3, seconds=0.060)
    step = batching.stream_step_seconds(policy.rows_per_round)
    assert policy.rows_per_round == pytest.approx(10.0)
    assert not policy.should_stream(COST(1, 10))  # what comparing with the tree batch said
    assert policy.should_stream(step)
    assert policy.resume_threshold(step) == pytest.approx(0.060 / COST(1, 1))


def test_trees_that_beat_decoding_keep_speculating() -> None:
    batching = batching_after([(1, 10)])
    policy = StreamPolicy()
    speculate(policy, 3 * MIN_ROUNDS, nodes=9, emitted=4, seconds=0.040)  # 10 ms a token
    assert not policy.should_stream(batching.stream_step_seconds(policy.rows_per_round))


def test_the_rate_rule_waits_for_min_rounds() -> None:
    batching = batching_after([(1, 10)])
    policy = StreamPolicy()
    speculate(policy, MIN_ROUNDS - 1, nodes=9, emitted=1, seconds=0.060)
    step = batching.stream_step_seconds(policy.rows_per_round)
    assert not policy.should_stream(step)
    speculate_more = TreeVerified(MIN_ROUNDS, [5], 0, None, num_verified=9)
    policy.observe(VerifyTree(MIN_ROUNDS, [5] * 9, list(range(-1, 8))), speculate_more, 9.0)
    assert policy.should_stream(step)


def test_the_lookup_chain_of_a_streamed_step_and_its_record() -> None:
    lookup = StreamLookup(length=8, max_depth=6)
    context = [1, 2, 3, 4, 9, 1, 2]
    tree, estimates = lookup.tree(context, room=16)
    assert tree.tokens == (3, 4, 9, 1, 2) and tree.parents == (-1, 0, 1, 2, 3)
    # The prior of one hit in two tries, a power per step: non-increasing, best-first.
    assert estimates == pytest.approx([0.5**k for k in range(1, 6)])
    lookup.record([3, 4, 7])  # two chain tokens right, then the target's own
    assert lookup.tokens_per_step > 1.0
    _, better = lookup.tree(context, room=3)
    assert len(better) == 3 and better[0] > 0.5
    lookup.record([8])  # the next step missed at once
    assert lookup.tree([*context, 8, 5], room=16) == (DraftTree(), ())  # 5 never came before
    assert StreamLookup(8, 6).tree(context, room=0)[0].num_nodes == 0


def test_a_new_sessions_lookup_estimates_start_from_the_pooled_record() -> None:
    """Sessions whose chains keep missing teach the pooled record: a new session's chain is
    then estimated far below the flat prior of 1/2; where chains come true, far above it; the
    session's own record then moves its estimate."""
    context = [1, 2, 3, 4, 9, 1, 2]
    estimates = {}
    for label, hits in (("missing", False), ("copying", True)):
        pooled = LookupStats()
        for _ in range(30):  # sessions of one step each, all on the same chain
            lookup = StreamLookup(8, 6, pooled)
            tree, _ = lookup.tree(context, room=16)
            lookup.record([*tree.tokens[:3], 5] if hits else [7])
        fresh = StreamLookup(8, 6, pooled)
        estimates[label] = fresh.tree(context, room=16)[1]
        if not hits:
            fresh.record(list(fresh._chain[0][:3]) + [5])  # this session's chain comes true
            assert fresh.tree(context, room=16)[1][0] > estimates[label][0]
    assert estimates["missing"][0] < 0.1
    assert estimates["copying"][0] > 0.7  # three right of every four tried
    assert StreamLookup(8, 6, LookupStats()).tree(context, room=16)[1][0] == pytest.approx(0.5)


def test_the_lookup_chain_stops_at_the_depth_cap() -> None:
    lookup = StreamLookup(length=8, max_depth=2)
    tree, estimates = lookup.tree([1, 2, 3, 4, 5, 1], room=16)
    assert tree.tokens == (2, 3) and len(estimates) == 2
