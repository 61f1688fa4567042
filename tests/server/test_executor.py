"""The executor with a tiny real target but no network: batching, prefill interleaving, slot
lifetimes under close / cancel / finish / shutdown, and failures that stay where they belong
(one sequence's sampling, a forward one sequence breaks) with the health they report."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from specedge.core.goodput import FittedBatchCost, LinearBatchCost
from specedge.core.model_runner import ModelRunner
from specedge.core.sampling import SamplingParams
from specedge.core.target import GenerationLimits, TargetEngine
from specedge.core.tree import DraftTree
from specedge.errors import CapacityError, InvalidRequestError
from specedge.model.loader import LoadedModel
from specedge.server.executor import (
    ServerClosingError,
    SessionStateError,
    VerificationExecutor,
    VerificationFailedError,
)
from specedge.server.health import ModelHealth
from specedge.server.scheduler import SchedulerPolicy
from tests.support.models import tiny_model
from tests.support.reference import reference_tokens

GREEDY = SamplingParams()
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model()


def make_executor(
    target: LoadedModel, num_slots: int = 4, health: ModelHealth | None = None, **policy: Any
) -> VerificationExecutor:
    runner = ModelRunner(target, num_slots=num_slots, max_context=256, max_block=24)
    engine = TargetEngine(runner, GenerationLimits(max_tree_nodes=16, max_tree_depth=6))
    policy_ = SchedulerPolicy(prefill_chunk=16, **policy)
    return VerificationExecutor(engine, policy_, health=health)


def with_executor(
    target: LoadedModel,
    body: Callable[[VerificationExecutor], Awaitable[Any]],
    **kwargs: Any,
) -> Any:
    async def main() -> Any:
        executor = make_executor(target, **kwargs)
        executor.start()
        try:
            return await body(executor)
        finally:
            await executor.stop()

    return asyncio.run(main())


async def settle(executor: VerificationExecutor) -> None:
    while not executor.idle:
        await asyncio.sleep(0.001)


def free_slots(executor: VerificationExecutor) -> int:
    return executor.engine.runner.kv.num_free


async def generate(executor: VerificationExecutor, prompt: list[int], max_tokens: int) -> list[int]:
    session = executor.open_session(prompt, GREEDY, max_tokens)
    tokens: list[int] = []
    while not session.finished:
        tokens += (await executor.verify(session.session_id, DraftTree())).emitted_tokens
    executor.close_session(session.session_id)
    return tokens


def test_ready_requests_share_one_forward(target: LoadedModel) -> None:
    async def body(executor: VerificationExecutor) -> None:
        sessions = [executor.open_session(PROMPT[i:], GREEDY, 8) for i in range(3)]
        await settle(executor)  # let the prefills run
        forwards = executor.engine.runner.num_forwards
        trees = [DraftTree((7, 8), (-1, 0)), DraftTree(), DraftTree((1,), (-1,))]
        results = await asyncio.gather(
            *(executor.verify(s.session_id, tree) for s, tree in zip(sessions, trees, strict=True))
        )
        assert executor.engine.runner.num_forwards == forwards + 1
        assert [len(r.emitted_tokens) >= 1 for r in results] == [True] * 3
        registry = executor.metrics.registry
        assert registry.get_sample_value("specedge_server_verify_batch_size_count") == 1
        assert registry.get_sample_value("specedge_server_verify_batch_size_sum") == 3

    with_executor(target, body)


def test_long_prefill_does_not_stall_a_running_session(target: LoadedModel) -> None:
    """While a 100-token prompt prefills in chunks of 16, a running session gets a reply every
    iteration: the new session advances at most one chunk per reply."""
    long_prompt = [(i * 5 + 2) % 256 for i in range(100)]

    async def body(executor: VerificationExecutor) -> list[int]:
        running = executor.open_session(PROMPT, GREEDY, 64)
        await executor.verify(running.session_id, DraftTree())
        newcomer = executor.open_session(long_prompt, GREEDY, 4)
        progress = [newcomer.seq.prefilled]
        while newcomer.seq.needs_prefill:
            await executor.verify(running.session_id, DraftTree())
            progress.append(newcomer.seq.prefilled)
        return progress

    progress = with_executor(target, body)
    steps = [b - a for a, b in zip(progress, progress[1:], strict=False)]
    # The reply is sent before the iteration's prefill chunk runs on the model thread, so one
    # read may land before or after that chunk: allow two chunks between consecutive reads.
    # The property itself is the count: the running session kept getting replies throughout.
    assert max(steps) <= 2 * 16 and len(progress) >= 99 // 16


def test_executor_output_matches_local_target(target: LoadedModel) -> None:
    expected = [reference_tokens(target, PROMPT[i:], 10) for i in range(3)]

    async def body(executor: VerificationExecutor) -> list[list[int]]:
        return list(await asyncio.gather(*(generate(executor, PROMPT[i:], 10) for i in range(3))))

    assert with_executor(target, body) == expected


def test_finished_session_frees_its_slot_at_once(target: LoadedModel) -> None:
    async def body(executor: VerificationExecutor) -> None:
        session = executor.open_session(PROMPT, GREEDY, 1)
        assert free_slots(executor) == 3
        result = await executor.verify(session.session_id, DraftTree())
        assert result.finish_reason == "length" and session.finished
        assert free_slots(executor) == 4  # before the producer closes it
        with pytest.raises(SessionStateError, match="finished"):
            await executor.verify(session.session_id, DraftTree())
        executor.close_session(session.session_id)
        executor.close_session(session.session_id)  # idempotent, no double free
        assert free_slots(executor) == 4 and executor.num_sessions == 0

    with_executor(target, body)


def test_close_during_the_forward_frees_after_the_batch(target: LoadedModel) -> None:
    async def body(executor: VerificationExecutor) -> None:
        session = executor.open_session(PROMPT, GREEDY, 8)
        await executor.verify(session.session_id, DraftTree())
        pending = asyncio.ensure_future(executor.verify(session.session_id, DraftTree((1,), (-1,))))
        while session.session_id not in executor._in_flight:
            await asyncio.sleep(0)
        executor.close_session(session.session_id)
        assert free_slots(executor) == 3  # still in the running forward
        with pytest.raises(SessionStateError, match="closed"):
            await pending
        await settle(executor)
        assert free_slots(executor) == 4

    with_executor(target, body)


def test_cancelled_verify_closes_the_session(target: LoadedModel) -> None:
    async def body(executor: VerificationExecutor) -> None:
        session = executor.open_session(PROMPT, GREEDY, 8)
        pending = asyncio.ensure_future(executor.verify(session.session_id, DraftTree()))
        await asyncio.sleep(0)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert executor.session(session.session_id) is None
        await settle(executor)
        assert free_slots(executor) == 4

    with_executor(target, body)


def test_bad_tree_and_full_server_raise_before_any_work(target: LoadedModel) -> None:
    async def body(executor: VerificationExecutor) -> None:
        first = executor.open_session(PROMPT, GREEDY, 8)
        executor.open_session(PROMPT, GREEDY, 8)
        with pytest.raises(CapacityError):
            executor.open_session(PROMPT, GREEDY, 8)
        with pytest.raises(InvalidRequestError, match="stop token"):
            executor.open_session(PROMPT, GREEDY, 8, stop_token_ids=[999])
        forwards = executor.engine.runner.num_forwards
        with pytest.raises(InvalidRequestError, match="parent"):
            await executor.verify(first.session_id, DraftTree((1, 2), (1, -1)))
        with pytest.raises(SessionStateError, match="closed"):
            await executor.verify("no-such-session", DraftTree())
        assert executor.engine.runner.num_forwards == forwards

    with_executor(target, body, num_slots=2)


def test_stop_fails_pending_work_and_frees_everything(target: LoadedModel) -> None:
    async def main() -> None:
        executor = make_executor(target)
        executor.start()
        session = executor.open_session(PROMPT, GREEDY, 8)
        pending = asyncio.ensure_future(executor.verify(session.session_id, DraftTree()))
        await asyncio.sleep(0)
        await executor.stop()
        with pytest.raises(ServerClosingError):
            await pending
        with pytest.raises(ServerClosingError):
            executor.open_session(PROMPT, GREEDY, 8)
        assert free_slots(executor) == 4

    asyncio.run(main())


def test_a_broken_model_fails_its_sessions_and_reports_it(target: LoadedModel) -> None:
    """An exception in every forward (e.g. out of memory) closes the sessions with a typed
    error and, after `max_failures` of them, makes the executor report a problem; the first
    forward that works again clears it, and new sessions are served correctly."""

    async def body(executor: VerificationExecutor) -> None:
        sessions = [executor.open_session(PROMPT[i:], GREEDY, 8) for i in range(2)]
        await settle(executor)
        real_forward = executor.engine.runner.forward

        def broken(rows: Any) -> Any:
            raise RuntimeError("CUDA out of memory (simulated)")

        executor.engine.runner.forward = broken  # type: ignore[method-assign]
        for session in sessions:  # one failed forward each: a batch of one is not retried
            with pytest.raises(VerificationFailedError, match="out of memory"):
                await executor.verify(session.session_id, DraftTree())
            assert executor.session(session.session_id) is None
        assert free_slots(executor) == 4
        assert executor.problem() == (
            "2 model forwards failed in a row (latest: RuntimeError: CUDA out of memory "
            "(simulated))"
        )
        executor.engine.runner.forward = real_forward  # type: ignore[method-assign]
        assert await generate(executor, PROMPT, 5) == reference_tokens(target, PROMPT, 5)
        assert executor.problem() is None

    with_executor(target, body, health=ModelHealth(max_failures=2))


def test_a_sampling_failure_fails_only_its_session(
    target: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three sessions share every forward; one's sampling raises in its second round. It
    alone is closed (its slot freed); the other two finish with the target's tokens, and a
    bad sequence is no model failure: no problem is reported."""
    import specedge.core.target as target_module

    poisoned = SamplingParams(temperature=0.9, seed=666)
    real_sample = target_module.sample_at
    rounds = {"poisoned": 0}

    def sample(logits, params, stream, positions):  # type: ignore[no-untyped-def]
        if params.seed == poisoned.seed:
            rounds["poisoned"] += 1
            if rounds["poisoned"] == 2:
                raise RuntimeError("probability tensor contains inf or nan (simulated)")
        return real_sample(logits, params, stream, positions)

    monkeypatch.setattr(target_module, "sample_at", sample)
    prompts = [PROMPT, PROMPT[2:]]
    expected = [reference_tokens(target, prompt, 10) for prompt in prompts]

    async def poisoned_session(executor: VerificationExecutor) -> str:
        session = executor.open_session(PROMPT[4:], poisoned, 10)
        with pytest.raises(VerificationFailedError, match="simulated") as failure:
            while True:
                await executor.verify(session.session_id, DraftTree((5, 6), (-1, 0)))
        return str(failure.value)

    async def body(executor: VerificationExecutor) -> tuple[list[list[int]], str]:
        *good, message = await asyncio.gather(
            *(generate(executor, prompt, 10) for prompt in prompts), poisoned_session(executor)
        )
        assert executor.problem() is None and free_slots(executor) == 4
        batch_sizes = executor.metrics.registry.get_sample_value(
            "specedge_server_verify_batch_size_sum"
        )
        batches = executor.metrics.registry.get_sample_value(
            "specedge_server_verify_batch_size_count"
        )
        assert batch_sizes is not None and batches is not None and batch_sizes > batches
        return good, message

    good, message = with_executor(target, body)
    assert good == expected
    assert "the session is closed" in message


