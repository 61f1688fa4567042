"""What the soak test (`benchmarks/soak.py`) recorded, and how it is judged and reported.

Terms:

- A *request* is one streamed greedy completion as its client saw it: the text that arrived,
  the usage, and how it ended. Its *outcome* is `correct` (the reference text, token count
  and finish reason), `wrong` (anything else that completed, or a disconnected request whose
  text so far is not a prefix of the reference), `disconnected` (the client hung up on
  purpose: an injected fault, judged by its prefix) or `error`.
- An error's *kind* is how it surfaced (`http-503`, `error-event` in the SSE stream,
  `connection-broken`, `connect-failed`, `timeout`, `truncated`: a stream that ended with
  neither `[DONE]` nor an error); its *cause* is the injected fault it is attributed to: the
  latest fault whose window (start to recovery, plus `ATTRIBUTION_GRACE_S`) holds the error's
  time and that could reach the request (an edge kill only reaches that edge's clients).
  An error no fault explains, a `truncated` stream or a wrong answer is a finding.
- *Memory growth* of a process lifetime is the median RSS of its last `MEMORY_WINDOW_S` over
  the median of its first `MEMORY_WINDOW_S` after its warm-up (from its start, or a restart).

Everything here is a pure function of the records; nothing reads a clock or a process.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from specedge.bench.metrics import percentile

ATTRIBUTION_GRACE_S = 30.0  # failover timeout and in-flight rounds after a fault's recovery
MEMORY_WINDOW_S = 60.0
MEMORY_GROWTH_LIMIT = 0.10
CLEAN_KINDS = frozenset({"http-503", "error-event", "connection-broken", "connect-failed"})
PLOT_FILE = "memory_over_time.png"


@dataclass(frozen=True)
class Reference:
    """The greedy answer to one prompt, computed once in float32 in the soak's process."""

    text: str
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class SoakRequest:
    client: int
    edge: int
    prompt: int  # index into the references
    behaviour: str  # normal, disconnect, slow
    start_s: float  # seconds since the soak started
    end_s: float
    first_token_s: float | None
    text: str
    completion_tokens: int | None  # from usage; None when no usage arrived
    finish_reason: str | None
    disconnected: bool  # the client hung up on purpose
    error_kind: str | None
    error: str | None


@dataclass(frozen=True)
class FaultRecord:
    kind: str  # server-kill, edge-kill, partition, client-disconnect, slow-reader
    target: str  # "server A", "edge 0", "link to server B", "clients 1,3,5,7"
    start_s: float
    end_s: float  # recovered: process healthy again, partition healed, armed requests done
    detail: str
    edge: int | None = None  # the edge a kill reaches


@dataclass(frozen=True)
class MemorySample:
    t_s: float
    process: str  # "server A", "server B", "edge 0", "edge 1", "soak driver"
    pid: int
    rss_bytes: int


# ---- judging requests --------------------------------------------------------------------------
def outcome(request: SoakRequest, reference: Reference) -> str:
    """correct, wrong, disconnected or error (module docstring)."""
    if request.error_kind is not None:
        return "error"
    if request.disconnected:
        return "disconnected" if reference.text.startswith(request.text) else "wrong"
    same = (
        request.text == reference.text
        and request.completion_tokens == reference.completion_tokens
        and request.finish_reason == reference.finish_reason
    )
    return "correct" if same else "wrong"


def attributed_fault(request: SoakRequest, faults: Sequence[FaultRecord]) -> int | None:
    """Index of the injected fault a clean error is attributed to (module docstring); None
    for an error no fault explains, or one that did not end cleanly."""
    if request.error_kind not in CLEAN_KINDS:
        return None
    candidates = [
        index
        for index, fault in enumerate(faults)
        if fault.start_s <= request.end_s <= fault.end_s + ATTRIBUTION_GRACE_S
        and (fault.edge is None or fault.edge == request.edge)
    ]
    return max(candidates, key=lambda index: faults[index].start_s, default=None)


@dataclass(frozen=True)
class RequestSummary:
    total: int
    outcomes: dict[str, int]
    errors_by_cause: dict[str, dict[str, int]]  # cause -> kind -> count
    errors_by_fault: dict[int, int]  # fault index -> errors attributed to it
    unexplained: list[SoakRequest]  # errors no fault explains
    wrong: list[SoakRequest]
    latency_s: dict[str, float]  # p50, p99 of completed normal requests (and TTFT)
    completion_tokens: int

    @property
    def passed(self) -> bool:
        return not self.unexplained and not self.wrong


