"""The target engine: request validation at `open` and `admit` (every bad input gets its
error; a tree past the context is cut to fit), greedy verification emits exactly the target's
greedy continuation whatever the tree, a batched verify equals verifying each sequence alone,
a sequence whose sampling fails (NaN logits, or a sampler that raises) fails alone while the
rest of its batch completes exactly as without it, and after any accept/reject sequence a
slot's KV equals a fresh prefill of the committed tokens but the root."""

from __future__ import annotations

import random

import pytest
import torch

from specedge.core.model_runner import ModelRunner
from specedge.core.sampling import SamplingParams
from specedge.core.target import (
    GenerationLimits,
    SamplingError,
    SequenceFailure,
    TargetEngine,
    TargetSequence,
    fit_to_context,
)
from specedge.core.tree import ROOT_PARENT, DraftTree
from specedge.core.verify import FINISH_LENGTH
from specedge.errors import InvalidRequestError
from specedge.model.loader import LoadedModel
from tests.support.models import causal_forward, tiny_hf_config, tiny_loaded_model
from tests.support.reference import assert_slot_matches_fresh_prefill
from tests.support.trees import plant_path, random_tree, shuffle_tree

VOCAB = 24  # small, so that random trees often contain the target's sample
GREEDY = SamplingParams()
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
LIMITS = GenerationLimits(max_tree_nodes=12, max_tree_depth=4)


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_loaded_model(tiny_hf_config("llama", vocab_size=VOCAB), seed=11)


def make_engine(target: LoadedModel, num_slots: int = 2, max_context: int = 64) -> TargetEngine:
    runner = ModelRunner(target, num_slots=num_slots, max_context=max_context, max_block=16)
    return TargetEngine(runner, LIMITS)


def greedy_continuation(loaded: LoadedModel, tokens: list[int], length: int) -> list[int]:
    out: list[int] = []
    for _ in range(length):
        logits = causal_forward(loaded.model, torch.tensor([tokens + out]))[0]
        out.append(int(logits[0, -1].argmax()))
    return out


def chain(tokens: list[int]) -> DraftTree:
    return DraftTree(tuple(tokens), tuple(range(ROOT_PARENT, len(tokens) - 1)))


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt", "max_new_tokens", "message"),
    [
        ([], 4, "the prompt is empty"),
        ([1, 2], 0, "max tokens must be >= 1"),
        ([1, VOCAB], 4, f"token id {VOCAB} outside vocab"),
        ([1, -1], 4, "token id -1 outside vocab"),
        ([1] * 64, 4, "the context limit is 64"),
    ],
)
def test_open_rejects_bad_requests(
    target: LoadedModel, prompt: list[int], max_new_tokens: int, message: str
) -> None:
    engine = make_engine(target)
    with pytest.raises(InvalidRequestError, match=message):
        engine.open(prompt, GREEDY, max_new_tokens)
    assert engine.runner.kv.num_free == 2  # a refused request takes no slot


def test_open_caps_new_tokens_to_the_context(target: LoadedModel) -> None:
    seq = make_engine(target).open([1] * 60, GREEDY, max_new_tokens=100)
    assert seq.max_new_tokens == 4


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        (DraftTree(tuple(range(13)), (ROOT_PARENT,) * 13), "13 nodes, the limit is 12"),
        (chain([1, 2, 3, 4, 5]), "depth 5 exceeds the limit 4"),
        (DraftTree((1, VOCAB), (ROOT_PARENT, 0)), f"token id {VOCAB} outside vocab"),
        (DraftTree((1, 2), (ROOT_PARENT, 1)), "parent index 1"),
        (DraftTree((1, 1), (ROOT_PARENT, ROOT_PARENT)), "duplicate sibling token 1"),
    ],
)
def test_admit_rejects_bad_trees(target: LoadedModel, tree: DraftTree, message: str) -> None:
    engine = make_engine(target)
    seq = engine.open(PROMPT, GREEDY, max_new_tokens=8)
    with pytest.raises(InvalidRequestError, match=message):
        engine.admit(seq, tree)


