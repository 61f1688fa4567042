"""Helpers for edge tests: tiny random-weight target and drafts sharing a tokenizer, the real
verification server in-process on loopback, a character tokenizer with a chat template (so the
HTTP API has real text), and the local autoregressive reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from conftest import tiny_hf_config, tiny_loaded_model

from specedge.core.generation import GenerationRequest, GenerationStats
from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.edge.app import Edge, build_edge
from specedge.edge.config import EdgeConfig
from specedge.model.loader import LoadedModel
from specedge.server.app import BackgroundServer
from specedge.server.config import ServerConfig

VOCAB = 256
TARGET_SEED = 11
SERVER_CONFIG = ServerConfig(
    model="tiny-target",
    port=0,
    metrics_port=0,
    max_batch=8,
    max_sessions=8,
    max_tree_nodes=32,
    max_tree_depth=12,
    max_context=256,
    prefill_chunk=64,
    session_timeout=30.0,
    shutdown_grace=0.0,
)
EDGE_CONFIG = EdgeConfig(
    model="tiny-draft",
    server="127.0.0.1:1",  # replaced by each test
    port=0,
    budget=12,
    depth=4,
    width=3,
    beams=3,
    proactive_budget=6,
    proactive_depth=2,
    max_sessions=4,
    max_context=256,
    connect_timeout=2.0,
    reply_timeout=20.0,
    startup_timeout=5.0,
)


# ---- models ------------------------------------------------------------------------------------
class CharTokenizer:
    """A tokenizer with real text for tiny models: token i is the letter chr(0x100 + i) (all
    printable); other characters map to their code point mod the vocabulary. Its chat template
    is a plain `<role>: text` list. Two instances of the same size share a fingerprint."""

    chat_template = "plain"
    base = 0x100

    def __init__(self, vocab_size: int = VOCAB, eos_token_id: int | None = None) -> None:
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


def tiny_model(seed: int, *, vocab: int = VOCAB, char_tokenizer: bool = False) -> LoadedModel:
    """A tiny random Llama (seed TARGET_SEED is the target); drafts use other seeds, or the
    target's seed for a draft that always agrees with it."""
    model = tiny_loaded_model(tiny_hf_config(vocab_size=vocab), seed=seed, name=f"tiny-{seed}")
    return replace(model, tokenizer=CharTokenizer(vocab)) if char_tokenizer else model


def reference_tokens(
    target: LoadedModel,
    prompt: Sequence[int],
    max_tokens: int,
    stop_token_ids: Sequence[int] = (),
) -> list[int]:
    """Greedy autoregressive target output computed locally: the ground truth."""
    generator = LocalGenerator(target, max_context=SERVER_CONFIG.max_context)
    return generator.generate(prompt, SamplingParams(), max_tokens, stop_token_ids).token_ids


# ---- processes in threads ------------------------------------------------------------------------
def start_server(target: LoadedModel, **overrides: Any) -> BackgroundServer:
    """The real `specedge serve` server on loopback (free ports), in a thread."""
    return BackgroundServer(replace(SERVER_CONFIG, **overrides).validate(), target).start()


def edge_config(server: BackgroundServer | int, **overrides: Any) -> EdgeConfig:
    port = server if isinstance(server, int) else server.port
    return replace(EDGE_CONFIG, server=f"127.0.0.1:{port}", **overrides).validate()


async def edge_generate(
    edge: Edge,
    prompt: Sequence[int],
    max_tokens: int,
    params: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
) -> tuple[list[int], GenerationStats]:
    """One generation through the edge's round loop: (tokens, stats)."""
    request = GenerationRequest(list(prompt), params or SamplingParams(), max_tokens,
                                tuple(stop_token_ids))  # fmt: skip
    stats = GenerationStats()
    tokens: list[int] = []
    async with aclosing(edge.runtime.generate(request, stats)) as rounds:
        async for emitted in rounds:
            tokens.extend(emitted)
    return tokens, stats


async def with_edge(config: EdgeConfig, draft: LoadedModel, body: Callable[[Edge], Any]) -> Any:
    """Run `body(edge)` (a coroutine function) on a fresh edge, closing it afterwards."""
    edge = build_edge(config, draft)
    try:
        return await body(edge)
    finally:
        await edge.close()
