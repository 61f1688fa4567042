"""The bundled SmolLM2-135M-Instruct (GGUF, dequantized to fp32) through our loader and
transformer generates exactly what transformers generates from the same converted weights."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel

from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.model.loader import LoadedModel
from specedge.text import encode_prompt
from tests.support.models import causal_logits

NUM_NEW_TOKENS = 24
PROMPTS = [
    ("The three primary colors are", False),
    ("Write one sentence about the sea.", True),
]


@pytest.fixture(scope="module")
def hf_smollm2(smollm2: LoadedModel) -> Iterator[PreTrainedModel]:
    yield AutoModelForCausalLM.from_pretrained(smollm2.directory, dtype=torch.float32).eval()


def test_loaded_config(smollm2: LoadedModel) -> None:
    config = smollm2.config
    assert (config.model_type, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings
    assert smollm2.dtype == torch.float32
    assert smollm2.tokenizer.eos_token_id in smollm2.stop_token_ids


def test_prefill_logits_match_transformers(
    smollm2: LoadedModel, hf_smollm2: PreTrainedModel
) -> None:
    tokens = encode_prompt(smollm2.tokenizer, PROMPTS[0][0], chat=False)
    with torch.no_grad():
        expected = hf_smollm2(torch.tensor([tokens])).logits
    actual = causal_logits(smollm2.model, torch.tensor([tokens]))
    torch.testing.assert_close(actual, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize(("prompt", "chat"), PROMPTS, ids=["plain", "chat"])
def test_greedy_continuation_matches_transformers(
    smollm2: LoadedModel, hf_smollm2: PreTrainedModel, prompt: str, chat: bool
) -> None:
    prompt_tokens = encode_prompt(smollm2.tokenizer, prompt, chat=chat)
    if chat:
        assert len(prompt_tokens) > len(smollm2.tokenizer(prompt)["input_ids"]) + 5
    generator = LocalGenerator(smollm2, max_context=256)
    output = generator.generate(
        prompt_tokens, SamplingParams(temperature=0.0), NUM_NEW_TOKENS, smollm2.stop_token_ids
    )
    with torch.no_grad():
        sequences = cast(GenerationMixin, hf_smollm2).generate(
            torch.tensor([prompt_tokens]),
            attention_mask=torch.ones(1, len(prompt_tokens), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NUM_NEW_TOKENS,
            eos_token_id=list(smollm2.stop_token_ids),
            pad_token_id=smollm2.tokenizer.pad_token_id,
        )
    assert isinstance(sequences, torch.Tensor)
    reference = sequences[0, len(prompt_tokens) :].tolist()
    assert output.prompt_tokens == len(prompt_tokens)
    assert output.token_ids == reference
    assert len(reference) >= 8, "the reference stopped too early to be a meaningful comparison"
