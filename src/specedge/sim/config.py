"""Settings of `specedge simulate`: one frozen dataclass whose fields are the command's options
and the keys of its YAML file (`config_file.setting`), validated once by `load_sim_config`.

A simulation is a grid like a benchmark's: every system x edges x RTT x temperature, each cell
one *run*. Defaults are those of `specedge serve`, `specedge edge` and `specedge bench`, so a
simulated run and a benchmarked one mean the same thing unless a setting says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from specedge.bench.config import coerce_value
from specedge.bench.metrics import Prices
from specedge.bench.results import SERVER_AR, SERVER_SPEC, SPECEDGE, SPECEDGE_NO_PROACTIVE
from specedge.config_file import (
    check_budget,
    check_choices,
    check_nonempty,
    check_ranges,
    flag_and_key,
    path_fields,
    read_yaml_settings,
    setting,
)
from specedge.core.limits import AUTO_BUDGET, BUDGET_HELP, TreeShape, budget_cap
from specedge.errors import SpecEdgeError
from specedge.server.scheduler import SchedulerPolicy

SIM_SYSTEMS = (SPECEDGE, SPECEDGE_NO_PROACTIVE, SERVER_SPEC, SERVER_AR)
ARRIVALS = ("closed", "poisson", "bursts")
_POLICY = SchedulerPolicy()
_SHAPE = TreeShape()


class SimConfigError(SpecEdgeError):
    """The simulation settings are invalid (the message says how to fix it)."""


@dataclass(frozen=True)
class SimConfig:
    profile: str = setting(
        "sim-profile.json", "Device profile of the servers (`specedge profile`).", path=True
    )
    edge_profile: str | None = setting(
        None,
        "Device profile of the edges, for their draft costs (default: --profile's).",
        path=True,
    )
    acceptance: str | None = setting(
        None,
        "A `specedge bench` output directory (or its requests.jsonl): the measured requests "
        "whose acceptance, lengths and proactive hits the simulated ones replay.",
        path=True,
    )
    systems: tuple[str, ...] = setting(
        (SPECEDGE, SERVER_SPEC, SERVER_AR), f"Comma-separated: {', '.join(SIM_SYSTEMS)}."
    )
    edges: tuple[int, ...] = setting((1, 2, 4, 8), "Concurrent edges (users) per run.", minimum=1)
    servers: int = setting(1, "Server replicas (new sessions go to the least loaded).", minimum=1)
    rtt_ms: tuple[float, ...] = setting((15.0,), "Edge-server round-trip times, ms.", minimum=0)
    jitter_ms: float = setting(0.0, "RTT jitter (uniform +-), ms.", minimum=0)
    loss: float = setting(
        0.0, "Probability a message is lost (then resent after --rto-ms).", minimum=0, maximum=0.5
    )
    rto_ms: float = setting(200.0, "Retransmission timeout of a lost message, ms.", minimum=0)
    temperatures: tuple[float, ...] = setting(
        (0.0,), "One temperature or a comma-separated list.", flag="temperature", minimum=0
    )
    arrival: str = setting(
        "closed",
        "closed (each edge sends its requests back to back), poisson (--rate per edge) or "
        "bursts (--burst-size requests per edge every --burst-interval-s).",
    )
    requests_per_edge: int = setting(4, "Closed loop: measured requests per edge.", minimum=1)
    warmup_per_edge: int = setting(1, "Closed loop: unmeasured requests per edge first.", minimum=0)
    rate: float = setting(0.2, "Poisson: requests per second per edge.", minimum=0, exclusive=True)
    burst_size: int = setting(4, "Bursts: requests per edge per burst.", minimum=1)
    burst_interval_s: float = setting(
        10.0, "Bursts: seconds between bursts.", minimum=0, exclusive=True
    )
    duration_s: float = setting(
        60.0, "Open loop (poisson, bursts): seconds of arrivals.", minimum=0, exclusive=True
    )
    warmup_s: float = setting(
        5.0, "Open loop: arrivals in the first seconds are not measured.", minimum=0
    )
    max_tokens: int = setting(
        128, "Tokens per request (a measured one may stop sooner).", minimum=1
    )
    budget: str = setting(AUTO_BUDGET, BUDGET_HELP)
    depth: int = setting(_SHAPE.depth, "Draft tree depth (draft steps per tree).", minimum=1)
    proactive: str = setting("keep-depth", "keep-depth | add-depth (specedge-no-proactive: off).")
    proactive_depth: int = setting(3, "Depth (draft steps) of a proactive subtree.", minimum=1)
    edge_mode: str = setting(
        "per-client",
        "per-client (each edge its own device and link) | shared (one edge device and link for "
        "all, as `specedge bench` runs on a small machine).",
    )
    server_decoding: bool = setting(
        True, "The server decodes sessions whose trees do not pay (`edge --no-server-decoding`)."
    )
    max_batch: int = setting(_POLICY.max_batch, "Trees per batched forward.", minimum=1)
    max_batch_tokens: int = setting(
        _POLICY.max_batch_tokens, "Verified tokens per batched forward.", minimum=1
    )
    prefill_chunk: int = setting(_POLICY.prefill_chunk, "Prompt tokens per prefill.", minimum=1)
    batch_wait_ms: float = setting(
        1000 * _POLICY.max_wait, "Longest wait (ms) for a predicted arrival.", minimum=0
    )
    max_tree_nodes: int = setting(64, "The server's node cap per tree.", minimum=1)
    noise: float = setting(
        0.0,
        "Relative spread (uniform +-) of every forward's time around the profile's.",
        minimum=0,
        maximum=0.9,
    )
    host_ms_per_token: str = setting(
        "",
        "The server's host work per emitted token, held on its device after each batch, as "
        "SYSTEM=MS,... (a `specedge bench` run's server_host_ms_per_token; default none).",
    )
    prices: str = setting("server=4.05,edge=0.35", "Machine prices, $/hour.")
    seed: int = setting(0, "Seed of every random draw.")
    out: str = setting("sim-results", "Output directory.")

    # -- derived ---------------------------------------------------------------------------------
    @property
    def price_table(self) -> Prices:
        return Prices.parse(self.prices)

    @property
    def host_costs(self) -> dict[str, float]:
        """`host_ms_per_token` as seconds per token by system."""
        costs = {}
        for item in filter(None, (part.strip() for part in self.host_ms_per_token.split(","))):
            system, sep, value = item.partition("=")
            if not sep or system.strip() not in SIM_SYSTEMS:
                raise ValueError(f"expected SYSTEM=MS with a system of {', '.join(SIM_SYSTEMS)}")
            milliseconds = float(value)
            if not milliseconds >= 0:  # NaN too
                raise ValueError(f"{system.strip()}: a time must be >= 0 ms, got {value}")
            costs[system.strip()] = milliseconds / 1000.0
        return costs

    @property
    def budget_cap(self) -> int:
        return min(budget_cap(self.budget), self.max_tree_nodes)

    @property
    def adaptive(self) -> bool:
        return self.budget == AUTO_BUDGET

    @property
    def policy(self) -> SchedulerPolicy:
        return SchedulerPolicy(
            max_batch=self.max_batch,
            max_batch_tokens=self.max_batch_tokens,
            prefill_chunk=self.prefill_chunk,
            max_wait=self.batch_wait_ms / 1000.0,
        )

    def validate(self) -> SimConfig:
        check_choices(
            self,
            {
                "systems": SIM_SYSTEMS,
                "arrival": ARRIVALS,
                "edge_mode": ("per-client", "shared"),
                "proactive": ("keep-depth", "add-depth"),
            },
            SimConfigError,
        )
        check_nonempty(self, ("edges", "rtt_ms", "temperatures"), SimConfigError)
        check_ranges(self, SimConfigError)
        check_budget(self, SimConfigError)
        if self.acceptance is None and any(s != SERVER_AR for s in self.systems):
            raise SimConfigError(
                f"{_where('acceptance')} is needed to simulate drafting: give a `specedge bench` "
                "output directory with SpecEdge runs (e.g. benchmarks/results/sim/"
                "validation-bench-r1)"
            )
        for name in ("price_table", "host_costs"):
            try:
                getattr(self, name)  # parse to validate
            except ValueError as error:
                key = "prices" if name == "price_table" else "host_ms_per_token"
                raise SimConfigError(f"{_where(key)}: {error}") from None
        return self


def load_sim_config(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> SimConfig:
    """Defaults < YAML file (paths relative to it) < `overrides` (flags; None ignored)."""
    settings: dict[str, Any] = {}
    if config_file is not None:
        settings.update(read_yaml_settings(config_file, _FIELD_TYPES, SimConfigError))
        for name in _PATH_FIELDS:
            if isinstance(settings.get(name), str):
                settings[name] = str(config_file.parent / settings[name])
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    coerced = {}
    for name, value in settings.items():
        try:
            coerced[name] = coerce_value(_FIELD_TYPES[name], value)
        except (TypeError, ValueError) as error:
            raise SimConfigError(f"{_where(name)}: bad value {value!r} ({error})") from None
    return replace(SimConfig(), **coerced).validate()


_FIELD_TYPES = {f.name: str(f.type) for f in fields(SimConfig)}
_PATH_FIELDS = path_fields(SimConfig)


def _where(name: str) -> str:
    return flag_and_key(name, SimConfig)
