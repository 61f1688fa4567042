"""The draft shipped with the package: loads by alias, matches the target's tokenizer, is
small on disk, and keeps speculative decoding lossless."""

from __future__ import annotations

import pytest
import torch

from specedge.core.limits import TreeShape
from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.model.loader import ASSETS_DIR, load_model, tokenizer_fingerprint
from specedge.text import encode_prompt

BUNDLED = ASSETS_DIR / "smollm2-135m-draft"
pytestmark = pytest.mark.skipif(
    not (BUNDLED / "config.json").exists(), reason="the bundled draft is not in this checkout"
)
PROMPTS = ["Write a haiku about autumn leaves.", "What is 17 times 23? Explain your steps."]


@pytest.fixture(scope="module")
def pair() -> tuple:
    target = load_model("smollm2-135m", dtype=torch.float32)
    draft = load_model("smollm2-135m-draft", dtype=torch.float32)
    return target, draft


def test_bundled_draft_loads_by_alias_and_shares_the_tokenizer(pair: tuple) -> None:
    target, draft = pair
    assert tokenizer_fingerprint(draft.tokenizer) == tokenizer_fingerprint(target.tokenizer)
    assert draft.config.vocab_size == target.config.vocab_size
    assert draft.config.num_layers < target.config.num_layers
    logits = draft.model.logits(torch.zeros(1, draft.config.hidden_size))
    assert logits.shape == (1, target.config.vocab_size)


def test_bundled_draft_is_small_on_disk() -> None:
    size = sum(p.stat().st_size for p in BUNDLED.iterdir() if p.is_file())
    assert size < 30e6


@pytest.mark.parametrize("prompt", PROMPTS)
def test_speculative_with_bundled_draft_equals_autoregressive(pair: tuple, prompt: str) -> None:
    target, draft = pair
    ids = encode_prompt(target.tokenizer, prompt, chat=True)
    params = SamplingParams(temperature=0.0)
    spec = LocalGenerator(target, draft, TreeShape(budget=16, depth=4)).generate(
        ids, params, 40, target.stop_token_ids
    )
    ar = LocalGenerator(target).generate(ids, params, 40, target.stop_token_ids)
    assert spec.token_ids == ar.token_ids
    assert spec.stats.rounds < len(spec.token_ids)  # the draft got some tokens accepted
