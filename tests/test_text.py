"""Incremental decoding: the text streamed piece by piece is the text of the whole list."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from specedge.model.loader import LoadedModel
from specedge.text import IncrementalDecoder
from tests.support.models import word_tokenizer

TEXTS = [
    "Hello, world! Ünïcödé 你好世界 🎉🎉 emoji",
    "def f(x):\n    return x ** 2  # squares",
    "naïve café — “quotes” 日本語のテキスト",
]


class ByteTokenizer:
    """Token t is the byte t: a character of several UTF-8 bytes spans several tokens."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")


def stream(tokenizer: Any, ids: list[int], rng: random.Random) -> tuple[str, IncrementalDecoder]:
    decoder, out, start = IncrementalDecoder(tokenizer), "", 0
    while start < len(ids):
        step = rng.randint(1, 4)  # rounds of one to four tokens
        piece = decoder.add(ids[start : start + step])
        assert "\ufffd" not in piece[-1:]  # an incomplete character is held back
        out, start = out + piece, start + step
    return out, decoder


def test_bytes_split_characters_are_held_back_until_complete() -> None:
    rng = random.Random(0)
    for text in TEXTS:
        ids = list(text.encode())
        out, decoder = stream(ByteTokenizer(), ids, rng)
        assert out == text and decoder.text() == text and decoder.emitted == len(text)
    decoder = IncrementalDecoder(ByteTokenizer())
    assert decoder.add([0xC3]) == "" and decoder.text() == "\ufffd"  # the tail shows in text()
    assert decoder.add([0xA9]) == "é"


@pytest.mark.parametrize("source", ["bundled", "words"])
def test_streamed_text_equals_the_whole_decode(source: str, smollm2: LoadedModel) -> None:
    tokenizer = smollm2.tokenizer if source == "bundled" else word_tokenizer()
    rng = random.Random(1)
    for text in TEXTS * 5:
        ids = list(tokenizer(text)["input_ids"])
        ids += [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(30))]  # any ids
        out, decoder = stream(tokenizer, ids, rng)
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert out + decoder.text()[decoder.emitted :] == whole
        assert decoder.text() == whole