def summarize_requests(
    requests: Sequence[SoakRequest],
    references: Sequence[Reference],
    faults: Sequence[FaultRecord],
) -> RequestSummary:
    outcomes: Counter[str] = Counter()
    errors: dict[str, Counter[str]] = {}
    by_fault: Counter[int] = Counter()
    unexplained, wrong = [], []
    for request in requests:
        result = outcome(request, references[request.prompt])
        outcomes[result] += 1
        if result == "wrong":
            wrong.append(request)
        if result != "error":
            continue
        assert request.error_kind is not None
        fault = attributed_fault(request, faults)
        if fault is None:
            unexplained.append(request)
        else:
            by_fault[fault] += 1
        attributed = "unexplained" if fault is None else faults[fault].kind
        errors.setdefault(attributed, Counter())[request.error_kind] += 1
    normal = [
        r
        for r in requests
        if r.behaviour == "normal" and outcome(r, references[r.prompt]) == "correct"
    ]
    latency: dict[str, float] = {}
    if normal:
        durations = [r.end_s - r.start_s for r in normal]
        ttfts = [r.first_token_s - r.start_s for r in normal if r.first_token_s is not None]
        latency = {"p50": percentile(durations, 50), "p99": percentile(durations, 99)}
        if ttfts:
            latency |= {"ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99)}
    return RequestSummary(
        total=len(requests),
        outcomes=dict(outcomes),
        errors_by_cause={c: dict(kinds) for c, kinds in sorted(errors.items())},
        errors_by_fault=dict(by_fault),
        unexplained=unexplained,
        wrong=wrong,
        latency_s=latency,
        completion_tokens=sum(r.completion_tokens or 0 for r in requests if not r.error_kind),
    )


# ---- memory ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryGrowth:
    process: str
    pid: int
    baseline_bytes: float  # median of the first window after warm-up
    final_bytes: float  # median of the last window
    peak_bytes: int
    span_s: float  # from the baseline window's start to the last sample

    @property
    def growth(self) -> float:
        return self.final_bytes / self.baseline_bytes - 1.0


def memory_growth(
    samples: Sequence[MemorySample], warmup_s: float, window_s: float = MEMORY_WINDOW_S
) -> list[MemoryGrowth]:
    """Growth of every process lifetime (process name and pid) sampled for at least two
    windows past its own warm-up (`warmup_s` after its first sample)."""
    lifetimes: dict[tuple[str, int], list[MemorySample]] = {}
    for sample in samples:
        lifetimes.setdefault((sample.process, sample.pid), []).append(sample)
    growths = []
    for (process, pid), series in lifetimes.items():
        settled = [s for s in series if s.t_s >= series[0].t_s + warmup_s]
        if not settled or settled[-1].t_s - settled[0].t_s < 2 * window_s:
            continue
        first, last = settled[0].t_s, settled[-1].t_s
        baseline = [s.rss_bytes for s in settled if s.t_s < first + window_s]
        final = [s.rss_bytes for s in settled if s.t_s > last - window_s]
        growths.append(
            MemoryGrowth(
                process,
                pid,
                statistics.median(baseline),
                statistics.median(final),
                max(s.rss_bytes for s in settled),
                last - first,
            )
        )
    return sorted(growths, key=lambda growth: (growth.process, -growth.span_s))


def write_memory_plot(
    samples: Sequence[MemorySample],
    faults: Sequence[FaultRecord],
    warmup_s: float,
    path: Path,
) -> None:
    """RSS of every process over the soak (one line per process, broken at restarts), the
    faults as vertical lines, warm-up shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 5))
    colors: dict[str, Any] = {}
    lifetimes: dict[tuple[str, int], list[MemorySample]] = {}
    for sample in samples:
        lifetimes.setdefault((sample.process, sample.pid), []).append(sample)
    for (process, _), series in lifetimes.items():
        label = None if process in colors else process
        (line,) = axis.plot(
            [s.t_s / 60 for s in series],
            [s.rss_bytes / 2**20 for s in series],
            color=colors.get(process),
            label=label,
            linewidth=1.2,
        )
        colors.setdefault(process, line.get_color())
    styles = {"server-kill": "red", "edge-kill": "magenta", "partition": "blue",
              "client-disconnect": "olive", "slow-reader": "gray"}  # fmt: skip
    marked: set[str] = set()
    for fault in faults:
        color = styles.get(fault.kind, "black")
        label = None if fault.kind in marked else fault.kind
        marked.add(fault.kind)
        axis.axvline(fault.start_s / 60, color=color, alpha=0.35, linestyle="--", label=label)
    axis.axvspan(0, warmup_s / 60, color="0.9", label="warm-up")
    axis.set_xlabel("minutes since the clients started")
    axis.set_ylabel("resident memory (MiB)")
    axis.set_title("Soak: resident memory of every process, faults marked")
    axis.grid(True, alpha=0.3)
    axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- checks and files --------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    key: str  # requests, slots, memory, crashes
    name: str
    passed: bool | None  # None: not measured
    detail: str


def checks(
    results: dict[str, Any], summary: RequestSummary, growths: Sequence[MemoryGrowth]
) -> list[Check]:
    """The soak's verdicts (module docstring), from what it recorded."""
    outcomes = summary.outcomes
    found = [
        Check(
            "requests",
            "every request correct, or a clean error attributed to an injected fault",
            summary.passed,
            f"{outcomes.get('correct', 0)} correct, {outcomes.get('disconnected', 0)} hung up "
            f"on purpose, {outcomes.get('error', 0)} errors ({len(summary.unexplained)} "
            f"unexplained), {outcomes.get('wrong', 0)} wrong",
        )
    ]
    slots = results["slots"]
    open_left = {n: e["open_sessions"] for n, e in slots.items() if e["open_sessions"] != 0}
    probes = {name: entry["probe"] for name, entry in slots.items() if "probe" in entry}
    short = {name: probe for name, probe in probes.items() if probe["held"] != probe["slots"]}
    found.append(
        Check(
            "slots",
            "no leaked KV slots (no session open at the end, every slot free)",
            not open_left and not short,
            f"open sessions: {open_left}, probe short: {short}"
            if open_left or short
            else "0 open sessions on every server and edge; every server's slots taken at once",
        )
    )
    long_lived = results["setup"]["long_lived"]
    kept = [growth for growth in growths if growth.process in long_lived]
    found.append(
        Check(
            "memory",
            f"resident memory growth under {MEMORY_GROWTH_LIMIT:.0%} after warm-up",
            all(g.growth < MEMORY_GROWTH_LIMIT for g in kept) if kept else None,
            ", ".join(f"{g.process} {g.growth:+.1%}" for g in kept)
            if kept
            else "the run is too short",
        )
    )
    crashes = results["crashes"]
    found.append(
        Check(
            "crashes",
            "no process died without an injected fault",
            not crashes,
            "; ".join(
                f"{c['process']} at {c['at_s']:.0f} s (status {c['returncode']})" for c in crashes
            )
            or "none",  # fmt: skip
        )
    )
    return found


def write_results(results: dict[str, Any], out_dir: Path) -> list[Check]:
    """Judge `results` (what the soak recorded) and write results.json (with the checks and
    a summary), the memory plot and report.md into `out_dir`. Returns the checks."""
    setup = results["setup"]
    references = [Reference(**reference) for reference in results["references"]]
    requests = [SoakRequest(**request) for request in results["requests"]]
    faults = [FaultRecord(**fault) for fault in results["faults"]]
    samples = [MemorySample(*sample) for sample in results["memory"]]
    summary = summarize_requests(requests, references, faults)
    growths = memory_growth(samples, setup["warmup_s"])
    verdicts = checks(results, summary, growths)
    results["checks"] = [asdict(check) for check in verdicts]
    results["summary"] = {
        "requests": summary.total,
        "outcomes": summary.outcomes,
        "errors_by_cause": summary.errors_by_cause,
        "latency_s": summary.latency_s,
        "completion_tokens": summary.completion_tokens,
        "memory_growth": {f"{g.process} (pid {g.pid})": g.growth for g in growths},
    }
    (out_dir / "results.json").write_text(_json_lines(results))
    write_memory_plot(samples, faults, setup["warmup_s"], out_dir / PLOT_FILE)
    (out_dir / "report.md").write_text(render_report(results, summary, growths))
    return verdicts


def _json_lines(results: dict[str, Any]) -> str:
    """results as JSON with one line per list item (requests, memory samples), the rest
    indented."""
    fields = []
    for key, value in results.items():
        if isinstance(value, list) and value:
            items = ",\n  ".join(json.dumps(item) for item in value)
            fields.append(f"{json.dumps(key)}: [\n  {items}\n ]")
        else:
            fields.append(f"{json.dumps(key)}: {json.dumps(value, indent=1)}")
    return "{\n " + ",\n ".join(fields) + "\n}\n"


# ---- the report --------------------------------------------------------------------------------
def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f} MiB"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def render_report(
    results: dict[str, Any],
    summary: RequestSummary,
    memory: Sequence[MemoryGrowth],
) -> str:
    """The Markdown report of one soak (`results` is what results.json holds)."""
    setup = results["setup"]
    lines = [
        "# Soak test: faults under load",
        "",
        f"`{setup['command']}`, started {setup['started']}, tested commit `{setup['commit']}`.",
        "",
        f"{setup['clients']} streaming clients against {setup['edges']} `specedge edge` "
        f"processes (`--server A,B`, failing over), two `specedge serve` processes behind "
        f"user-space WAN proxies ({setup['rtt_ms']:g} ms RTT), for "
        f"{setup['duration_s'] / 60:.1f} minutes, a fault every {setup['fault_every_s']:g} s. "
        f"Target `{setup['target']}` in float32 on the servers (greedy equality needs it), draft "
        f"`{setup['draft']}` on the edges; every request greedy (T = 0), at most "
        f"{setup['max_tokens']} tokens, over {setup['prompts']} prompts whose reference answers "
        f"were computed once in float32 with `LocalGenerator`.",
        "",
        *[f"- {line}" for line in setup["placement"]],
        f"- {setup['machine']}",
        "",
        "## Checks",
        "",
        "| check | result |",
        "|---|---|",
    ]
    for check in results["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[check["passed"]]
        lines.append(f"| {check['name']} | {verdict}: {check['detail']} |")
    lines += _requests_section(summary)
    lines += _faults_section([FaultRecord(**fault) for fault in results["faults"]], summary)
    lines += _failovers(results.get("failovers"), setup)
    lines += _slots_section(results["slots"])
    lines += _memory_section(memory, setup["long_lived"], setup["warmup_s"])
    notes = [*method_notes(setup), *(results.get("notes") or [])]
    lines += ["", "## Notes", "", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def method_notes(setup: dict[str, Any]) -> list[str]:
    """What the numbers do and do not cover."""
    return [
        "Errors from an edge kill are by design: the client's HTTP connection to the edge that "
        "died breaks (the OpenAI API has no resume). Server kills and partitions are meant to be "
        "invisible to clients (the edge fails over with the prompt plus the tokens emitted so "
        "far), so any error attributed to them would be a finding even though it counts as "
        "explained.",
        f"A black-hole partition lasts {setup['partition_s']:g} s against the edges' "
        f"`--reply-timeout {setup['reply_timeout_s']:g}`: the sessions on the cut link time out "
        "and fail over; healing then closes the server's side of them.",
        "Slow readers fall behind by seconds, but streams of this length never fill the socket "
        "buffers, so `--stream-timeout` (a reader that stops for good) is not reached here; "
        "`tests/server/test_bad_input.py` covers it.",
        "The clients read their streams with `benchmarks/soak_client.py` (the benchmark client, "
        "`specedge.bench.client`, keeps chunk times but not the text, and has no slow or "
        "hanging-up reader); they share its request path and model name.",
        "Latency is of requests as the clients saw them, faults included, on a CPU shared with "
        "other work (see the load averages above): no performance figure, only evidence that "
        "requests kept completing.",
    ]


def _requests_section(summary: RequestSummary) -> list[str]:
    outcomes = summary.outcomes
    lines = [
        "",
        "## Requests",
        "",
        f"{summary.total} requests, {summary.completion_tokens} completion tokens: "
        f"{outcomes.get('correct', 0)} completed with the reference answer, "
        f"{outcomes.get('disconnected', 0)} hung up by their client on purpose (each a prefix "
        f"of its reference), {outcomes.get('error', 0)} ended in an error, "
        f"{outcomes.get('wrong', 0)} wrong.",
        "",
    ]
    latency = summary.latency_s
    if latency:
        lines += [
            "Latency of the completed requests that read at full speed: "
            f"p50 {_seconds(latency.get('p50'))}, p99 {_seconds(latency.get('p99'))} "
            f"(time to first token p50 {_seconds(latency.get('ttft_p50'))}, "
            f"p99 {_seconds(latency.get('ttft_p99'))}).",
            "",
        ]
    lines += ["Errors by cause (the fault each is attributed to) and how they surfaced:", ""]
    if not summary.errors_by_cause:
        lines.append("(no errors)")
    else:
        lines += ["| cause | errors | how |", "|---|---|---|"]
        for attributed, kinds in summary.errors_by_cause.items():
            how = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
            lines.append(f"| {attributed} | {sum(kinds.values())} | {how} |")
    for label, bad in (("Unexplained errors", summary.unexplained), ("Wrong", summary.wrong)):
        if bad:
            lines += ["", f"{label} (first 10):", ""]
            for request in bad[:10]:
                lines.append(
                    f"- client {request.client} (edge {request.edge}), prompt {request.prompt}, "
                    f"{request.start_s:.1f}-{request.end_s:.1f} s, {request.behaviour}: "
                    f"{request.error_kind or 'completed'} {request.error or ''}".rstrip()
                )
    return lines


def _faults_section(faults: Sequence[FaultRecord], summary: RequestSummary) -> list[str]:
    kinds = Counter(fault.kind for fault in faults)
    lines = [
        "",
        "## Faults",
        "",
        f"{len(faults)} injected: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
        "",
        "| at | fault | target | recovered after | errors attributed | detail |",
        "|---|---|---|---|---|---|",
    ]
    for index, fault in enumerate(faults):
        lines.append(
            f"| {fault.start_s / 60:.1f} min | {fault.kind} | {fault.target} | "
            f"{fault.end_s - fault.start_s:.1f} s | {summary.errors_by_fault.get(index, 0)} | "
            f"{fault.detail} |"
        )
    return lines


def _failovers(counts: dict[str, int] | None, setup: dict[str, Any]) -> list[str]:
    if counts is None:
        return []
    return [
        "",
        f"The edges' logs show {sum(counts.values())} sessions failing over to the other "
        f"server: {counts['stream broke']} when their stream broke (a killed server, a reset "
        f"link), {counts['no reply']} after no reply within `--reply-timeout "
        f"{setup['reply_timeout_s']:g}` (a black hole). Each of their requests is among those "
        "above, judged against its reference.",
    ]


def _slots_section(slots: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## KV slots at the end",
        "",
        "After the clients stopped: `specedge_server_active_sessions` of each server and "
        "`specedge_edge_active_sessions` of each edge (every session holds one KV slot; 0 = "
        "nothing leaked), and a probe that takes every slot of each server at once "
        "(`--max-sessions` streams on its HTTP API, all holding a session before any is "
        "closed; a leaked slot would make one wait for `--queue-timeout` and fail with 503).",
        "",
        "| process | open sessions | slot probe | sessions by outcome (this lifetime) |",
        "|---|---|---|---|",
    ]
    for name, entry in slots.items():
        probe = entry.get("probe")
        probe_text = "-" if probe is None else f"{probe['held']} of {probe['slots']} taken"
        outcomes = entry.get("sessions_by_outcome") or {}
        by_outcome = ", ".join(f"{k} {v:g}" for k, v in sorted(outcomes.items())) or "-"
        lines.append(f"| {name} | {entry['open_sessions']} | {probe_text} | {by_outcome} |")
    return lines


def _memory_section(
    memory: Sequence[MemoryGrowth], long_lived: Sequence[str], warmup_s: float
) -> list[str]:
    lines = [
        "",
        "## Memory",
        "",
        f"RSS from /proc every few seconds. Growth: median of the last "
        f"{MEMORY_WINDOW_S:.0f} s over the median of the first {MEMORY_WINDOW_S:.0f} s after "
        f"a {warmup_s:.0f} s warm-up from its start, for every process lifetime long enough (a "
        f"restart starts a new one). The faults kill "
        f"server A and edge 0 (their lines restart); {' and '.join(long_lived)} live through "
        f"the whole soak and carry the check (limit {MEMORY_GROWTH_LIMIT:.0%}).",
        "",
        "| process | pid | measured over | after warm-up | at the end | peak | growth |",
        "|---|---|---|---|---|---|---|",
    ]
    for growth in memory:
        lines.append(
            f"| {growth.process} | {growth.pid} | {growth.span_s / 60:.1f} min | "
            f"{_mib(growth.baseline_bytes)} | {_mib(growth.final_bytes)} | "
            f"{_mib(growth.peak_bytes)} | {growth.growth:+.1%} |"
        )
    lines += ["", f"![Resident memory over time]({PLOT_FILE})"]
    return lines
