"""Process placement, pinned subprocesses and Prometheus counter scraping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from specedge.bench.processes import BenchProcessError, ManagedProcess, Placement, parse_counter

METRICS = """# HELP specedge_server_busy_seconds_total Time the model was running.
# TYPE specedge_server_busy_seconds_total counter
specedge_server_busy_seconds_total 12.5
specedge_server_busy_seconds_created 1.7e9
specedge_server_sessions_total{outcome="finished"} 3.0
specedge_server_sessions_total{outcome="refused"} 1.0
"""


def test_parse_counter() -> None:
    assert parse_counter(METRICS, "specedge_server_busy_seconds_total") == 12.5
    assert parse_counter(METRICS, "specedge_server_sessions_total") == 4.0
    assert parse_counter(METRICS, "specedge_server_rounds_total") is None


def test_default_placement_separates_the_server() -> None:
    placement = Placement.plan()
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        assert placement.server_cpus is None and "no pinning" in placement.describe()[0]
        return
    assert placement.server_cpus == {available[0]}
    assert placement.edge_cpus == set(available[1:])
    assert any("server" in line for line in placement.describe())
    with pytest.raises(Exception, match="not available"):
        Placement.plan([10_000])


def test_managed_process_is_pinned_and_single_threaded(tmp_path: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    script = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"
    process = ManagedProcess("probe", ["-c", script], tmp_path / "probe.log", frozenset({cpu}))
    assert process.process.wait(timeout=30) == 0
    assert process.log_path.read_text().strip() == f"[{cpu}] 1"


def test_a_dead_process_fails_with_its_log(tmp_path: Path) -> None:
    script = "import sys; print('model not found'); sys.exit(2)"
    process = ManagedProcess("server", ["-c", script], tmp_path / "server.log", None)
    process.process.wait(timeout=30)
    with pytest.raises(BenchProcessError, match="(?s)exited with status 2.*model not found"):
        process.wait_healthy("http://127.0.0.1:9/health", timeout_s=5)
