"""Benchmark results: one `RunResult` per point of the grid (system, clients, RTT, temperature),
their JSON files, and the lookups the report's comparisons need.

Files in the output directory:
- `results.json`: a list of runs, each a flat object (the run's settings + `RunMetrics`);
- `requests.jsonl`: one line per request (the run's settings + its `RequestRecord`, including
  the arrival time of every streamed chunk, i.e. of every verification round's tokens);
- `meta.json`: the configuration, the machine, the resource placement and notes.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from specedge.bench.metrics import RequestRecord, RunMetrics

SPECEDGE = "specedge"
SPECEDGE_NO_PROACTIVE = "specedge-no-proactive"
SPECEDGE_NO_PIPELINING = "specedge-no-pipelining"
SPECEDGE_NO_LOOKUP = "specedge-no-lookup"
SERVER_SPEC = "server-spec"
SERVER_AR = "server-ar"
VLLM = "vllm"
VLLM_NGRAM = "vllm-ngram"
HF_ASSISTED = "hf-assisted"
ALL_SYSTEMS = (
    SPECEDGE,
    SPECEDGE_NO_PROACTIVE,
    SPECEDGE_NO_PIPELINING,
    SPECEDGE_NO_LOOKUP,
    SERVER_SPEC,
    SERVER_AR,
    VLLM,
    VLLM_NGRAM,
    HF_ASSISTED,
)
EDGE_SYSTEMS = (SPECEDGE, SPECEDGE_NO_PROACTIVE, SPECEDGE_NO_PIPELINING, SPECEDGE_NO_LOOKUP)
VLLM_SYSTEMS = (VLLM, VLLM_NGRAM)  # vLLM's OpenAI server (bench/vllm_server.py)
BASELINES = (SERVER_SPEC, SERVER_AR, *VLLM_SYSTEMS)  # the server-only systems

RESULTS_FILE = "results.json"
REQUESTS_FILE = "requests.jsonl"
META_FILE = "meta.json"


@dataclass(frozen=True)
class RunSpec:
    """One point of the benchmark grid."""

    system: str
    clients: int
    rtt_ms: float
    temperature: float
    jitter_ms: float = 0.0
    depth: int | None = None  # draft tree depth (None: no drafting)
    budget: str | None = None  # draft tree nodes per round: auto or a fixed count
    prompt_set: str = "specbench"  # the prompts: specbench, random (random text), or a file
    repeat: int = 0  # which repeat of the cell (runs differing only here are aggregated)


@dataclass(frozen=True)
class RunResult:
    spec: RunSpec
    metrics: RunMetrics
    records: tuple[RequestRecord, ...] = ()
    notes: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The flat object stored in results.json (settings, then metrics)."""
        return {**asdict(self.spec), **self.metrics.as_dict(), "notes": self.notes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        spec_keys = RunSpec.__dataclass_fields__.keys()
        metric_keys = RunMetrics.__dataclass_fields__.keys()
        spec = RunSpec(**{k: data[k] for k in spec_keys if k in data})
        metrics = RunMetrics(**{k: data.get(k) for k in metric_keys})  # type: ignore[arg-type]
        return cls(spec=spec, metrics=metrics, notes=str(data.get("notes", "")))


@dataclass
class BenchMeta:
    """Everything about a benchmark that is not a run: shown at the top of report.md."""

    config: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    placement: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started_at: str = ""
    duration_s: float = 0.0
    # Per deployment: {"systems", "client_slots", "startup_s", "warmup_s", "runs_s"}.
    timeline: list[dict[str, Any]] = field(default_factory=list)


def write_results(out_dir: Path, runs: Sequence[RunResult], meta: BenchMeta) -> None:
    """results.json, requests.jsonl and meta.json (rewritten whole, so a partial benchmark
    leaves consistent files behind)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_FILE).write_text(json.dumps([r.as_dict() for r in runs], indent=1) + "\n")
    with (out_dir / REQUESTS_FILE).open("w") as requests:
        for run in runs:
            for record in run.records:
                requests.write(json.dumps({**asdict(run.spec), **record.as_dict()}) + "\n")
    (out_dir / META_FILE).write_text(json.dumps(asdict(meta), indent=1) + "\n")


def read_results(out_dir: Path) -> tuple[list[RunResult], BenchMeta]:
    runs = [RunResult.from_dict(d) for d in json.loads((out_dir / RESULTS_FILE).read_text())]
    meta_path = out_dir / META_FILE
    meta = BenchMeta(**json.loads(meta_path.read_text())) if meta_path.exists() else BenchMeta()
    return runs, meta


def aggregate(runs: Sequence[RunResult]) -> list[RunResult]:
    """One run per cell (the spec but its repeat): the median of each metric over the cell's
    repeats, their count, and the spread of throughput and ITL. Order: first appearance."""
    cells: dict[RunSpec, list[RunResult]] = {}
    for run in runs:
        cells.setdefault(replace(run.spec, repeat=0), []).append(run)
    merged = []
    for spec, repeats in cells.items():
        if len(repeats) == 1:
            merged.append(replace(repeats[0], spec=spec))
            continue
        values: dict[str, Any] = {}
        for name in RunMetrics.__dataclass_fields__:
            column = [getattr(r.metrics, name) for r in repeats]
            numbers = [v for v in column if isinstance(v, int | float) and v is not None]
            if numbers and len(numbers) == len(column):
                values[name] = statistics.median(numbers)
            else:  # text (which side bound the run): the most common
                present = [v for v in column if v is not None]
                values[name] = max(set(present), key=present.count) if present else None
        throughputs = [r.metrics.server_throughput_tok_s for r in repeats]
        itls = [r.metrics.itl_ms_mean for r in repeats if r.metrics.itl_ms_mean is not None]
        values.update(
            repeats=len(repeats),
            throughput_min=min(throughputs),
            throughput_max=max(throughputs),
            itl_ms_min=min(itls) if itls else None,
            itl_ms_max=max(itls) if itls else None,
        )
        notes = "; ".join(sorted({r.notes for r in repeats if r.notes}))
        merged.append(RunResult(spec, RunMetrics(**values), (), notes))
    return merged


def find_run(
    runs: Iterable[RunResult],
    system: str,
    clients: int,
    temperature: float,
    rtt_ms: float | None = None,
) -> RunResult | None:
    """The run of `system` at `clients` and `temperature` whose RTT is `rtt_ms`, or the
    nearest RTT measured (None: the lowest)."""
    candidates = [
        r
        for r in runs
        if r.spec.system == system
        and r.spec.clients == clients
        and r.spec.temperature == temperature
    ]
    if not candidates:
        return None
    wanted = 0.0 if rtt_ms is None else rtt_ms
    return min(candidates, key=lambda r: (abs(r.spec.rtt_ms - wanted), r.spec.rtt_ms))


def systems_of(runs: Iterable[RunResult]) -> list[str]:
    """Systems present, in the canonical order (unknown names last)."""
    present = {r.spec.system for r in runs}
    known = [s for s in ALL_SYSTEMS if s in present]
    return known + sorted(present - set(known))


def reference_rtt(runs: Iterable[RunResult], preferred: float = 15.0) -> float:
    """The SpecEdge RTT closest to `preferred` (the paper's WAN: ~15 ms)."""
    rtts = sorted({r.spec.rtt_ms for r in runs if r.spec.system == SPECEDGE})
    if not rtts:
        rtts = sorted({r.spec.rtt_ms for r in runs}) or [preferred]
    return min(rtts, key=lambda rtt: (abs(rtt - preferred), rtt))