def test_a_forward_that_one_sequence_breaks_fails_it_alone(target: LoadedModel) -> None:
    """The batched forward raises whenever one session's row is in it; the batch is retried
    one sequence at a time, so only that session fails and the others' outputs are exact."""
    prompts = [PROMPT, PROMPT[2:], PROMPT[1:]]
    expected = [reference_tokens(target, prompt, 10) for prompt in prompts[:2]]

    async def body(executor: VerificationExecutor) -> list[list[int]]:
        bad = executor.open_session(prompts[2], GREEDY, 10)
        real_forward = executor.engine.runner.forward

        def forward(rows: Any) -> Any:
            if any(row.slot == bad.seq.slot and len(row.parents) > 1 for row in rows):
                raise IndexError("index out of range in self (simulated)")
            return real_forward(rows)

        executor.engine.runner.forward = forward  # type: ignore[method-assign]

        async def broken_session() -> None:
            with pytest.raises(VerificationFailedError, match="simulated"):
                while True:
                    await executor.verify(bad.session_id, DraftTree((1, 2), (-1, 0)))

        *good, _ = await asyncio.gather(
            *(generate(executor, prompt, 10) for prompt in prompts[:2]), broken_session()
        )
        assert free_slots(executor) == 4
        return good

    assert with_executor(target, body) == expected


