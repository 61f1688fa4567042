"""`specedge generate`: load models once, tokenize prompts, stream or print JSON results.

`GenerateSettings` declares the command's options once (`specedge.config_file.setting`):
each field is one `--kebab-case` option with its default and help."""

from __future__ import annotations

import json
import sys
from dataclasses import MISSING, dataclass
from typing import Any

from specedge.config_file import DEFAULT_DEVICE, DEVICE_HELP, MODEL_HELP, setting
from specedge.core.limits import AUTO_BUDGET, BUDGET_HELP, TreeShape, budget_cap, parse_budget
from specedge.errors import InvalidRequestError

_TREE = TreeShape()  # the tree-shape defaults


@dataclass(frozen=True)
class GenerateSettings:
    model: str = setting(MISSING, f"Target model: {MODEL_HELP}.")
    draft: str | None = setting(None, "Draft model (enables --mode spec).")
    chat: bool = setting(False, "Apply the model's chat template.")
    max_tokens: int = setting(128, "New tokens per prompt.")
    temperature: float = setting(0.0, "0 = greedy.")
    top_p: float = setting(1.0, "Nucleus sampling: keep the smallest set of this probability.")
    top_k: int = setting(0, "Keep the k most likely tokens, 0 = off.")
    seed: int | None = setting(None, "Sampling seed (default: random).")
    mode: str | None = setting(None, "ar | spec (default: spec with --draft, else ar).")
    budget: str = setting(AUTO_BUDGET, BUDGET_HELP)
    depth: int = setting(_TREE.depth, "Draft tree depth.")
    width: int = setting(_TREE.width, "Children per expanded node.")
    beams: int = setting(_TREE.beams, "Nodes expanded per draft step.")
    lookup: int = setting(_TREE.lookup, "Context lookup chain length (prompt lookup), 0 = off.")
    device: str = setting(DEFAULT_DEVICE, DEVICE_HELP)
    dtype: str | None = setting(None, "float32|bfloat16|float16 (default: best for the device).")
    json_output: bool = setting(False, "One JSON object per prompt.", flag="json")

    @property
    def decoding(self) -> str:
        return self.mode or ("spec" if self.draft else "ar")

    @property
    def tree_shape(self) -> TreeShape:
        try:
            cap = budget_cap(self.budget)
        except ValueError as error:
            raise InvalidRequestError(f"--budget {error}") from None
        return TreeShape(cap, self.depth, self.width, self.beams, lookup=self.lookup)

    @property
    def adaptive(self) -> bool:
        return parse_budget(self.budget) is None


def run_generate(settings: GenerateSettings, prompts: list[str]) -> None:
    """Generate each prompt's continuation: stream its text, or print one JSON object."""
    # Imported here, not at the top: the command line (`specedge --help`) loads no torch.
    from specedge.core.local import LocalGenerator
    from specedge.core.sampling import SamplingParams
    from specedge.model.loader import load_model, parse_dtype
    from specedge.text import IncrementalDecoder, encode_prompt

    mode, shape = settings.decoding, settings.tree_shape  # the shape checks itself
    if mode not in ("ar", "spec"):
        raise InvalidRequestError(f"--mode must be 'ar' or 'spec', got {mode!r}")
    if mode == "spec" and settings.draft is None:
        raise InvalidRequestError("--mode spec needs --draft")
    if settings.max_tokens < 1:
        raise InvalidRequestError(f"--max-tokens must be >= 1, got {settings.max_tokens}")
    params = SamplingParams(settings.temperature, settings.top_p, settings.top_k, settings.seed)
    if any(not p.strip() for p in prompts):
        raise InvalidRequestError("the prompt is empty")
    dtype = parse_dtype(settings.dtype) if settings.dtype else None
    target = load_model(settings.model, settings.device, dtype)
    draft = None
    if mode == "spec" and settings.draft is not None:
        draft = load_model(settings.draft, settings.device, dtype or target.dtype)
    generator = LocalGenerator(target, draft, shape, adaptive=settings.adaptive)
    for prompt in prompts:
        prompt_tokens = encode_prompt(target.tokenizer, prompt, chat=settings.chat)
        decoder = IncrementalDecoder(target.tokenizer)

        def stream(tokens: list[int], decoder: IncrementalDecoder = decoder) -> None:
            if not settings.json_output:
                sys.stdout.write(decoder.add(tokens))
                sys.stdout.flush()

        output = generator.generate(
            prompt_tokens, params, settings.max_tokens, target.stop_token_ids, stream
        )
        if settings.json_output:
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
