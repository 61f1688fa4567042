"""Streaming weights into a model (`model.weights`): a checkpoint in shards loads as the same
model as in one file while holding at most about one shard of tensors; every parameter is
written exactly once; and a bad checkpoint fails, before any copy, with a message naming the
tensor."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

import specedge.model.weights as weights
from specedge.errors import ModelLoadError
from specedge.model.config import ModelConfig
from specedge.model.loader import LoadedModel, load_model
from specedge.model.transformer import Transformer
from specedge.model.weights import hf_placements, read_state_dict, safetensors_files
from tests.support.models import (
    causal_logits,
    random_hf_model,
    tiny_hf_config,
    word_tokenizer,
)

SEED = 7
FAMILIES = {
    "llama": lambda: tiny_hf_config("llama"),
    "llama-tied": lambda: tiny_hf_config("llama", tie_word_embeddings=True),
    "qwen2": lambda: tiny_hf_config("qwen2"),
    "qwen3": lambda: tiny_hf_config("qwen3", head_dim=32),
}


def save(hf: PretrainedConfig, folder: Path, shards: int = 1) -> Path:
    """A random model of `hf` saved by transformers, in one file or `shards` files plus the
    index (sharded by size, the way checkpoints on the hub are), with a tokenizer."""
    model = random_hf_model(hf, SEED)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    size = total if shards == 1 else int(0.4 * total)  # 3 shards of the models below
    model.save_pretrained(folder, max_shard_size=size)
    word_tokenizer().save_pretrained(folder)
    assert len(safetensors_files(folder)) == shards
    return folder


def tokens(vocab_size: int) -> torch.Tensor:  # [1, L]
    return torch.randint(0, vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))


def load(folder: Path) -> LoadedModel:
    return load_model(str(folder), "cpu", torch.float32)


# ---- shards ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_three_shards_load_as_the_one_file_model(family: str, tmp_path: Path) -> None:
    whole = load(save(FAMILIES[family](), tmp_path / "one"))
    sharded = load(save(FAMILIES[family](), tmp_path / "three", shards=3))
    assert (tmp_path / "three" / weights.INDEX_FILE).is_file()
    sequence = tokens(whole.config.vocab_size)
    assert torch.equal(causal_logits(sharded.model, sequence), causal_logits(whole.model, sequence))
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(sharded.model.state_dict()[name], tensor), name


class LiveTensors:
    """Bytes of the tensors read from safetensors files that are still referenced, and the
    peak of that sum: what a loader holds of a checkpoint at once (tensors are memory-mapped,
    so this counts what the loader keeps alive, not pages the kernel happens to hold)."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._freed, size)
        return tensor

    def _freed(self, size: int) -> None:
        self.live -= size


@pytest.fixture
def live_tensors(monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveTensors]:
    """Every `safe_open` of `model.weights` counted by a LiveTensors."""
    probe = LiveTensors()
    real_open = weights.safe_open

    class Counted:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.handle = real_open(*args, **kwargs)

        def __enter__(self) -> Counted:
            self.handle.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.handle.keys()

        def get_slice(self, name: str) -> Any:
            return self.handle.get_slice(name)

        def get_tensor(self, name: str) -> torch.Tensor:
            return probe.read(self.handle.get_tensor(name))

    monkeypatch.setattr(weights, "safe_open", Counted)
    yield probe


def shard_bytes(folder: Path) -> list[int]:
    return [
        sum(t.numel() * t.element_size() for t in load_file(file).values())
        for file in safetensors_files(folder)
    ]


def test_loading_holds_at_most_one_shard(live_tensors: LiveTensors, tmp_path: Path) -> None:
    folder = save(tiny_hf_config("qwen3", head_dim=32), tmp_path / "three", shards=3)
    sizes = shard_bytes(folder)
    load(folder)
    assert 0 < live_tensors.peak <= max(sizes) < sum(sizes)
    assert live_tensors.live == 0


def test_the_probe_sees_a_whole_checkpoint_held(live_tensors: LiveTensors, tmp_path: Path) -> None:
    """Power check: reading every tensor at once (`read_state_dict`) peaks at the total."""
    folder = save(tiny_hf_config("qwen3", head_dim=32), tmp_path / "three", shards=3)
    state = read_state_dict(folder)
    assert live_tensors.peak == sum(shard_bytes(folder))
    del state


