"""`BenchConfig`: everything `specedge bench` needs, validated once at start-up.

Sources, later ones winning: the defaults below, a YAML file (`--config bench.yaml`, keys as
the field names, dashes or underscores; lists as YAML lists or comma-separated strings), then
command-line flags (`--kebab-case` of each field, declared once with `setting`). With `quick`
the `QUICK` preset replaces every setting that neither the file nor a flag gave. The config is
frozen: nothing changes it after start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from specedge.bench.metrics import Prices
from specedge.bench.prompts import RANDOM_TEXT, SPECBENCH
from specedge.bench.results import (
    ALL_SYSTEMS,
    BASELINES,
    EDGE_SYSTEMS,
    HF_ASSISTED,
    SERVER_AR,
    SPECEDGE,
)
from specedge.config_file import (
    check_budget,
    check_choices,
    check_nonempty,
    check_ranges,
    read_yaml_settings,
    setting,
)
from specedge.config_file import flag_and_key as _flag_and_key
from specedge.core.limits import AUTO_BUDGET, BUDGET_HELP, TreeShape, budget_cap
from specedge.errors import SpecEdgeError

AUTO = "auto"
REFERENCE_RTT_MS = 15.0  # the paper's WAN


class BenchConfigError(SpecEdgeError):
    """The benchmark configuration is invalid (the message says how to fix it)."""


@dataclass(frozen=True)
class BenchConfig:
    target: str = setting("smollm2-135m", "Target model.")
    draft: str = setting("smollm2-135m-draft", "Draft model.")
    systems: tuple[str, ...] = setting(
        ALL_SYSTEMS,
        f"Comma-separated: {', '.join(ALL_SYSTEMS)} (default: all).",
        show_default=False,
    )
    clients: tuple[int, ...] = setting((1, 2, 4, 8, 16), "Concurrent clients.", minimum=1)
    rtt_ms: tuple[float, ...] = setting(
        (0.0, 15.0, 30.0, 50.0), "SpecEdge's edge-server RTTs, ms.", minimum=0
    )
    baseline_rtt_ms: tuple[float, ...] = setting(
        (), "RTTs of the server-only systems, ms (default: --rtt-ms values of 0 and 15).", minimum=0
    )
    ablation_rtt_ms: tuple[float, ...] = setting(
        (), "RTTs of the SpecEdge ablations, ms (default: the --rtt-ms nearest 15).", minimum=0
    )
    jitter_ms: float = setting(0.0, "RTT jitter, ms.", minimum=0)
    prompts: str = setting(
        SPECBENCH,
        "Spec-Bench style JSON Lines, or specbench (the bundled set), random (random text) or "
        "long (Spec-Bench documents stacked to about 1,500 tokens).",
    )
    categories: tuple[str, ...] = setting((), "Comma-separated prompt categories (default: all).")
    num_prompts: int = setting(
        8, "Prompts sampled; each run sends them all, shared by its clients.", minimum=1
    )
    requests_per_client: int = setting(
        4,
        "Measured requests per client per run, back to back (closed loop), cycling the "
        "prompts; 0: each run sends every prompt once, shared by its clients.",
        minimum=0,
    )
    warmup_per_client: int = setting(
        1, "Unmeasured requests per client before each run's measured ones.", minimum=0
    )
    repeats: int = setting(
        2,
        "Runs of each cell at the reference RTTs (0 and 15 ms), systems alternated "
        "between repeats; the report shows medians and ranges.",
        minimum=1,
    )
    worst_case_prompts: str = setting(
        RANDOM_TEXT,
        "A second prompt set for SpecEdge and server-ar at 15 ms RTT, every client count and "
        "temperature: random (random text), a file, or none.",
    )
    max_tokens: int = setting(128, "Tokens per request.", minimum=1)
    temperatures: tuple[float, ...] = setting(
        (0.0, 0.7), "One temperature or a comma-separated list.", flag="temperature", minimum=0
    )
    budget: str = setting(AUTO_BUDGET, BUDGET_HELP)
    depth: str = setting(
        str(TreeShape().depth), f"Draft tree depth, or {AUTO} (calibrated: see calibrate.py)."
    )
    proactive: str = setting("keep-depth", "The full system's policy: keep-depth | add-depth.")
    edge_mode: str = setting(
        "shared",
        "SpecEdge's edges: shared (one edge serves every client) | per-client (one edge each).",
    )
    prices: str = setting("server=4.05,edge=0.35", "Machine prices, $/hour.")
    out: str = setting("bench-results", "Output directory.")
    seed: int = setting(0, "Requests' sampling seed (each request adds its prompt's index).")
    dtype: str | None = setting(None, "float32|bfloat16|float16 (default: best for the device).")
    server_cpus: tuple[int, ...] = setting(
        (), "The server's CPU cores, comma-separated (default: the first available core)."
    )
    edge_cpus: tuple[int, ...] = setting(
        (), "Cores of the edges and clients, comma-separated (default: the other cores)."
    )
    request_timeout_s: float = setting(
        600.0, "Seconds a request may take.", minimum=0, exclusive=True
    )
    startup_timeout_s: float = setting(
        300.0, "Seconds a process may take to start.", minimum=0, exclusive=True
    )
    vllm_python: str | None = setting(
        None,
        "Python of a virtual environment with vLLM, for the vllm systems (default: this Python "
        "if it imports vllm, else $SPECEDGE_VLLM_PYTHON; without one they are skipped with a "
        "note).",
        show_default=False,
    )
    vllm_kv_cache_gb: int = setting(4, "vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE), GB.", minimum=1)
    quick: bool = setting(False, "A small run of everything (minutes).")

    # -- derived ---------------------------------------------------------------------------------
    @property
    def price_table(self) -> Prices:
        return Prices.parse(self.prices)

    @property
    def budget_cap(self) -> int:
        """The most nodes a tree drafts (`--budget auto` sizes trees up to this)."""
        return budget_cap(self.budget)

    @property
    def auto_depth(self) -> bool:
        return self.depth == AUTO

    def rtts_for(self, system: str) -> tuple[float, ...]:
        """RTTs at which `system` runs: all for SpecEdge, references for the others."""
        if system == HF_ASSISTED:
            return (0.0,)
        if system in BASELINES:
            chosen = self.baseline_rtt_ms or tuple(r for r in self.rtt_ms if r in (0.0, 15.0))
            return chosen or self.rtt_ms[:1]
        if system in EDGE_SYSTEMS and system != EDGE_SYSTEMS[0]:
            if self.ablation_rtt_ms:
                return self.ablation_rtt_ms
            return (min(self.rtt_ms, key=lambda r: (abs(r - REFERENCE_RTT_MS), r)),)
        return self.rtt_ms

    @property
    def prompt_sets(self) -> tuple[str, ...]:
        """The main prompt set, then the worst case (if any)."""
        extra = self.worst_case_prompts
        if not extra or extra == "none" or extra == self.prompts:
            return (self.prompts,)
        return (self.prompts, extra)

    def repeats_for(self, system: str, rtt_ms: float) -> int:
        """Repeats of a cell: `repeats` at the reference RTTs for SpecEdge and the baselines
        (the cells the comparisons rest on), once elsewhere."""
        if system in (SPECEDGE, *BASELINES) and rtt_ms in (0.0, REFERENCE_RTT_MS):
            return self.repeats
        return 1

    def prompt_sets_for(self, system: str, rtt_ms: float) -> tuple[str, ...]:
        """The worst-case set runs for SpecEdge and server-ar at the reference RTT only."""
        sets = self.prompt_sets
        if system in (SPECEDGE, SERVER_AR) and rtt_ms == REFERENCE_RTT_MS:
            return sets
        return sets[:1]

    def clients_for(self, system: str) -> tuple[int, ...]:
        return (1,) if system == HF_ASSISTED else self.clients

    def requests_for(self, clients: int, num_prompts: int) -> int:
        """Requests in a run of `clients` clients (every client sends at least one)."""
        if self.requests_per_client:
            return clients * self.requests_per_client
        return max(num_prompts, clients)

    def validate(self) -> BenchConfig:
        check_choices(self, {"systems": ALL_SYSTEMS}, BenchConfigError)
        check_nonempty(self, ("clients", "rtt_ms", "temperatures"), BenchConfigError)
        check_ranges(self, BenchConfigError)
        check_budget(self, BenchConfigError)
        if not self.auto_depth and not (self.depth.isdigit() and int(self.depth) >= 1):
            raise BenchConfigError(f"{_where('depth')} must be >= 1 or 'auto', got {self.depth!r}")
        check_choices(self, {"edge_mode": ("shared", "per-client")}, BenchConfigError)
        if self.proactive not in ("keep-depth", "add-depth"):
            raise BenchConfigError(
                f"{_where('proactive')} must be keep-depth or add-depth (the ablation "
                f"`specedge-no-proactive` runs with it off), got {self.proactive!r}"
            )
        try:
            self.price_table  # noqa: B018 (parse to validate)
        except ValueError as error:
            raise BenchConfigError(f"--prices: {error}") from None
        return self


# A small version of everything: a few prompts, short outputs, 2 clients, 2 RTTs, all systems.
QUICK: dict[str, Any] = {
    "clients": (2,),
    "rtt_ms": (0.0, 15.0),
    "num_prompts": 4,
    "max_tokens": 16,
    "requests_per_client": 1,
    "warmup_per_client": 0,
    "repeats": 1,
    "worst_case_prompts": "none",
    "temperatures": (0.0,),
    "depth": "4",
    "out": "bench-results-quick",
}


def load_bench_config(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> BenchConfig:
    """Defaults < YAML < `overrides` (flags; None values ignored), the QUICK preset filling
    what neither set when `quick`; then validate."""
    settings: dict[str, Any] = {}
    if config_file is not None:
        settings.update(read_yaml_settings(config_file, _FIELD_TYPES, BenchConfigError))
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings = {name: _coerce(name, value) for name, value in settings.items()}
    if settings.get("quick"):
        settings = {**QUICK, **settings}
    return replace(BenchConfig(), **settings).validate()


_FIELD_TYPES = {f.name: str(f.type) for f in fields(BenchConfig)}


def _where(name: str) -> str:
    return _flag_and_key(name, BenchConfig)


def _coerce(name: str, value: Any) -> Any:
    """A flag's or YAML value as the field's type ("1,2,4" -> (1, 2, 4) for tuples)."""
    try:
        return coerce_value(_FIELD_TYPES[name], value)
    except (TypeError, ValueError) as error:
        raise BenchConfigError(f"{_where(name)}: bad value {value!r} ({error})") from None


def coerce_value(kind: str, value: Any) -> Any:
    """A flag's or YAML value as a field of annotation `kind` (e.g. "tuple[int, ...]"):
    "1,2,4" or a YAML list -> (1, 2, 4) for tuples, numbers as ints or floats, text as text
    (also for `specedge simulate`'s settings); ValueError or TypeError when it is not one."""
    if kind.startswith("tuple"):
        items = value.split(",") if isinstance(value, str) else list(value)
        items = [i.strip() if isinstance(i, str) else i for i in items]
        element = {"int": int, "float": float}.get(kind[6:].split(",")[0].strip(), str)
        return tuple(element(i) for i in items if i != "")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if value is None and "None" in kind:
        return None
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    return None if value is None else str(value)
