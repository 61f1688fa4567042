"""How long `specedge simulate` takes for a large fleet (issue 14 item 4: 10,000 edges in
minutes): 10,000 SpecEdge edges (RTX 4090 estimate each) over 100 A100 replicas (estimate),
14 ms RTT, one 128-token request per edge, the assumed Qwen3 acceptance of
`sim_projection.py`.

    taskset -c 1 .venv/bin/python -m benchmarks.sim_scale --edges 10000 --servers 100 \
        --out benchmarks/results/sim/scale.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from benchmarks.sim_projection import assumed_acceptance
from specedge.bench.results import SPECEDGE, RunSpec
from specedge.sim.config import load_sim_config
from specedge.sim.roofline import A100_80GB, QWEN3_1_7B, QWEN3_14B, RTX_4090, estimate_profile
from specedge.sim.run import simulate_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edges", type=int, default=10_000)
    parser.add_argument("--servers", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = (1.0, 4.0, 8.0, 8.0, 8.0, 4.0)
    server = estimate_profile(A100_80GB, QWEN3_14B, QWEN3_1_7B, rows_per_step=rows)
    edge = estimate_profile(RTX_4090, QWEN3_14B, QWEN3_1_7B, rows_per_step=rows)
    config = load_sim_config(
        None,
        {
            "acceptance": "(assumed)",
            "systems": SPECEDGE,
            "edges": str(args.edges),
            "servers": args.servers,
            "rtt_ms": "14",
            "requests_per_edge": 1,
            "warmup_per_edge": 0,
            "max_tokens": 128,
            "max_batch": 256,
            "max_batch_tokens": 16384,
        },
    )
    spec = RunSpec(SPECEDGE, args.edges, 14.0, 0.0, depth=config.depth, budget=config.budget)
    started, cpu = time.perf_counter(), time.process_time()
    result = simulate_run(spec, config, server, edge, assumed_acceptance(3.0, config.depth))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    metrics = result.metrics
    text = f"""# Simulator scale

`benchmarks/sim_scale.py`: {args.edges:,} SpecEdge edges (RTX 4090, an estimate) over
{args.servers} A100 80GB replicas (an estimate), 14 ms RTT, one 128-token request per edge,
assumed acceptance (3.0 tokens per verified round), on this machine
({platform.processor() or "CPU"}, {os.cpu_count()} cores, one used).

| simulated | value |
|---|---|
| requests completed | {metrics.requests:,} of {args.edges:,} |
| tokens | {metrics.tokens:,} |
| simulated wall time | {metrics.wall_s:.1f} s |
| fleet throughput | {metrics.server_throughput_tok_s:,.0f} tok/s |
| mean ITL | {metrics.itl_ms_mean:.1f} ms |
| tokens per round | {metrics.tokens_per_round:.2f} |

**Simulator time: {wall:.0f} s wall ({cpu:.0f} s CPU)**, {metrics.tokens / wall:,.0f}
simulated tokens per second of wall time.
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
