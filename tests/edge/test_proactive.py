"""Proactive drafting on a tiny random draft model: a hit splices the subtree into the next tree
(fewer draft forwards for it), a miss discards it, and after any sequence of hits and misses the
draft KV and every draft log-probability equal a fresh causal recompute of the committed tokens
(the published prototype's bug was not moving the spliced KV)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from specedge.core.draft import NOT_CACHED, DraftEngine, DraftSequence, SentTree, TreeBuilder
from specedge.core.limits import TreeShape
from specedge.core.model_runner import ModelRunner
from specedge.core.tree import ROOT_PARENT, DraftTree
from specedge.core.verify import VerifyResult
from specedge.edge.config import ProactivePolicy
from specedge.edge.proactive import (
    ProactiveDrafter,
    tree_leaves,
)
from specedge.model.loader import LoadedModel
from tests.support.drafts import (
    assert_draft_kv_matches_prefill,
    assert_scores_match_recompute,
    builder_path,
)
from tests.support.models import causal_logits, tiny_hf_config, tiny_loaded_model

SHAPE = TreeShape(budget=10, depth=4, width=3, beams=3)
SUBTREE = TreeShape(budget=6, depth=3, width=3, beams=2)
PROMPT = [11, 42, 7, 99, 3]


@pytest.fixture(scope="module")
def draft_model() -> LoadedModel:
    return tiny_loaded_model(tiny_hf_config("llama"), seed=5)


def make_engine(model: LoadedModel, shape: TreeShape = SHAPE) -> DraftEngine:
    runner = ModelRunner(model, num_slots=3, max_context=256, max_block=512)
    return DraftEngine(runner, shape)


def grown_round(engine: DraftEngine) -> tuple[DraftSequence, TreeBuilder, SentTree]:
    seq = engine.open(PROMPT)
    engine.prefill(seq)
    builder = engine.builder(seq)
    builder.grow()
    return seq, builder, builder.sent_tree()


def verdict(sent: SentTree, accepted: list[int], emitted: list[int]) -> VerifyResult:
    """The verdict that accepts `accepted` (builder indices, all in the sent tree)."""
    return VerifyResult(emitted, [sent.builder_nodes.index(i) for i in accepted], None)


def test_bet_is_the_best_leaf_continuation(draft_model: LoadedModel) -> None:
    engine = make_engine(draft_model)
    seq, builder, sent = grown_round(engine)
    drafter = ProactiveDrafter(engine, ProactivePolicy.KEEP_DEPTH, SUBTREE)
    bet = drafter.choose_bet(sent)
    leaves = [sent.builder_nodes[i] for i in tree_leaves(sent.tree)]
    assert bet.leaf in leaves
    assert all(builder.nodes[leaf].block_index != NOT_CACHED for leaf in leaves)
    # Brute force: score(L) + log q(t | L) over every leaf and every token.
    best = -math.inf
    for leaf in leaves:
        tokens = seq.committed + [builder.nodes[i].token for i in builder_path(builder, leaf)]
        logq = causal_logits(draft_model.model, torch.tensor([tokens]))[0, -1].log_softmax(-1)
        value, token = logq.max(dim=-1)
        if builder.nodes[leaf].score + value.item() > best:
            best, expected = builder.nodes[leaf].score + value.item(), (leaf, int(token))
    assert (bet.leaf, bet.token) == expected
    assert bet.score == pytest.approx(best + math.log(0.9), abs=1e-4)


@pytest.mark.parametrize("policy", [ProactivePolicy.KEEP_DEPTH, ProactivePolicy.ADD_DEPTH])
def test_hit_reuses_the_subtree(draft_model: LoadedModel, policy: ProactivePolicy) -> None:
    engine = make_engine(draft_model)
    seq, builder, sent = grown_round(engine)
    drafter = ProactiveDrafter(engine, policy, SUBTREE)
    proactive = drafter.start(sent, drafter.choose_bet(sent))
    proactive.builder.grow()
    subtree_sent = proactive.builder.sent_tree()
    accepted = builder_path(builder, proactive.bet.leaf)
    emitted = [builder.nodes[i].token for i in accepted] + [proactive.bet.token]

    next_builder, hit = drafter.resolve(seq, sent, proactive, verdict(sent, accepted, emitted))
    assert hit and seq.kv_len == len(seq.committed)  # the bet token's KV is committed context
    assert_draft_kv_matches_prefill(engine, seq)
    before = engine.runner.num_forwards
    next_builder.grow()
    spliced_forwards = engine.runner.num_forwards - before
    assert_scores_match_recompute(draft_model, next_builder)

    fresh = DraftEngine(engine.runner, next_builder.shape).builder(_reopen(engine, seq.committed))
    fresh.grow()
    assert next_builder.num_forwarded < fresh.num_forwarded
    if policy == ProactivePolicy.KEEP_DEPTH:
        assert spliced_forwards == SHAPE.depth - proactive.builder.steps
        # The subtree's nodes start the next tree: no node of it was forwarded again.
        reused = [n for n in next_builder.nodes[: len(proactive.builder.nodes)]]
        assert [n.token for n in reused] == [n.token for n in proactive.builder.nodes]
    else:
        # Up to `depth` more steps on top of the subtree (growth stops once no new node can
        # enter the budget).
        assert next_builder.shape.depth == SHAPE.depth + proactive.builder.steps
        assert 1 <= spliced_forwards <= SHAPE.depth
    next_tree = next_builder.sent_tree().tree
    assert max(next_tree.depths()) >= max(subtree_sent.tree.depths())
    assert subtree_sent.builder_nodes  # the subtree had nodes


def _reopen(engine: DraftEngine, committed: list[int]) -> DraftSequence:
    seq = engine.open(committed)
    engine.prefill(seq)
    return seq


def test_miss_discards_the_subtree(draft_model: LoadedModel) -> None:
    engine = make_engine(draft_model)
    seq, builder, sent = grown_round(engine)
    drafter = ProactiveDrafter(engine, ProactivePolicy.KEEP_DEPTH, SUBTREE)
    proactive = drafter.start(sent, drafter.choose_bet(sent))
    proactive.builder.grow()
    accepted = builder_path(builder, proactive.bet.leaf)
    wrong_bonus = (proactive.bet.token + 1) % draft_model.config.vocab_size
    emitted = [builder.nodes[i].token for i in accepted] + [wrong_bonus]

    next_builder, hit = drafter.resolve(seq, sent, proactive, verdict(sent, accepted, emitted))
    assert not hit
    assert next_builder.pending == [wrong_bonus] and not next_builder.nodes
    assert seq.kv_len == len(seq.committed) - 1  # prefix + accepted path, the bonus pending
    assert_draft_kv_matches_prefill(engine, seq)
    next_builder.grow()
    assert_scores_match_recompute(draft_model, next_builder)


def test_tree_leaves() -> None:
    tree = DraftTree(tokens=(5, 6, 7, 8), parents=(-1, -1, 0, 2))
    assert tree_leaves(tree) == [1, 3]


def random_reply(
    rng: random.Random, builder: TreeBuilder, tree: DraftTree, node_map: list[int], vocab: int
) -> tuple[list[int], list[int]]:
    """A reply verification could give: a root-down path of the tree, then a bonus token that
    is not a child of its end (builder indices, emitted tokens)."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(node)
    path, current = [], ROOT_PARENT
    while children.get(current) and rng.random() < 0.8:
        current = rng.choice(children[current])
        path.append(current)
    taken = {tree.tokens[c] for c in children.get(current, [])}
    bonus = rng.choice([t for t in range(vocab) if t not in taken])
    return [node_map[i] for i in path], [tree.tokens[i] for i in path] + [bonus]


