"""The paper's setting, simulated (issue 14 item 6): an A100 server verifying for RTX 4090
edges over a 14 ms WAN, Qwen3-14B target and Qwen3-1.7B draft, from roofline ESTIMATES of
both devices (`specedge.sim.roofline`; no GPU has run this code), SpecEdge against
server-spec and server-ar at 1-256 edges per server, and capacity planning from it.

    .venv/bin/python benchmarks/sim_projection.py \
        --records benchmarks/results/sim/validation-bench-r1 \
        --out benchmarks/results/sim/projection.json

Acceptance has two sources, both shown: the bundled pair's measured records (SmolLM2-135M and
its 4-layer draft on SpecBench: a weak draft) and an assumed Qwen3-1.7B -> Qwen3-14B draft
emitting `--assumed-tokens` tokens per verified round (an assumption, stated as one).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from specedge.bench.results import SERVER_AR, SERVER_SPEC, SPECEDGE, RunResult, RunSpec
from specedge.sim.acceptance import AcceptanceModel, RequestSample, step_acceptance
from specedge.sim.config import load_sim_config
from specedge.sim.profile import DeviceProfile
from specedge.sim.roofline import A100_80GB, QWEN3_1_7B, QWEN3_14B, RTX_4090, estimate_profile
from specedge.sim.run import simulate_run

EDGES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SYSTEMS = (SPECEDGE, SERVER_SPEC, SERVER_AR)
RTT_MS = 14.0  # the paper's WAN
A100_80GB_PER_HOUR, RTX_4090_PER_HOUR = 5.05, 0.35
USERS = (1_000, 10_000, 100_000)


def assumed_acceptance(tokens: float, depth: int, prompt_tokens: int = 200) -> AcceptanceModel:
    """Every request a 128-token answer whose verified rounds emit `tokens` on average."""
    sample = RequestSample(prompt_tokens, 128, step_acceptance(tokens, depth), 0.2, "assumed")
    return AcceptanceModel({0.0: (sample,)}, f"assumed: {tokens:g} tokens per verified round")


def sweep(
    acceptance: AcceptanceModel, server: DeviceProfile, edge: DeviceProfile, requests: int
) -> list[RunResult]:
    settings: dict[str, Any] = {
        "acceptance": "(given)",
        "rtt_ms": str(RTT_MS),
        "temperatures": "0",
        "requests_per_edge": requests,
        "warmup_per_edge": 1,
        "max_tokens": 128,
        "max_batch": 256,
        "max_batch_tokens": 16384,
        "edge_mode": "per-client",
        "prices": f"server={A100_80GB_PER_HOUR},edge={RTX_4090_PER_HOUR}",
    }
    runs = []
    for system, decoding in (*((s, True) for s in SYSTEMS), (SPECEDGE, False)):
        for edges in EDGES:
            config = load_sim_config(
                None,
                {**settings, "systems": system, "edges": str(edges), "server_decoding": decoding},
            )
            spec = RunSpec(system, edges, RTT_MS, 0.0, depth=config.depth, budget=config.budget)
            if system == SERVER_AR:
                spec = replace(spec, depth=None, budget=None)
            result = simulate_run(spec, config, server, edge, acceptance)
            if not decoding:  # SpecEdge that always sends trees (`edge --no-server-decoding`)
                result = replace(result, notes="no server decoding")
            runs.append(result)
    return runs


TREES_ALWAYS = "specedge, trees always"


def _key(run: dict[str, Any]) -> str:
    return TREES_ALWAYS if run["notes"] == "no server decoding" else run["system"]


def capacity(runs: list[RunResult], system: str, itl_ms: float) -> RunResult | None:
    """The largest edges-per-server point of `system` whose mean ITL is within `itl_ms`."""
    fitting = [
        r
        for r in runs
        if r.spec.system == system
        and r.notes != "no server decoding"
        and (r.metrics.itl_ms_mean or 1e9) <= itl_ms
    ]
    return max(fitting, key=lambda r: r.spec.clients, default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--assumed-tokens", type=float, default=3.0)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument(
        "--tree-shape-from",
        type=Path,
        default=Path("benchmarks/results/sim/profile-cpu.json"),
        help="a measured profile whose draft rows per step (whole and sized trees) to use",
    )
    args = parser.parse_args()
    # The tree shape's rows per draft step, whole and sized, as this machine's profile
    # measured them (a property of the tree builder, not of the device).
    shape = DeviceProfile.load(args.tree_shape_from)
    rows, by_budget = shape.draft_rows_per_step, shape.draft_rows_by_budget
    server = estimate_profile(
        A100_80GB, QWEN3_14B, QWEN3_1_7B, rows_per_step=rows, rows_by_budget=by_budget
    )
    edge = estimate_profile(
        RTX_4090, QWEN3_14B, QWEN3_1_7B, rows_per_step=rows, rows_by_budget=by_budget
    )
    sources = {
        "assumed": assumed_acceptance(args.assumed_tokens, 6),
        "bundled": AcceptanceModel.from_bench(args.records, 6),
    }
    out: dict[str, Any] = {
        "server": server.notes[0],
        "edge": edge.notes[0],
        "rtt_ms": RTT_MS,
        "prices": {"server": A100_80GB_PER_HOUR, "edge": RTX_4090_PER_HOUR},
        "sources": {},
    }
    for name, acceptance in sources.items():
        started = time.monotonic()
        runs = sweep(acceptance, server, edge, args.requests)
        single = {s: capacity(runs, s, 1e9) for s in SYSTEMS}
        plan = {}
        for limit in (50.0, 100.0):
            per_system = {}
            for system in SYSTEMS:
                best = capacity(runs, system, limit)
                if best is None:
                    per_system[system] = None
                    continue
                per_server = best.spec.clients
                per_system[system] = {
                    "edges_per_server": per_server,
                    "servers": {str(u): math.ceil(u / per_server) for u in USERS},
                    "cost_per_mtok_usd": best.metrics.cost_per_mtok_usd,
                    "itl_ms": best.metrics.itl_ms_mean,
                    "server_throughput_tok_s": best.metrics.server_throughput_tok_s,
                }
            plan[f"itl<= {limit:g} ms"] = per_system
        out["sources"][name] = {
            "acceptance": acceptance.source,
            "alpha": acceptance.mean_alpha(0.0),
            "seconds": time.monotonic() - started,
            "runs": [r.as_dict() for r in runs],
            "capacity": plan,
            "largest": {s: r.spec.clients if r else None for s, r in single.items()},
        }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    tables = args.out.with_suffix(".tables.md")
    tables.write_text(markdown(out))
    print(f"wrote {args.out} and {tables}")


def markdown(out: dict[str, Any]) -> str:
    """The sweep and capacity tables of each acceptance source."""
    lines = []
    for source in out["sources"].values():
        runs = {(_key(r), r["clients"]): r for r in source["runs"]}
        lines += [
            f"### Acceptance: {source['acceptance']} (alpha {source['alpha']:.2f})",
            "",
            "| edges per server | SpecEdge tok/s | server-spec | server-ar | SpecEdge / "
            "server-spec | SpecEdge ITL ms | server-spec | server-ar | $/1M tok SpecEdge "
            "| server-spec | server-ar | tok/round SpecEdge | streamed | SpecEdge, trees "
            "always: tok/s | ITL ms | tok/round |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for edges in EDGES:
            se, sp, ar = (runs[(s, edges)] for s in SYSTEMS)
            trees = runs[(TREES_ALWAYS, edges)]
            ratio = se["server_throughput_tok_s"] / sp["server_throughput_tok_s"]
            lines.append(
                f"| {edges} | {se['server_throughput_tok_s']:.0f} "
                f"| {sp['server_throughput_tok_s']:.0f} | {ar['server_throughput_tok_s']:.0f} "
                f"| {ratio:.2f}x | {se['itl_ms_mean']:.1f} | {sp['itl_ms_mean']:.1f} "
                f"| {ar['itl_ms_mean']:.1f} | {se['cost_per_mtok_usd']:.2f} "
                f"| {sp['cost_per_mtok_usd']:.2f} | {ar['cost_per_mtok_usd']:.2f} "
                f"| {se['tokens_per_round']:.2f} | {se['streamed_share'] or 0:.2f} "
                f"| {trees['server_throughput_tok_s']:.0f} | {trees['itl_ms_mean']:.1f} "
                f"| {trees['tokens_per_round']:.2f} |"
            )
        lines += [
            "",
            "| ITL limit | system | edges per server | servers for 1k / 10k / 100k "
            "users | $/1M tokens |",
            "|---|---|---|---|---|",
        ]
        for limit, per_system in source["capacity"].items():
            for system, plan in per_system.items():
                if plan is None:
                    lines.append(f"| {limit} | {system} | none | - | - |")
                    continue
                servers = " / ".join(f"{n:,}" for n in plan["servers"].values())
                lines.append(
                    f"| {limit} | {system} | {plan['edges_per_server']} | {servers} "
                    f"| {plan['cost_per_mtok_usd']:.2f} |"
                )
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
