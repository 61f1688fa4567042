"""`specedge generate`: load models once, tokenize prompts, stream or print JSON results."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from specedge.core.draft import TreeShape
from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.errors import InvalidRequestError
from specedge.model.loader import load_model, parse_dtype
from specedge.text import IncrementalDecoder, encode_prompt


@dataclass(frozen=True)
class GenerateRequest:
    model: str
    draft: str | None
    prompts: list[str]
    chat: bool
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    mode: str
    shape: TreeShape
    device: str
    dtype: str | None
    json_output: bool


def run_generate(request: GenerateRequest) -> None:
    if request.mode not in ("ar", "spec"):
        raise InvalidRequestError(f"--mode must be 'ar' or 'spec', got {request.mode!r}")
    if request.mode == "spec" and request.draft is None:
        raise InvalidRequestError("--mode spec needs --draft")
    if request.max_tokens < 1:
        raise InvalidRequestError(f"--max-tokens must be >= 1, got {request.max_tokens}")
    params = SamplingParams(request.temperature, request.top_p, request.top_k, request.seed)
    if any(not p.strip() for p in request.prompts):
        raise InvalidRequestError("the prompt is empty")
    dtype = parse_dtype(request.dtype) if request.dtype else None
    target = load_model(request.model, request.device, dtype)
    draft = None
    if request.mode == "spec" and request.draft is not None:
        draft = load_model(request.draft, request.device, dtype or target.dtype)
    generator = LocalGenerator(target, draft, request.shape)
    for prompt in request.prompts:
        prompt_tokens = encode_prompt(target.tokenizer, prompt, chat=request.chat)
        decoder = IncrementalDecoder(target.tokenizer)

        def stream(tokens: list[int], decoder: IncrementalDecoder = decoder) -> None:
            if not request.json_output:
                sys.stdout.write(decoder.add(tokens))
                sys.stdout.flush()

        output = generator.generate(
            prompt_tokens, params, request.max_tokens, target.stop_token_ids, stream
        )
        if request.json_output:
            print(json.dumps(_as_json(output, target.tokenizer)), flush=True)
        else:
            sys.stdout.write("\n")


def _as_json(output: Any, tokenizer: Any) -> dict[str, Any]:
    stats = output.stats
    return {
        "text": tokenizer.decode(output.token_ids, skip_special_tokens=True),
        "token_ids": output.token_ids,
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "finish_reason": output.finish_reason,
        "stats": {
            "rounds": stats.rounds,
            "tokens_per_round": round(stats.tokens_per_round, 4),
            "acceptance_rate": round(stats.acceptance_rate, 4),
            "tokens_per_s": round(stats.tokens_per_s, 3),
            "ttft_ms": round(stats.ttft_ms, 3),
        },
    }
