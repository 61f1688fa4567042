"""`specedge bench --quick` end to end: real servers, edges and proxies, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specedge.bench.config import QUICK
from specedge.bench.plots import PLOT_FILES
from specedge.bench.results import ALL_SYSTEMS, HF_ASSISTED, VLLM_SYSTEMS

REQUIRED_KEYS = {
    "system",
    "clients",
    "rtt_ms",
    "temperature",
    "tokens",
    "server_throughput_tok_s",
    "ttft_ms_mean",
    "itl_ms_mean",
    "itl_ms_p99",
    "tokens_per_round",
    "acceptance_rate",
    "proactive_hit_rate",
    "server_busy_fraction",
    "bytes_per_token",
    "cost_per_mtok_usd",
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_bench_writes_valid_results_and_plots(tmp_path: Path) -> None:
    # From a folder outside the repository, with the bundled prompts: as a new user runs it.
    out = tmp_path / "quick"
    completed = subprocess.run(
        [sys.executable, "-m", "specedge.cli", "bench", "--quick", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())
    notes = json.loads((out / "meta.json").read_text())["notes"]
    systems = {run["system"] for run in runs}
    # Every system ran, except the transformers peer and vLLM, which may be skipped with a note
    # (vLLM where no Python here imports it).
    optional = {HF_ASSISTED, *VLLM_SYSTEMS}
    assert set(ALL_SYSTEMS) - optional <= systems, notes
    assert HF_ASSISTED in systems or any(n.startswith(HF_ASSISTED) for n in notes)
    vllm_note = "vllm, vllm-ngram skipped: "
    assert set(VLLM_SYSTEMS) <= systems or any(n.startswith(vllm_note) for n in notes), notes
    for run in runs:
        assert run.keys() >= REQUIRED_KEYS
        assert run["failed_requests"] == 0, run
        assert run["tokens"] > 0 and run["server_throughput_tok_s"] > 0
        assert run["ttft_ms_mean"] > 0 and run["itl_ms_mean"] > 0
        assert run["cost_per_mtok_usd"] > 0
    specedge = [run for run in runs if run["system"] == "specedge"]
    assert {run["rtt_ms"] for run in specedge} == set(QUICK["rtt_ms"])
    assert {run["clients"] for run in specedge} == set(QUICK["clients"])
    for run in specedge:
        # The draft's tokens get accepted, or the server decoded the session itself (trees
        # did not pay on this machine).
        assert run["tokens_per_round"] > 1.0 or run["streamed_share"] > 0.5, run
        assert run["server_busy_fraction"] is not None and 0 < run["server_busy_fraction"] <= 1
        assert run["server_host_ms_per_token"] > 0  # the server's gRPC work per token
        assert 1 <= run["server_mean_batch"] <= run["clients"]
        assert run["bytes_per_token"] is not None and run["bytes_per_token"] > 0
        assert run["predicted_tokens_per_round"] is None or run["predicted_tokens_per_round"] >= 1
    report = (out / "report.md").read_text()
    assert "## Goodput: SpecEdge against plain batched decoding" in report
    for name in PLOT_FILES:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in report
    assert "## Headline" in report and "| Server throughput, SpecEdge / server-spec |" in report
    requests = (out / "requests.jsonl").read_text().splitlines()
    assert len(requests) == sum(run["requests"] for run in runs)
