"""Ground truths the tests compare against: the local greedy (or seeded) autoregressive output
of the target, and a slot's KV against a fresh prefill of its tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.model.kv_cache import KVCache
from specedge.model.loader import LoadedModel
from tests.support.models import causal_forward
from tests.support.servers import SERVER_CONFIG

KV_ATOL = 1e-5


def reference_tokens(
    target: LoadedModel,
    prompt: Sequence[int],
    max_tokens: int,
    params: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
) -> list[int]:
    """Plain autoregressive target output, computed locally (greedy unless `params`)."""
    generator = LocalGenerator(target, max_context=SERVER_CONFIG.max_context)
    output = generator.generate(prompt, params or SamplingParams(), max_tokens, stop_token_ids)
    return output.token_ids


def assert_slot_matches_fresh_prefill(
    loaded: LoadedModel, kv: KVCache, slot: int, tokens: list[int]
) -> None:
    """`slot` holds exactly len(tokens) positions, the K/V of a plain causal prefill of
    `tokens` from position 0."""
    length = len(tokens)
    assert kv.lengths[slot] == length
    if not length:
        return
    _, fresh = causal_forward(loaded.model, torch.tensor([tokens]))
    for layer in range(loaded.config.num_layers):
        keys, values = kv.read(layer, slot, length)
        fresh_keys, fresh_values = fresh.read(layer, 0, length)
        torch.testing.assert_close(keys, fresh_keys, atol=KV_ATOL, rtol=0)
        torch.testing.assert_close(values, fresh_values, atol=KV_ATOL, rtol=0)
