"""`specedge export`: a loaded model written as a Hugging Face folder reads back, through
transformers and through our loader, as the same model (same logits, config, tokenizer and stop
tokens); the weight names are the exact inverse of the loader's; bad destinations and models
with no Hugging Face equivalent get their errors."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from specedge.model.config import ModelConfig
from specedge.model.export import ExportError, export_model, hf_config, to_hf_state_dict
from specedge.model.loader import LoadedModel, load_model, tokenizer_fingerprint
from specedge.model.weights import convert_hf_state_dict
from tests.support.models import (
    LLAMA3_ROPE_SCALING,
    WORD_EOS,
    causal_logits,
    random_hf_model,
    tiny_hf_config,
    word_tokenizer,
)

SEED = 5
FAMILIES = {
    "llama": lambda: tiny_hf_config("llama"),
    "llama-tied": lambda: tiny_hf_config("llama", tie_word_embeddings=True),
    "llama3-rope": lambda: tiny_hf_config(
        "llama", rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE_SCALING}
    ),
    "mistral": lambda: tiny_hf_config("mistral", sliding_window=256),
    "qwen2": lambda: tiny_hf_config("qwen2"),
    "qwen2-window": lambda: tiny_hf_config("qwen2", use_sliding_window=True, sliding_window=128),
    "qwen3": lambda: tiny_hf_config("qwen3", head_dim=32),
}


def tiny_loaded(hf: PretrainedConfig, folder: Path) -> LoadedModel:
    """A random-weight model of `hf` saved by transformers (with a word tokenizer) into
    `folder` and loaded from there in fp32, as a user's local model would be."""
    hf.eos_token_id = WORD_EOS
    random_hf_model(hf, SEED).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return load_model(str(folder), dtype=torch.float32)


def tokens(vocab_size: int, length: int = 24) -> torch.Tensor:  # [1, L]
    return torch.randint(2, vocab_size, (1, length), generator=torch.Generator().manual_seed(3))


def hf_logits(directory: Path, sequence: torch.Tensor) -> torch.Tensor:  # [1, L, V]
    hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf_model(sequence).logits


# ---- names and config: the exact inverse of the loader's -----------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_names_invert_the_loaders(family: str) -> None:
    hf_model = random_hf_model(FAMILIES[family](), SEED)
    config = ModelConfig.from_hf(hf_model.config)
    hf_state = dict(hf_model.state_dict())
    if config.tie_word_embeddings:
        del hf_state["lm_head.weight"]  # the embeddings, stored once
    exported = to_hf_state_dict(convert_hf_state_dict(hf_state, config), config)
    assert exported.keys() == hf_state.keys()
    for name, tensor in hf_state.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_config_reads_back_as_the_same_model_config(family: str) -> None:
    config = ModelConfig.from_hf(FAMILIES[family]())
    assert ModelConfig.from_hf(hf_config(config, torch.float32)) == config


# ---- exported folders load back as the same model ------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_export_loads_back_in_transformers_and_specedge(family: str, tmp_path: Path) -> None:
    loaded = tiny_loaded(FAMILIES[family](), tmp_path / "source")
    directory = export_model(loaded, tmp_path / "export")
    sequence = tokens(loaded.config.vocab_size)
    ours = causal_logits(loaded.model, sequence)
    torch.testing.assert_close(hf_logits(directory, sequence), ours, atol=1e-4, rtol=1e-4)
    again = load_model(str(directory), dtype=torch.float32)
    assert again.config == loaded.config
    assert again.stop_token_ids == (WORD_EOS,)
    assert tokenizer_fingerprint(again.tokenizer) == tokenizer_fingerprint(loaded.tokenizer)
    assert (directory / "generation_config.json").read_text() == (
        loaded.directory / "generation_config.json"
    ).read_text()
    torch.testing.assert_close(causal_logits(again.model, sequence), ours, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_bundled_model_export_loads_back(smollm2: LoadedModel, tmp_path: Path) -> None:
    """The bundled SmolLM2 (a GGUF dequantized by the loader, tied embeddings) exported in
    fp32: transformers and our loader read the same model back."""
    directory = export_model(smollm2, tmp_path / "smollm2")
    assert "lm_head.weight" not in _safetensors_names(directory / "model.safetensors")
    sequence = torch.tensor([smollm2.tokenizer("The three primary colors are")["input_ids"]])
    ours = causal_logits(smollm2.model, sequence)
    torch.testing.assert_close(hf_logits(directory, sequence), ours, atol=1e-3, rtol=0)
    again = load_model(str(directory), dtype=torch.float32)
    assert again.config == smollm2.config
    assert again.stop_token_ids == smollm2.stop_token_ids
    assert tokenizer_fingerprint(again.tokenizer) == tokenizer_fingerprint(smollm2.tokenizer)
    torch.testing.assert_close(causal_logits(again.model, sequence), ours, atol=1e-6, rtol=0)


def test_bf16_export_keeps_the_loaded_weights(tmp_path: Path) -> None:
    loaded = tiny_loaded(tiny_hf_config("llama"), tmp_path / "source")
    bf16 = replace(loaded, model=loaded.model.to(torch.bfloat16))
    again = load_model(str(export_model(bf16, tmp_path / "bf16")), dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    for name, tensor in bf16.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name


# ---- errors -------------------------------------------------------------------------------------
def test_a_non_empty_folder_needs_force(tmp_path: Path) -> None:
    loaded = tiny_loaded(tiny_hf_config("llama"), tmp_path / "source")
    directory = tmp_path / "export"
    directory.mkdir()
    (directory / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty.*--force"):
        export_model(loaded, directory)
    assert (directory / "notes.txt").exists()
    export_model(loaded, directory, force=True)
    assert not (directory / "notes.txt").exists()
    assert (directory / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "source"]  # no staging left


def test_a_file_is_no_destination(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.write_text("")
    with pytest.raises(ExportError, match="not a folder"):
        export_model(tiny_loaded(tiny_hf_config("llama"), tmp_path / "source"), path, force=True)


def test_a_reduced_head_has_no_hf_equivalent() -> None:
    config = ModelConfig.from_hf(tiny_hf_config("llama"))
    with pytest.raises(ExportError, match="reduced LM head"):
        hf_config(replace(config, head_token_ids=(0, 1, 2)), torch.float32)


def test_a_tokenizer_that_cannot_be_saved(tmp_path: Path) -> None:
    loaded = tiny_loaded(tiny_hf_config("llama"), tmp_path / "source")
    loaded = replace(loaded, tokenizer=object())
    with pytest.raises(ExportError, match="cannot be saved"):
        export_model(loaded, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ---- the command ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_command(tmp_path: Path) -> None:
    source = tiny_loaded(tiny_hf_config("qwen3", head_dim=32), tmp_path / "source").directory
    out = tmp_path / "out"

    def export(*flags: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "specedge.cli", "export", str(source), str(out), *flags]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)

    first = export("--dtype", "bfloat16")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"wrote {out}"
    assert load_model(str(out)).dtype == torch.bfloat16
    second = export()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.startswith("error: ") and "--force" in second.stderr
    assert export("--force").returncode == 0
    assert load_model(str(out), dtype=torch.float32).config == load_model(str(source)).config


def _safetensors_names(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        return set(weights.keys())
