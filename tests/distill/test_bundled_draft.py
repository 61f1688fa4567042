"""The draft shipped with the package: loads by alias, matches the target's tokenizer, is
small on disk, keeps speculative decoding lossless, and training can continue from it."""

from __future__ import annotations

import json

import pytest
import torch

from specedge.core.limits import TreeShape
from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.distill.student import load_draft_student
from specedge.distill.teacher import load_teacher
from specedge.model.loader import ASSETS_DIR, load_model, tokenizer_fingerprint
from specedge.text import encode_prompt
from tests.support.models import causal_logits

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


def test_training_continues_from_the_bundled_draft_where_it_stands(pair: tuple) -> None:
    """`--init-from smollm2-135m-draft`: the student is the bundled draft (its logits over
    the draft's head equal the loaded draft's), keeps its head tokens, and trains only its
    own tensors (those it shares with the target stay frozen)."""
    target, draft = pair
    teacher = load_teacher(target.directory, "cpu", torch.float32)
    student, shared, head = load_draft_student(teacher, BUNDLED)
    meta = json.loads((BUNDLED / "specedge_draft.json").read_text())
    assert head == meta["head_token_ids"] and shared == meta["shared_from_target"]
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and not trainable & set(shared)
    ids = encode_prompt(target.tokenizer, PROMPTS[0], chat=True)
    with torch.no_grad():
        logits = student(torch.tensor([ids])).logits[0, :, head]  # [S, K_head]
    expected = causal_logits(draft.model, torch.tensor([ids]))[0, :, head]
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)
