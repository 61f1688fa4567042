"""results.json, requests.jsonl, report.md and the plots, from synthetic runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from specedge.bench.metrics import Prices, RequestRecord, ServerUsage, compute_run_metrics
from specedge.bench.plots import PLOT_FILES
from specedge.bench.report import headline, rewrite_report, write_report
from specedge.bench.results import (
    BenchMeta,
    RunResult,
    RunSpec,
    find_run,
    read_results,
    reference_rtt,
)

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
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(
    system: str,
    clients: int,
    rtt_ms: float,
    *,
    temperature: float = 0.0,
    wall_s: float,
    itl_s: float,
    tokens_per_round: float,
    busy_s: float,
    edges: bool,
) -> RunResult:
    """`clients` requests of 41 tokens each, one per client, with the given ITL."""
    records = []
    for client in range(clients):
        rounds = round(41 / tokens_per_round)
        records.append(
            RequestRecord(
                client=client,
                prompt_id=str(client),
                category="qa",
                start_s=0.0,
                first_token_s=0.1,
                end_s=0.1 + 40 * itl_s,
                tokens=41,
                rounds=rounds,
                accepted=41 - rounds,
                proactive_hits=2 if edges else 0,
                proactive_attempts=4 if edges else 0,
                chunk_times_s=(0.1, 0.1 + 40 * itl_s),
            )
        )
    usage = ServerUsage(
        wall_s=wall_s,
        busy_s=busy_s,
        edge_engaged_s=tuple(0.1 + 40 * itl_s for _ in range(clients)) if edges else (),
        wire_bytes=41 * clients * 50,
    )
    spec = RunSpec(system, clients, rtt_ms, temperature, depth=6, budget=32)
    return RunResult(spec, compute_run_metrics(records, usage, Prices()), tuple(records))


def _synthetic_runs() -> list[RunResult]:
    runs = []
    for clients in (1, 2):
        for rtt in (0.0, 15.0):
            runs.append(
                _run(
                    "specedge",
                    clients,
                    rtt,
                    wall_s=2.0,
                    itl_s=0.045 + rtt / 1e4,
                    tokens_per_round=3.4,
                    busy_s=1.0,
                    edges=True,
                )
            )
        runs.append(
            _run(
                "specedge-no-proactive",
                clients,
                15.0,
                wall_s=2.2,
                itl_s=0.05,
                tokens_per_round=3.0,
                busy_s=1.1,
                edges=True,
            )
        )
        runs.append(
            _run(
                "server-spec",
                clients,
                0.0,
                wall_s=4.0,
                itl_s=0.05,
                tokens_per_round=3.0,
                busy_s=3.6,
                edges=False,
            )
        )
        runs.append(
            _run(
                "server-ar",
                clients,
                0.0,
                wall_s=6.0,
                itl_s=0.15,
                tokens_per_round=1.0,
                busy_s=5.8,
                edges=False,
            )
        )
    return runs


def test_results_files_hold_every_required_key(tmp_path: Path) -> None:
    runs = _synthetic_runs()
    write_report(tmp_path, runs, BenchMeta(machine={"cpu": "test"}, placement=["all here"]))
    results = json.loads((tmp_path / "results.json").read_text())
    assert isinstance(results, list) and len(results) == len(runs)
    for run in results:
        assert run.keys() >= REQUIRED_KEYS
        assert run.keys() >= {"ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p90"}
    requests = [
        json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().split("\n") if line
    ]
    assert len(requests) == sum(len(r.records) for r in runs)
    assert {"system", "clients", "rtt_ms", "start_s", "chunk_times_s"} <= requests[0].keys()
    loaded, meta = read_results(tmp_path)
    assert [r.as_dict() for r in loaded] == [r.as_dict() for r in runs]
    assert meta.machine == {"cpu": "test"}


def test_plots_are_png_files_embedded_in_the_report(tmp_path: Path) -> None:
    report = write_report(tmp_path, _synthetic_runs(), BenchMeta()).read_text()
    for name in PLOT_FILES:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in report


def test_headline_compares_with_server_spec_like_the_paper() -> None:
    runs = _synthetic_runs()
    rows = {row.claim.split(",")[0]: row for row in headline(runs, 0.0)}
    throughput = headline(runs, 0.0)[0]
    assert throughput.claim == "Server throughput, SpecEdge / server-spec"
    assert throughput.value == pytest.approx(2.0)  # 4.0 s vs 2.0 s for the same tokens
    assert throughput.verdict() == "meets the aim (1.80x); misses the paper (2.22x) by 0.22x"
    busy = rows["Server busy time per token"]
    assert busy.value == pytest.approx(1 - 1.0 / 3.6)
    itl = rows["ITL"]  # SpecEdge at 15 ms (46.5 ms) vs server-spec at 0 ms (50 ms)
    assert itl.value == pytest.approx(1 - 46.5 / 50)
    assert itl.verdict() == "misses the paper (11.2%) by 4.2 points"
    cost = rows["Cost efficiency (server-spec $ / SpecEdge $ per 1M tokens)"]
    server_spec = find_run(runs, "server-spec", 2, 0.0, 15.0)
    specedge = find_run(runs, "specedge", 2, 0.0, 15.0)
    assert server_spec and specedge
    assert cost.value == pytest.approx(
        server_spec.metrics.cost_usd / specedge.metrics.cost_usd  # same tokens
    )
    ar_rows = [row for row in headline(runs, 0.0) if row.claim.endswith("server-ar")]
    assert ar_rows[0].value == pytest.approx(3.0)
    assert ar_rows[0].verdict() == "no published figure"
    proactive = rows["Proactive drafting: tokens per round gain vs --proactive off"]
    assert proactive.value == pytest.approx(41 / 12 / (41 / 14) - 1)


def test_report_sections_and_ratios(tmp_path: Path) -> None:
    meta = BenchMeta(
        machine={"cpu": "2 cores"},
        placement=["server on core 0", "edges and clients on core 1"],
        notes=["hf-assisted skipped: no draft"],
        timeline=[{"systems": "server-ar", "client_slots": 2, "startup_s": 5.0, "runs_s": 9.5}],
    )
    report = write_report(tmp_path, _synthetic_runs(), meta).read_text()
    for heading in (
        "## Benchmark timeline",
        "## Machine",
        "## Resource placement",
        "## Headline",
        "## All runs",
        "### Ratios against the baselines",
        "## Notes",
        "## Definitions",
    ):
        assert heading in report
    assert "server on core 0" in report and "hf-assisted skipped" in report
    assert "| server-ar | 2 | 5.0 | – | 9.5 | – |" in report
    # specedge at 2 clients, 15 ms: twice server-spec's throughput, 3x server-ar's.
    assert "| specedge | 2 | 15 | 2.00x |" in report
    assert "## Discussion" not in report
    (tmp_path / "report.md").unlink()
    assert rewrite_report(tmp_path).read_text() == report
    (tmp_path / "discussion.md").write_text("Throughput misses because of one core.\n")
    rewritten = rewrite_report(tmp_path).read_text()
    assert "## Discussion\n\nThroughput misses because of one core." in rewritten


def test_lookups_prefer_the_nearest_rtt() -> None:
    runs = _synthetic_runs()
    assert reference_rtt(runs) == 15.0
    run = find_run(runs, "server-spec", 1, 0.0, 15.0)
    assert run is not None and run.spec.rtt_ms == 0.0
    assert find_run(runs, "server-spec", 8, 0.0, 15.0) is None
    assert find_run(runs, "specedge", 1, 0.7) is None
