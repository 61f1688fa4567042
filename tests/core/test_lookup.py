"""Context lookup: the chain it copies from the context, the record that scores it, and how the
draft tree takes it in (one node per (parent, token), forwarded with its ancestors, KV and
scores equal to a recompute, the record updated from the target's reply)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from specedge.core.draft import NOT_CACHED, DraftEngine, SentTree
from specedge.core.limits import TreeShape
from specedge.core.lookup import LookupStats, TokenPositions, lookup_chain
from specedge.core.model_runner import ModelRunner
from specedge.core.tree import ROOT_PARENT, DraftTree, validate_tree
from specedge.core.verify import VerifyResult
from specedge.errors import InvalidRequestError
from specedge.model.loader import LoadedModel
from tests.support.drafts import assert_draft_kv_matches_prefill
from tests.support.models import causal_logits, tiny_hf_config, tiny_loaded_model

# ---- the chain -------------------------------------------------------------------------------


def test_chain_follows_the_longest_recurring_suffix() -> None:
    # "2 3" recurs after "1" and after "9": the longer match "1 2 3" wins.
    context = [1, 2, 3, 4, 5, 9, 2, 3, 6, 1, 2, 3]
    assert lookup_chain(context, 3) == ([4, 5, 9], 3)


def test_chain_prefers_the_most_recent_of_equal_matches() -> None:
    context = [1, 2, 3, 4, 5, 6, 7, 1, 2, 8, 9, 5, 1, 2]
    assert lookup_chain(context, 2, max_ngram=2) == ([8, 9], 2)


def test_chain_prefers_an_occurrence_with_more_tokens_after_it() -> None:
    # In a loop the most recent occurrence is followed by only one token; an older one by more.
    assert lookup_chain([7, 7, 7, 7, 7, 7, 7], 3, max_ngram=2) == ([7, 7, 7], 2)


def test_chain_is_cut_to_length_and_to_the_context() -> None:
    context = [5, 6, 7, 8, 9, 5]
    assert lookup_chain(context, 2) == ([6, 7], 1)
    assert lookup_chain(context, 10) == ([6, 7, 8, 9, 5], 1)


def test_no_chain_without_a_recurring_suffix() -> None:
    assert lookup_chain([1, 2, 3, 4], 5) == ([], 0)
    assert lookup_chain([1], 5) == ([], 0)
    assert lookup_chain([1, 2, 1], 0) == ([], 0)
    assert lookup_chain([3, 1, 2, 9, 2], 4, min_ngram=2) == ([], 0)


# ---- the record ------------------------------------------------------------------------------


def test_kept_positions_give_the_chain_a_scan_gives() -> None:
    """A growing context's kept token positions (a streamed session's) find the same chain as a
    scan of the whole context, at every length."""
    rng = random.Random(3)
    context: list[int] = []
    index = TokenPositions()
    for _ in range(300):
        context.append(rng.randrange(6))  # a small alphabet: many matches of every length
        ends = index.ends(context)
        assert lookup_chain(context, 5, ends=ends) == lookup_chain(context, 5)


def test_record_counts_tries_up_to_the_first_wrong_token() -> None:
    stats = LookupStats()
    assert math.exp(stats.log_p(3)) == pytest.approx(0.5)  # the prior
    stats.record([4, 5, 6, 7], 3, [4, 5, 9])  # two right, the third tried and wrong
    assert (stats.hits[3], stats.tries[3]) == (2, 3)
    stats.record([4, 5], 3, [4, 5, 6])  # both right, nothing more to try
    assert (stats.hits[3], stats.tries[3]) == (4, 5)
    stats.record([8], 1, [2])
    assert (stats.hits[1], stats.tries[1]) == (0, 1)
    stats.record([], 0, [2])
    assert 0 not in stats.tries
    assert math.exp(stats.log_p(3)) == pytest.approx(5 / 7)
    assert math.exp(stats.log_p(1)) == pytest.approx(1 / 3)


def test_negative_lookup_length_is_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="lookup"):
        TreeShape(lookup=-1)


# ---- in the draft tree -----------------------------------------------------------------------

SHAPE = TreeShape(budget=12, depth=5, width=3, beams=2, lookup=4)
REPEATING = [20, 21, 22, 23, 24, 25, 26, 27, 30, 31, 20, 21, 22]


@pytest.fixture(scope="module")
def draft_model() -> LoadedModel:
    return tiny_loaded_model(tiny_hf_config("llama"), seed=5)


def make_engine(model: LoadedModel, shape: TreeShape = SHAPE) -> DraftEngine:
    return DraftEngine(ModelRunner(model, num_slots=2, max_context=256, max_block=512), shape)


def test_tree_carries_the_lookup_chain(draft_model: LoadedModel) -> None:
    engine = make_engine(draft_model)
    seq = engine.open(REPEATING)
    engine.prefill(seq)
    builder = engine.builder(seq)
    builder.grow()
    assert builder.lookup == ([23, 24, 25, 26], 3)
    sent = builder.sent_tree()
    tree, node_map = sent.tree, sent.builder_nodes
    validate_tree(tree.tokens, tree.parents, vocab_size=256, max_nodes=12, max_depth=5)
    # The chain is a root-down path of the sent tree (a random draft never outscores it).
    node, path = ROOT_PARENT, []
    for token in [23, 24, 25, 26]:
        (node,) = [
            i for i, (t, p) in enumerate(zip(tree.tokens, tree.parents, strict=True))
            if p == node and t == token
        ]  # fmt: skip
        path.append(node_map[node])
    assert all(builder.nodes[i].lookup for i in path)
    # Forwarded nodes hang from forwarded nodes only: lookup ancestors went with them.
    for node_ in builder.nodes:
        if node_.block_index != NOT_CACHED and node_.parent != ROOT_PARENT:
            assert builder.nodes[node_.parent].block_index != NOT_CACHED
    assert any(builder.nodes[i].block_index != NOT_CACHED for i in path)


def test_scores_and_kv_equal_a_recompute_over_rounds(draft_model: LoadedModel) -> None:
    """Model-proposed nodes score parent + log q + log decay with q from a causal forward;
    lookup-scored ones parent + the record's log p + log decay; after each commit the draft KV
    equals a fresh prefill, and the record counts the chain against the reply."""
    engine = make_engine(draft_model)
    seq = engine.open(REPEATING)
    engine.prefill(seq)
    log_decay = math.log(SHAPE.decay)
    for round_ in range(4):
        builder = engine.builder(seq)
        builder.grow()
        chain, ngram = builder.lookup
        for node in builder.nodes:
            parent = builder.nodes[node.parent] if node.parent != ROOT_PARENT else None
            base = parent.score if parent else 0.0
            if node.lookup:
                expected = seq.lookup_stats.log_p(ngram)
            else:
                path, i = [], node.parent
                while i != ROOT_PARENT:
                    path.append(builder.nodes[i].token)
                    i = builder.nodes[i].parent
                tokens = seq.committed + path[::-1]
                logits = causal_logits(draft_model.model, torch.tensor([tokens]))
                expected = logits[0, -1].log_softmax(-1)[node.token].item()
            assert node.score - base - log_decay == pytest.approx(expected, abs=1e-4)
        # The target accepts the first two chain tokens, then emits a context token off it.
        assert len(chain) >= 3, round_
        accepted = [builder.child_of[(ROOT_PARENT, chain[0])]]
        accepted.append(builder.child_of[(accepted[0], chain[1])])
        bonus = next(t for t in REPEATING[round_:] if t != chain[2])
        tries_before = seq.lookup_stats.tries.get(ngram, 0.0)
        # Sent: the accepted chain prefix (tree nodes 0, 1 = builder nodes `accepted`).
        sent = SentTree(DraftTree(tuple(chain[:2]), (ROOT_PARENT, 0)), tuple(accepted), builder)
        engine.advance(seq, sent, VerifyResult([*chain[:2], bonus], [0, 1], None))
        assert seq.lookup_stats.tries[ngram] == tries_before + 3, round_
        assert_draft_kv_matches_prefill(engine, seq)
