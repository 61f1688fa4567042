"""The sizes every part agrees on, in one torch-free module (the command line reads its
defaults from here without loading a model library): the shape of a draft tree, the limits a
verifier announces, the prompt tokens per prefill forward and the default context length."""

from __future__ import annotations

from dataclasses import dataclass, replace

from specedge.errors import InvalidRequestError

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per prefill forward or job: bounds one's stall
DEFAULT_MAX_CONTEXT = 4096  # prompt + generated tokens per request, unless the model allows less


AUTO_BUDGET = "auto"  # `--budget auto`: trees sized by what the verifier takes (core.goodput)
AUTO_BUDGET_CAP = 32  # the most nodes an automatically sized tree drafts
BUDGET_HELP = (
    "Draft tree nodes per round: auto (sized by what the verifier recently verified, at most "
    f"{AUTO_BUDGET_CAP}) or a fixed N (for experiments)."
)


def parse_budget(value: str | int) -> int | None:
    """A `--budget` value: None for auto, else the fixed node count (>= 1); ValueError
    otherwise."""
    text = str(value).strip().lower()
    if text == AUTO_BUDGET:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"must be {AUTO_BUDGET} or a node count >= 1, got {value!r}")
    return int(text)


def budget_cap(value: str | int) -> int:
    """The most nodes a `--budget` value drafts per tree."""
    fixed = parse_budget(value)
    return AUTO_BUDGET_CAP if fixed is None else fixed


@dataclass(frozen=True)
class TreeShape:
    budget: int = 32  # nodes sent per round
    depth: int = 6  # maximum tree depth, and maximum draft steps per tree
    width: int = 4  # children proposed per expanded node
    beams: int = 8  # nodes forwarded per draft step
    decay: float = 0.9
    lookup: int = 8  # context lookup chain length (specedge.core.lookup; capped by depth), 0 = off

    def __post_init__(self) -> None:
        for name in ("budget", "depth", "width", "beams"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"tree {name} must be >= 1, got {getattr(self, name)}")
        if self.lookup < 0:
            raise InvalidRequestError(f"tree lookup must be >= 0, got {self.lookup}")
        if not 0.0 < self.decay < 1.0:
            raise InvalidRequestError(f"tree decay must be in (0, 1), got {self.decay}")

    def sized(self, size: int) -> TreeShape:
        """The shape of a tree sized to `size` nodes: below the budget, no more draft steps
        than nodes (a small tree goes out sooner); at or above it, this shape."""
        if size >= self.budget:
            return self
        nodes = max(size, 1)
        return replace(self, budget=nodes, depth=min(self.depth, nodes))

    @property
    def max_block(self) -> int:
        """Slot positions a round may lay out past the committed prefix (with slack for the
        pending chain and a proactive subtree): forwarded nodes, at most `beams` per step
        plus the lookup chain."""
        return 4 * (self.budget + self.depth * self.beams) + min(self.lookup, self.depth) + 64


@dataclass(frozen=True)
class TreeLimits:
    """What the verifier accepts: nodes per tree, depth, and prompt + generated tokens."""

    max_tree_nodes: int
    max_tree_depth: int
    max_context: int

    def room(self, context_len: int) -> int:
        """Nodes the next tree may have with `context_len` tokens committed: the node cap, and
        no further than the context limit (the only place a tree is fitted to the context)."""
        return max(0, min(self.max_tree_nodes, self.max_context - context_len))
