"""Model configuration: one frozen dataclass covering the Llama family.

`ModelConfig.from_hf` reads a Hugging Face config (Llama 2/3, Qwen2/2.5, Qwen3, Mistral,
SmolLM2) and rejects anything else with a message naming the supported architectures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from specedge.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    # A reduced LM head (distilled drafts): logits only for these token ids, -inf elsewhere.
    head_token_ids: tuple[int, ...] | None = None

    @property
    def max_context(self) -> int:
        """Longest context the model attends over (a sliding window caps it)."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Build from a transformers `PretrainedConfig` (or anything with the same attributes)."""
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported architecture {model_type!r}: expected one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} "
                "(Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2)"
            )
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        rope = _rope_parameters(hf_config)
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type != "default":
            raise ModelLoadError(
                f"unsupported rope_type {rope_type!r}: expected 'default' or 'llama3'"
            )
        window = getattr(hf_config, "sliding_window", None)
        if model_type in ("qwen2", "qwen3") and not getattr(hf_config, "use_sliding_window", False):
            window = None
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(hf_config.max_position_embeddings),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=window,
        )


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """RoPE settings across transformers versions (`rope_parameters` in v5, else the old fields)."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params)
    merged: dict[str, Any] = dict(getattr(hf_config, "rope_scaling", None) or {})
    merged.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return merged
