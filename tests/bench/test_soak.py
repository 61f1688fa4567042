"""The soak test (`benchmarks/soak.py`) never rots: a short run with tiny models on disk goes
through every fault (server and edge SIGKILLed and restarted, a partition, clients hanging up,
slow readers) and writes its report; and its judge attributes errors to faults, flags wrong
answers and measures memory growth the way its report says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.soak_report import (
    FaultRecord,
    MemorySample,
    Reference,
    SoakRequest,
    attributed_fault,
    memory_growth,
    outcome,
    summarize_requests,
)
from tests.support.models import TARGET_SEED, random_hf_model, tiny_hf_config, word_tokenizer

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Reference("w5 w7 w9", completion_tokens=3, finish_reason="length")
EDGE_KILL = FaultRecord("edge-kill", "edge 0", 10.0, 20.0, "", edge=0)
PARTITION = FaultRecord("partition", "link to server B", 100.0, 115.0, "")


def request(**fields: object) -> SoakRequest:
    settings: dict[str, object] = {
        "client": 0, "edge": 0, "prompt": 0, "behaviour": "normal", "start_s": 0.0,
        "end_s": 5.0, "first_token_s": 1.0, "text": "w5 w7 w9", "completion_tokens": 3,
        "finish_reason": "length", "disconnected": False, "error_kind": None, "error": None,
    }  # fmt: skip
    return SoakRequest(**(settings | fields))  # type: ignore[arg-type]


def test_outcomes_need_the_reference_text_tokens_and_finish_reason() -> None:
    assert outcome(request(), REFERENCE) == "correct"
    assert outcome(request(text="w5 w7 w8"), REFERENCE) == "wrong"
    assert outcome(request(completion_tokens=4), REFERENCE) == "wrong"  # a duplicated token
    assert outcome(request(finish_reason="stop"), REFERENCE) == "wrong"
    assert outcome(request(completion_tokens=None), REFERENCE) == "wrong"  # no usage
    assert outcome(request(text="w5 w7", disconnected=True), REFERENCE) == "disconnected"
    assert outcome(request(text="w5 w8", disconnected=True), REFERENCE) == "wrong"
    assert outcome(request(error_kind="http-503"), REFERENCE) == "error"


def test_errors_are_attributed_to_a_fault_that_could_cause_them() -> None:
    faults = [EDGE_KILL, PARTITION]
    broken = request(error_kind="connection-broken", end_s=12.0)
    assert attributed_fault(broken, faults) == 0
    assert attributed_fault(request(error_kind="connection-broken", end_s=45.0), faults) == 0
    # Too long after the recovery, on the edge that was not killed, before any fault.
    assert attributed_fault(request(error_kind="connection-broken", end_s=60.0), faults) is None
    assert attributed_fault(request(error_kind="connection-broken", end_s=12.0, edge=1),
                            faults) is None  # fmt: skip
    assert attributed_fault(request(error_kind="http-503", end_s=5.0), faults) is None
    # The latest fault in whose window it falls; an unclean ending is never explained.
    assert attributed_fault(request(error_kind="error-event", edge=1, end_s=110.0), faults) == 1
    assert attributed_fault(request(error_kind="truncated", end_s=12.0), faults) is None
    assert attributed_fault(request(error_kind="timeout", end_s=12.0), faults) is None


def test_summary_counts_by_cause_and_fails_on_unexplained_or_wrong() -> None:
    requests = [
        request(),
        request(error_kind="connection-broken", end_s=12.0),
        request(text="w5 w7", disconnected=True, behaviour="disconnect"),
    ]
    summary = summarize_requests(requests, [REFERENCE], [EDGE_KILL])
    assert summary.passed
    assert summary.outcomes == {"correct": 1, "error": 1, "disconnected": 1}
    assert summary.errors_by_cause == {"edge-kill": {"connection-broken": 1}}
    assert summary.errors_by_fault == {0: 1}
    assert summary.latency_s["p50"] == 5.0 and summary.latency_s["ttft_p50"] == 1.0

    unexplained = summarize_requests([request(error_kind="http-503")], [REFERENCE], [EDGE_KILL])
    assert not unexplained.passed and unexplained.errors_by_cause == {
        "unexplained": {"http-503": 1}
    }
    assert not summarize_requests([request(text="w5")], [REFERENCE], []).passed


def test_memory_growth_per_lifetime_after_its_own_warm_up() -> None:
    mib = 2**20
    flat = [MemorySample(t, "server B", 7, 1000 * mib) for t in range(0, 400, 5)]
    growing = [MemorySample(t, "edge 1", 8, (500 + t) * mib) for t in range(0, 400, 5)]
    # Growth within a lifetime's warm-up (100 s from its first sample) does not count, for a
    # process restarted at t = 150 too; a lifetime too short after it is left out.
    restarted = [MemorySample(t, "server A", 9, (100 if t < 250 else 900) * mib)
                 for t in range(150, 500, 5)]  # fmt: skip
    short = [MemorySample(t, "edge 0", 10, 800 * mib) for t in range(300, 400, 5)]
    samples = flat + growing + restarted + short
    growths = {g.process: g for g in memory_growth(samples, warmup_s=100.0)}
    assert set(growths) == {"server B", "edge 1", "server A"}
    assert growths["server B"].growth == 0.0 and growths["server A"].growth == 0.0
    assert growths["server A"].pid == 9 and growths["server A"].span_s == 245.0
    # medians: t in [100, 160) 627.5 MiB, t in (335, 395] 867.5 MiB
    assert growths["edge 1"].growth == pytest.approx(867.5 / 627.5 - 1)


@pytest.mark.slow
def test_a_short_soak_runs_every_fault_and_passes(tmp_path: Path) -> None:
    model = tmp_path / "tiny"
    random_hf_model(tiny_hf_config(), TARGET_SEED).save_pretrained(model)
    word_tokenizer().save_pretrained(model)
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": " ".join(f"w{(7 * n + 3 * k) % 250 + 2}" for k in range(6))}
             for n in range(4)]  # fmt: skip
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "soak"
    command = [
        sys.executable, "-m", "benchmarks.soak", "--model", str(model), "--draft", str(model),
        "--prompts", str(prompts), "--num-prompts", "4", "--max-tokens", "24",
        "--clients", "4", "--duration", "9", "--fault-every", "1.5", "--partition", "2.5",
        "--down", "0.5", "--reply-timeout", "1.5", "--failover-timeout", "10",
        "--sample-every", "1", "--warmup", "0", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {fault["kind"] for fault in results["faults"]} == {
        "server-kill", "edge-kill", "partition", "client-disconnect", "slow-reader",
    }  # fmt: skip
    verdicts = {check["key"]: check["passed"] for check in results["checks"]}
    assert verdicts["requests"] and verdicts["slots"] and verdicts["crashes"]
    assert verdicts["memory"] is not False  # 9 s are too short to measure it
    outcomes = results["summary"]["outcomes"]
    assert outcomes["correct"] > 0 and outcomes.get("wrong", 0) == 0
    behaviours = {r["behaviour"] for r in results["requests"]}
    assert {"normal", "disconnect", "slow"} <= behaviours
    assert all(entry["open_sessions"] == 0 for entry in results["slots"].values())
    assert (out / "report.md").read_text().startswith("# Soak test")
    assert (out / "memory_over_time.png").stat().st_size > 0
