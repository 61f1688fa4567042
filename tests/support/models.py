"""Tiny random-weight models of every supported family, tiny tokenizers for them, plain causal
reference forwards, and the bundled SmolLM2 model.

Random weights are drawn on purpose far from Hugging Face's initialisation (norm weights near 1
but not 1, non-zero biases, logits with a spread of a few nats), so that a wrong norm, bias or
rotary detail changes the logits instead of hiding under near-uniform outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from specedge.model.config import ModelConfig
from specedge.model.kv_cache import KVCache
from specedge.model.loader import LoadedModel, build_model, load_model
from specedge.model.transformer import Transformer, chain_batch
from specedge.model.weights import convert_hf_state_dict

TINY_VOCAB = 256
WORD_EOS = 1  # the end-of-sequence id of `word_tokenizer`
TARGET_SEED = 11  # the seed of the tiny target; drafts use other seeds (or this one to agree)
BUNDLED_MODEL = "smollm2-135m"
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


# ---- configs and weights -----------------------------------------------------------------------
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


# ---- tokenizers --------------------------------------------------------------------------------
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


class CharTokenizer:
    """A tokenizer with real text for tiny models: token i is the letter chr(0x100 + i) (all
    printable); other characters map to their code point mod the vocabulary. Its chat template
    is a plain `<role>: text` list. Two instances of the same size share a fingerprint."""

    chat_template = "plain"
    base = 0x100

    def __init__(self, vocab_size: int = TINY_VOCAB, eos_token_id: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id

    def _id(self, char: str) -> int:
        code = ord(char) - self.base
        return code if 0 <= code < self.vocab_size else ord(char) % self.vocab_size

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [self._id(char) for char in text]}

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, tokenize: bool
    ) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return self(text)["input_ids"]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        skip = {self.eos_token_id} if skip_special_tokens else set()
        return "".join(chr(self.base + t) for t in token_ids if t not in skip)

    def get_vocab(self) -> dict[str, int]:
        return {chr(self.base + i): i for i in range(self.vocab_size)}

    @property
    def all_special_tokens(self) -> list[str]:
        return [] if self.eos_token_id is None else [chr(self.base + self.eos_token_id)]


def word_tokenizer(vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """A real (saveable) word-level tokenizer: token i is the word "w<i>", 1 is <eos>."""
    vocab = {"<unk>": 0, "<eos>": WORD_EOS, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


# ---- loaded models -----------------------------------------------------------------------------
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


def tiny_model(
    seed: int = TARGET_SEED, *, vocab: int = TINY_VOCAB, char_tokenizer: bool = False
) -> LoadedModel:
    """A tiny random Llama named "tiny-<seed>" (seed TARGET_SEED is the target); drafts use
    other seeds, or the target's seed for a draft that always agrees with it. With
    `char_tokenizer` it has real text (CharTokenizer) for the HTTP APIs."""
    model = tiny_loaded_model(tiny_hf_config(vocab_size=vocab), seed=seed, name=f"tiny-{seed}")
    return replace(model, tokenizer=CharTokenizer(vocab)) if char_tokenizer else model


def bundled_model() -> LoadedModel:
    """The bundled SmolLM2-135M-Instruct in fp32 (the first load converts the GGUF, ~30 s)."""
    return load_model(BUNDLED_MODEL, dtype=torch.float32)


# ---- reference forwards ------------------------------------------------------------------------
def causal_forward(model: Transformer, sequences: Tensor) -> tuple[Tensor, KVCache]:
    """Plain causal forward of whole sequences ([B, L]) from position 0 in a fresh KV cache
    (sequence b in the b-th slot allocated): the logits ([B, L, V]) and the cache."""
    batch, length = sequences.shape
    kv = KVCache(model.config, num_slots=batch, max_len=length)
    slots = [kv.allocate() for _ in range(batch)]
    flat = chain_batch(kv, [(slot, 0, length) for slot in slots])
    positions = torch.arange(length).repeat(batch)
    with torch.inference_mode():
        logits = model(sequences.flatten(), positions, flat, kv).view(batch, length, -1)
    for slot in slots:
        kv.set_length(slot, length)
    return logits, kv


def causal_logits(model: Transformer, sequences: Tensor) -> Tensor:  # [B, L] -> [B, L, V]
    return causal_forward(model, sequences)[0]
