"""Token trees and everything derived from them: depths, paths, ancestor masks, positions.

A *draft tree* is a list of nodes, each a token id and the index of its parent within the list;
parents come before children and `ROOT_PARENT` marks a child of the tree's *root* (the last
committed token, whose KV no one has computed yet). Siblings carry distinct tokens.

A *block* is what one sequence feeds to one forward: nodes laid out in a KV slot after the
sequence's committed *context* (positions 0..context_len-1). Block parents use the same
convention (`ROOT_PARENT` = directly after the context), so a prompt chunk is a chain, a
verification is the root followed by the draft tree, and a draft step is a tree whose first
`num_cached` nodes are already in the slot. This module is pure topology: a node attends the
whole context, its ancestors and itself (`ancestor_mask`), at position context_len + depth;
`core.model_runner` lays a batch of blocks out from these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from specedge.errors import InvalidRequestError

ROOT_PARENT = -1  # parent index of a node attached directly to the root / the context


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of each node: 1 for a child of the root (the root itself is depth 0)."""
    out: list[int] = []
    for parent in parents:
        out.append(1 if parent == ROOT_PARENT else out[parent] + 1)
    return out


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """Node indices from the root's child down to `node` (inclusive)."""
    path = []
    while node != ROOT_PARENT:
        path.append(node)
        node = parents[node]
    return path[::-1]


def children(parents: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents):
        if parent != ROOT_PARENT:
            out[parent].append(node)
    return out


def is_chain(parents: Sequence[int]) -> bool:
    return all(parent == node - 1 for node, parent in enumerate(parents))


def ancestor_mask(parents: Sequence[int]) -> Tensor:  # [n, n] bool, [i, j] = j is i or its ancestor
    num_nodes = len(parents)
    if is_chain(parents):
        return torch.ones(num_nodes, num_nodes, dtype=torch.bool).tril()
    mask = torch.eye(num_nodes, dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent != ROOT_PARENT:
            mask[node] |= mask[parent]
    return mask


def validate_tree(
    tokens: Sequence[int],
    parents: Sequence[int],
    *,
    vocab_size: int,
    max_nodes: int,
    max_depth: int,
) -> None:
    """Raise InvalidRequestError unless the tree is well formed and within the caps."""
    if len(tokens) != len(parents):
        raise InvalidRequestError(
            f"tree has {len(tokens)} tokens but {len(parents)} parent indices"
        )
    if len(tokens) > max_nodes:
        raise InvalidRequestError(f"tree has {len(tokens)} nodes, the limit is {max_nodes}")
    for node, (token, parent) in enumerate(zip(tokens, parents, strict=True)):
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(
                f"node {node}: token id {token} outside vocab [0, {vocab_size})"
            )
        if not ROOT_PARENT <= parent < node:
            raise InvalidRequestError(
                f"node {node}: parent index {parent} must be -1 (the root) or an earlier node"
            )
    if tokens and max(depths(parents)) > max_depth:
        raise InvalidRequestError(
            f"tree depth {max(depths(parents))} exceeds the limit {max_depth}"
        )
    seen: set[tuple[int, int]] = set()
    for token, parent in zip(tokens, parents, strict=True):
        if (parent, token) in seen:
            raise InvalidRequestError(f"duplicate sibling token {token} under parent {parent}")
        seen.add((parent, token))


@dataclass(frozen=True)
class DraftTree:
    """A draft tree as sent on the wire: node tokens and parent indices (root excluded)."""

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        return depths(self.parents)

    def prefix(self, num_nodes: int) -> DraftTree:
        """The first `num_nodes` nodes (a tree whenever parents come before children)."""
        if num_nodes >= self.num_nodes:
            return self
        return DraftTree(self.tokens[:num_nodes], self.parents[:num_nodes])

    def rooted(self, root_token: int) -> tuple[list[int], list[int]]:
        """The verification block: the root then the nodes, parents shifted by one."""
        tokens = [root_token, *self.tokens]
        parents = [ROOT_PARENT, *(parent + 1 for parent in self.parents)]
        return tokens, parents