def test_admit_cuts_a_tree_to_the_context_and_refuses_finished_sequences(
    target: LoadedModel,
) -> None:
    engine = make_engine(target, max_context=12)
    seq = engine.open(PROMPT, GREEDY, max_new_tokens=8)  # capped to 4 by the context
    engine.prefill(seq)
    fitting = DraftTree(tuple(range(4)), (ROOT_PARENT,) * 4)
    assert engine.admit(seq, fitting) is fitting
    five = DraftTree(tuple(range(5)), (ROOT_PARENT,) * 5)
    assert engine.admit(seq, five) == fitting  # prompt 8 + 4 nodes = the context
    while seq.finish_reason is None:
        engine.verify([(seq, DraftTree())])
    assert seq.finish_reason == FINISH_LENGTH and seq.num_generated == 4
    with pytest.raises(InvalidRequestError, match="already finished"):
        engine.admit(seq, DraftTree())


# ---- greedy verification -------------------------------------------------------------------------
@pytest.mark.parametrize("num_right", [0, 1, 3])
def test_partially_accepted_tree_emits_the_greedy_continuation(
    target: LoadedModel, num_right: int
) -> None:
    """A chain whose first `num_right` tokens are the target's greedy ones, then a wrong one
    (with wrong siblings along the way): exactly those are accepted, the bonus token is the
    greedy next one, and the slot keeps the prompt + accepted path, as a fresh prefill would."""
    engine = make_engine(target)
    seq = engine.open(PROMPT, GREEDY, max_new_tokens=16)
    engine.prefill(seq)
    greedy = greedy_continuation(target, PROMPT, num_right + 1)
    wrong = (greedy[num_right] + 1) % VOCAB
    path = [*greedy[:num_right], wrong]
    decoy = next(t for t in range(VOCAB) if t not in (greedy[0], path[0]))
    tokens = [*path, decoy]
    parents = [*range(ROOT_PARENT, len(path) - 1), ROOT_PARENT]
    result = engine.verify([(seq, DraftTree(tuple(tokens), tuple(parents)))])[0]
    assert result.num_accepted == num_right
    assert result.emitted_tokens == greedy
    assert seq.committed == PROMPT + greedy
    assert_slot_matches_fresh_prefill(target, engine.runner.kv, seq.slot, seq.committed[:-1])


def test_batched_verify_equals_verifying_each_sequence_alone(target: LoadedModel) -> None:
    rng = random.Random(3)
    prompts = [PROMPT, [7, 7, 2], [11, 5, 9, 13, 2, 1, 0, 4, 4, 8]]
    trees = []
    for prompt in prompts:
        tokens, parents = random_tree(rng, VOCAB, 8, max_depth=4)
        tokens, parents = plant_path(tokens, parents, greedy_continuation(target, prompt, 2))
        trees.append(DraftTree(tuple(tokens), tuple(parents)))
    batched_engine = make_engine(target, num_slots=3)
    batch = [
        (batched_engine.open(p, GREEDY, 16), tree) for p, tree in zip(prompts, trees, strict=True)
    ]
    for seq, _ in batch:
        batched_engine.prefill(seq)
    batched = batched_engine.verify(batch)
    for prompt, tree, together in zip(prompts, trees, batched, strict=True):
        engine = make_engine(target, num_slots=1)
        seq = engine.open(prompt, GREEDY, 16)
        engine.prefill(seq)
        alone = engine.verify([(seq, tree)])[0]
        assert alone == together
        assert together.num_accepted >= 2  # the planted path was found in a batch too


