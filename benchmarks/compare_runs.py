"""Compare `specedge bench` result folders side by side (e.g. before/after a refactor, runs
alternated in one session): per run, the server throughput, ITL, tokens per round and server
busy time per token of each folder, and the median of each label's repeats.

    python benchmarks/compare_runs.py --out report.md before=/tmp/b1,/tmp/b2 after=/tmp/a1,/tmp/a2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = [  # (results key, column title, format)
    ("server_throughput_tok_s", "server tok/s", "{:.1f}"),
    ("itl_ms_mean", "ITL ms", "{:.0f}"),
    ("tokens_per_round", "tokens/round", "{:.2f}"),
    ("server_busy_ms_per_token", "busy ms/token", "{:.1f}"),
]


def load(folder: Path) -> dict[tuple, dict]:
    runs = json.loads((folder / "results.json").read_text())
    return {
        (
            r["system"],
            r.get("prompt_set", "specbench"),
            r["clients"],
            r["rtt_ms"],
            r["temperature"],
        ): r
        for r in runs
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", help="LABEL=DIR[,DIR...]")
    parser.add_argument("--out", type=Path, help="write the Markdown table here (else stdout)")
    args = parser.parse_args()
    groups = {}
    for group in args.groups:
        label, _, dirs = group.partition("=")
        groups[label] = [load(Path(d)) for d in dirs.split(",")]
    keys = sorted({key for runs in groups.values() for result in runs for key in result})
    lines = []
    for metric, title, fmt in METRICS:
        lines += [f"### {title}", ""]
        header = ["system", "prompts", "clients", "RTT ms", "T"]
        for label, runs in groups.items():
            header += [f"{label} #{i + 1}" for i in range(len(runs))] + [f"{label} median"]
        header.append(" / ".join(reversed(list(groups))) + " (medians)")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key in keys:
            row = [key[0], key[1], str(key[2]), f"{key[3]:g}", f"{key[4]:g}"]
            medians = []
            for runs in groups.values():
                values = [result[key][metric] for result in runs if key in result]
                row += [fmt.format(v) for v in values] + ["–"] * (len(runs) - len(values))
                median = statistics.median(values) if values else float("nan")
                medians.append(median)
                row.append(fmt.format(median))
            ratio = medians[-1] / medians[0] if medians[0] else float("nan")
            row.append(f"{ratio:.2f}x")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
