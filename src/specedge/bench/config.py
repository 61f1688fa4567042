"""`BenchConfig`: everything `specedge bench` needs, validated once at start-up.

Sources, later ones winning: the defaults below, a YAML file (`--config bench.yaml`, keys as
the field names, dashes or underscores; lists as YAML lists or comma-separated strings), then
command-line flags. With `quick` the `QUICK` preset replaces every setting that neither the file
nor a flag gave. The config is frozen: nothing changes it after start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from specedge.bench.metrics import Prices
from specedge.bench.prompts import SPECBENCH
from specedge.bench.results import ALL_SYSTEMS, BASELINES, EDGE_SYSTEMS, HF_ASSISTED
from specedge.config_file import read_yaml_settings
from specedge.errors import SpecEdgeError

AUTO = "auto"
REFERENCE_RTT_MS = 15.0  # the paper's WAN


class BenchConfigError(SpecEdgeError):
    """The benchmark configuration is invalid (the message says how to fix it)."""


@dataclass(frozen=True)
class BenchConfig:
    target: str = "smollm2-135m"
    draft: str = "smollm2-135m-draft"
    systems: tuple[str, ...] = ALL_SYSTEMS
    clients: tuple[int, ...] = (1, 2, 4, 8)
    rtt_ms: tuple[float, ...] = (0.0, 15.0, 30.0, 50.0)  # SpecEdge's edge <-> server RTTs
    baseline_rtt_ms: tuple[float, ...] = ()  # server-only systems; () = rtt_ms & {0, 15}
    ablation_rtt_ms: tuple[float, ...] = ()  # SpecEdge ablations; () = the RTT nearest 15 ms
    jitter_ms: float = 0.0
    prompts: str = SPECBENCH  # the bundled Spec-Bench set, or a JSONL file
    categories: tuple[str, ...] = ()  # () = all
    num_prompts: int = 8  # prompts sampled; each run sends them all, shared by its clients
    requests_per_client: int = 0  # > 0: each run sends clients x this many, cycling the prompts
    max_tokens: int = 32
    temperatures: tuple[float, ...] = (0.0, 0.7)
    budget: int = 32
    depth: str = "6"  # an integer, or "auto" (calibrated: see calibrate.py)
    proactive: str = "keep-depth"  # the full system's policy: keep-depth | add-depth
    prices: str = "server=4.05,edge=0.35"  # $/hour
    out: str = "bench-results"
    seed: int = 0
    dtype: str | None = None
    server_cpus: tuple[int, ...] = ()  # () = the first available core
    edge_cpus: tuple[int, ...] = ()  # () = the other cores
    request_timeout_s: float = 600.0
    startup_timeout_s: float = 300.0
    quick: bool = False

    # -- derived ---------------------------------------------------------------------------------
    @property
    def price_table(self) -> Prices:
        return Prices.parse(self.prices)

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

    def clients_for(self, system: str) -> tuple[int, ...]:
        return (1,) if system == HF_ASSISTED else self.clients

    def requests_for(self, clients: int, num_prompts: int) -> int:
        """Requests in a run of `clients` clients (every client sends at least one)."""
        if self.requests_per_client:
            return clients * self.requests_per_client
        return max(num_prompts, clients)

    def validate(self) -> BenchConfig:
        unknown = [s for s in self.systems if s not in ALL_SYSTEMS]
        if unknown or not self.systems:
            raise BenchConfigError(
                f"--systems: unknown {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(ALL_SYSTEMS)}"
            )
        for name in ("clients", "rtt_ms", "temperatures"):
            if not getattr(self, name):
                raise BenchConfigError(f"{_where(name)} needs at least one value")
        if any(c < 1 for c in self.clients):
            raise BenchConfigError(f"{_where('clients')} must be >= 1, got {self.clients}")
        for name in ("rtt_ms", "baseline_rtt_ms", "ablation_rtt_ms"):
            if any(r < 0 for r in getattr(self, name)):
                raise BenchConfigError(f"{_where(name)} must be >= 0 ms")
        if self.jitter_ms < 0:
            raise BenchConfigError(f"{_where('jitter_ms')} must be >= 0, got {self.jitter_ms}")
        if any(t < 0 for t in self.temperatures):
            raise BenchConfigError(f"{_where('temperatures')} must be >= 0")
        if self.requests_per_client < 0:
            raise BenchConfigError(f"{_where('requests_per_client')} must be >= 0 (0 = off)")
        for name in ("num_prompts", "max_tokens", "budget"):
            if getattr(self, name) < 1:
                raise BenchConfigError(f"{_where(name)} must be >= 1, got {getattr(self, name)}")
        if not self.auto_depth and not (self.depth.isdigit() and int(self.depth) >= 1):
            raise BenchConfigError(f"{_where('depth')} must be >= 1 or 'auto', got {self.depth!r}")
        if self.proactive not in ("keep-depth", "add-depth"):
            raise BenchConfigError(
                f"{_where('proactive')} must be keep-depth or add-depth (the ablation "
                f"`specedge-no-proactive` runs with it off), got {self.proactive!r}"
            )
        try:
            self.price_table  # noqa: B018 (parse to validate)
        except ValueError as error:
            raise BenchConfigError(f"--prices: {error}") from None
        if self.request_timeout_s <= 0 or self.startup_timeout_s <= 0:
            raise BenchConfigError("timeouts must be > 0 seconds")
        return self


# A small version of everything: a few prompts, short outputs, 2 clients, 2 RTTs, all systems.
QUICK: dict[str, Any] = {
    "clients": (2,),
    "rtt_ms": (0.0, 15.0),
    "num_prompts": 4,
    "max_tokens": 16,
    "temperatures": (0.0,),
    "budget": 16,
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
    return f"--{name.replace('_', '-')} (`{name}` in bench.yaml)"


def _coerce(name: str, value: Any) -> Any:
    """A flag's or YAML value as the field's type ("1,2,4" -> (1, 2, 4) for tuples)."""
    kind = _FIELD_TYPES[name]
    try:
        if kind.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [i.strip() if isinstance(i, str) else i for i in items]
            element = {"int": int, "float": float}.get(kind[6:].split(",")[0].strip(), str)
            return tuple(element(i) for i in items if i != "")
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        return None if value is None else str(value)
    except (TypeError, ValueError) as error:
        raise BenchConfigError(f"{_where(name)}: bad value {value!r} ({error})") from None