@pytest.mark.parametrize("fault", ["nan logits", "sampler raises"])
def test_a_sampling_failure_fails_only_its_sequence(
    target: LoadedModel, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The middle sequence of a batch of three fails; the other two get the results they get
    in a batch without it, their KV is committed, the failed one's round is not."""
    prompts = [PROMPT, [7, 7, 2], [11, 5, 9, 13, 2, 1, 0, 4, 4, 8]]
    trees = [chain(greedy_continuation(target, prompt, 3)) for prompt in prompts]
    poisoned = SamplingParams(temperature=0.7, seed=666)

    def run(with_fault: bool) -> tuple[list[TargetSequence], list[object]]:
        engine = make_engine(target, num_slots=3)
        params = [GREEDY, poisoned, GREEDY]
        seqs = [engine.open(p, q, 16) for p, q in zip(prompts, params, strict=True)]
        for seq in seqs:
            engine.prefill(seq)
        if with_fault and fault == "nan logits":
            real_logits = engine.runner.logits

            def broken_logits(hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
                logits = real_logits(hidden, upcast).clone()
                first = len(trees[0].tokens) + 1  # the middle sequence's rows come next
                logits[first : first + len(trees[1].tokens) + 1] = torch.nan
                return logits

            monkeypatch.setattr(engine.runner, "logits", broken_logits)
        if with_fault and fault == "sampler raises":
            import specedge.core.target as target_module

            real_sample = target_module.sample_at

            def broken_sample(logits, params, stream, positions):  # type: ignore[no-untyped-def]
                if params.seed == poisoned.seed:
                    raise RuntimeError("probability tensor contains inf or nan (simulated)")
                return real_sample(logits, params, stream, positions)

            monkeypatch.setattr(target_module, "sample_at", broken_sample)
        outcomes: list[object] = list(engine.verify_each(list(zip(seqs, trees, strict=True))))
        monkeypatch.undo()
        return seqs, outcomes

    clean_seqs, clean = run(with_fault=False)
    seqs, outcomes = run(with_fault=True)
    assert isinstance(outcomes[1], SequenceFailure)
    assert ("NaN" if fault == "nan logits" else "simulated") in outcomes[1].reason
    assert seqs[1].rounds == 0 and seqs[1].committed == prompts[1]
    for index in (0, 2):
        assert outcomes[index] == clean[index]
        assert seqs[index].committed == clean_seqs[index].committed
        assert len(seqs[index].committed) == len(prompts[index]) + 4  # the chain and a bonus


def test_verify_raises_a_sampling_error_for_callers_that_fail_whole(target: LoadedModel) -> None:
    engine = make_engine(target, num_slots=1)
    seq = engine.open(PROMPT, GREEDY, 4)
    engine.prefill(seq)
    real_logits = engine.runner.logits
    engine.runner.logits = lambda hidden, upcast=True: real_logits(hidden, upcast) * torch.nan  # type: ignore[method-assign]
    with pytest.raises(SamplingError, match="no distribution"):
        engine.verify([(seq, DraftTree())])


# ---- KV after any accept/reject sequence ---------------------------------------------------------
def open_sequence(engine: TargetEngine, rng: random.Random, seed: int) -> TargetSequence:
    """A random prompt, greedy or at temperature 1, prefilled in chunks (as the server does)."""
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))]
    params = SamplingParams(temperature=rng.choice([0.0, 1.0]), seed=seed)
    seq = engine.open(prompt, params, max_new_tokens=40)
    while not engine.prefill_chunk(seq, chunk=7):
        pass
    return seq


def random_round_tree(rng: random.Random, loaded: LoadedModel, seq: TargetSequence) -> DraftTree:
    """A random tree; for a greedy sequence it holds the target's next 0-5 tokens as a path,
    so acceptance lengths vary from 0 to 5 (random trees alone rarely match more than one)."""
    tokens, parents = random_tree(rng, VOCAB, rng.randint(0, 20))
    if seq.params.greedy:
        path = greedy_continuation(loaded, seq.committed, rng.randint(0, 5))
        tokens, parents = plant_path(tokens, parents, path)
    tokens, parents = shuffle_tree(rng, tokens, parents)
    return DraftTree(tuple(tokens), tuple(parents))


