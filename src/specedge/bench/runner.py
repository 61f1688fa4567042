"""`specedge bench`: run every system over the grid (clients x RTT x temperature), measure each
run the same way, write results, request records, report.md and plots.

Plan: the runs are grouped by deployment (`systems.deployment_key`): one set of processes per
system serves all its client counts, RTTs and temperatures, except the lockstep ablation, which
needs a server per client count. Each run sets the proxies' RTT, scrapes the server's busy
counter, drives `clients` concurrent streaming clients through the run's prompts, scrapes
again, and computes `RunMetrics`. Files are rewritten after every run, so an interrupted
benchmark still leaves a consistent results.json behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from specedge.bench.client import RequestSettings, run_clients
from specedge.bench.config import REFERENCE_RTT_MS, BenchConfig
from specedge.bench.hf_assisted import run_hf_assisted
from specedge.bench.metrics import (
    RequestRecord,
    ServerUsage,
    compute_run_metrics,
    engaged_times,
    run_window,
)
from specedge.bench.processes import Placement
from specedge.bench.prompts import BenchPrompt, load_prompts, sample_prompts
from specedge.bench.report import write_report
from specedge.bench.results import (
    EDGE_SYSTEMS,
    HF_ASSISTED,
    SERVER_AR,
    SPECEDGE_NO_PIPELINING,
    VLLM_NGRAM,
    VLLM_SYSTEMS,
    BenchMeta,
    RunResult,
    RunSpec,
    write_results,
)
from specedge.bench.systems import (
    LOCKSTEP_BATCH_WAIT_MS,
    Deployment,
    SystemSettings,
    deploy,
    deployment_key,
)
from specedge.bench.vllm_server import MAX_MODEL_LEN, NGRAM_SPECULATION, VllmRuntime, find_vllm
from specedge.errors import SpecEdgeError

logger = logging.getLogger(__name__)

WARMUP_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class RunGroup:
    """Runs that share one deployment (one server, and the edges of its systems)."""

    systems: tuple[str, ...]
    clients: int  # client slots the deployment provides per system
    specs: tuple[RunSpec, ...]

    @property
    def name(self) -> str:
        return " + ".join(self.systems)


def plan_runs(config: BenchConfig, depth: int, skipped: Collection[str] = ()) -> list[RunGroup]:
    """Every run of the benchmark but those of the `skipped` systems, grouped by deployment,
    in the order they will run: the groups once per repeat, so that the systems alternate
    between repeats of a cell."""
    passes: list[dict[tuple[str, int], list[RunSpec]]] = [{} for _ in range(config.repeats)]
    for system in (s for s in config.systems if s not in skipped):
        clients = config.clients_for(system)
        drafts = system not in (SERVER_AR, *VLLM_SYSTEMS)  # n-gram lookup grows no draft tree
        for prompt_set in config.prompt_sets:
            for temperature in config.temperatures:
                for count in clients:
                    for rtt in config.rtts_for(system):
                        if prompt_set not in config.prompt_sets_for(system, rtt):
                            continue
                        if system == HF_ASSISTED:
                            key = (HF_ASSISTED, 1)
                        else:
                            key = deployment_key(system, count, max(clients))
                        for repeat in range(config.repeats_for(system, rtt)):
                            passes[repeat].setdefault(key, []).append(
                                RunSpec(
                                    system=system,
                                    clients=count,
                                    rtt_ms=rtt,
                                    temperature=temperature,
                                    jitter_ms=config.jitter_ms if rtt > 0 else 0.0,
                                    depth=depth if drafts else None,
                                    budget=config.budget if drafts else None,
                                    prompt_set=prompt_set,
                                    repeat=repeat,
                                )
                            )
    return [
        RunGroup(tuple(dict.fromkeys(s.system for s in specs)), slots, tuple(specs))
        for groups in passes
        for (_, slots), specs in groups.items()
    ]


def run_bench(config: BenchConfig, console: Console | None = None) -> Path:
    """Run the whole benchmark; returns the path of report.md."""
    console = console or Console(stderr=True)
    started = time.monotonic()
    out_dir = Path(config.out)
    placement = Placement.plan(config.server_cpus, config.edge_cpus)
    placement.pin_this_process()
    prompt_sets = {
        name: sample_prompts(
            load_prompts(name), config.num_prompts, config.categories if index == 0 else ()
        )
        for index, name in enumerate(config.prompt_sets)
    }
    prompts = prompt_sets[config.prompts]
    meta = BenchMeta(
        config=_config_summary(config, prompts),
        machine=describe_machine(),
        placement=placement.describe(),
        started_at=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    if SPECEDGE_NO_PIPELINING in config.systems:
        meta.notes.append(
            f"{SPECEDGE_NO_PIPELINING}: server --max-batch = clients and a batch wait of "
            f"{LOCKSTEP_BATCH_WAIT_MS / 1000:g} s for predicted arrivals, so batches form when "
            "every edge is ready (the server has no barrier mode: a tree later than predicted "
            "is not waited for)"
        )
    depth = _resolve_depth(config, placement, prompts, meta)
    vllm = _find_vllm(config, meta)
    plan = plan_runs(config, depth, skipped=() if vllm else VLLM_SYSTEMS)
    settings = SystemSettings(
        target=config.target,
        draft=config.draft,
        budget=config.budget,
        depth=depth,
        proactive=config.proactive,
        edge_mode=config.edge_mode,
        dtype=config.dtype,
        startup_timeout_s=config.startup_timeout_s,
        vllm=vllm,
        vllm_kv_cache_gb=config.vllm_kv_cache_gb,
    )
    runs: list[RunResult] = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        overall = progress.add_task("benchmark runs", total=sum(len(g.specs) for g in plan))
        for group in plan:
            try:
                runs += _run_group(
                    group, config, settings, placement, prompt_sets, progress, out_dir, meta
                )
            except SpecEdgeError as error:
                lines = (line.strip(" │╭╮╰╯─") for line in str(error).splitlines())
                detail = " ".join(filter(None, lines))
                note = f"{group.name} ({group.clients} client slots) stopped: {detail}"
                logger.warning(note)
                meta.notes.append(note)
            progress.update(overall, completed=len(runs))
            write_results(out_dir, runs, meta)
    meta.duration_s = time.monotonic() - started
    return write_report(out_dir, runs, meta)


def _run_group(
    group: RunGroup,
    config: BenchConfig,
    settings: SystemSettings,
    placement: Placement,
    prompt_sets: dict[str, list[BenchPrompt]],
    progress: Progress,
    out_dir: Path,
    meta: BenchMeta,
) -> list[RunResult]:
    """Deploy, warm up and measure every run of `group`; its timings go to `meta.timeline`."""
    clock = time.monotonic()
    timeline: dict[str, Any] = {"systems": group.name, "client_slots": group.clients}
    meta.timeline.append(timeline)
    if group.systems == (HF_ASSISTED,):
        task = progress.add_task(f"{HF_ASSISTED}: loading", total=None)
        try:
            return run_hf_assisted(
                group.specs,
                config,
                prompt_sets[config.prompts],
                placement,
                out_dir / "logs",
                config.price_table,
            )
        finally:
            timeline["runs_s"] = time.monotonic() - clock
            progress.remove_task(task)
    task = progress.add_task(f"{group.name}: starting {group.clients} client slots", total=None)
    try:
        with deploy(
            group.systems, group.clients, settings, placement, out_dir / "logs"
        ) as deployment:
            timeline["startup_s"] = time.monotonic() - clock
            _warm_up(deployment, config)
            timeline["warmup_s"] = time.monotonic() - clock - timeline["startup_s"]
            results = []
            for spec in group.specs:
                prompts = prompt_sets[spec.prompt_set]
                results.append(measure_run(deployment, spec, prompts, config, progress, task))
            timeline["runs_s"] = sum(r.metrics.wall_s for r in results)
            return results
    finally:
        timeline["total_s"] = time.monotonic() - clock
        progress.remove_task(task)


def _warm_up(deployment: Deployment, config: BenchConfig) -> None:
    """One short request per client slot, all at once, not measured (first-use costs,
    connections)."""
    urls = [url for system_urls in deployment.client_urls.values() for url in system_urls]
    warm = [BenchPrompt("warmup", "warmup", "Say hello.")]
    settings = RequestSettings(WARMUP_TOKENS, 0.0, timeout_s=config.request_timeout_s)
    for record in asyncio.run(run_clients(urls, warm, settings)):
        if record.error:
            raise SpecEdgeError(f"warm-up request to {urls[record.client]} failed: {record.error}")


def measure_run(
    deployment: Deployment,
    spec: RunSpec,
    prompts: Sequence[BenchPrompt],
    config: BenchConfig,
    progress: Progress,
    task: Any,
) -> RunResult:
    deployment.check_alive()
    deployment.set_network(spec.rtt_ms, spec.jitter_ms)
    total = config.requests_for(spec.clients, len(prompts))
    progress.update(
        task,
        description=f"{spec.system}: {spec.clients} clients, {spec.rtt_ms:g} ms, "
        f"T={spec.temperature:g}",
        total=total,
        completed=0,
    )
    settings = RequestSettings(
        config.max_tokens, spec.temperature, seed=config.seed, timeout_s=config.request_timeout_s
    )
    urls = deployment.client_urls[spec.system][: spec.clients]
    if config.warmup_per_client:  # the run's own warm-up: same settings, not measured
        warm = asyncio.run(
            run_clients(
                urls, prompts[::-1], settings, num_requests=len(urls) * config.warmup_per_client
            )
        )
        failed = [r.error for r in warm if r.error]
        if failed:
            raise SpecEdgeError(f"warm-up of {spec.system} failed: {failed[0]}")
    before = deployment.server_counters()
    bytes_before = deployment.wire_bytes(spec.system)
    records = asyncio.run(
        run_clients(
            urls,
            prompts,
            settings,
            on_done=lambda _: progress.advance(task),
            num_requests=total,
        )
    )
    server = deployment.server_counters().since(before)
    bytes_after = deployment.wire_bytes(spec.system)
    records = rebase(records)
    usage = ServerUsage(
        wall_s=run_window(records),
        busy_s=server.busy_s,
        host_cpu_s=server.host_cpu_s,
        batches=server.batches,
        batched_sequences=server.batched_sequences,
        batched_rows=server.batched_rows,
        verify_s=server.verify_s,
        edge_engaged_s=_edge_engaged(spec, records, config),
        wire_bytes=bytes_after - bytes_before,
    )
    metrics = compute_run_metrics(records, usage, config.price_table)
    return RunResult(spec, metrics, tuple(records), _run_notes(records))


def _edge_engaged(
    spec: RunSpec, records: Sequence[RequestRecord], config: BenchConfig
) -> tuple[float, ...]:
    """How long the run kept each edge engaged: one edge for all clients when shared."""
    if spec.system not in EDGE_SYSTEMS:
        return ()
    if config.edge_mode == "shared":
        return (run_window(records),)
    return engaged_times(records)


def rebase(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """The records with times counted from the run's first request start."""
    if not records:
        return []
    origin = min(r.start_s for r in records)
    return [
        dataclasses.replace(
            r,
            start_s=r.start_s - origin,
            first_token_s=None if r.first_token_s is None else r.first_token_s - origin,
            end_s=r.end_s - origin,
            chunk_times_s=tuple(t - origin for t in r.chunk_times_s),
        )
        for r in sorted(records, key=lambda r: (r.start_s, r.client))
    ]