def test_a_stuck_model_thread_is_reported_until_it_ends(target: LoadedModel) -> None:
    """A forward that hangs (a stuck device) makes the executor report the stuck thread once
    it has run past the health's floor (100 x its modelled 1 ms is less); when it ends, the
    report clears."""
    import threading

    release = threading.Event()

    async def body(executor: VerificationExecutor) -> None:
        executor.batch_cost = FittedBatchCost(LinearBatchCost(0.001, 0.0, 0.0))
        session = executor.open_session(PROMPT, GREEDY, 8)
        await settle(executor)
        real_forward = executor.engine.runner.forward

        def hang(rows: Any) -> Any:
            release.wait(10)
            return real_forward(rows)

        executor.engine.runner.forward = hang  # type: ignore[method-assign]
        pending = asyncio.ensure_future(executor.verify(session.session_id, DraftTree()))
        await asyncio.sleep(0.05)
        assert executor.problem() is None  # running, but not for long yet
        await asyncio.sleep(0.3)
        assert (executor.problem() or "").startswith("the model thread is stuck")
        release.set()
        await pending
        assert executor.problem() is None

    with_executor(target, body, health=ModelHealth(stuck_after=0.2))


# ---- goodput selection (DESIGN.md section 12) ----------------------------------------------
class RecordingCost(FittedBatchCost):
    """A pinned cost model (seconds = fixed + per_row x rows) that records what the executor
    observed: (sequences, rows) of every batch."""

    def __init__(self, fixed_s: float, per_row_s: float) -> None:
        super().__init__(LinearBatchCost(fixed_s, 0.0, per_row_s))
        self.seen: list[tuple[int, int]] = []

    def observe(self, sequences: int, rows: int, seconds: float) -> None:
        self.seen.append((sequences, rows))

    def __call__(self, sequences: int, rows: int) -> float:
        return self.prior(sequences, rows)