# ---- placements --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_placements_write_every_parameter_row_exactly_once(family: str) -> None:
    config = ModelConfig.from_hf(FAMILIES[family]())
    with torch.device("meta"):
        params = dict(Transformer(config).named_parameters())
    written = {name: torch.zeros(p.shape[0], dtype=torch.int) for name, p in params.items()}
    for placements in hf_placements(config).values():
        for p in placements:
            if p.name is not None:
                written[p.name][p.offset : p.offset + (p.rows or params[p.name].shape[0])] += 1
    assert all(bool((count == 1).all()) for count in written.values())


# ---- bad checkpoints ---------------------------------------------------------------------------
def rewrite(folder: Path, change: Any) -> None:
    """Apply `change` to the tensors of the folder's single weight file."""
    file = folder / "model.safetensors"
    state = load_file(file)
    change(state)
    save_file(state, file)


def test_a_missing_tensor_is_named(tmp_path: Path) -> None:
    folder = save(tiny_hf_config("llama"), tmp_path / "m")
    rewrite(folder, lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensor.*layers\.1\.mlp\.up_proj\.weight"):
        load(folder)


def test_a_wrong_shape_is_named(tmp_path: Path) -> None:
    folder = save(tiny_hf_config("llama"), tmp_path / "m")
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite(folder, lambda state: state.update({name: state[name][:-1].clone()}))
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight has shape \[31, 64\].*wqkv"):
        load(folder)


def test_a_tensor_without_a_parameter_is_named(tmp_path: Path) -> None:
    folder = save(tiny_hf_config("llama"), tmp_path / "m")
    rewrite(folder, lambda state: state.update({"model.layers.0.mlp.up_proj.bias": torch.ones(2)}))
    with pytest.raises(ModelLoadError, match=r"no parameter for: layers\.0\.mlp\.up_proj\.bias"):
        load(folder)


def test_a_tensor_in_two_shards_is_an_error(tmp_path: Path) -> None:
    folder = save(tiny_hf_config("llama"), tmp_path / "m", shards=3)
    first, second = safetensors_files(folder)[:2]
    name, tensor = next(iter(load_file(first).items()))
    save_file({**load_file(second), name: tensor}, second)
    with pytest.raises(ModelLoadError, match=f"{name.removeprefix('model.')} is stored in two"):
        load(folder)


def test_the_index_decides_which_files_are_weights(tmp_path: Path) -> None:
    """A folder may hold other safetensors (Mistral's consolidated.safetensors): with an
    index only its files load; a file the index names must exist."""
    folder = save(tiny_hf_config("llama"), tmp_path / "m", shards=3)
    save_file({"layers.0.attention.wq.weight": torch.ones(2)}, folder / "consolidated.safetensors")
    load(folder)
    safetensors_files(folder)[0].unlink()
    with pytest.raises(ModelLoadError, match="names missing weight files: model-00001-of-00003"):
        load(folder)


# ---- the output projection's bias --------------------------------------------------------------
def attention_bias_folder(folder: Path, zero: bool) -> Path:
    """A Llama with `attention_bias` (q/k/v and o_proj biases), o_proj's zeroed or not."""
    hf_model = random_hf_model(tiny_hf_config("llama", attention_bias=True), SEED)
    if zero:
        with torch.no_grad():
            for layer in hf_model.model.layers:
                layer.self_attn.o_proj.bias.zero_()
    hf_model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_a_zero_output_bias_loads_as_the_same_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = attention_bias_folder(tmp_path / "m", zero=True)
    loaded = load(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    sequence = tokens(loaded.config.vocab_size)
    with torch.no_grad():
        expected = hf_model(sequence).logits
    torch.testing.assert_close(causal_logits(loaded.model, sequence), expected)


def test_a_nonzero_output_bias_is_refused(tmp_path: Path) -> None:
    folder = attention_bias_folder(tmp_path / "m", zero=False)
    with pytest.raises(ModelLoadError, match=r"o_proj\.bias is not zero.*not supported"):
        load(folder)


# ---- drafts that share tensors with their target ----------------------------------------------
@pytest.mark.slow
def test_the_bundled_draft_takes_its_shared_tensors_from_the_target(
    smollm2: LoadedModel,
) -> None:
    draft = load_model("smollm2-135m-draft", "cpu", torch.float32)
    assert torch.equal(draft.model.embed_tokens.weight, smollm2.model.embed_tokens.weight)
    first, target_first = draft.model.layers[0], smollm2.model.layers[0]
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, target_first.state_dict()[name]), name
    assert draft.config.head_token_ids is not None
    head_rows = smollm2.model.embed_tokens.weight[list(draft.config.head_token_ids)]
    assert torch.equal(draft.model.lm_head.weight, head_rows)
