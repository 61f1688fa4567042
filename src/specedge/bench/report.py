"""report.md: the machine, the resource placement, the headline comparisons with the paper's
claims, the plots, every run, and each run's ratios against `server-spec` and `server-ar`.

Repeats of a cell are aggregated first (`results.aggregate`: medians, with the throughput and
ITL range). The goodput section (DESIGN.md section 12) compares SpecEdge with plain batched
decoding (`server-ar`) at the same RTT on every prompt set, client count and temperature, and
checks calibration (predicted against measured tokens per round).

The vLLM section compares `server-ar` and SpecEdge with vLLM's CPU build (`vllm`, and
`vllm-ngram` alongside) at the same clients, temperature and RTT, or quotes the note that says
why vLLM did not run.

The headline compares SpecEdge with the server-only baselines the way the paper does:
server throughput at the same clients and ~15 ms RTT, server busy time per token, ITL against
`server-spec` with no network delay on the baseline side, cost per 1M tokens, and the tokens per
round that proactive drafting adds (against `specedge-no-proactive`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from specedge.bench.metrics import RunMetrics
from specedge.bench.plots import COST_PLOT, ITL_PLOT, THROUGHPUT_PLOT, write_plots
from specedge.bench.results import (
    SERVER_AR,
    SERVER_SPEC,
    SPECEDGE,
    SPECEDGE_NO_PROACTIVE,
    VLLM,
    VLLM_NGRAM,
    BenchMeta,
    RunResult,
    aggregate,
    find_run,
    read_results,
    reference_rtt,
    systems_of,
    write_results,
)

REPORT_FILE = "report.md"
DISCUSSION_FILE = "discussion.md"
MISSING = "–"


@dataclass(frozen=True)
class Comparison:
    """One headline number: `value` compares `ours` with `theirs`; `paper` is the published
    figure, `aim` the issue's target where it has one. Higher `value` is better."""

    claim: str
    setting: str
    ours: str
    theirs: str
    value: float | None
    unit: str  # "x" for a ratio, "%" for a fraction shown in percent
    paper: float | None  # None: the paper has no such figure
    aim: float | None = None

    def shown(self, number: float | None) -> str:
        if number is None:
            return MISSING
        return f"{number:.2f}x" if self.unit == "x" else f"{100 * number:.1f}%"

    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        verdicts = []
        if self.aim is not None:
            verdicts.append(self._against(self.aim, "the aim"))
        if self.paper is not None:
            verdicts.append(self._against(self.paper, "the paper"))
        return "; ".join(verdicts) or "no published figure"

    def _against(self, target: float, name: str) -> str:
        assert self.value is not None
        if self.value >= target:
            return f"meets {name} ({self.shown(target)})"
        gap = target - self.value
        gap_text = f"{gap:.2f}x" if self.unit == "x" else f"{100 * gap:.1f} points"
        return f"misses {name} ({self.shown(target)}) by {gap_text}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _reduction(ours: float | None, theirs: float | None) -> float | None:
    """How much lower ours is, as a fraction of theirs (0.4 = 40% lower)."""
    return 1.0 - ours / theirs if ours is not None and theirs else None


