"""Trees: depths, paths, ancestor masks and validation (every bad input gets its error). The
batch layout and the tree-attention property: tests/core/test_model_runner.py."""

from __future__ import annotations

import random

import pytest
import torch

from specedge.core.model_runner import chain_parents
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
