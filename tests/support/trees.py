"""Draft trees for tests: random ones (with a planted path, in a shuffled order) for property
tests, and per-round tree functions for a scripted edge (`TreeFunction`)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from specedge.core.tree import ROOT_PARENT, DraftTree
from tests.support.models import TINY_VOCAB


# ---- random trees ------------------------------------------------------------------------------
def random_tree(
    rng: random.Random, vocab_size: int, num_nodes: int, max_depth: int = 8
) -> tuple[list[int], list[int]]:
    """A random draft tree (tokens, parents) in parents-first order with distinct siblings.
    Half of the nodes extend the previous node, so that trees are deep as well as bushy."""
    tokens: list[int] = []
    parents: list[int] = []
    node_depths: list[int] = []
    used: dict[int, set[int]] = {}
    while len(tokens) < num_nodes:
        node = len(tokens)
        if node and rng.random() < 0.5:
            parent = node - 1
        else:
            parent = rng.choice([ROOT_PARENT, *range(node)])
        depth = 1 if parent == ROOT_PARENT else node_depths[parent] + 1
        free = sorted(set(range(vocab_size)) - used.setdefault(parent, set()))
        if depth > max_depth or not free:
            continue
        token = rng.choice(free)
        used[parent].add(token)
        tokens.append(token)
        parents.append(parent)
        node_depths.append(depth)
    return tokens, parents


def plant_path(
    tokens: list[int], parents: list[int], path_tokens: Sequence[int]
) -> tuple[list[int], list[int]]:
    """The tree with `path_tokens` as a path from the root (reusing nodes that already hold
    it, appending the rest)."""
    tokens, parents = list(tokens), list(parents)
    current = ROOT_PARENT
    for token in path_tokens:
        match = [
            i
            for i, (t, p) in enumerate(zip(tokens, parents, strict=True))
            if (p, t) == (current, token)
        ]
        if match:
            current = match[0]
        else:
            tokens.append(token)
            parents.append(current)
            current = len(tokens) - 1
    return tokens, parents


def shuffle_tree(
    rng: random.Random, tokens: Sequence[int], parents: Sequence[int]
) -> tuple[list[int], list[int]]:
    """The same tree with its nodes in a random parents-first order."""
    placed: dict[int, int] = {ROOT_PARENT: ROOT_PARENT}  # old index -> new index
    order: list[int] = []
    while len(order) < len(tokens):
        ready = [i for i in range(len(tokens)) if i not in placed and parents[i] in placed]
        node = rng.choice(ready)
        placed[node] = len(order)
        order.append(node)
    return [tokens[i] for i in order], [placed[parents[i]] for i in order]


# ---- trees of a scripted edge --------------------------------------------------------------------
TreeFunction = Callable[[list[int]], DraftTree]  # generated tokens so far -> next tree


def empty_tree(generated: list[int]) -> DraftTree:
    return DraftTree()


def oracle_tree(reference: list[int], hits: int, decoys: int = 2) -> TreeFunction:
    """A tree whose main chain holds the next `hits` reference tokens, each level also carrying
    `decoys` wrong siblings (so the server must pick the right child among several)."""

    def build(generated: list[int]) -> DraftTree:
        upcoming = reference[len(generated) : len(generated) + hits]
        tokens: list[int] = []
        parents: list[int] = []
        parent = ROOT_PARENT
        for token in upcoming:
            for offset in range(1, decoys + 1):
                tokens.append((token + offset) % TINY_VOCAB)
                parents.append(parent)
            tokens.append(token)
            parents.append(parent)
            parent = len(tokens) - 1
        return DraftTree(tuple(tokens), tuple(parents))

    return build


def junk_tree(generated: list[int]) -> DraftTree:
    """A bushy tree of arbitrary tokens (mostly rejected)."""
    seed = len(generated)
    tokens = [(seed * 31 + i * 17) % TINY_VOCAB for i in range(3)]
    parents = [ROOT_PARENT] * 3
    tokens += [(seed * 7 + 5) % TINY_VOCAB, (seed * 11 + 9) % TINY_VOCAB]
    parents += [0, 3]
    return DraftTree(tuple(tokens), tuple(parents))
