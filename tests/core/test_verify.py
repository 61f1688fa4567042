"""Sample-then-match verification on hand-built trees and samples: full acceptance, rejection
at the root, the bonus token, stop tokens (nothing after them), the max-tokens cut, and the
accepted node indices; plus invariants on random trees and samples."""

from __future__ import annotations

import random

import pytest

from specedge.core.tree import ROOT_PARENT
from specedge.core.verify import (
    FINISH_LENGTH,
    FINISH_STOP,
    VerifyResult,
    verdict_from_reply,
    verify_tree,
)
from tests.support.trees import random_tree

#   root ── 10 (node 0) ── 11 (node 2) ── 12 (node 3)
#       └── 20 (node 1) ── 21 (node 4)
#                      └── 22 (node 5)
TOKENS = [10, 20, 11, 12, 21, 22]
PARENTS = [ROOT_PARENT, ROOT_PARENT, 0, 2, 1, 1]
NO_STOP: frozenset[int] = frozenset()
EOS = 2


def run(
    samples_by_node: dict[int, int],
    *,
    stop: frozenset[int] = NO_STOP,
    max_new_tokens: int = 100,
    tokens: list[int] = TOKENS,
    parents: list[int] = PARENTS,
) -> VerifyResult:
    """Verify with the given draws ({node: token}, ROOT_PARENT for the root); draws not given
    are a token no node holds, so that an unexpected read shows up as a wrong output."""
    samples = [samples_by_node.get(node, 999) for node in range(ROOT_PARENT, len(tokens))]
    return verify_tree(tokens, parents, samples, stop_token_ids=stop, max_new_tokens=max_new_tokens)


def test_full_acceptance_ends_with_a_bonus_token() -> None:
    result = run({ROOT_PARENT: 10, 0: 11, 2: 12, 3: 77})
    assert result == VerifyResult([10, 11, 12, 77], [0, 2, 3], None)
    assert result.num_accepted == 3


def test_rejection_at_the_root_emits_only_the_root_sample() -> None:
    result = run({ROOT_PARENT: 30, 0: 11, 2: 12})
    assert result == VerifyResult([30], [], None)


def test_partial_acceptance_on_the_second_branch() -> None:
    assert run({ROOT_PARENT: 20, 1: 22, 5: 40}) == VerifyResult([20, 22, 40], [1, 5], None)
    # Rejection below an accepted node: the bonus replaces the drafted child.
    assert run({ROOT_PARENT: 20, 1: 23}) == VerifyResult([20, 23], [1], None)
    assert run({ROOT_PARENT: 10, 0: 20}) == VerifyResult([10, 20], [0], None)


def test_empty_tree_is_one_autoregressive_step() -> None:
    assert run({ROOT_PARENT: 5}, tokens=[], parents=[]) == VerifyResult([5], [], None)


def test_stop_token_mid_path_ends_emission() -> None:
    """A stop token drafted and accepted mid-path: it is emitted, nothing after it."""
    tokens, parents = [10, EOS, 11], [ROOT_PARENT, 0, 1]
    result = run(
        {ROOT_PARENT: 10, 0: EOS, 1: 11, 2: 12},
        stop=frozenset({EOS}),
        tokens=tokens,
        parents=parents,
    )
    assert result == VerifyResult([10, EOS], [0, 1], FINISH_STOP)


def test_stop_token_as_the_bonus() -> None:
    result = run({ROOT_PARENT: 10, 0: EOS}, stop=frozenset({EOS}))
    assert result == VerifyResult([10, EOS], [0], FINISH_STOP)


def test_stop_token_at_the_root() -> None:
    assert run({ROOT_PARENT: EOS, 0: 11}, stop=frozenset({EOS})) == VerifyResult(
        [EOS], [], FINISH_STOP
    )


def test_any_of_several_stop_tokens() -> None:
    result = run({ROOT_PARENT: 10, 0: 11, 2: 12}, stop=frozenset({EOS, 11}))
    assert result == VerifyResult([10, 11], [0, 2], FINISH_STOP)


@pytest.mark.parametrize(
    ("max_new_tokens", "emitted", "accepted"),
    [
        (1, [10], [0]),
        (2, [10, 11], [0, 2]),
        (3, [10, 11, 12], [0, 2, 3]),
        (4, [10, 11, 12, 77], [0, 2, 3]),  # the cut falls on the bonus token
    ],
)
def test_max_new_tokens_cut(max_new_tokens: int, emitted: list[int], accepted: list[int]) -> None:
    result = run({ROOT_PARENT: 10, 0: 11, 2: 12, 3: 77}, max_new_tokens=max_new_tokens)
    assert result == VerifyResult(emitted, accepted, FINISH_LENGTH)


def test_no_cut_when_the_allowance_is_not_reached() -> None:
    result = run({ROOT_PARENT: 10, 0: 11, 2: 12, 3: 77}, max_new_tokens=5)
    assert result.finish_reason is None and len(result.emitted_tokens) == 4


def test_invariants_on_random_trees() -> None:
    """Accepted nodes form a path from the root; each emitted token is the target's draw at
    the previous emitted node; the walk stops exactly where the rules say."""
    for seed in range(500):
        check_invariants(seed)


def check_invariants(seed: int) -> None:
    rng = random.Random(seed)
    vocab = rng.choice([3, 5, 8])
    tokens, parents = random_tree(rng, vocab, rng.randint(0, 15))
    samples = [rng.randrange(vocab) for _ in range(len(tokens) + 1)]
    stop = frozenset(rng.sample(range(vocab), rng.randint(0, 1)))
    max_new_tokens = rng.randint(1, 8)
    result = verify_tree(
        tokens, parents, samples, stop_token_ids=stop, max_new_tokens=max_new_tokens
    )
    emitted, accepted = result.emitted_tokens, result.accepted_nodes

    previous = ROOT_PARENT
    for node in accepted:
        assert parents[node] == previous
        previous = node
    path = [ROOT_PARENT, *accepted]
    for i, token in enumerate(emitted):
        assert token == samples[path[i] + 1]
        if i < len(accepted):
            assert tokens[accepted[i]] == token
    assert 1 <= len(emitted) <= max_new_tokens
    assert len(accepted) in (len(emitted), len(emitted) - 1)
    assert not stop & set(emitted[:-1])
    if emitted[-1] in stop:
        assert result.finish_reason == FINISH_STOP
    elif len(emitted) == max_new_tokens:
        assert result.finish_reason == FINISH_LENGTH
    else:
        assert result.finish_reason is None
        last = path[len(emitted) - 1]
        assert len(accepted) == len(emitted) - 1
        assert (last, emitted[-1]) not in set(zip(parents, tokens, strict=True))


def test_verdict_from_reply_walks_the_accepted_tokens() -> None:
    """A remote verifier's reply (emitted tokens, how many accepted) as tree indices."""
    tokens, parents = (5, 6, 7, 8), (-1, -1, 0, 2)
    verdict = verdict_from_reply(tokens, parents, [5, 7, 8, 1], 3, None)
    assert verdict.accepted_nodes == [0, 2, 3] and verdict.emitted_tokens == [5, 7, 8, 1]
    assert verdict_from_reply(tokens, parents, [9], 0, "stop").accepted_nodes == []
    with pytest.raises(ValueError, match="not a child"):
        verdict_from_reply(tokens, parents, [6, 7, 1], 2, None)  # 7 is not a child of 6
    with pytest.raises(ValueError, match="accepted tokens"):
        verdict_from_reply(tokens, parents, [5], 2, None)
