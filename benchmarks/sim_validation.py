"""Validate `specedge simulate` against a measured benchmark (issue 14 item 5): simulate every
run of a `specedge bench` output directory with a profile of the machine it ran on, and
tabulate the errors of server throughput and mean ITL.

    .venv/bin/python benchmarks/sim_validation.py \
        --bench benchmarks/results/sim/validation-bench-r1 \
        --bench benchmarks/results/sim/validation-bench-r2 \
        --profile benchmarks/results/sim/profile-cpu.json \
        --out benchmarks/results/sim/validation-table.md \
        --host-from benchmarks/results/draft-headline/new-r1

Each measured run is simulated with its own settings (system, clients, RTT, temperature) and
the benchmark's (requests per client, warm-up, max tokens, budget, depth, shared edge), the
acceptance replayed from the first benchmark's request records (each system's own requests)
and, with `--host-from`, the server's host work per token as other runs measured it; each run
is simulated with `--seeds` seeds (the requests drawn differ) and the metrics averaged. The
simulated runs are also written as a results directory next to the table (`validation-sim/`:
report and plots).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from specedge.bench.report import write_report
from specedge.bench.results import BenchMeta, RunResult, read_results
from specedge.sim.acceptance import AcceptanceModel
from specedge.sim.config import SIM_SYSTEMS, load_sim_config
from specedge.sim.profile import DeviceProfile
from specedge.sim.run import simulate_run

AIM = 0.10  # relative error allowed (issue 14)


def host_costs(benches: list[Path]) -> str:
    """Each system's server host ms per token over the runs of `benches` that measured it
    (token-weighted), as `specedge simulate --host-ms-per-token` takes it."""
    host: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for bench in benches:
        for run in read_results(bench)[0]:
            ms = run.metrics.server_host_ms_per_token
            if ms is not None and run.spec.system in SIM_SYSTEMS:
                host[run.spec.system] = host.get(run.spec.system, 0.0) + ms * run.metrics.tokens
                tokens[run.spec.system] = tokens.get(run.spec.system, 0) + run.metrics.tokens
    return ",".join(f"{system}={host[system] / tokens[system]:.3f}" for system in sorted(host))


def simulate_bench(
    bench: Path,
    profile_path: Path,
    seed: int,
    systems: tuple[str, ...] = SIM_SYSTEMS,
    records: Path | None = None,
    host: str = "",
    seeds: int = 1,
) -> list[tuple[RunResult, RunResult]]:
    """(measured, simulated) for every run of `bench` of `systems`, acceptance from the
    request records of `records` (default: `bench`'s own), the server's host work per token
    `host` (`host_costs`), each simulated with `seeds` seeds and averaged."""
    runs, meta = read_results(bench)
    settings = meta.config
    depth = int(str(settings.get("draft tree", "depth 6")).split("depth ")[1].split(",")[0])
    profile = DeviceProfile.load(profile_path)
    acceptance = AcceptanceModel.from_bench(records or bench, depth)
    pairs = []
    for measured in runs:
        spec = measured.spec
        if spec.system not in systems:
            continue
        config = load_sim_config(
            None,
            {
                "profile": str(profile_path),
                "acceptance": str(records or bench),
                "systems": spec.system,
                "edges": str(spec.clients),
                "rtt_ms": str(spec.rtt_ms),
                "temperatures": str(spec.temperature),
                "jitter_ms": spec.jitter_ms,
                "requests_per_edge": int(str(settings["requests per run"]).split()[0]),
                "warmup_per_edge": 1,
                "max_tokens": int(settings["max tokens per request"]),
                "budget": spec.budget or "auto",
                "depth": depth,
                "edge_mode": "shared",
                "prices": "server=4.05,edge=0.35",
                "host_ms_per_token": host,
                "seed": seed,
            },
        )
        runs = [
            simulate_run(
                replace(spec, repeat=0),
                replace(config, seed=seed + k),
                profile,
                profile,
                acceptance,
            )
            for k in range(seeds)
        ]
        pairs.append((measured, _mean_of(runs)))
    return pairs


def _mean_of(runs: list[RunResult]) -> RunResult:
    """The first run with the compared metrics averaged over all of them (the simulator's
    expectation for the settings, not one draw of requests)."""
    names = ("server_throughput_tok_s", "itl_ms_mean", "tokens_per_round", "streamed_share")
    values = {}
    for name in names:
        known = [v for r in runs if (v := getattr(r.metrics, name)) is not None]
        values[name] = sum(known) / len(known) if known else None
    return replace(runs[0], metrics=replace(runs[0].metrics, **values))


def error(simulated: float | None, measured: float | None) -> float | None:
    if simulated is None or measured is None or measured == 0:
        return None
    return simulated / measured - 1.0


def table(pairs: list[tuple[RunResult, RunResult]]) -> list[str]:
    lines = [
        "| system | clients | RTT ms | T | tok/s measured | simulated | error | ITL ms measured "
        "| simulated | error | tok/round measured | simulated | streamed measured | simulated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for measured, simulated in pairs:
        m, s, spec = measured.metrics, simulated.metrics, measured.spec
        throughput = error(s.server_throughput_tok_s, m.server_throughput_tok_s)
        itl = error(s.itl_ms_mean, m.itl_ms_mean)
        lines.append(
            f"| {spec.system} | {spec.clients} | {spec.rtt_ms:g} | {spec.temperature:g} "
            f"| {m.server_throughput_tok_s:.1f} | {s.server_throughput_tok_s:.1f} "
            f"| {_pct(throughput)} | {_num(m.itl_ms_mean)} | {_num(s.itl_ms_mean)} | {_pct(itl)} "
            f"| {_num(m.tokens_per_round, 2)} | {_num(s.tokens_per_round, 2)} "
            f"| {_num(m.streamed_share, 2)} | {_num(s.streamed_share, 2)} |"
        )
    return lines


def summary(pairs: list[tuple[RunResult, RunResult]]) -> dict[str, object]:
    throughput = [
        error(s.metrics.server_throughput_tok_s, m.metrics.server_throughput_tok_s)
        for m, s in pairs
    ]
    itl = [error(s.metrics.itl_ms_mean, m.metrics.itl_ms_mean) for m, s in pairs]
    both = [
        t is not None and i is not None and abs(t) <= AIM and abs(i) <= AIM
        for t, i in zip(throughput, itl, strict=True)
    ]
    known_t = [abs(t) for t in throughput if t is not None]
    known_i = [abs(i) for i in itl if i is not None]
    return {
        "runs": len(pairs),
        "within_10pct_both": sum(both),
        "throughput_within": sum(e <= AIM for e in known_t),
        "itl_within": sum(e <= AIM for e in known_i),
        "throughput_mean_abs_error": sum(known_t) / len(known_t) if known_t else None,
        "itl_mean_abs_error": sum(known_i) / len(known_i) if known_i else None,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.0f}%"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bench",
        action="append",
        required=True,
        help="DIR or DIR=system,system (repeatable): the measured runs to simulate",
    )
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="validation table (Markdown)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        type=int,
        default=8,
        help="simulate each run with this many seeds (the requests drawn differ) and average",
    )
    parser.add_argument(
        "--host-from",
        type=Path,
        action="append",
        default=[],
        help="bench DIR (repeatable) whose runs measured the server's host work per token "
        "(better other runs than those simulated); none: no host term",
    )
    args = parser.parse_args()
    pairs = []
    records = Path(args.bench[0].split("=")[0])  # acceptance from the first directory
    host = host_costs(args.host_from)
    for entry in args.bench:
        directory, _, systems = entry.partition("=")
        chosen = tuple(systems.split(",")) if systems else SIM_SYSTEMS
        pairs += simulate_bench(
            Path(directory), args.profile, args.seed, chosen, records, host, args.seeds
        )
    results = summary(pairs)
    benches = ", ".join(args.bench)
    lines = [f"Simulated vs measured: {benches} with {args.profile}", ""]
    if host:
        sources = ", ".join(map(str, args.host_from))
        lines += [f"Server host ms per token (from {sources}): {host}", ""]
    lines += [*table(pairs), ""]
    lines.append("Summary: " + json.dumps(results))
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "summary": results,
                "runs": [{"measured": m.as_dict(), "simulated": s.as_dict()} for m, s in pairs],
            },
            indent=1,
        )
        + "\n"
    )
    sim_dir = args.out.parent / "validation-sim"
    meta = BenchMeta(
        config={"simulated": f"yes: every run of {benches}", "profile": str(args.profile)}
    )
    write_report(sim_dir, [s for _, s in pairs], meta)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
