"""Sample-then-match verification (DESIGN.md section 4), as a pure function.

The target draws one token at the root and at every node. Starting at the root, while the
drawn token matches a child of the current node, that child is *accepted* and becomes current;
the first unmatched draw is the *bonus token*. Every emitted token is a fresh target sample at
exactly the emitted prefix, so the output distribution is the target's. Emission stops after a
stop token (it is emitted, nothing after it) or when the token allowance runs out.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from specedge.core.tree import ROOT_PARENT

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class VerifyResult:
    emitted_tokens: list[int]  # accepted path, then the bonus token (possibly cut by a stop)
    accepted_nodes: list[int]  # tree node indices of the accepted tokens that were emitted
    finish_reason: str | None  # FINISH_STOP, FINISH_LENGTH or None (keep going)
    # Nodes of the sent tree that were verified, a prefix in the sent order (None: all of
    # them). The seam for a server that verifies less than it was sent: the accepted path
    # never leaves the verified prefix.
    num_verified: int | None = None

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)


def verify_tree(
    tree_tokens: Sequence[int],  # [num_nodes]
    tree_parents: Sequence[int],  # [num_nodes], ROOT_PARENT for children of the root
    samples: Sequence[int],  # [1 + num_nodes]: the target's draw at the root, then at each node
    *,
    stop_token_ids: Collection[int],
    max_new_tokens: int,
) -> VerifyResult:
    """Walk the tree along the target's draws; see the module docstring."""
    assert len(samples) == len(tree_tokens) + 1
    walk = TreeWalk(
        tree_tokens, tree_parents, stop_token_ids=stop_token_ids, max_new_tokens=max_new_tokens
    )
    while walk.pending is not None:
        walk.feed(samples[walk.pending + 1])
    return walk.result()


class TreeWalk:
    """`verify_tree` one draw at a time, for a verifier that computes the target's draws only
    where the walk reads them: `pending` is the node whose draw comes next (ROOT_PARENT for the
    root), None once the verdict is known; `feed` gives that draw."""

    def __init__(
        self,
        tree_tokens: Sequence[int],
        tree_parents: Sequence[int],
        *,
        stop_token_ids: Collection[int],
        max_new_tokens: int,
    ) -> None:
        assert max_new_tokens >= 1
        self._child_by_token = _child_index(tree_tokens, tree_parents)
        self._stop_token_ids = stop_token_ids
        self._max_new_tokens = max_new_tokens
        self._emitted: list[int] = []
        self._accepted: list[int] = []
        self._finish_reason: str | None = None
        self.pending: int | None = ROOT_PARENT

    def feed(self, token: int) -> None:
        """The target's draw at the pending node."""
        assert self.pending is not None, "the walk is over"
        child = self._child_by_token.get((self.pending, token))
        self._emitted.append(token)
        if child is not None:
            self._accepted.append(child)
        if token in self._stop_token_ids:
            self._finish_reason = FINISH_STOP
        elif len(self._emitted) >= self._max_new_tokens:
            self._finish_reason = FINISH_LENGTH
        self.pending = child if child is not None and self._finish_reason is None else None

    def result(self) -> VerifyResult:
        assert self.pending is None, "the walk needs more draws"
        return VerifyResult(self._emitted, self._accepted, self._finish_reason)


def verdict_from_reply(
    tree_tokens: Sequence[int],  # [num_nodes]
    tree_parents: Sequence[int],  # [num_nodes]
    emitted_tokens: Sequence[int],
    num_accepted: int,
    finish_reason: str | None,
    num_verified: int | None = None,
) -> VerifyResult:
    """The verdict a remote verifier's reply (emitted tokens, how many were accepted) stands
    for: its accepted path walked down the tree (pass only the verified prefix of the sent
    tree, and its length as `num_verified`). Raises ValueError when the reply does not fit
    the tree."""
    if not 0 <= num_accepted <= len(emitted_tokens):
        raise ValueError(f"{num_accepted} accepted tokens out of {len(emitted_tokens)} emitted")
    child_by_token = _child_index(tree_tokens, tree_parents)
    path, current = [], ROOT_PARENT
    for token in emitted_tokens[:num_accepted]:
        node = child_by_token.get((current, token))
        if node is None:
            raise ValueError(f"accepted token {token} is not a child of tree node {current}")
        path.append(node)
        current = node
    return VerifyResult(list(emitted_tokens), path, finish_reason, num_verified)


def _child_index(
    tree_tokens: Sequence[int], tree_parents: Sequence[int]
) -> dict[tuple[int, int], int]:
    """(parent, token) -> node: siblings carry distinct tokens."""
    return {
        (parent, token): node
        for node, (token, parent) in enumerate(zip(tree_tokens, tree_parents, strict=True))
    }
