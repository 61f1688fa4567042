"""Our transformer against Hugging Face transformers on the same random weights: prefill and
KV-cached decode logits agree within 1e-4 for every supported family and feature (Llama-3 rope
scaling, Qwen2 qkv bias, Qwen3 q/k norm, tied embeddings, GQA); unknown architectures are
rejected with a message naming the supported ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2Config, PretrainedConfig

from specedge.errors import ModelLoadError
from specedge.model import attention
from specedge.model.config import ModelConfig
from specedge.model.kv_cache import KVCache
from specedge.model.loader import build_model, load_model
from specedge.model.transformer import Linear, chain_batch
from specedge.model.weights import convert_hf_state_dict
from tests.support.models import (
    LLAMA3_ROPE_SCALING,
    TINY_VOCAB,
    causal_logits,
    random_hf_model,
    tiny_hf_config,
    to_specedge,
)

ATOL = 1e-4

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3-rope-scaling": ("llama", {"rope_scaling": LLAMA3_ROPE_SCALING, "rope_theta": 5e5}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2-qkv-bias": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    # head_dim 32 != hidden / heads (16), as in Qwen3: the projections are not square.
    "qwen3-qk-norm": ("qwen3", {"head_dim": 32}),
}


def case_config(case: str) -> PretrainedConfig:
    model_type, overrides = CASES[case]
    return tiny_hf_config(model_type, **overrides)


def test_cases_exercise_each_feature() -> None:
    """The parsed configs carry the features the cases are named after."""
    configs = {case: ModelConfig.from_hf(case_config(case)) for case in CASES}
    assert configs["llama3-rope-scaling"].rope_scaling is not None
    assert configs["llama3-rope-scaling"].rope_scaling.factor == 8.0
    assert configs["llama3-rope-scaling"].rope_theta == 5e5
    assert configs["llama-tied"].tie_word_embeddings and configs["qwen2-tied"].tie_word_embeddings
    assert configs["qwen2-qkv-bias"].qkv_bias and not configs["llama"].qkv_bias
    assert configs["qwen3-qk-norm"].qk_norm and configs["qwen3-qk-norm"].head_dim == 32
    assert all(c.num_kv_heads < c.num_heads for c in configs.values())


@pytest.mark.parametrize("case", CASES)
def test_prefill_logits_match_transformers(case: str) -> None:
    hf_model = random_hf_model(case_config(case), seed=1)
    _, model = to_specedge(hf_model)
    tokens = torch.randint(
        0, hf_model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        expected = hf_model(tokens).logits
    actual = causal_logits(model, tokens)
    assert expected.std() > 0.5, "reference logits too flat to discriminate"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", [attention.SDPA, attention.NATIVE])
@pytest.mark.parametrize("case", CASES)
def test_decode_with_kv_cache_matches_transformers(case: str, kernel: str) -> None:
    """Prefill a prompt, then decode one token at a time through the KV cache; each step's
    logits equal transformers' full forward over the sequence so far (decode steps through
    SDPA and through the native kernel)."""
    hf_model = random_hf_model(case_config(case), seed=3)
    config, model = to_specedge(hf_model)
    generator = torch.Generator().manual_seed(4)
    num_prompt, num_steps = 12, 10
    sequence = torch.randint(0, config.vocab_size, (1, num_prompt), generator=generator)
    kv = KVCache(config, num_slots=2, max_len=num_prompt + num_steps, block_size=4)
    kv.allocate(capacity=8)  # slot 0 takes the first blocks, so that pool addressing matters
    slot = kv.allocate()
    batch = chain_batch(kv, [(slot, 0, num_prompt)])
    with torch.inference_mode():
        logits = model(sequence[0], torch.arange(num_prompt), batch, kv)[-1]
    for step in range(num_steps):
        with torch.no_grad():
            expected = hf_model(sequence).logits[0, -1]
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
        next_token = torch.randint(0, config.vocab_size, (1, 1), generator=generator)
        position = num_prompt + step
        sequence = torch.cat([sequence, next_token], dim=1)
        batch = chain_batch(kv, [(slot, position, 1)], kernel)
        with torch.inference_mode():
            logits = model(next_token[0], torch.tensor([position]), batch, kv)[-1]
    assert logits.shape == (config.vocab_size,)


def test_rope_scaling_changes_logits() -> None:
    """Control for the rope-scaling case: at these positions, dropping the Llama-3 scaling
    would move the logits far beyond the tolerance, so the equality above is meaningful."""
    scaled = random_hf_model(case_config("llama3-rope-scaling"), seed=1)
    unscaled = random_hf_model(tiny_hf_config("llama", rope_theta=5e5), seed=1)
    tokens = torch.randint(0, TINY_VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        difference = (scaled(tokens).logits - unscaled(tokens).logits).abs().max()
    assert difference > 100 * ATOL


def test_unknown_architecture_names_the_supported_ones() -> None:
    with pytest.raises(ModelLoadError) as error:
        ModelConfig.from_hf(GPT2Config())
    message = str(error.value)
    assert "gpt2" in message
    for expected in ("llama", "mistral", "qwen2", "qwen3"):
        assert expected in message


def test_load_model_rejects_unknown_architecture_directory(tmp_path: Path) -> None:
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="expected one of llama, mistral, qwen2, qwen3"):
        load_model(str(tmp_path))


def test_unsupported_rope_type_is_rejected() -> None:
    config = tiny_hf_config("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ModelLoadError, match="rope_type 'linear'"):
        ModelConfig.from_hf(config)


def test_bf16_cpu_models_pack_their_linears_without_changing_a_bit() -> None:
    """`build_model` gives CPU bf16 models oneDNN-prepacked linear weights; a prefill (many
    rows) through them equals the plain `F.linear` forward exactly, and fp32 models stay
    unpacked."""
    hf_model = random_hf_model(case_config("qwen2-qkv-bias"), seed=5)
    config = ModelConfig.from_hf(hf_model.config)
    state = convert_hf_state_dict(dict(hf_model.state_dict()), config)
    model = build_model(config, state, "cpu", torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not all(m.packed_weight is not None for m in linears):
        pytest.skip("this torch build has no oneDNN bf16 linear")
    assert not any(
        m.packed_weight is not None
        for m in build_model(config, state, "cpu", torch.float32).modules()
        if isinstance(m, Linear)
    )
    tokens = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(6))

    def prefill() -> torch.Tensor:
        kv = KVCache(config, num_slots=1, max_len=9, dtype=torch.bfloat16)
        batch = chain_batch(kv, [(kv.allocate(), 0, 9)])
        with torch.inference_mode():
            return model(tokens[0], torch.arange(9), batch, kv)

    packed = prefill()
    for m in linears:
        m.packed_weight = None
    assert torch.equal(packed, prefill())
