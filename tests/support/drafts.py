"""Checks on draft-model state: a builder node's path, every node's score against a plain
causal forward, and a sequence's draft KV against a fresh prefill of its committed tokens."""

from __future__ import annotations

import math

import pytest
import torch

from specedge.core.draft import DraftEngine, DraftSequence, TreeBuilder
from specedge.core.tree import ROOT_PARENT
from specedge.model.loader import LoadedModel
from tests.support.models import causal_logits


def builder_path(builder: TreeBuilder, node: int) -> list[int]:
    """Builder indices from the root's child down to `node`."""
    path = []
    while node != ROOT_PARENT:
        path.append(node)
        node = builder.nodes[node].parent
    return path[::-1]


def assert_scores_match_recompute(model: LoadedModel, builder: TreeBuilder) -> None:
    """Every model-proposed node scores parent + log q(token | committed + path) + log decay,
    with q from a plain causal forward (lookup-scored nodes: tests/core/test_lookup.py)."""
    log_decay = math.log(builder.shape.decay)
    reference: dict[int, torch.Tensor] = {}  # log q after each parent, computed once
    for node in builder.nodes:
        if node.lookup:
            continue
        if node.parent not in reference:
            path = [] if node.parent == ROOT_PARENT else builder_path(builder, node.parent)
            tokens = builder.seq.committed + [builder.nodes[i].token for i in path]
            logits = causal_logits(model.model, torch.tensor([tokens]))[0, -1]
            reference[node.parent] = logits.log_softmax(dim=-1)
        parent_score = 0.0 if node.parent == ROOT_PARENT else builder.nodes[node.parent].score
        expected = parent_score + reference[node.parent][node.token].item() + log_decay
        assert node.score == pytest.approx(expected, abs=1e-4)


def assert_draft_kv_matches_prefill(engine: DraftEngine, seq: DraftSequence) -> None:
    """The slot's committed draft KV equals a fresh chain prefill of the same tokens."""
    kv = engine.runner.kv
    length = seq.kv_len
    reference = kv.allocate()
    try:
        engine.runner.prefill(reference, seq.committed[:length], 0)
        for layer in range(kv.keys.shape[0]):
            for cache, fresh in zip(
                kv.read(layer, seq.slot, length), kv.read(layer, reference, length), strict=True
            ):
                torch.testing.assert_close(cache, fresh, atol=1e-5, rtol=0)
    finally:
        kv.free(reference)