def _run_notes(records: Sequence[RequestRecord]) -> str:
    errors = sorted({r.error for r in records if r.error})
    return "; ".join(f"failed: {e}" for e in errors[:3])


def _find_vllm(config: BenchConfig, meta: BenchMeta) -> VllmRuntime | None:
    """The vLLM to run when the benchmark has vLLM systems; the report notes which one, or
    why there is none (its systems are then skipped)."""
    wanted = [system for system in config.systems if system in VLLM_SYSTEMS]
    if not wanted:
        return None
    found = find_vllm(config.vllm_python)
    if isinstance(found, str):
        note = f"{', '.join(wanted)} skipped: {found}"
        logger.warning(note)
        meta.notes.append(note)
        return None
    ngram = f"; {VLLM_NGRAM}: n-gram speculation {json.dumps(NGRAM_SPECULATION)}"
    meta.notes.append(
        f"{', '.join(wanted)}: vLLM {found.version} ({found.python}), CPU build, the "
        f"benchmark's dtype, eager mode, --max-model-len {MAX_MODEL_LEN}, prefix caching off, KV "
        f"cache {config.vllm_kv_cache_gb} GB, one OpenMP thread per server core"
        + (ngram if VLLM_NGRAM in wanted else "")
    )
    return found


def _resolve_depth(
    config: BenchConfig, placement: Placement, prompts: Sequence[BenchPrompt], meta: BenchMeta
) -> int:
    if not config.auto_depth:
        return int(config.depth)
    from specedge.bench.calibrate import calibrate_depth

    rtt = min(config.rtt_ms, key=lambda r: (abs(r - REFERENCE_RTT_MS), r))
    batch = max(1, max(config.clients) // 2)  # one of the two pipelined groups
    edge_cores = len(placement.edge_cpus or os.sched_getaffinity(0))
    edges_per_core = math.ceil(batch / edge_cores)  # a group's edges draft at the same time
    depth, timings = calibrate_depth(
        config.target,
        config.draft,
        prompts[0].text,
        config.budget_cap,
        rtt,
        batch,
        placement,
        edges_per_core,
    )
    meta.notes.append(
        f"--depth auto: verify {timings.verify_ms:.1f} ms (batch {batch} x {config.budget_cap} "
        f"nodes, server core), draft step {timings.draft_step_ms:.1f} ms (edge core) x "
        f"{edges_per_core} edges drafting at once per edge core, RTT {rtt:g} ms -> depth "
        f"{depth} (depth x draft step + RTT ~= verify)"
    )
    return depth


def _config_summary(config: BenchConfig, prompts: Sequence[BenchPrompt]) -> dict[str, Any]:
    categories = sorted({p.category for p in prompts})
    return {
        "target": config.target,
        "draft": config.draft,
        "systems": ", ".join(config.systems),
        "clients": ", ".join(map(str, config.clients)),
        "SpecEdge RTTs (ms)": ", ".join(f"{r:g}" for r in config.rtt_ms),
        "baseline RTTs (ms)": ", ".join(f"{r:g}" for r in config.rtts_for("server-spec")),
        "ablation RTTs (ms)": ", ".join(f"{r:g}" for r in config.rtts_for("specedge-no-proactive")),
        "jitter (ms)": f"{config.jitter_ms:g}",
        "temperatures": ", ".join(f"{t:g}" for t in config.temperatures),
        "prompts": f"{len(prompts)} from {config.prompts} (first turn, chat template), "
        f"categories: {', '.join(categories)}",
        "requests per run": f"{config.requests_per_client} per client"
        if config.requests_per_client
        else f"{len(prompts)} (all prompts, shared by the clients)",
        "max tokens per request": config.max_tokens,
        "draft tree": f"budget {config.budget}, depth {config.depth}, proactive {config.proactive}",
        "prices ($/h)": f"server {config.price_table.server_per_hour:g}, "
        f"edge {config.price_table.edge_per_hour:g}",
        "dtype": config.dtype or "default for the device",
    }


def describe_machine() -> dict[str, Any]:
    """CPU, cores, memory, OS, Python, torch: the report's machine section."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    except OSError:
        pass
    from specedge.model.loader import cpu_has_native_bf16

    return {
        "CPU": cpu,
        "cores": os.cpu_count() or "?",
        "native bf16": "yes" if cpu_has_native_bf16() else "no (fp32 by default)",
        "memory": memory,
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)",
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "torch": torch.__version__,
    }
