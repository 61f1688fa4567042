"""Process placement, pinned subprocesses (the benchmark's and the demo's unpinned ones), their
logs on failure, and Prometheus counter scraping."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from specedge.bench.processes import (
    BenchProcessError,
    ManagedProcess,
    Placement,
    managed,
    parse_counter,
)

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


def test_an_unpinned_process_keeps_the_cores_and_thread_settings(tmp_path: Path) -> None:
    """The demo's processes: every core this process may use, torch's own thread count."""
    script = "import os; print(sorted(os.sched_getaffinity(0)), os.environ.get('OMP_NUM_THREADS'))"
    log = tmp_path / "probe.log"
    process = ManagedProcess("probe", ["-c", script], log, None, single_thread=False)
    assert process.process.wait(timeout=30) == 0
    ours = f"{sorted(os.sched_getaffinity(0))} {os.environ.get('OMP_NUM_THREADS')}"
    assert process.log_path.read_text().strip() == ours


def test_a_failed_block_shows_every_log_and_stops_every_process(tmp_path: Path) -> None:
    sleeper = "import time; print('loaded {}', flush=True); time.sleep(60)"
    failures = io.StringIO()
    with pytest.raises(RuntimeError, match="no answer"), managed([], failures) as processes:
        for name in ("server", "edge"):
            args = ["-c", sleeper.format(name)]
            processes.append(ManagedProcess(name, args, tmp_path / f"{name}.log", None))
        deadline = time.monotonic() + 30
        while not all("loaded" in process.log_tail() for process in processes):
            assert time.monotonic() < deadline, "the probes did not start"
            time.sleep(0.05)
        raise RuntimeError("no answer")
    assert failures.getvalue().splitlines() == [
        "--- edge log (last lines) ---", "loaded edge",
        "--- server log (last lines) ---", "loaded server",
    ]  # fmt: skip
    assert all(process.process.poll() is not None for process in processes)


def test_a_process_error_is_not_shown_twice(tmp_path: Path) -> None:
    """A `BenchProcessError` already carries the failing process's log."""
    failures = io.StringIO()
    script = "import sys; print('model not found'); sys.exit(2)"
    with pytest.raises(BenchProcessError, match="model not found"), managed([], failures) as ps:
        ps.append(ManagedProcess("server", ["-c", script], tmp_path / "server.log", None))
        ps[0].process.wait(timeout=30)
        ps[0].check_alive()
    assert failures.getvalue() == ""
