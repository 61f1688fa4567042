"""Prompt loading and even sampling across categories."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from specedge.bench.prompts import SPECBENCH_FILE as SPEC_BENCH
from specedge.bench.prompts import BenchPrompt, load_prompts, sample_prompts
from specedge.errors import InvalidRequestError


def _prompts(counts: dict[str, int]) -> list[BenchPrompt]:
    return [
        BenchPrompt(f"{category}-{i}", category, f"{category} {i}")
        for category, count in counts.items()
        for i in range(count)
    ]


def test_sampling_is_even_across_categories_and_spread_within() -> None:
    prompts = _prompts({"a": 10, "b": 80, "c": 2})
    picked = sample_prompts(prompts, 7)
    assert Counter(p.category for p in picked) == {"a": 3, "b": 2, "c": 2}
    assert [p.prompt_id for p in picked if p.category == "b"] == ["b-0", "b-40"]
    assert [p.category for p in picked[:3]] == ["a", "b", "c"]  # interleaved
    assert sample_prompts(prompts, 7) == picked  # deterministic
    assert len(sample_prompts(prompts, 1000)) == 92


def test_category_filter() -> None:
    prompts = _prompts({"a": 4, "b": 4})
    assert {p.category for p in sample_prompts(prompts, 3, ["b"])} == {"b"}
    with pytest.raises(InvalidRequestError, match="unknown category z"):
        sample_prompts(prompts, 3, ["z"])


def test_load_first_turns_and_plain_prompts(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    lines = [
        {"question_id": 81, "category": "writing", "turns": ["first", "second"]},
        {"prompt": "plain"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    prompts = load_prompts(path)
    assert prompts == [BenchPrompt("81", "writing", "first"), BenchPrompt("2", "default", "plain")]
    path.write_text('{"text": "no"}\n')
    with pytest.raises(InvalidRequestError, match="turns"):
        load_prompts(path)
    with pytest.raises(InvalidRequestError, match="--prompts"):
        load_prompts(tmp_path / "missing.jsonl")


def test_spec_bench_sample_covers_all_thirteen_categories() -> None:
    picked = sample_prompts(load_prompts(SPEC_BENCH), 16)
    assert len({p.category for p in picked}) == 13


def test_long_prompts_stack_spec_bench_documents_to_about_1500_tokens() -> None:
    prompts = load_prompts("long")
    documents = {p.text for p in load_prompts(SPEC_BENCH) if p.category in ("rag", "summarization")}
    assert len(prompts) >= 16 and prompts == load_prompts("long")  # enough, deterministic
    for prompt in prompts:
        assert 5_600 <= len(prompt.text) <= 6_800 and prompt.category == "long"
        assert any(prompt.text.startswith(document) for document in documents)
    assert len({p.text for p in prompts}) == len(prompts)