def oracle(tokens: list[int], size: int) -> tuple[DraftTree, tuple[float, ...]]:
    """A chain of the target's next `size` tokens, with estimates that promise it."""
    size = min(size, len(tokens))
    return DraftTree(tuple(tokens[:size]), tuple(range(-1, size - 1))), (0.9,) * size


def test_a_tree_cut_to_nothing_is_a_plain_decoding_step(target: LoadedModel) -> None:
    expected = reference_tokens(target, PROMPT, 12)

    async def body(executor: VerificationExecutor) -> list[tuple[int, list[int]]]:
        executor.batch_cost = cost = RecordingCost(fixed_s=0.001, per_row_s=1.0)  # dear rows
        session = executor.open_session(PROMPT, GREEDY, 12)
        outcomes = []
        while not session.finished:
            done = len(session.seq.committed) - len(PROMPT)
            tree, estimates = oracle(expected[done:], 4)
            result = await executor.verify(session.session_id, tree, estimates)
            outcomes.append((result.num_verified or 0, result.emitted_tokens))
        assert cost.seen == [(1, 1)] * len(outcomes)  # one row per round: the decoding step
        return outcomes

    outcomes = with_executor(target, body)
    assert [verified for verified, _ in outcomes] == [0] * 12
    assert [t for _, emitted in outcomes for t in emitted] == expected


def test_cheap_rows_verify_the_tree_and_mixed_batches_select_per_tree(
    target: LoadedModel,
) -> None:
    expected = reference_tokens(target, PROMPT, 12)

    async def body(executor: VerificationExecutor) -> None:
        executor.batch_cost = RecordingCost(fixed_s=0.05, per_row_s=0.001)
        good, bad = (executor.open_session(PROMPT, GREEDY, 12) for _ in range(2))
        await settle(executor)
        tree, estimates = oracle(expected, 4)
        dud = (0.001,) * 4  # the same tree, with estimates that say it will fail
        results = await asyncio.gather(
            executor.verify(good.session_id, tree, estimates),
            executor.verify(bad.session_id, tree, dud),
        )
        assert [r.num_verified for r in results] == [4, 0]
        assert results[0].emitted_tokens == expected[:5]
        assert results[1].emitted_tokens == expected[:1]
        # Without estimates (a version 1 edge) the whole tree is verified.
        whole = await executor.verify(bad.session_id, DraftTree((expected[1],), (-1,)))
        assert whole.num_verified == 1 and whole.emitted_tokens == expected[1:3]

    with_executor(target, body)


def test_estimates_must_match_the_tree(target: LoadedModel) -> None:
    async def body(executor: VerificationExecutor) -> None:
        session = executor.open_session(PROMPT, GREEDY, 4)
        tree = DraftTree((5, 6), (-1, 0))
        for estimates in [(0.5,), (0.2, 0.5), (1.5, 0.1)]:
            with pytest.raises(InvalidRequestError, match="estimates"):
                await executor.verify(session.session_id, tree, estimates)

    with_executor(target, body)
