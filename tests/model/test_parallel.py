"""Tensor parallelism (`model.parallel`): a model split over 2 real gloo ranks on loopback
gives the logits of the whole model in one process, for a batched prefill and for a batch of
trees past it, in every family's layout (grouped-query heads, q/k/v biases, q/k norms, a tied
head); a split the model's shape does not allow is refused with the divisor to pick."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from specedge.model.config import ModelConfig
from specedge.model.loader import build_model
from specedge.model.parallel import TensorParallelError, local_config, shard_tensor
from specedge.model.transformer import Transformer
from specedge.model.weights import convert_hf_state_dict
from tests.support.models import random_hf_model, tiny_hf_config
from tests.support.parallel import prefill_and_tree_logits, sharded_logits

FAMILIES = {
    "llama (grouped-query heads)": tiny_hf_config("llama"),
    "qwen2 (q/k/v biases)": tiny_hf_config("qwen2"),
    "qwen3 (q/k norms, tied head)": tiny_hf_config("qwen3", head_dim=32, tie_word_embeddings=True),
}


def tiny_models(dtype: torch.dtype) -> list[Transformer]:
    models = []
    for seed, hf_config in enumerate(FAMILIES.values()):
        hf_model = random_hf_model(hf_config, seed)
        config = ModelConfig.from_hf(hf_config)
        state = convert_hf_state_dict(dict(hf_model.state_dict()), config)
        models.append(build_model(config, state, "cpu", dtype))
    return models


def test_two_ranks_give_the_logits_of_the_whole_model() -> None:
    models = tiny_models(torch.float32)
    sharded = sharded_logits(models, world_size=2, dtype=torch.float32)
    for family, model, answers in zip(FAMILIES, models, sharded, strict=True):
        expected = prefill_and_tree_logits(model, model.config)
        for what, got, want in zip(("prefill", "tree"), answers, expected, strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{family}: {what}")


def test_bf16_shards_with_packed_weights_agree_with_the_whole_model() -> None:
    """bf16 shards take oneDNN's packed path where this CPU has it (rebuilt for each shard):
    the ranks sum bf16 partial products, so the logits agree to bf16 precision."""
    models = tiny_models(torch.bfloat16)[:1]
    [answers] = sharded_logits(models, world_size=2, dtype=torch.bfloat16)
    expected = prefill_and_tree_logits(models[0], models[0].config)
    for got, want in zip(answers, expected, strict=True):
        torch.testing.assert_close(got, want, atol=0.1, rtol=0.02)
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_shards_of_every_weight_put_back_together_give_the_weight() -> None:
    config = ModelConfig.from_hf(tiny_hf_config("qwen2"))
    model = build_model(
        config,
        convert_hf_state_dict(
            dict(random_hf_model(tiny_hf_config("qwen2"), 0).state_dict()), config
        ),
        "cpu",
        torch.float32,
    )
    shard = local_config(config, 2)
    for name, weight in model.state_dict().items():
        pieces = [shard_tensor(name, weight, config, rank, 2) for rank in range(2)]
        if pieces[0].shape == weight.shape:  # replicated
            assert all(piece is weight for piece in pieces), name
            continue
        assert sum(piece.numel() for piece in pieces) == weight.numel(), name
    qkv = model.layers[0].attention.wqkv.weight
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    rank_one = shard_tensor("layers.0.attention.wqkv.weight", qkv, config, 1, 2)
    q, k, v = rank_one.split([shard.num_heads * config.head_dim] + 2 * [shard.head_dim])
    assert torch.equal(q, qkv[q_dim // 2 : q_dim])  # the second half of the query heads
    assert torch.equal(k, qkv[q_dim + kv_dim // 2 : q_dim + kv_dim])  # with their K/V head
    assert torch.equal(v, qkv[q_dim + kv_dim + kv_dim // 2 :])


def test_local_config_divides_heads_width_and_vocabulary() -> None:
    config = ModelConfig.from_hf(tiny_hf_config("llama"))
    shard = local_config(config, 2)
    assert (shard.num_heads, shard.num_kv_heads) == (2, 1)
    assert (shard.intermediate_size, shard.vocab_size) == (64, 128)
    assert (shard.hidden_size, shard.head_dim, shard.num_layers) == (64, 16, 2)


@pytest.mark.parametrize(
    ("change", "world_size", "message"),
    [
        ({}, 4, "does not divide the model's 2 key-value heads; pick a divisor of 2"),
        ({"num_kv_heads": 4, "intermediate_size": 90}, 4, "90 feed-forward width"),
        ({"vocab_size": 255}, 2, "255 vocabulary"),
        ({"head_token_ids": (1, 2, 3)}, 2, "reduced LM head"),
    ],
)
def test_splits_the_model_does_not_allow_are_refused(
    change: dict[str, object], world_size: int, message: str
) -> None:
    config = replace(ModelConfig.from_hf(tiny_hf_config("llama")), **change)  # type: ignore[arg-type]
    with pytest.raises(TensorParallelError, match=message):
        local_config(config, world_size)
