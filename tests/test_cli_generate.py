"""`specedge generate` as users run it, in a subprocess: JSON output with every field, prompt
files (plain lines and JSON Lines), autoregressive and speculative modes agreeing at
temperature 0, streamed text, and one-line errors (no traceback) for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from tests.support.models import random_hf_model, tiny_hf_config

pytestmark = pytest.mark.slow

SPECEDGE = str(Path(sys.executable).parent / "specedge")
PROMPTS = ["The capital of France is", "List three fruits:"]
MAX_TOKENS = 12
STATS_KEYS = {"rounds", "tokens_per_round", "acceptance_rate", "tokens_per_s", "ttft_ms"}
TOP_KEYS = {"text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason", "stats"}
SMOLLM2 = ["--model", "smollm2-135m", "--dtype", "float32"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # One intra-op thread: the test machines' few cores are shared with other test processes.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [SPECEDGE, "generate", *args], capture_output=True, text=True, timeout=600, env=env
    )


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("prompts")
    plain = folder / "prompts.txt"
    plain.write_text("\n".join(PROMPTS[:1] + [""] + PROMPTS[1:]) + "\n")  # blank lines skipped
    jsonl = folder / "prompts.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS))
    )
    return {"plain": plain, "jsonl": jsonl}


@pytest.fixture(scope="module")
def ar_outputs(prompt_files: dict[str, Path]) -> list[dict[str, Any]]:
    """Autoregressive greedy run over the plain-lines prompt file."""
    result = run_cli(
        *SMOLLM2, "--prompt-file", str(prompt_files["plain"]), "--max-tokens", str(MAX_TOKENS),
        "--mode", "ar", "--json",
    )  # fmt: skip
    return json_lines(result)


@pytest.fixture(scope="module")
def spec_outputs(prompt_files: dict[str, Path]) -> list[dict[str, Any]]:
    """Speculative greedy run (the target as its own draft) over the JSON Lines prompt file."""
    result = run_cli(
        *SMOLLM2, "--draft", "smollm2-135m", "--mode", "spec",
        "--prompt-file", str(prompt_files["jsonl"]), "--max-tokens", str(MAX_TOKENS),
        "--budget", "8", "--depth", "4", "--width", "2", "--beams", "2", "--json",
    )  # fmt: skip
    return json_lines(result)


def check_output_fields(output: dict[str, Any]) -> None:
    assert set(output) == TOP_KEYS
    assert set(output["stats"]) == STATS_KEYS
    assert isinstance(output["text"], str) and output["text"].strip()
    assert all(isinstance(t, int) for t in output["token_ids"])
    assert output["completion_tokens"] == len(output["token_ids"])
    assert 1 <= output["completion_tokens"] <= MAX_TOKENS
    assert output["prompt_tokens"] > 0
    assert output["finish_reason"] in ("stop", "length")
    if output["finish_reason"] == "length":
        assert output["completion_tokens"] == MAX_TOKENS
    stats = output["stats"]
    assert 0.0 <= stats["acceptance_rate"] <= 1.0
    assert stats["tokens_per_s"] > 0 and stats["ttft_ms"] > 0
    assert stats["tokens_per_round"] >= 1.0


def test_json_output_of_every_prompt(
    ar_outputs: list[dict[str, Any]], spec_outputs: list[dict[str, Any]]
) -> None:
    assert len(ar_outputs) == len(spec_outputs) == len(PROMPTS)
    for output in ar_outputs + spec_outputs:
        check_output_fields(output)
    # The prompts differ, and each output is its own.
    assert ar_outputs[0]["prompt_tokens"] != ar_outputs[1]["prompt_tokens"]
    assert ar_outputs[0]["token_ids"] != ar_outputs[1]["token_ids"]


def test_speculative_equals_autoregressive_at_temperature_zero(
    ar_outputs: list[dict[str, Any]], spec_outputs: list[dict[str, Any]]
) -> None:
    for ar, spec in zip(ar_outputs, spec_outputs, strict=True):
        assert spec["token_ids"] == ar["token_ids"]
        assert spec["text"] == ar["text"]
        assert spec["prompt_tokens"] == ar["prompt_tokens"]
        stats = spec["stats"]
        assert 1 <= stats["rounds"] < spec["completion_tokens"], "the draft never helped"
        assert stats["tokens_per_round"] == pytest.approx(
            spec["completion_tokens"] / stats["rounds"], abs=1e-3
        )
        assert stats["acceptance_rate"] > 0.3


def test_streamed_text_equals_json_text(ar_outputs: list[dict[str, Any]]) -> None:
    result = run_cli(*SMOLLM2, "--prompt", PROMPTS[0], "--max-tokens", str(MAX_TOKENS))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ar_outputs[0]["text"] + "\n"


# ---- bad input ------------------------------------------------------------------------------


def write_tiny_model(folder: Path, words: list[str], max_positions: int, seed: int) -> Path:
    """A random-weight Llama directory (config.json, model.safetensors) with a word-level
    tokenizer over `words` (plus <unk> and <eos>)."""
    vocab = {"<unk>": 0, "<eos>": 1, **{word: i + 2 for i, word in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.save_pretrained(folder)
    config = tiny_hf_config(
        "llama", vocab_size=len(vocab), max_position_embeddings=max_positions, eos_token_id=1
    )
    random_hf_model(config, seed).save_pretrained(folder)
    assert (folder / "model.safetensors").exists()
    return folder


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny models of the same vocabulary size but different tokenizers."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    numbers = [str(n) for n in range(26)]
    return {
        "letters": write_tiny_model(tmp_path_factory.mktemp("letters"), letters, 32, seed=1),
        "numbers": write_tiny_model(tmp_path_factory.mktemp("numbers"), numbers, 32, seed=2),
    }


def test_unknown_model() -> None:
    result = run_cli("--model", "no-such-model", "--prompt", "Hello")
    assert_one_line_error(result, "unknown model 'no-such-model'")


def test_mismatched_tokenizers(tiny_dirs: dict[str, Path]) -> None:
    result = run_cli(
        "--model", str(tiny_dirs["letters"]), "--draft", str(tiny_dirs["numbers"]),
        "--prompt", "a b c",
    )  # fmt: skip
    assert_one_line_error(result, "do not share a tokenizer")


def test_prompt_longer_than_the_context(tiny_dirs: dict[str, Path]) -> None:
    result = run_cli("--model", str(tiny_dirs["letters"]), "--prompt", " ".join(["a"] * 40))
    assert_one_line_error(result, "the prompt has 40 tokens; the context limit is 32")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prompt", "   "], "the prompt is empty"),
        (["--prompt", "Hi", "--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
        (["--prompt", "Hi", "--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    ],
    ids=["empty-prompt", "max-tokens-0", "negative-temperature"],
)
def test_invalid_request(args: list[str], expected: str) -> None:
    assert_one_line_error(run_cli(*SMOLLM2, *args), expected)


def test_prompt_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    assert_one_line_error(
        run_cli(*SMOLLM2, "--prompt-file", str(bad)),
        f"{bad}:2: expected a JSON object with a 'prompt' field",
    )