def test_target_kv_after_random_rounds_equals_fresh_prefill(target: LoadedModel) -> None:
    """Three sequences share one batched verify per round, each with its own random tree.
    Finished sequences leave and new ones take their (dirty) slots."""
    rng = random.Random(5)
    runner = ModelRunner(target, num_slots=3, max_context=96, max_block=32)
    engine = TargetEngine(runner)
    active = [open_sequence(engine, rng, seed) for seed in range(3)]
    accepted_per_round: list[int] = []
    num_opened = 3
    for _ in range(30):
        batch = []
        for seq in active:
            batch.append((seq, engine.admit(seq, random_round_tree(rng, target, seq))))
        results = engine.verify(batch)
        accepted_per_round.extend(result.num_accepted for result in results)
        for seq in active:
            # Between rounds the root has no KV; a finished sequence may hold its last token's.
            assert seq.prefilled == len(seq.committed) - 1 or seq.finish_reason is not None
            with_kv = seq.committed[: seq.prefilled]
            assert_slot_matches_fresh_prefill(target, runner.kv, seq.slot, with_kv)
        for i, seq in enumerate(active):
            if seq.finish_reason is not None:
                engine.close(seq)
                active[i] = open_sequence(engine, rng, seed=num_opened)
                num_opened += 1
                assert_slot_matches_fresh_prefill(
                    target, runner.kv, active[i].slot, active[i].committed[:-1]
                )
    # The property was exercised: rejections at the root, and paths several nodes deep.
    assert accepted_per_round.count(0) >= 5
    assert len({n for n in accepted_per_round if n > 0}) >= 4
    assert num_opened >= 4


def test_the_path_head_verifies_exactly_as_the_head_over_every_row(target: LoadedModel) -> None:
    """Three engines run the same rounds (greedy and sampled sequences, stop tokens, token
    allowances, planted paths several nodes deep): one runs the LM head over every row and
    draws every row (a GPU), one draws on a CPU from the head over every row (sampled
    sequences draw their walk's rows only), one runs the head only on the rows its walks read.
    Results, committed tokens and KV are the same; the walks read far fewer rows."""
    rng = random.Random(8)
    engines = []
    for path_head_min_rows in (None, 10**9, 0):
        runner = ModelRunner(target, num_slots=4, max_context=96, max_block=32)
        engine = TargetEngine(runner)
        engine.path_head_min_rows = path_head_min_rows
        engine.path_head_rows_per_sequence = 0
        engines.append(engine)
    requests = []
    for seed in range(4):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
        params = SamplingParams(temperature=(0.0, 1.0)[seed % 2], seed=seed)
        requests.append((prompt, params, rng.randint(4, 30), [rng.randrange(VOCAB)]))
    sequences = [[e.open(p, q, n, stop) for p, q, n, stop in requests] for e in engines]
    for engine, seqs in zip(engines, sequences, strict=True):
        for seq in seqs:
            engine.prefill(seq)
    depths = []
    while any(seq.finish_reason is None for seq in sequences[0]):
        live = [i for i, seq in enumerate(sequences[0]) if seq.finish_reason is None]
        trees = [random_round_tree(rng, target, sequences[0][i]) for i in live]
        every_row, drawn_on_path, on_path = (
            e.verify([(seqs[i], tree) for i, tree in zip(live, trees, strict=True)])
            for e, seqs in zip(engines, sequences, strict=True)
        )
        assert drawn_on_path == every_row
        assert on_path == every_row
        depths.extend(result.num_accepted for result in on_path)
    for by_every_row, *others in zip(*sequences, strict=True):
        for other, engine in zip(others, engines[1:], strict=True):
            assert other.committed == by_every_row.committed
            assert other.finish_reason == by_every_row.finish_reason
            with_kv = other.committed[: other.prefilled]
            assert_slot_matches_fresh_prefill(target, engine.runner.kv, other.slot, with_kv)
    assert max(depths) >= 3  # walks went several nodes deep
    assert {seq.finish_reason for seq in sequences[2]} >= {"stop", "length"}
    assert engines[2].num_head_rows < engines[0].num_head_rows / 2


def test_fit_to_context_keeps_a_prefix() -> None:
    tree = DraftTree((1, 2, 3, 4), (-1, 0, 1, -1))
    assert fit_to_context(tree, context_len=10, max_context=20) is tree
    assert fit_to_context(tree, context_len=18, max_context=20) == DraftTree((1, 2), (-1, 0))
