"""The prepared GPU check (`benchmarks/gpu_check.sh`) never rots: its tiny mode runs the whole
script on the CPU (every verification cell, the draft rounds, the report and its JSON), it
refuses a torch without a GPU with a message saying what to do, and its memory arithmetic
counts what it says it counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.gpu_check as gpu_check
from specedge.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    command = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_tiny_mode_measures_every_cell_and_writes_both_reports(tmp_path: Path) -> None:
    out = tmp_path / "report" / "gpu_check.md"
    done = run_script("--tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = out.read_text()
    for heading in ("## Verification cost", "## Decode step", "## Draft rounds", "## Memory"):
        assert heading in report
    results = json.loads(out.with_suffix(".json").read_text())
    plan = results["plan"]
    cells = {(v["batch"], v["tree_nodes"]): v["seconds"] for v in results["verification"]}
    assert set(cells) == {(b, n) for b in plan["batches"] for n in plan["tree_nodes"]}
    assert all(len(s) == plan["repetitions"] and min(s) > 0 for s in cells.values())
    (draft,) = results["drafts"].values()
    assert [entry["batch"] for entry in draft["rounds"]] == plan["draft_batches"]
    for entry in draft["rounds"]:
        (round_,) = entry["rounds"]
        assert round_["seconds"] > 0 and 1 <= round_["flushes"] <= round_["steps"]
    assert not results["timed_out"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_what_to_do(tmp_path: Path) -> None:
    done = run_script("--out", str(tmp_path / "gpu_check.md"))
    assert done.returncode == 2
    assert "sees no CUDA GPU; install a CUDA build of torch, or run with --tiny" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "gpu_check.md").exists()


def measured(peak: int | None) -> dict[str, object]:
    """Results as `run` returns them, for the memory arithmetic: 40 GB of weights, 1 MB of
    KV per position, trees of up to 64 nodes (a 72-position verification block)."""
    return {
        "plan": {"tree_nodes": [0, 64]},
        "target": {
            "weight_bytes": 40 * 10**9,
            "allocated_bytes": None if peak is None else 41 * 10**9,
            "kv_pool_bytes": 10**9,
            "verification_peak_bytes": peak,
            "kv_bytes_per_position": 10**6,
        },
        "drafts": {
            "d": {"weight_bytes": 4 * 10**9, "kv_bytes_per_position": 10**5, "max_block": 104}
        },
    }


def test_sessions_that_fit_count_weights_transient_memory_and_the_draft() -> None:
    alone = gpu_check.sessions_that_fit(measured(peak=None), None)
    assert alone[1024] == 40 * 10**9 // ((1024 + 72) * 10**6)
    # 3 GB above the weights, the KV pool and what was allocated before: the transient part
    with_transient = gpu_check.sessions_that_fit(measured(peak=45 * 10**9), None)
    assert with_transient[1024] == 37 * 10**9 // ((1024 + 72) * 10**6)
    drafting = gpu_check.sessions_that_fit(measured(peak=None), "d")
    per_session = (1024 + 72) * 10**6 + (1024 + 104) * 10**5
    assert drafting[1024] == 36 * 10**9 // per_session
    assert all(alone[c] >= with_transient[c] >= 0 for c in gpu_check.SESSION_CONTEXTS)


def test_the_shapes_are_the_models_they_are_named_after() -> None:
    """The configs read from the published Hugging Face configs give the same ModelConfig."""
    from transformers import Qwen3Config

    def published(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> object:
        return ModelConfig.from_hf(
            Qwen3Config(
                vocab_size=151936,
                hidden_size=hidden,
                intermediate_size=intermediate,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=8,
                head_dim=128,
                rms_norm_eps=1e-6,
                rope_theta=1000000,
                max_position_embeddings=40960,
                tie_word_embeddings=tied,
            )
        )

    assert published(5120, 17408, 40, 40, tied=False) == gpu_check.TARGET  # Qwen3-14B
    assert gpu_check.DRAFTS["Qwen3-1.7B"] == published(2048, 6144, 28, 16, tied=True)
    assert gpu_check.DRAFTS["Qwen3-0.6B"] == published(1024, 3072, 28, 16, tied=True)