def _num(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return MISSING if value is None else f"{value * scale:.{digits}f}"


def headline(runs: Sequence[RunResult], temperature: float) -> list[Comparison]:
    """The paper's comparisons at `temperature` (module docstring), at the largest client
    count that SpecEdge and server-spec share, at the SpecEdge RTT nearest 15 ms."""
    rtt = reference_rtt(runs)
    shared = {r.spec.clients for r in runs if r.spec.system == SPECEDGE} & {
        r.spec.clients for r in runs if r.spec.system == SERVER_SPEC
    }
    if not shared:
        return []
    clients = max(shared)
    ours = find_run(runs, SPECEDGE, clients, temperature, rtt)
    spec = find_run(runs, SERVER_SPEC, clients, temperature, rtt)
    spec_local = find_run(runs, SERVER_SPEC, clients, temperature, 0.0)
    ar = find_run(runs, SERVER_AR, clients, temperature, rtt)
    no_proactive = find_run(runs, SPECEDGE_NO_PROACTIVE, clients, temperature, rtt)
    if ours is None or spec is None or spec_local is None:
        return []
    where = f"{clients} clients, T={temperature:g}"
    at = f"{where}, {ours.spec.rtt_ms:g} ms RTT (baseline {spec.spec.rtt_ms:g} ms)"
    m, s = ours.metrics, spec.metrics
    rows = [
        Comparison(
            "Server throughput, SpecEdge / server-spec",
            at,
            f"{m.server_throughput_tok_s:.2f} tok/s",
            f"{s.server_throughput_tok_s:.2f} tok/s",
            _ratio(m.server_throughput_tok_s, s.server_throughput_tok_s),
            "x",
            paper=2.22,
            aim=1.8,
        ),
        Comparison(
            "Server busy time per token, reduction vs server-spec",
            at,
            f"{_num(m.server_busy_ms_per_token)} ms",
            f"{_num(s.server_busy_ms_per_token)} ms",
            _reduction(m.server_busy_ms_per_token, s.server_busy_ms_per_token),
            "%",
            paper=0.40,
        ),
        Comparison(
            "ITL, reduction vs server-spec at 0 ms RTT",
            f"{where}, SpecEdge {ours.spec.rtt_ms:g} ms vs {spec_local.spec.rtt_ms:g} ms",
            f"{_num(m.itl_ms_mean)} ms",
            f"{_num(spec_local.metrics.itl_ms_mean)} ms",
            _reduction(m.itl_ms_mean, spec_local.metrics.itl_ms_mean),
            "%",
            paper=0.1124,
        ),
        Comparison(
            "Cost efficiency (server-spec $ / SpecEdge $ per 1M tokens)",
            at,
            f"${_num(m.cost_per_mtok_usd, 2)}",
            f"${_num(s.cost_per_mtok_usd, 2)}",
            _ratio(s.cost_per_mtok_usd, m.cost_per_mtok_usd),
            "x",
            paper=1.91,
        ),
    ]
    if ar is not None:
        rows.append(
            Comparison(
                "Server throughput, SpecEdge / server-ar",
                f"{where}, {ours.spec.rtt_ms:g} ms RTT (baseline {ar.spec.rtt_ms:g} ms)",
                f"{m.server_throughput_tok_s:.2f} tok/s",
                f"{ar.metrics.server_throughput_tok_s:.2f} tok/s",
                _ratio(m.server_throughput_tok_s, ar.metrics.server_throughput_tok_s),
                "x",
                paper=None,
            )
        )
    if no_proactive is not None:
        gain = _ratio(m.tokens_per_round, no_proactive.metrics.tokens_per_round)
        rows.append(
            Comparison(
                "Proactive drafting: tokens per round gain vs --proactive off",
                f"{where}, {ours.spec.rtt_ms:g} ms RTT",
                _num(m.tokens_per_round, 2),
                _num(no_proactive.metrics.tokens_per_round, 2),
                None if gain is None else gain - 1.0,
                "%",
                paper=0.13,
            )
        )
    return rows


RUN_COLUMNS: list[tuple[str, Callable[[RunMetrics], str]]] = [
    ("tokens", lambda m: str(m.tokens)),
    ("server tok/s", lambda m: _num(m.server_throughput_tok_s, 2)),
    ("TTFT ms mean / p99", lambda m: f"{_num(m.ttft_ms_mean, 0)} / {_num(m.ttft_ms_p99, 0)}"),
    (
        "ITL ms mean / p50 / p90 / p99",
        lambda m: " / ".join(
            _num(v, 0) for v in (m.itl_ms_mean, m.itl_ms_p50, m.itl_ms_p90, m.itl_ms_p99)
        ),
    ),
    ("tok/round", lambda m: _num(m.tokens_per_round, 2)),
    ("accept", lambda m: _num(m.acceptance_rate, 2)),
    ("proactive hit", lambda m: _num(m.proactive_hit_rate, 2)),
    ("server busy", lambda m: _num(m.server_busy_fraction, 2)),
    ("busy ms/tok", lambda m: _num(m.server_busy_ms_per_token, 1)),
    ("mean batch", lambda m: _num(m.server_mean_batch, 1)),
    ("B/tok", lambda m: _num(m.bytes_per_token, 0)),
    ("$/1M tok", lambda m: _num(m.cost_per_mtok_usd, 2)),
    ("failed", lambda m: str(m.failed_requests)),
]


def _sorted_runs(runs: Sequence[RunResult], temperature: float) -> list[RunResult]:
    order = {name: i for i, name in enumerate(systems_of(runs))}
    mine = [r for r in runs if r.spec.temperature == temperature]
    return sorted(mine, key=lambda r: (order[r.spec.system], r.spec.clients, r.spec.rtt_ms))


def runs_table(runs: Sequence[RunResult], temperature: float) -> list[str]:
    header = ["system", "clients", "RTT ms", *(name for name, _ in RUN_COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in _sorted_runs(runs, temperature):
        cells = [run.spec.system, str(run.spec.clients), f"{run.spec.rtt_ms:g}"]
        cells += [cell(run.metrics) for _, cell in RUN_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ratios_table(runs: Sequence[RunResult], temperature: float) -> list[str]:
    """Each non-baseline run against server-spec and server-ar (same clients and temperature,
    nearest RTT): throughput x (higher is better), ITL x and $/1M tokens x (lower is better)."""
    header = ["system", "clients", "RTT ms"]
    for baseline in (SERVER_SPEC, SERVER_AR):
        header += [f"tok/s vs {baseline}", f"ITL vs {baseline}", f"$/1M vs {baseline}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in _sorted_runs(runs, temperature):
        if run.spec.system in (SERVER_SPEC, SERVER_AR):
            continue
        cells = [run.spec.system, str(run.spec.clients), f"{run.spec.rtt_ms:g}"]
        for baseline in (SERVER_SPEC, SERVER_AR):
            base = find_run(runs, baseline, run.spec.clients, temperature, run.spec.rtt_ms)
            b = base.metrics if base else None
            m = run.metrics
            for ours, theirs in (
                (m.server_throughput_tok_s, b.server_throughput_tok_s if b else None),
                (m.itl_ms_mean, b.itl_ms_mean if b else None),
                (m.cost_per_mtok_usd, b.cost_per_mtok_usd if b else None),
            ):
                ratio = _ratio(ours, theirs)
                cells.append(MISSING if ratio is None else f"{ratio:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _spread(value: float | None, low: float | None, high: float | None, digits: int = 1) -> str:
    if value is None:
        return MISSING
    if low is None or high is None or low == high:
        return _num(value, digits)
    return f"{_num(value, digits)} [{_num(low, digits)}-{_num(high, digits)}]"


def _cell(runs: Sequence[RunResult], system: str, clients: int, temperature: float,
          rtt: float, prompt_set: str) -> RunResult | None:  # fmt: skip
    for run in runs:
        s = run.spec
        if (s.system, s.clients, s.temperature, s.rtt_ms, s.prompt_set) == (
            system, clients, temperature, rtt, prompt_set
        ):  # fmt: skip
            return run
    return None


def goodput_section(cells: Sequence[RunResult], rtt: float) -> list[str]:
    """SpecEdge against plain decoding (server-ar) at `rtt` on every prompt set, client count
    and temperature, then the checks of issue 11's must-show list that these runs answer."""
    pairs = []
    for run in cells:
        s = run.spec
        if s.system != SPECEDGE or s.rtt_ms != rtt:
            continue
        ar = _cell(cells, SERVER_AR, s.clients, s.temperature, rtt, s.prompt_set)
        if ar is not None:
            pairs.append((run, ar))
    if not pairs:
        return ["No SpecEdge / server-ar pair at the same RTT was measured."]
    out = [
        f"SpecEdge against `server-ar` at {rtt:g} ms RTT (both sides): medians over repeats, "
        "[min-max] where a cell ran more than once. Capacity: tokens per server-busy second. "
        "Streamed: share of SpecEdge's rounds the server decoded itself. Bound: which side "
        "limited the run (server busy >= 90%: server).",
        "",
        "| prompts | T | clients | SpecEdge tok/s | server-ar tok/s | ratio | SpecEdge ITL ms | "
        "server-ar ITL ms | ITL ratio | capacity ratio | tok/round (predicted) | streamed | "
        "bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ours, ar in sorted(pairs, key=lambda p: (p[0].spec.prompt_set, p[0].spec.temperature,
                                                 p[0].spec.clients)):  # fmt: skip
        m, b = ours.metrics, ar.metrics
        out.append(
            f"| {ours.spec.prompt_set} | {ours.spec.temperature:g} | {ours.spec.clients} | "
            f"{_spread(m.server_throughput_tok_s, m.throughput_min, m.throughput_max)} | "
            f"{_spread(b.server_throughput_tok_s, b.throughput_min, b.throughput_max)} | "
            f"{_num(_ratio(m.server_throughput_tok_s, b.server_throughput_tok_s), 2)}x | "
            f"{_spread(m.itl_ms_mean, m.itl_ms_min, m.itl_ms_max, 0)} | "
            f"{_spread(b.itl_ms_mean, b.itl_ms_min, b.itl_ms_max, 0)} | "
            f"{_num(_ratio(m.itl_ms_mean, b.itl_ms_mean), 2)}x | "
            f"{_num(_ratio(m.server_capacity_tok_s, b.server_capacity_tok_s), 2)}x | "
            f"{_num(m.measured_tokens_per_predicted_round, 2)} "
            f"({_num(m.predicted_tokens_per_round, 2)}) | {_num(m.streamed_share, 2)} | "
            f"{m.bound or MISSING} / {b.bound or MISSING} |"
        )
    out += ["", *_must_shows(cells, pairs, rtt)]
    return out


def _must_shows(
    cells: Sequence[RunResult], pairs: list[tuple[RunResult, RunResult]], rtt: float
) -> list[str]:
    def ratio(pair: tuple[RunResult, RunResult]) -> float | None:
        return _ratio(
            pair[0].metrics.server_throughput_tok_s, pair[1].metrics.server_throughput_tok_s
        )

    def itl_ratio(pair: tuple[RunResult, RunResult]) -> float | None:
        return _ratio(pair[0].metrics.itl_ms_mean, pair[1].metrics.itl_ms_mean)

    primary = pairs[0][0].spec.prompt_set
    lines = ["Checks (issue 11):", ""]
    for temperature, aim in ((0.0, 1.5), (0.7, 1.2)):
        for clients in (4, 8):
            key = (primary, temperature, clients)
            found = [
                p
                for p in pairs
                if (p[0].spec.prompt_set, p[0].spec.temperature, p[0].spec.clients) == key
            ]
            if found:
                value = ratio(found[0])
                verdict = "met" if value is not None and value >= aim else "missed"
                lines.append(
                    f"- Throughput vs server-ar, {clients} clients, T={temperature:g}, "
                    f"{primary}: {_num(value, 2)}x (aim >= {aim:g}x): {verdict}"
                )
    ratios = [(r, p) for p in pairs if (r := ratio(p)) is not None]
    itls = [(r, p) for p in pairs if (r := itl_ratio(p)) is not None]
    if ratios:
        worst, where = min(ratios, key=lambda x: x[0])
        verdict = "met" if worst >= 0.95 else "missed"
        lines.append(f"- Never slower than server-ar: lowest throughput ratio {worst:.2f}x at "
                     f"{_where(where[0])} (aim >= 0.95x): {verdict}")  # fmt: skip
    if itls:
        worst, where = max(itls, key=lambda x: x[0])
        verdict = "met" if worst <= 1.05 else "missed"
        lines.append(f"- ITL at most server-ar's: highest ITL ratio {worst:.2f}x at "
                     f"{_where(where[0])} (aim <= 1.05x): {verdict}")  # fmt: skip
    ours8 = _cell(cells, SPECEDGE, 8, 0.0, rtt, primary)
    spec8 = _cell(cells, SERVER_SPEC, 8, 0.0, rtt, primary)
    if ours8 and spec8:
        value = _ratio(ours8.metrics.server_throughput_tok_s, spec8.metrics.server_throughput_tok_s)
        verdict = "met" if value is not None and value >= 1.6 else "missed"
        lines.append(f"- Throughput vs server-spec, 8 clients, T=0: {_num(value, 2)}x "
                     f"(aim >= 1.6x): {verdict}")  # fmt: skip
    for clients in (1, 2):
        ours = _cell(cells, SPECEDGE, clients, 0.0, rtt, primary)
        local = _cell(cells, SERVER_AR, clients, 0.0, 0.0, primary)
        if ours and local and ours.metrics.itl_ms_mean and local.metrics.itl_ms_mean:
            value = ours.metrics.itl_ms_mean / local.metrics.itl_ms_mean
            verdict = "met" if value <= 1.0 else "missed"
            lines.append(f"- ITL at {rtt:g} ms vs server-ar at 0 ms, {clients} client(s), T=0: "
                         f"{value:.2f}x (aim <= 1x): {verdict}")  # fmt: skip
    for system in (SPECEDGE, SERVER_SPEC):
        for temperature in sorted({r.spec.temperature for r in cells}):
            chosen = [r.metrics for r in cells if r.spec.system == system
                      and r.spec.temperature == temperature
                      and r.metrics.predicted_tokens_per_round]  # fmt: skip
            if not chosen:
                continue
            predicted = sum(m.predicted_tokens_per_round or 0.0 for m in chosen) / len(chosen)
            measured = sum(m.measured_tokens_per_predicted_round or 0.0 for m in chosen) / len(
                chosen
            )
            error = predicted / measured - 1.0 if measured else None
            verdict = "met" if error is not None and abs(error) <= 0.10 else "missed"
            lines.append(f"- Calibration, {system}, T={temperature:g}: predicted "
                         f"{predicted:.2f} vs measured {measured:.2f} tokens per round "
                         f"({_num(None if error is None else 100 * error, 1)}%, aim within "
                         f"10%): {verdict}")  # fmt: skip
    return lines


VLLM_AIM = 0.9  # issue 12: server-ar's throughput at least 0.9x vLLM's, same placement


def vllm_section(cells: Sequence[RunResult], notes: Sequence[str]) -> list[str]:
    """server-ar and SpecEdge against vLLM (autoregressive) at the same clients, temperature,
    RTT and prompts, with vllm-ngram alongside; or the note that says why vLLM did not run."""
    rows = [r for r in cells if r.spec.system == VLLM]
    if not rows:
        skipped = [note for note in notes if note.startswith(VLLM) and "skipped" in note]
        return skipped or ["vLLM was not part of this benchmark (`--systems ...,vllm`)."]
    out = [
        "Output throughput (tokens per second of wall time) at the same clients, temperature, "
        "RTT and prompts; ratios against `vllm`.",
        "",
        "| prompts | T | clients | RTT ms | vllm tok/s | vllm-ngram tok/s | server-ar tok/s | "
        "server-ar / vllm | SpecEdge tok/s | SpecEdge / vllm | vllm ITL ms | server-ar ITL ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for run in sorted(rows, key=lambda r: (r.spec.prompt_set, r.spec.temperature,
                                           r.spec.clients, r.spec.rtt_ms)):  # fmt: skip
        s, m = run.spec, run.metrics
        key = (s.clients, s.temperature, s.rtt_ms, s.prompt_set)
        ngram, ar, ours = (_cell(cells, name, *key) for name in (VLLM_NGRAM, SERVER_AR, SPECEDGE))
        ar_ratio = _ratio(_tok_s(ar), m.server_throughput_tok_s)
        out.append(
            f"| {s.prompt_set} | {s.temperature:g} | {s.clients} | {s.rtt_ms:g} | "
            f"{_num(m.server_throughput_tok_s)} | {_num(_tok_s(ngram))} | {_num(_tok_s(ar))} | "
            f"{_times(ar_ratio)} | {_num(_tok_s(ours))} | "
            f"{_times(_ratio(_tok_s(ours), m.server_throughput_tok_s))} | "
            f"{_num(m.itl_ms_mean)} | {_num(ar.metrics.itl_ms_mean if ar else None)} |"
        )
        if ar_ratio is not None:
            verdict = "met" if ar_ratio >= VLLM_AIM else "missed"
            checks.append(f"- server-ar / vllm, {s.clients} clients, T={s.temperature:g}, "
                          f"{s.rtt_ms:g} ms, {s.prompt_set}: {ar_ratio:.2f}x "
                          f"(aim >= {VLLM_AIM:g}x): {verdict}")  # fmt: skip
    return out + (["", "Checks (issue 12):", "", *checks] if checks else [])


def _times(ratio: float | None) -> str:
    return MISSING if ratio is None else f"{ratio:.2f}x"


def _tok_s(run: RunResult | None) -> float | None:
    return None if run is None else run.metrics.server_throughput_tok_s


def _where(run: RunResult) -> str:
    s = run.spec
    return f"{s.clients} clients, T={s.temperature:g}, {s.prompt_set}"


def render_report(
    runs: Sequence[RunResult], meta: BenchMeta, plots: Sequence[str], discussion: str = ""
) -> str:
    cells = aggregate(runs)
    primary = cells[0].spec.prompt_set if cells else "specbench"
    runs = [r for r in cells if r.spec.prompt_set == primary]
    temperatures = sorted({r.spec.temperature for r in runs})
    out = ["# SpecEdge benchmark report", ""]
    if meta.started_at:
        out += [f"Run started {meta.started_at}, took {meta.duration_s / 60:.1f} min.", ""]
    out += ["## Machine", ""]
    out += [f"- {key}: {value}" for key, value in meta.machine.items()] or ["- not recorded"]
    out += ["", "## Resource placement", ""]
    out += [f"- {line}" for line in meta.placement] or ["- not recorded"]
    out += ["", "## Settings", ""]
    out += [f"- {key}: {value}" for key, value in meta.config.items()]
    out += ["", "## Goodput: SpecEdge against plain batched decoding", ""]
    out += goodput_section(cells, reference_rtt(runs))
    out += ["", "## Headline: SpecEdge against server-only speculative decoding", ""]
    for temperature in temperatures:
        rows = headline(runs, temperature)
        if not rows:
            out += [f"Temperature {temperature:g}: no SpecEdge / server-spec pair measured.", ""]
            continue
        out += [
            f"Temperature {temperature:g}:",
            "",
            "| claim | setting | SpecEdge | baseline | measured | paper | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            out.append(
                f"| {row.claim} | {row.setting} | {row.ours} | {row.theirs} | "
                f"{row.shown(row.value)} | {row.shown(row.paper)} | {row.verdict()} |"
            )
        out.append("")
    out += ["## Against vLLM", "", *vllm_section(cells, meta.notes), ""]
    if discussion.strip():
        out += ["## Discussion", "", discussion.strip(), ""]
    titles = {
        THROUGHPUT_PLOT: "Server throughput vs clients",
        ITL_PLOT: "Inter-token latency vs RTT",
        COST_PLOT: "Cost per 1M tokens",
    }
    if plots:
        out += ["## Plots", ""]
        out += [f"![{titles.get(name, name)}]({name})\n" for name in plots]
    for temperature in temperatures:
        out += ["", f"## All runs, temperature {temperature:g}", ""]
        out += runs_table(runs, temperature)
        out += ["", f"### Ratios against the baselines, temperature {temperature:g}", ""]
        out += ratios_table(runs, temperature)
    if meta.timeline:
        out += ["", "## Benchmark timeline", ""]
        out += ["| deployment | client slots | start-up s | warm-up s | measured s | total s |"]
        out += ["|---|---|---|---|---|---|"]
        for step in meta.timeline:
            times = [step.get(k) for k in ("startup_s", "warmup_s", "runs_s", "total_s")]
            shown = [_num(c) if isinstance(c, int | float) else MISSING for c in times]
            out.append(f"| {step['systems']} | {step['client_slots']} | {' | '.join(shown)} |")
    if meta.notes:
        out += ["", "## Notes", ""]
        out += [f"- {note}" for note in meta.notes]
    out += ["", _DEFINITIONS]
    return "\n".join(out) + "\n"


_DEFINITIONS = """## Definitions

TTFT: request start -> first token received by the client. ITL: per request, (last token -
first token) / (tokens - 1), then mean and percentiles over requests. Server throughput:
generated tokens / wall time of the run (first request sent -> last token received). Tokens per
round: emitted tokens / verification rounds; acceptance: accepted draft tokens / emitted tokens.
Server busy: the server's `specedge_server_busy_seconds_total` over the run / wall time. B/tok:
bytes on the WAN link (edge <-> server gRPC for SpecEdge, client <-> server HTTP for the
server-only systems), both directions, per generated token. Cost: (server $/h x wall time + sum
over edges of edge $/h x the edge's engaged time) / tokens; server-only systems pay the server
alone. Ratios compare runs at the same clients and temperature and the nearest RTT measured."""


def write_report(out_dir: Path, runs: Sequence[RunResult], meta: BenchMeta) -> Path:
    """results.json, requests.jsonl, meta.json, the plots and report.md into `out_dir`."""
    write_results(out_dir, runs, meta)
    return _render(out_dir, runs, meta)


def rewrite_report(out_dir: Path) -> Path:
    """Re-render the plots and report.md of an existing results directory (e.g. after writing
    its discussion.md)."""
    runs, meta = read_results(out_dir)
    return _render(out_dir, runs, meta)


def _render(out_dir: Path, runs: Sequence[RunResult], meta: BenchMeta) -> Path:
    """Plots and report.md; a hand-written `discussion.md` in `out_dir` (why a number misses,
    what limits this machine) goes in after the headline."""
    cells = aggregate(runs)
    primary = cells[0].spec.prompt_set if cells else "specbench"
    plots = write_plots([r for r in cells if r.spec.prompt_set == primary], out_dir)
    discussion_path = out_dir / DISCUSSION_FILE
    discussion = discussion_path.read_text() if discussion_path.exists() else ""
    path = out_dir / REPORT_FILE
    path.write_text(render_report(runs, meta, plots, discussion))
    return path
