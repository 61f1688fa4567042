"""Trees: depths, paths, ancestor masks, validation (every bad input gets its error), and the
tree-attention property: every node of a batched tree forward has the logits of a plain causal
forward over the committed prefix followed by that node's path."""

from __future__ import annotations

import random

import pytest
import torch

from specedge.core.model_runner import ModelRunner, TreeRow, build_forward_inputs, chain_parents
from specedge.core.tree import (
    ROOT_PARENT,
    DraftTree,
    ancestor_mask,
    children,
    depths,
    is_chain,
    path_to,
    validate_tree,
)
from specedge.errors import InvalidRequestError
from specedge.model.loader import LoadedModel
from tests.support.models import causal_logits, tiny_hf_config, tiny_loaded_model
from tests.support.trees import random_tree

ATOL = 1e-4

#        root
#       /    \
#      0      1
#     / \      \
#    2   3      4
#    |
#    5
PARENTS = [ROOT_PARENT, ROOT_PARENT, 0, 0, 1, 2]


def test_depths_paths_children() -> None:
    assert depths(PARENTS) == [1, 1, 2, 2, 2, 3]
    assert path_to(PARENTS, 5) == [0, 2, 5]
    assert path_to(PARENTS, 4) == [1, 4]
    assert path_to(PARENTS, 0) == [0]
    assert path_to(PARENTS, ROOT_PARENT) == []
    assert children(PARENTS) == [[2, 3], [4], [5], [], [], []]
    assert depths([]) == []


def test_is_chain() -> None:
    assert is_chain([ROOT_PARENT, 0, 1, 2])
    assert is_chain(chain_parents(5)) and chain_parents(1) == [ROOT_PARENT]
    assert is_chain([])
    assert not is_chain(PARENTS)
    assert not is_chain([ROOT_PARENT, ROOT_PARENT])


