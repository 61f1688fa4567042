"""Proactive drafting (DESIGN.md section 5): keep drafting while a tree is being verified.

While a round is in flight the edge bets on its single most likely outcome: the accepted path
ends at leaf L of the sent tree and the bonus token is t. The *bet* (L, t) maximises
score(L) + log(decay_p) + log q(t | L) over the sent tree's leaves, which takes one draft
forward over the leaves not expanded yet. The edge then grows the *proactive subtree* rooted at
t under L, with its own smaller budget and depth, one draft step at a time.

When the reply lands, a *hit* (the accepted path ends exactly at L and the bonus is t) splices
the subtree in as the start of the next tree, its draft KV moved to the slot positions the next
tree expects (`DraftEngine.splice`); growth continues from it under one of two policies:
`keep-depth` keeps the tree's total depth (the next tree is sent sooner), `add-depth` grows the
full depth on top of the subtree (the next tree is deeper). A *miss* discards the subtree and
compacts the draft KV to the prefix + accepted path (`DraftEngine.commit`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from specedge.core.draft import NOT_CACHED, DraftEngine, DraftSequence, TreeBuilder, TreeShape
from specedge.core.tree import ROOT_PARENT, DraftTree


class ProactivePolicy(enum.StrEnum):
    OFF = "off"
    KEEP_DEPTH = "keep-depth"
    ADD_DEPTH = "add-depth"


@dataclass(frozen=True)
class Bet:
    leaf: int  # builder node index of L, a leaf of the sent tree
    token: int  # t, the predicted bonus token
    score: float  # score(L) + log(decay_p) + log q(t | L): the bet's estimated log-probability


@dataclass
class ProactiveDraft:
    """A bet and the subtree grown for it, laid out after the sent tree's block."""

    bet: Bet
    builder: TreeBuilder

    @property
    def started(self) -> bool:
        """Whether the subtree has any draft KV (its root t was forwarded)."""
        return self.builder.root_expanded


def tree_leaves(tree: DraftTree) -> list[int]:
    """Tree node indices of the nodes without children."""
    parents = set(tree.parents)
    return [node for node in range(tree.num_nodes) if node not in parents]


def accepted_nodes(tree: DraftTree, emitted_tokens: Sequence[int], num_accepted: int) -> list[int]:
    """Tree node indices of the accepted path: the first `num_accepted` emitted tokens walked
    down from the root. Raises ValueError when the reply does not fit the tree."""
    child_by_token = {
        (parent, token): node
        for node, (token, parent) in enumerate(zip(tree.tokens, tree.parents, strict=True))
    }
    if not 0 <= num_accepted <= len(emitted_tokens):
        raise ValueError(f"{num_accepted} accepted tokens out of {len(emitted_tokens)} emitted")
    path, current = [], ROOT_PARENT
    for token in emitted_tokens[:num_accepted]:
        node = child_by_token.get((current, token))
        if node is None:
            raise ValueError(f"accepted token {token} is not a child of tree node {current}")
        path.append(node)
        current = node
    return path


class ProactiveDrafter:
    """Chooses bets, starts their subtrees and turns a reply into the next tree's builder."""

    def __init__(
        self,
        draft: DraftEngine,
        policy: ProactivePolicy,
        subtree_shape: TreeShape,
        decay_p: float = 0.9,
    ) -> None:
        assert 0.0 < decay_p < 1.0
        self.draft = draft
        self.policy = policy
        self.subtree_shape = subtree_shape
        self.log_decay_p = math.log(decay_p)

    @property
    def enabled(self) -> bool:
        return self.policy != ProactivePolicy.OFF

    def choose_bet(self, builder: TreeBuilder, node_map: Sequence[int], tree: DraftTree) -> Bet:
        """The best (leaf, next token) bet on the sent tree; forwards the leaves not expanded
        yet (one draft step), which also gives them the draft KV a subtree hangs from."""
        leaves = [node_map[node] for node in tree_leaves(tree)]
        builder.expand([i for i in leaves if builder.nodes[i].block_index == NOT_CACHED])
        best_child: dict[int, int] = {}
        leaf_set = set(leaves)
        for i, node in enumerate(builder.nodes):
            if node.parent in leaf_set:
                current = best_child.get(node.parent)
                if current is None or node.score > builder.nodes[current].score:
                    best_child[node.parent] = i
        # A child's score already holds score(L) + log q(t | L) + log(decay).
        child = max(best_child.values(), key=lambda i: builder.nodes[i].score)
        log_decay = math.log(builder.shape.decay)
        score = builder.nodes[child].score - log_decay + self.log_decay_p
        return Bet(builder.nodes[child].parent, builder.nodes[child].token, score)

    def start(self, builder: TreeBuilder, bet: Bet) -> ProactiveDraft:
        """A builder for t's subtree, laid out after `builder`'s block with t hanging from L;
        its steps are the caller's to run."""
        subtree = TreeBuilder(
            builder.runner,
            builder.seq,
            self.subtree_shape,
            cached_parents=list(builder.block_parents),
            pending=[bet.token],
            attach=builder.nodes[bet.leaf].block_index,
        )
        return ProactiveDraft(bet, subtree)

    @staticmethod
    def is_hit(
        proactive: ProactiveDraft | None, accepted: Sequence[int], emitted_tokens: Sequence[int]
    ) -> bool:
        """The accepted path (builder indices) ends at the bet's leaf and the bonus is t."""
        return (
            proactive is not None
            and proactive.started
            and bool(accepted)
            and accepted[-1] == proactive.bet.leaf
            and len(emitted_tokens) == len(accepted) + 1
            and emitted_tokens[-1] == proactive.bet.token
        )

    def resolve(
        self,
        seq: DraftSequence,
        builder: TreeBuilder,
        proactive: ProactiveDraft | None,
        accepted: Sequence[int],  # builder node indices of the accepted path
        emitted_tokens: Sequence[int],
        max_depth: int | None = None,  # the server's tree depth cap (bounds add-depth)
    ) -> tuple[TreeBuilder, bool]:
        """Commit a round's reply and return the next tree's builder and whether the bet hit."""
        if proactive is not None and self.is_hit(proactive, accepted, emitted_tokens):
            seq.lookup_stats.record(*builder.lookup, emitted_tokens)  # commit does it on a miss
            shape = self._next_shape(proactive.builder, max_depth)
            return self.draft.splice(seq, proactive.builder, emitted_tokens, shape), True
        self.draft.commit(seq, builder, accepted, emitted_tokens)
        return self.draft.builder(seq), False

    def _next_shape(self, subtree: TreeBuilder, max_depth: int | None) -> TreeShape:
        """keep-depth: the tree keeps its depth and continues from the subtree's steps;
        add-depth: `depth` more levels on top of them (within the server's cap)."""
        shape = self.draft.shape
        if self.policy != ProactivePolicy.ADD_DEPTH:
            return shape
        depth = shape.depth + subtree.steps
        if max_depth is not None:
            depth = min(depth, max_depth)
        return replace(shape, depth=depth)
