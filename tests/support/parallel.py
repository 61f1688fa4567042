"""Tensor-parallel ranks for tests: rank 0 in the test process, the others spawned, meeting
on loopback through gloo, each running the same forwards over its shard.

This module imports no transformers, so that a spawned rank starts in a few seconds."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from specedge.core.model_runner import ModelRunner, TreeRow, chain_parents
from specedge.model.config import ModelConfig
from specedge.model.loader import LoadedModel
from specedge.model.parallel import build_shard, local_config
from specedge.model.transformer import Transformer

# Two sequences in every batch: a prompt each, then a tree each (root + nodes) past it.
PROMPTS = ([(7 * i + 3) % 256 for i in range(21)], [(5 * i + 1) % 256 for i in range(13)])
TREE_PARENTS = ([-1, 0, 0, 1, 3, 2], [-1, 0, 1, 1])
TREE_TOKENS = ([11, 200, 37, 5, 90, 64], [17, 3, 250, 128])

HOST = "127.0.0.1"


def prefill_and_tree_logits(model: Transformer, config: ModelConfig) -> list[Tensor]:
    """Logits ([n, V] each) of a batched prefill of PROMPTS, then of a batch of one tree per
    sequence past its prompt: a model's (or a shard's, with its `local_config`) answers."""
    loaded = LoadedModel("model", model, None, config, (), Path())
    runner = ModelRunner(loaded, num_slots=2, max_context=64, max_block=8)
    slots = [runner.kv.allocate() for _ in PROMPTS]
    prefill = [
        TreeRow(slot, 0, chain_parents(len(prompt)), prompt)
        for slot, prompt in zip(slots, PROMPTS, strict=True)
    ]
    prompt_logits = runner.logits(torch.cat(runner.forward(prefill)))
    for slot, prompt in zip(slots, PROMPTS, strict=True):
        runner.kv.set_length(slot, len(prompt))
    roots = [len(prompt) for prompt in PROMPTS]
    trees = [
        TreeRow(slot, root, parents, tokens)
        for slot, root, parents, tokens in zip(slots, roots, TREE_PARENTS, TREE_TOKENS, strict=True)
    ]
    tree_logits = runner.logits(torch.cat(runner.forward(trees)))
    return [prompt_logits, tree_logits]


def run_rank(
    rank: int,
    world_size: int,
    store_port: int,
    configs: Sequence[ModelConfig],
    models: Sequence[Transformer] | None,
    dtype: torch.dtype,
) -> None:
    """The body of a spawned rank: join the group, build this rank's shard of each model
    (received from rank 0) and run `prefill_and_tree_logits` on it, as rank 0 does."""
    torch.set_num_threads(1)
    store = dist.TCPStore(HOST, store_port, world_size, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        shard_answers(configs, models, dtype)
    finally:
        dist.destroy_process_group()
    # Past this point torch's C++ teardown at interpreter exit sometimes aborts (a thread
    # destroyed unjoined) with all work done; as the server's workers, leave without it.
    os._exit(0)


def shard_answers(
    configs: Sequence[ModelConfig], models: Sequence[Transformer] | None, dtype: torch.dtype
) -> list[list[Tensor]]:
    world_size = dist.get_world_size()
    answers = []
    for index, config in enumerate(configs):
        full = models[index] if models is not None else None
        shard = build_shard(full, config, "cpu", dtype)
        answers.append(prefill_and_tree_logits(shard, local_config(config, world_size)))
    return answers


def sharded_logits(
    models: Sequence[Transformer], world_size: int, dtype: torch.dtype
) -> list[list[Tensor]]:
    """Rank 0's answers of every model split over `world_size` gloo ranks; the others are
    spawned processes. Rank 0 hosts the group's store and leaves the group last, once the
    others have exited (a rank whose store vanishes under it aborts as it exits)."""
    store = dist.TCPStore(HOST, 0, world_size, is_master=True, wait_for_workers=False)
    configs = [model.config for model in models]
    context = multiprocessing.get_context("spawn")
    others = [
        context.Process(target=run_rank, args=(rank, world_size, store.port, configs, None, dtype))
        for rank in range(1, world_size)
    ]
    for process in others:
        process.start()
    dist.init_process_group("gloo", store=store, rank=0, world_size=world_size)
    try:
        answers = shard_answers(configs, models, dtype)
    finally:
        for process in others:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        dist.destroy_process_group()
    assert [process.exitcode for process in others] == [0] * len(others), "a rank failed"
    return answers
