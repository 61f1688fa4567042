"""The report's PNG plots (matplotlib, Agg backend: no display needed).

- `throughput_vs_clients.png`: server throughput against clients at the reference RTT;
- `itl_vs_rtt.png`: mean ITL against RTT at each system's largest client count;
- `cost_per_system.png`: $ per 1M tokens of each system at the reference clients and RTT.
One panel per temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from specedge.bench.results import RunResult, find_run, reference_rtt, systems_of

THROUGHPUT_PLOT = "throughput_vs_clients.png"
ITL_PLOT = "itl_vs_rtt.png"
COST_PLOT = "cost_per_system.png"
PLOT_FILES = (THROUGHPUT_PLOT, ITL_PLOT, COST_PLOT)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt: Any, temperatures: Sequence[float]) -> tuple[Any, list[Any]]:
    figure, axes = plt.subplots(
        1, len(temperatures), figsize=(5.5 * len(temperatures), 4), squeeze=False
    )
    for axis, temperature in zip(axes[0], temperatures, strict=True):
        axis.set_title(f"temperature {temperature:g}")
        axis.grid(True, alpha=0.3)
    return figure, list(axes[0])


def write_plots(runs: Sequence[RunResult], out_dir: Path) -> list[str]:
    """Write the three plots into `out_dir`; returns their file names."""
    if not runs:
        return []
    plt = _pyplot()
    temperatures = sorted({r.spec.temperature for r in runs})
    rtt = reference_rtt(runs)
    systems = systems_of(runs)
    try:
        _throughput_vs_clients(plt, runs, systems, temperatures, rtt, out_dir / THROUGHPUT_PLOT)
        _itl_vs_rtt(plt, runs, systems, temperatures, out_dir / ITL_PLOT)
        _cost_per_system(plt, runs, systems, temperatures, rtt, out_dir / COST_PLOT)
    finally:
        plt.close("all")
    return list(PLOT_FILES)


def _runs_of(runs: Sequence[RunResult], system: str, temperature: float) -> list[RunResult]:
    return [r for r in runs if r.spec.system == system and r.spec.temperature == temperature]


def _throughput_vs_clients(
    plt: Any,
    runs: Sequence[RunResult],
    systems: list[str],
    temperatures: list[float],
    rtt: float,
    path: Path,
) -> None:
    figure, axes = _panels(plt, temperatures)
    for axis, temperature in zip(axes, temperatures, strict=True):
        for system in systems:
            clients = sorted({r.spec.clients for r in runs if r.spec.system == system})
            points = [find_run(runs, system, c, temperature, rtt) for c in clients]
            xy = [(p.spec.clients, p.metrics.server_throughput_tok_s) for p in points if p]
            if xy:
                axis.plot(*zip(*xy, strict=True), marker="o", label=system)
        axis.set_xticks(sorted({r.spec.clients for r in runs}))
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel("server throughput (tokens/s)")
        axis.legend(fontsize="small")
    figure.suptitle(f"Server throughput vs clients (RTT {rtt:g} ms or nearest measured)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _itl_vs_rtt(
    plt: Any,
    runs: Sequence[RunResult],
    systems: list[str],
    temperatures: list[float],
    path: Path,
) -> None:
    figure, axes = _panels(plt, temperatures)
    for axis, temperature in zip(axes, temperatures, strict=True):
        for system in systems:
            mine = _runs_of(runs, system, temperature)
            if not mine:
                continue
            clients = max(r.spec.clients for r in mine)
            xy = sorted(
                (r.spec.rtt_ms, r.metrics.itl_ms_mean)
                for r in mine
                if r.spec.clients == clients and r.metrics.itl_ms_mean is not None
            )
            if xy:
                axis.plot(*zip(*xy, strict=True), marker="o", label=f"{system} ({clients} cl.)")
        axis.set_xticks(sorted({r.spec.rtt_ms for r in runs}))
        axis.set_xlabel("RTT (ms)")
        axis.set_ylabel("mean inter-token latency (ms)")
        axis.legend(fontsize="small")
    figure.suptitle("Inter-token latency vs network RTT")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _cost_per_system(
    plt: Any,
    runs: Sequence[RunResult],
    systems: list[str],
    temperatures: list[float],
    rtt: float,
    path: Path,
) -> None:
    figure, axes = _panels(plt, temperatures)
    for axis, temperature in zip(axes, temperatures, strict=True):
        labels, costs = [], []
        for system in systems:
            mine = _runs_of(runs, system, temperature)
            if not mine:
                continue
            clients = max(r.spec.clients for r in mine)
            run = find_run(runs, system, clients, temperature, rtt)
            if run and run.metrics.cost_per_mtok_usd is not None:
                labels.append(f"{system}\n{clients} cl., {run.spec.rtt_ms:g} ms")
                costs.append(run.metrics.cost_per_mtok_usd)
        bars = axis.bar(range(len(costs)), costs, color="tab:blue")
        axis.bar_label(bars, fmt="$%.0f", fontsize="small")
        axis.set_xticks(range(len(labels)), labels, fontsize="x-small", rotation=20)
        axis.set_ylabel("$ per 1M tokens")
    figure.suptitle(f"Cost per 1M tokens (largest client count, RTT {rtt:g} ms or nearest)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