def test_ancestor_mask() -> None:
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [0, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 0, 0, 1, 0, 0],
            [0, 1, 0, 0, 1, 0],
            [1, 0, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(ancestor_mask(PARENTS), expected)
    assert torch.equal(ancestor_mask(chain_parents(4)), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("seed", range(5))
def test_ancestor_mask_is_the_path(seed: int) -> None:
    rng = random.Random(seed)
    _, parents = random_tree(rng, vocab_size=5, num_nodes=30)
    mask = ancestor_mask(parents)
    for node in range(len(parents)):
        assert mask[node].nonzero().flatten().tolist() == path_to(parents, node)


def test_rooted_tree_shifts_parents() -> None:
    tree = DraftTree(tokens=(7, 8, 9), parents=(ROOT_PARENT, 0, ROOT_PARENT))
    assert tree.num_nodes == 3 and tree.depths() == [1, 2, 1]
    assert tree.rooted(5) == ([5, 7, 8, 9], [ROOT_PARENT, 0, 1, 0])
    assert DraftTree().rooted(5) == ([5], [ROOT_PARENT])


def test_forward_inputs_positions_and_mask() -> None:
    """A draft-step row: 2 of the block's 4 nodes are cached, 2 are new, after 3 context
    positions; a second row is a 1-token chain, padded."""
    rows = [
        TreeRow(
            slot=1, context_len=3, parents=[ROOT_PARENT, 0, 0, 1], new_tokens=[11, 12], num_cached=2
        ),
        TreeRow(slot=0, context_len=1, parents=[ROOT_PARENT], new_tokens=[13]),
    ]
    inputs = build_forward_inputs(rows)
    assert inputs.tokens[0].tolist() == [11, 12] and inputs.tokens[1, 0] == 13
    assert inputs.positions[0].tolist() == [3 + 1, 3 + 2]  # context_len + depth - 1
    assert inputs.positions[1, 0] == 1
    assert inputs.kv_write.slots == (1, 0) and inputs.kv_write.starts == (5, 1)
    assert inputs.num_new == [2, 1]
    assert inputs.attn_mask.shape == (2, 2, 7)
    # Node 2 (child of 0) sees the context, node 0 and itself; node 3 sees 0, 1 and itself.
    assert inputs.attn_mask[0, 0].tolist() == [1, 1, 1, 1, 0, 1, 0]
    assert inputs.attn_mask[0, 1].tolist() == [1, 1, 1, 1, 1, 0, 1]
    assert inputs.attn_mask[1, 0].tolist() == [1, 1, 0, 0, 0, 0, 0]


# ---- validation ----------------------------------------------------------------------------

LIMITS = {"vocab_size": 100, "max_nodes": 8, "max_depth": 3}


def test_valid_trees_pass() -> None:
    validate_tree([5, 6, 7, 5], [ROOT_PARENT, ROOT_PARENT, 0, 2], **LIMITS)
    validate_tree([], [], **LIMITS)
    validate_tree([0, 99], [ROOT_PARENT, 0], **LIMITS)
    # The same token under different parents is fine.
    validate_tree([5, 5, 5], [ROOT_PARENT, 0, 1], **LIMITS)


@pytest.mark.parametrize(
    ("tokens", "parents", "message"),
    [
        ([5, 6], [1, ROOT_PARENT], r"node 0: parent index 1 must be -1"),
        ([5, 6], [ROOT_PARENT, 1], r"node 1: parent index 1 must be -1"),
        ([5, 6], [ROOT_PARENT, -2], r"node 1: parent index -2"),
        ([5] * 9, chain_parents(9), r"tree has 9 nodes, the limit is 8"),
        ([5, 100], [ROOT_PARENT, 0], r"node 1: token id 100 outside vocab \[0, 100\)"),
        ([-1], [ROOT_PARENT], r"node 0: token id -1 outside vocab"),
        ([1, 2, 3, 4], chain_parents(4), r"tree depth 4 exceeds the limit 3"),
        (
            [5, 6, 5],
            [ROOT_PARENT, ROOT_PARENT, ROOT_PARENT],
            r"duplicate sibling token 5 under parent -1",
        ),
        ([5, 6, 6], [ROOT_PARENT, 0, 0], r"duplicate sibling token 6 under parent 0"),
        ([5, 6], [ROOT_PARENT], r"tree has 2 tokens but 1 parent indices"),
    ],
    ids=[
        "parent-after-child",
        "self-parent",
        "parent-below-root",
        "too-many-nodes",
        "token-past-vocab",
        "negative-token",
        "too-deep",
        "duplicate-root-children",
        "duplicate-siblings",
        "length-mismatch",
    ],
)
def test_invalid_trees_are_rejected(tokens: list[int], parents: list[int], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        validate_tree(tokens, parents, **LIMITS)


# ---- tree attention ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> LoadedModel:
    return tiny_loaded_model(tiny_hf_config("qwen2"), seed=21)


def path_logits(
    loaded: LoadedModel, prefix: list[int], tokens: list[int], parents: list[int], node: int
) -> torch.Tensor:
    """Logits at `node` from a plain causal forward over prefix + the node's path, from scratch."""
    sequence = prefix + [tokens[i] for i in path_to(parents, node)]
    return causal_logits(loaded.model, torch.tensor([sequence]))[0, -1]


@pytest.mark.parametrize("seed", range(3))
def test_batched_tree_forward_equals_causal_forward_per_path(
    tiny_model: LoadedModel, seed: int
) -> None:
    """Four sequences with different prefix lengths (0 included) and random trees of different
    sizes in ONE forward; then the same trees forwarded in two steps, the second step reading
    the first step's nodes from the cache (as a draft step does)."""
    rng = random.Random(seed)
    vocab = tiny_model.config.vocab_size
    prefix_lengths = [0, 1, 6, 19]
    tree_sizes = [rng.randint(2, 6), rng.randint(8, 16), 1 + rng.randint(1, 3), rng.randint(20, 30)]
    runner = ModelRunner(tiny_model, num_slots=5, max_context=32, max_block=32)
    slots = [runner.kv.allocate() for _ in range(5)][1:]  # leave slot order non-trivial
    rng.shuffle(slots)
    prefixes = [[rng.randrange(vocab) for _ in range(n)] for n in prefix_lengths]
    trees = [random_tree(rng, vocab, n, max_depth=10) for n in tree_sizes]
    for slot, prefix in zip(slots, prefixes, strict=True):
        runner.prefill(slot, prefix, start=0, chunk=4)
    expected = [
        torch.stack(
            [path_logits(tiny_model, prefix, tokens, parents, node) for node in range(len(tokens))]
        )
        for prefix, (tokens, parents) in zip(prefixes, trees, strict=True)
    ]

    rows = [
        TreeRow(slot, len(prefix), parents, tokens)
        for slot, prefix, (tokens, parents) in zip(slots, prefixes, trees, strict=True)
    ]
    hidden = runner.forward(rows)
    for node_hidden, want in zip(hidden, expected, strict=True):
        torch.testing.assert_close(runner.logits(node_hidden), want, atol=ATOL, rtol=0)

    # Two steps: nodes [0, split) first, then the rest with the first part cached.
    splits = [rng.randint(1, len(tokens) - 1) for tokens, _ in trees]
    first = [
        TreeRow(slot, len(prefix), parents[:split], tokens[:split])
        for slot, prefix, (tokens, parents), split in zip(
            slots, prefixes, trees, splits, strict=True
        )
    ]
    second = [
        TreeRow(slot, len(prefix), parents, tokens[split:], num_cached=split)
        for slot, prefix, (tokens, parents), split in zip(
            slots, prefixes, trees, splits, strict=True
        )
    ]
    first_hidden = runner.forward(first)
    second_hidden = runner.forward(second)
    for a, b, want in zip(first_hidden, second_hidden, expected, strict=True):
        actual = runner.logits(torch.cat([a, b]))
        torch.testing.assert_close(actual, want, atol=ATOL, rtol=0)
