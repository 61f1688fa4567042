"""Shared test helpers: tiny random-weight models of every supported family, a minimal
tokenizer for them, plain causal reference forwards, and the bundled SmolLM2 model.

Random weights are drawn on purpose far from Hugging Face's initialisation (norm weights near 1
but not 1, non-zero biases, logits with a spread of a few nats), so that a wrong norm, bias or
rotary detail changes the logits instead of hiding under near-uniform outputs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

from specedge.core.tree import ROOT_PARENT
from specedge.model.config import ModelConfig
from specedge.model.kv_cache import KVCache, KVWrite
from specedge.model.loader import LoadedModel, build_model, convert_hf_state_dict, load_model
from specedge.model.transformer import Transformer

TINY_VOCAB = 256
HF_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Short on purpose: with head_dim 16 the frequencies fall in all three regimes
    # (kept, smoothed, scaled).
    "original_max_position_embeddings": 64,
}

# The tests run many small forwards, on machines whose few cores are shared with other test
# processes: intra-op threads then only add synchronisation (measured 4x slower with 2 threads
# under load). One thread keeps the suite fast and its timing predictable.
torch.set_num_threads(1)


def tiny_hf_config(model_type: str = "llama", **overrides: Any) -> PretrainedConfig:
    """A 2-layer, 64-wide transformers config of `model_type` (GQA: 4 heads, 2 KV heads)."""
    settings: dict[str, Any] = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    settings.update(overrides)
    return HF_CONFIG_CLASSES[model_type](**settings)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded noise: norm weights 1 +- 0.2, biases of std 0.5,
    matrices of std 1/sqrt(fan_in) (so each layer keeps activations of order 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif param.dim() == 1:
                param.copy_(0.5 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)


def random_hf_model(
    hf_config: PretrainedConfig, seed: int, logit_scale: float = 1.0
) -> PreTrainedModel:
    """A transformers causal LM of `hf_config` with seeded random weights, fp32, eval mode.
    `logit_scale` multiplies the output head (peakier distributions, wider argmax margins)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config).float().eval()
    randomize_(model, seed)
    if logit_scale != 1.0:
        assert not hf_config.tie_word_embeddings, "scaling a tied head would scale the inputs"
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)
    return model


def to_specedge(hf_model: PreTrainedModel) -> tuple[ModelConfig, Transformer]:
    """Our model holding the same weights (through the loader's name conversion)."""
    config = ModelConfig.from_hf(hf_model.config)
    state = convert_hf_state_dict(dict(hf_model.state_dict()), config)
    return config, build_model(config, state, "cpu", torch.float32)


class TinyTokenizer:
    """The part of a tokenizer that generation needs, for models without real text: token i
    is the string "<i>". Two instances of the same size share a fingerprint."""

    def __init__(self, vocab_size: int, eos_token_id: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id

    def get_vocab(self) -> dict[str, int]:
        return {f"<{i}>": i for i in range(self.vocab_size)}

    @property
    def all_special_tokens(self) -> list[str]:
        return [] if self.eos_token_id is None else [f"<{self.eos_token_id}>"]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        skip = {self.eos_token_id} if skip_special_tokens else set()
        return "".join(f"<{t}>" for t in token_ids if t not in skip)


def tiny_loaded_model(
    hf_config: PretrainedConfig,
    seed: int,
    *,
    name: str = "tiny",
    stop_token_ids: tuple[int, ...] = (),
    logit_scale: float = 1.0,
) -> LoadedModel:
    """A LoadedModel of random weights (seeded) with a TinyTokenizer, for generation tests."""
    config, model = to_specedge(random_hf_model(hf_config, seed, logit_scale))
    eos = stop_token_ids[0] if stop_token_ids else None
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=TinyTokenizer(config.vocab_size, eos),
        config=config,
        stop_token_ids=stop_token_ids,
        directory=Path(f"/nonexistent/{name}"),
    )


def causal_forward(model: Transformer, sequences: Tensor) -> tuple[Tensor, KVCache]:
    """Plain causal forward of whole sequences ([B, L]) from position 0 in a fresh KV cache
    (sequence b in slot b): the logits ([B, L, V]) and the cache."""
    batch, length = sequences.shape
    kv = KVCache(model.config, num_slots=batch, max_len=length)
    positions = torch.arange(length).expand(batch, length)
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, length, length)
    write = KVWrite(slots=tuple(range(batch)), starts=(0,) * batch)
    with torch.inference_mode():
        return model(sequences, positions, mask, kv, write), kv


def causal_logits(model: Transformer, sequences: Tensor) -> Tensor:  # [B, L] -> [B, L, V]
    return causal_forward(model, sequences)[0]


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


@pytest.fixture(scope="module")
def smollm2() -> Iterator[LoadedModel]:
    """The bundled SmolLM2-135M-Instruct in fp32 (the first load converts the GGUF, ~30 s)."""
    yield load_model("smollm2-135m", dtype=torch.float32)
