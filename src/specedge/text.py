"""Text <-> token ids: prompt files, prompt encoding (with or without the chat template) and
incremental decoding for streaming (emits only text that can no longer change)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specedge.errors import InvalidRequestError


def read_prompt_file(path: Path, flag: str) -> list[str]:
    """One prompt per line, or JSON Lines with a 'prompt' field (blank lines skipped); `flag`
    names the option that gave the file in error messages."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise InvalidRequestError(f"cannot read {flag} {path}: {error.strerror}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InvalidRequestError(
                    f"{path}:{number}: expected a JSON object with a 'prompt' field"
                ) from None
        else:
            prompts.append(line)
    if not prompts:
        raise InvalidRequestError(f"{flag} {path} holds no prompts")
    return prompts


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool) -> list[int]:
    """Token ids of `prompt`: as one user message through the chat template (with the
    generation prompt) when `chat`, else with the tokenizer's defaults."""
    if not prompt.strip():
        raise InvalidRequestError("the prompt is empty")
    if chat:
        return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt)["input_ids"])


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; send a plain prompt")
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers v5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


class IncrementalDecoder:
    """Decodes a growing token list; `add` returns the newly final text. Text ending in an
    incomplete UTF-8 sequence (shown as U+FFFD) is held back until it completes.

    Each call decodes a short window, not the whole list (which made a 128-token stream cost
    128 decodes of 64 tokens on average, a tenth of a busy server's core): the tokens since the
    last emission behind the previous emission's tokens as context (so that tokenizers which
    drop a leading space at the start of a decode, SentencePiece's, still place it), keeping
    the text past the context's own decode (the scheme of vLLM's detokenizer). Where the
    window's text does not extend the context's, the whole list is decoded instead."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.emitted = 0  # characters already returned
        self._returned: list[str] = []  # the text returned, in order
        # The window is tokens[context_start:]; tokens[context_start:context_end] were
        # emitted already and serve as context.
        self._context_start = 0
        self._context_end = 0

    def add(self, tokens: Sequence[int]) -> str:
        self.tokens.extend(tokens)
        new = self._pending()
        if not new or new.endswith("\ufffd"):
            return ""
        self._returned.append(new)
        self.emitted += len(new)
        self._context_start, self._context_end = self._context_end, len(self.tokens)
        return new

    def text(self) -> str:
        """Everything decoded so far, an incomplete tail included."""
        return "".join(self._returned) + self._pending()

    def _pending(self) -> str:
        """The text of the tokens not emitted yet."""
        context = self._decode(self.tokens[self._context_start : self._context_end])
        window = self._decode(self.tokens[self._context_start :])
        if window.startswith(context):
            return window[len(context) :]
        return self._decode(self.tokens)[self.emitted :]

    def _decode(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens))