@pytest.mark.parametrize("policy", [ProactivePolicy.KEEP_DEPTH, ProactivePolicy.ADD_DEPTH])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lookup", [0, 3])
def test_kv_equals_recompute_after_any_hits_and_misses(
    draft_model: LoadedModel, policy: ProactivePolicy, seed: int, lookup: int
) -> None:
    """With context lookup too: its nodes enter trees, bets and accepted paths unforwarded."""
    rng = random.Random(seed)
    engine = make_engine(draft_model, replace(SHAPE, lookup=lookup))
    drafter = ProactiveDrafter(engine, policy, SUBTREE)
    seq = engine.open(PROMPT * 3 if lookup else PROMPT)
    engine.prefill(seq)
    builder = engine.builder(seq)
    hits = misses = 0
    for round_ in range(10):
        builder.grow()
        assert_scores_match_recompute(draft_model, builder)
        sent = builder.sent_tree()
        tree, node_map = sent.tree, list(sent.builder_nodes)
        proactive = drafter.start(sent, drafter.choose_bet(sent))
        # The reply lands after 0..depth subtree steps; the first two rounds are a hit and a
        # miss for sure, the rest random.
        for _ in range(rng.randint(1 if round_ < 2 else 0, SUBTREE.depth)):
            proactive.builder.step()
        outcome = (
            ["hit", "wrong bonus"][round_]
            if round_ < 2
            else rng.choice(["hit", "hit", "wrong bonus", "random"])
        )
        if outcome == "random":
            accepted, emitted = random_reply(rng, builder, tree, node_map, 256)
        else:
            accepted = builder_path(builder, proactive.bet.leaf)
            bonus = proactive.bet.token if outcome == "hit" else (proactive.bet.token + 7) % 256
            emitted = [builder.nodes[i].token for i in accepted] + [bonus]
        reply = verdict(sent, accepted, emitted)
        expect_hit = drafter.is_hit(proactive, sent, reply)
        assert expect_hit == (outcome == "hit" and proactive.started) or outcome == "random"
        builder, hit = drafter.resolve(seq, sent, proactive, reply)
        assert hit == expect_hit
        hits, misses = hits + hit, misses + (not hit)
        assert_draft_kv_matches_prefill(engine, seq)
    assert hits and misses
