"""The draft engine and its tree builder: shapes are validated; a tree is the best `budget`
candidates, within the shape's depth, with every model-proposed score equal to a causal
recompute; chunked prefill equals one prefill; the context lookup chain enters the tree; and
after any sequence of commits (any accepted path, a bonus token off the tree) the draft KV
equals a fresh prefill of the committed tokens."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from specedge.core.draft import DraftEngine, SentTree
from specedge.core.limits import TreeShape
from specedge.core.model_runner import ModelRunner
from specedge.core.tree import ROOT_PARENT, validate_tree
from specedge.core.verify import VerifyResult
from specedge.errors import InvalidRequestError
from specedge.model.loader import LoadedModel
from tests.support.drafts import assert_scores_match_recompute
from tests.support.models import TINY_VOCAB, tiny_hf_config, tiny_loaded_model
from tests.support.reference import assert_slot_matches_fresh_prefill

SHAPE = TreeShape(budget=12, depth=5, width=3, beams=2, lookup=4)
REPEATING = [20, 21, 22, 23, 24, 25, 26, 27, 30, 31, 20, 21, 22]
PROMPT = [11, 42, 7, 99, 3]


@pytest.fixture(scope="module")
def draft_model() -> LoadedModel:
    return tiny_loaded_model(tiny_hf_config("llama"), seed=5)


def make_engine(model: LoadedModel, shape: TreeShape = SHAPE) -> DraftEngine:
    return DraftEngine(ModelRunner(model, num_slots=2, max_context=256, max_block=512), shape)


# ---- shapes --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("budget", 0, "tree budget must be >= 1"),
        ("depth", 0, "tree depth must be >= 1"),
        ("width", 0, "tree width must be >= 1"),
        ("beams", 0, "tree beams must be >= 1"),
        ("lookup", -1, "tree lookup must be >= 0"),
        ("decay", 1.0, r"tree decay must be in \(0, 1\)"),
        ("decay", 0.0, r"tree decay must be in \(0, 1\)"),
    ],
)
def test_bad_tree_shapes_are_rejected(field: str, value: float, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        TreeShape(**{field: value})


# ---- prefill and growth --------------------------------------------------------------------------
def test_open_takes_a_slot_and_close_frees_it(draft_model: LoadedModel) -> None:
    engine = make_engine(draft_model)
    seq = engine.open(PROMPT)
    assert engine.runner.kv.num_free == 1 and seq.committed == PROMPT and seq.kv_len == 0
    engine.close(seq)
    assert engine.runner.kv.num_free == 2


def test_chunked_prefill_equals_one_prefill(draft_model: LoadedModel) -> None:
    """The root (the last committed token) gets no KV; every other token's equals a fresh
    causal prefill, however the prompt was split."""
    engine = make_engine(draft_model)
    seq = engine.open(REPEATING)
    done = [engine.prefill(seq, max_tokens=5) for _ in range(3)]
    assert done == [False, False, True] and seq.kv_len == len(REPEATING) - 1
    assert_slot_matches_fresh_prefill(draft_model, engine.runner.kv, seq.slot, REPEATING[:-1])
    assert engine.prefill(seq)  # nothing left to do


@pytest.mark.parametrize("shape", [SHAPE, replace(SHAPE, lookup=0), TreeShape(8, 2, 4, 8, 0.5)])
def test_tree_is_the_best_budget_candidates_within_the_shape(
    draft_model: LoadedModel, shape: TreeShape
) -> None:
    engine = make_engine(draft_model, shape)
    seq = engine.open(REPEATING)
    engine.prefill(seq)
    builder = engine.builder(seq)
    builder.grow()
    assert builder.steps <= shape.depth
    assert_scores_match_recompute(draft_model, builder)
    sent = builder.sent_tree()
    tree, node_map = sent.tree, sent.builder_nodes
    assert tree.num_nodes == shape.budget < len(builder.nodes)
    # Distinct siblings, parents first, no deeper than the shape.
    validate_tree(
        tree.tokens,
        tree.parents,
        vocab_size=TINY_VOCAB,
        max_nodes=shape.budget,
        max_depth=shape.depth,
    )
    # Best-first: no candidate left out scores above one sent, and a child scores below its
    # parent, so the best `budget` never orphan a node.
    sent_nodes = set(node_map)
    lowest_sent = min(builder.nodes[i].score for i in sent_nodes)
    left_out = [i for i in range(len(builder.nodes)) if i not in sent_nodes]
    assert all(builder.nodes[i].score <= lowest_sent for i in left_out)
    for node in builder.nodes:
        if node.parent != ROOT_PARENT:
            assert node.score < builder.nodes[node.parent].score
    for tree_node, builder_node in enumerate(node_map):
        assert tree.tokens[tree_node] == builder.nodes[builder_node].token
    # A smaller cap keeps the best of the tree.
    small = builder.sent_tree(max_nodes=3)
    assert small.tree.num_nodes == 3 and set(small.builder_nodes) <= sent_nodes
    # Sent best-first by acceptance estimate: non-increasing, so every prefix is a tree (the
    # cut a verifier may make); each estimate is the product of the draft's step
    # probabilities along the path, never above its parent's.
    estimates = sent.estimates
    assert len(estimates) == tree.num_nodes
    assert all(a >= b for a, b in zip(estimates, estimates[1:], strict=False))
    for node, (parent, estimate) in enumerate(zip(tree.parents, estimates, strict=True)):
        assert 0.0 < estimate <= 1.0
        assert estimate == builder.acceptance_estimate(node_map[node])
        # The step from the parent multiplies by q(token | path): the score's step without
        # its decay (scores are checked against a causal forward above).
        entry = builder.nodes[node_map[node]]
        parent_estimate = 1.0 if parent == ROOT_PARENT else estimates[parent]
        parent_score = 0.0 if parent == ROOT_PARENT else builder.nodes[entry.parent].score
        step_q = math.exp(entry.score - parent_score - math.log(shape.decay))
        assert estimate == pytest.approx(min(parent_estimate * step_q, 1.0), rel=1e-9)
        if parent != ROOT_PARENT:
            assert parent < node and estimate <= parent_estimate


class ConfidentRunner(ModelRunner):
    """A draft far surer of itself than a random tiny model: logits sharpened 20-fold, so
    most steps have log q within rounding of 0."""

    def top_logprobs(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        logprobs = (20.0 * self.model.logits(hidden)).log_softmax(dim=-1)
        top = torch.topk(logprobs, k, dim=-1)
        return top.values, top.indices


@pytest.mark.parametrize("seed", range(6))
def test_a_confident_drafts_estimates_never_rise_above_a_parents(
    draft_model: LoadedModel, seed: int
) -> None:
    # Rounding alone can put a child's product of step probabilities one ulp above its
    # parent's when a step is certain; sent best-first, the child would precede its parent.
    shape = TreeShape(budget=32, depth=12, width=4, beams=8, decay=0.99, lookup=0)
    runner = ConfidentRunner(draft_model, num_slots=1, max_context=256, max_block=1024)
    engine = DraftEngine(runner, shape)
    prompt = random.Random(seed).choices(range(TINY_VOCAB), k=12)
    seq = engine.open(prompt)
    engine.prefill(seq)
    builder = engine.builder(seq)
    builder.grow()
    sent = builder.sent_tree()
    validate_tree(
        sent.tree.tokens, sent.tree.parents, vocab_size=TINY_VOCAB, max_nodes=32, max_depth=12
    )
    for node, parent in enumerate(sent.tree.parents):
        if parent != ROOT_PARENT:
            assert sent.estimates[node] <= sent.estimates[parent]


# ---- KV after commits ----------------------------------------------------------------------------
def random_verdict(rng: random.Random, sent: SentTree, vocab: int) -> VerifyResult:
    """A verdict verification could give: a root-down path of the sent tree (often none, often
    to a leaf that was never forwarded), then a bonus token that is not a child of its end."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(sent.tree.parents):
        children.setdefault(parent, []).append(node)
    path, current = [], ROOT_PARENT
    while children.get(current) and rng.random() < 0.8:
        current = rng.choice(children[current])
        path.append(current)
    taken = {sent.tree.tokens[c] for c in children.get(current, [])}
    bonus = rng.choice([t for t in range(vocab) if t not in taken])
    return VerifyResult([*(sent.tree.tokens[i] for i in path), bonus], path, None)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lookup", [0, 3])
