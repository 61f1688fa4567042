"""The model runner: the batch layout (positions, masks, KV write locations) and the
tree-attention property: every node of a batched tree forward has the logits of a plain causal
forward over the committed prefix followed by that node's path."""

from __future__ import annotations

import random

import pytest
import torch

from specedge.core.model_runner import ModelRunner, TreeRow, build_forward_inputs
from specedge.core.tree import ROOT_PARENT, path_to
from specedge.model.attention import ATTENTION_KERNELS
from specedge.model.loader import LoadedModel
from tests.support.models import causal_logits, tiny_hf_config, tiny_loaded_model
from tests.support.trees import random_tree

ATOL = 1e-4


def test_forward_inputs_positions_and_mask(tiny_model: LoadedModel) -> None:
    """A draft-step row: 2 of the block's 4 nodes are cached, 2 are new, after 3 context
    positions; a second row is a 1-token chain. Rows are concatenated (no padding), a mask
    only where the block is more than one new token, KV writes at the slots' pool indices."""
    runner = ModelRunner(tiny_model, num_slots=2, max_context=32, max_block=8)
    first, second = runner.kv.allocate(), runner.kv.allocate()
    rows = [
        TreeRow(
            slot=second,
            context_len=3,
            parents=[ROOT_PARENT, 0, 0, 1],
            new_tokens=[11, 12],
            num_cached=2,
        ),
        TreeRow(slot=first, context_len=1, parents=[ROOT_PARENT], new_tokens=[13]),
    ]
    inputs = build_forward_inputs(rows, runner.kv)
    assert inputs.tokens.tolist() == [11, 12, 13]
    assert inputs.positions.tolist() == [3 + 1, 3 + 2, 1]  # context_len + depth - 1
    assert inputs.num_new == [2, 1]
    second_base = runner.kv.physical(second, 0, 1).item()
    assert inputs.batch.write_index.tolist() == [second_base + 5, second_base + 6, 1]
    tree_block, chain_block = inputs.batch.sequences
    assert (tree_block.slot, tree_block.first_row, tree_block.num_rows) == (second, 0, 2)
    assert (chain_block.slot, chain_block.first_row, chain_block.num_rows) == (first, 2, 1)
    assert tree_block.kv_len == 7 and chain_block.kv_len == 2
    assert tree_block.mask is not None and chain_block.mask is None
    # Node 2 (child of 0) sees the context, node 0 and itself; node 3 sees 0, 1 and itself.
    assert tree_block.mask[0].tolist() == [1, 1, 1, 1, 0, 1, 0]
    assert tree_block.mask[1].tolist() == [1, 1, 1, 1, 1, 0, 1]


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
@pytest.mark.parametrize("kernel", ATTENTION_KERNELS)
def test_batched_tree_forward_equals_causal_forward_per_path(
    tiny_model: LoadedModel, seed: int, kernel: str
) -> None:
    """Four sequences with different prefix lengths (0 included) and random trees of different
    sizes in ONE forward; then the same trees forwarded in two steps, the second step reading
    the first step's nodes from the cache (as a draft step does). Every attention kernel,
    against the same reference (prefill chunks of one token are decode steps: no mask)."""
    rng = random.Random(seed)
    vocab = tiny_model.config.vocab_size
    prefix_lengths = [0, 1, 6, 19]
    tree_sizes = [rng.randint(2, 6), rng.randint(8, 16), 1 + rng.randint(1, 3), rng.randint(20, 30)]
    runner = ModelRunner(
        tiny_model, num_slots=5, max_context=32, max_block=32, attention_kernel=kernel
    )
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