def test_kv_after_prefill_and_commits_equals_fresh_prefill(
    draft_model: LoadedModel, seed: int, lookup: int
) -> None:
    """After any sequence of verdicts the slot holds exactly the K/V of a fresh causal prefill
    of the committed tokens with KV: the root chain and the forwarded prefix of the accepted
    path; accepted nodes never forwarded (and the bonus) wait as the next tree's pending chain,
    whose scores then equal a recompute too."""
    rng = random.Random(seed)
    engine = make_engine(draft_model, replace(SHAPE, lookup=lookup))
    seq = engine.open(PROMPT * 3)
    while not engine.prefill(seq, max_tokens=4):
        pass
    builder = engine.builder(seq)
    without_kv = []  # committed tokens without KV after each round
    for _ in range(8):
        builder.grow()
        assert_scores_match_recompute(draft_model, builder)
        sent = builder.sent_tree()
        verdict = random_verdict(rng, sent, TINY_VOCAB)
        committed_before = len(seq.committed)
        builder = engine.advance(seq, sent, verdict)
        assert len(seq.committed) == committed_before + len(verdict.emitted_tokens)
        kv_tokens = seq.committed[: seq.kv_len]
        assert_slot_matches_fresh_prefill(draft_model, engine.runner.kv, seq.slot, kv_tokens)
        assert builder.pending == seq.committed[seq.kv_len :]
        without_kv.append(len(seq.committed) - seq.kv_len)
    # Exercised: rounds where only the bonus waits, and rounds with unforwarded accepted nodes.
    assert 1 in without_kv and max(without_kv) > 1


def test_a_reused_slot_holds_nothing_of_the_previous_sequence(draft_model: LoadedModel) -> None:
    engine = make_engine(draft_model)
    first = engine.open(REPEATING)
    engine.prefill(first)
    engine.builder(first).grow()
    engine.close(first)
    seq = engine.open(PROMPT)
    assert seq.slot == first.slot
    engine.prefill(seq)
    assert_slot_matches_fresh_prefill(draft_model, engine.runner.kv, seq.slot, PROMPT[:-1])


def test_a_sized_shape_takes_no_more_steps_than_nodes() -> None:
    shape = TreeShape(budget=32, depth=6)
    assert shape.sized(32) is shape and shape.sized(40) is shape
    assert (shape.sized(8).budget, shape.sized(8).depth) == (8, 6)
    assert (shape.sized(2).budget, shape.sized(2).depth) == (2, 2)
    assert (shape.sized(0).budget, shape.sized(0).depth) == (1, 1)  # never an empty shape
    assert shape.sized(2).width == shape.width and shape.sized(2).lookup == shape.lookup
