"""The `specedge` command line. Each role's command lives with its role; this module only
collects them and turns the package's typed errors into one-line messages."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from specedge.errors import InvalidRequestError, SpecEdgeError
from specedge.text import read_prompt_file

app = typer.Typer(
    name="specedge",
    help="Edge-assisted speculative decoding: draft at the edge, verify in batches on a server.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def root() -> None:
    """SpecEdge: edge-assisted speculative decoding."""


MODEL_HELP = "alias (smollm2-135m, smollm2-135m-draft), .gguf file, model directory or hub id"


@app.command()
def generate(
    model: Annotated[str, typer.Option(help=f"Target model: {MODEL_HELP}.")],
    draft: Annotated[str | None, typer.Option(help="Draft model (enables --mode spec).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt text.")] = None,
    prompt_file: Annotated[
        Path | None,
        typer.Option(help="One prompt per line, or JSON Lines with a 'prompt' field."),
    ] = None,
    chat: Annotated[bool, typer.Option(help="Apply the model's chat template.")] = False,
    max_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    top_k: Annotated[int, typer.Option(help="0 disables top-k.")] = 0,
    seed: Annotated[int | None, typer.Option()] = None,
    mode: Annotated[
        str | None, typer.Option(help="ar | spec (default: spec with --draft, else ar).")
    ] = None,
    budget: Annotated[int, typer.Option(help="Draft tree nodes per round.")] = 32,
    depth: Annotated[int, typer.Option(help="Draft tree depth.")] = 6,
    width: Annotated[int, typer.Option(help="Children per expanded node.")] = 4,
    beams: Annotated[int, typer.Option(help="Nodes expanded per draft step.")] = 8,
    lookup: Annotated[
        int, typer.Option(help="Context lookup chain length (prompt lookup), 0 = off.")
    ] = 8,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[
        str | None, typer.Option(help="float32|bfloat16|float16 (default: best for device).")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON object per prompt.")
    ] = False,
) -> None:
    """Generate text locally: autoregressive, or tree speculative decoding with a draft."""
    from specedge.core.draft import TreeShape
    from specedge.local_cli import GenerateRequest, run_generate

    request = GenerateRequest(
        model=model,
        draft=draft,
        prompts=_read_prompts(prompt, prompt_file),
        chat=chat,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        mode=mode or ("spec" if draft else "ar"),
        shape=TreeShape(budget=budget, depth=depth, width=width, beams=beams, lookup=lookup),
        device=device,
        dtype=dtype,
        json_output=json_output,
    )
    run_generate(request)


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help=f"Target model: {MODEL_HELP}.")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port, 0 = any free [50051].")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="HTTP /metrics and /health port, 0 = any free [9400].")
    ] = None,
    max_batch: Annotated[int | None, typer.Option(help="Trees per batched forward [16].")] = None,
    max_sessions: Annotated[int | None, typer.Option(help="Concurrent sessions [16].")] = None,
    max_tree_nodes: Annotated[int | None, typer.Option(help="Nodes per tree [64].")] = None,
    max_tree_depth: Annotated[int | None, typer.Option(help="Tree depth [16].")] = None,
    max_context: Annotated[
        int | None, typer.Option(help="Prompt + generated tokens per session [2048].")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default cpu).")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32|bfloat16|float16 (default: best for the device).")
    ] = None,
    auth_token: Annotated[
        str | None, typer.Option(help="Require 'authorization: Bearer TOKEN' from edges.")
    ] = None,
    auth_token_file: Annotated[Path | None, typer.Option(help="File holding the token.")] = None,
    session_timeout: Annotated[
        float | None, typer.Option(help="Evict a session silent for this many seconds [60].")
    ] = None,
    api_port: Annotated[
        int | None,
        typer.Option(help="Also serve the OpenAI-compatible HTTP API here, 0 = any free [off]."),
    ] = None,
    draft: Annotated[
        str | None,
        typer.Option(
            help="Draft model for the HTTP API: speculative decoding on the server "
            "[off: autoregressive]."
        ),
    ] = None,
    budget: Annotated[
        int | None, typer.Option(help="Server-side tree nodes per round [32].")
    ] = None,
    depth: Annotated[int | None, typer.Option(help="Server-side tree depth [6].")] = None,
    width: Annotated[int | None, typer.Option(help="Children per expanded node [4].")] = None,
    beams: Annotated[int | None, typer.Option(help="Nodes expanded per draft step [8].")] = None,
    lookup: Annotated[int | None, typer.Option(help="Context lookup chain, 0 = off [8].")] = None,
    config: Annotated[Path | None, typer.Option(help="server.yaml (flags override it).")] = None,
) -> None:
    """Run the verification server: batched tree verification for many edges over gRPC, and
    with --api-port an OpenAI-compatible API for users with no edge."""
    from specedge.server.app import run_server
    from specedge.server.config import load_server_config

    flags = {
        "model": model,
        "host": host,
        "port": port,
        "metrics_port": metrics_port,
        "max_batch": max_batch,
        "max_sessions": max_sessions,
        "max_tree_nodes": max_tree_nodes,
        "max_tree_depth": max_tree_depth,
        "max_context": max_context,
        "device": device,
        "dtype": dtype,
        "auth_token": auth_token,
        "session_timeout": session_timeout,
        "api_port": api_port,
        "draft": draft,
        "budget": budget,
        "depth": depth,
        "width": width,
        "beams": beams,
        "lookup": lookup,
    }
    logging.getLogger("specedge").setLevel(logging.INFO)
    run_server(load_server_config(config, flags, auth_token_file))


@app.command()
def demo(
    prompt: Annotated[str | None, typer.Option(help="The chat prompt to send.")] = None,
    rtt_ms: Annotated[
        float, typer.Option(help="Emulated round-trip time between edge and server (ms).")
    ] = 0.0,
    max_tokens: Annotated[int, typer.Option(help="New tokens.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    target: Annotated[str, typer.Option(help=f"Target model: {MODEL_HELP}.")] = "smollm2-135m",
    draft: Annotated[str, typer.Option(help="Draft model.")] = "smollm2-135m-draft",
    proactive: Annotated[str, typer.Option(help="off | keep-depth | add-depth.")] = "keep-depth",
) -> None:
    """Run a server and an edge on loopback with the bundled pair and stream one answer."""
    from specedge.demo import DEFAULT_PROMPT, DemoConfig, run_demo

    if rtt_ms < 0:
        raise InvalidRequestError(f"--rtt-ms must be >= 0, got {rtt_ms}")
    run_demo(
        DemoConfig(
            target=target,
            draft=draft,
            prompt=prompt or DEFAULT_PROMPT,
            max_tokens=max_tokens,
            temperature=temperature,
            rtt_ms=rtt_ms,
            proactive=proactive,
        )
    )


@app.command()
def distill(
    target: Annotated[str, typer.Option(help=f"Target model: {MODEL_HELP}.")],
    out: Annotated[Path, typer.Option(help="Output model directory (also holds the checkpoint).")],
    layers: Annotated[int, typer.Option(help="Draft decoder layers.")] = 4,
    frozen_layers: Annotated[
        int, typer.Option(help="Bottom layers kept equal to the target's (not stored).")
    ] = 0,
    hidden: Annotated[int | None, typer.Option(help="Hidden size (default: the target's).")] = None,
    init_from_target: Annotated[
        bool, typer.Option(help="Start from the target's bottom and top layers.")
    ] = True,
    prompts: Annotated[
        Path | None, typer.Option(help="Training prompts (default: built-in).")
    ] = None,
    max_minutes: Annotated[float, typer.Option(help="Teacher data + training time.")] = 30.0,
    head_tokens: Annotated[int, typer.Option(help="LM head size, 0 = full vocabulary.")] = 8192,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="Default: best for device.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a small draft for TARGET by distillation on its own generations (resumable)."""
    from specedge.distill import DistillConfig, run_distill

    command = " ".join(["specedge", *sys.argv[1:]])
    config = DistillConfig(
        target=target,
        out=out,
        layers=layers,
        frozen_layers=frozen_layers,
        hidden=hidden,
        init_from_target=init_from_target,
        prompts=prompts,
        max_minutes=max_minutes,
        head_tokens=head_tokens,
        device=device,
        dtype=dtype,
        seed=seed,
        command=command,
    )
    typer.echo(f"wrote {run_distill(config)}")


@app.command()
def edge(
    model: Annotated[str | None, typer.Option(help=f"Draft model: {MODEL_HELP}.")] = None,
    server: Annotated[str | None, typer.Option(help="HOST:PORT of `specedge serve`.")] = None,
    host: Annotated[str | None, typer.Option(help="HTTP API address [127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP API port, 0 = any free [8000].")] = None,
    budget: Annotated[int | None, typer.Option(help="Draft tree nodes per round [32].")] = None,
    depth: Annotated[int | None, typer.Option(help="Draft tree depth [6].")] = None,
    width: Annotated[int | None, typer.Option(help="Children per expanded node [4].")] = None,
    beams: Annotated[int | None, typer.Option(help="Nodes expanded per draft step [8].")] = None,
    lookup: Annotated[int | None, typer.Option(help="Context lookup chain, 0 = off [8].")] = None,
    proactive: Annotated[
        str | None, typer.Option(help="Proactive drafting: off | keep-depth | add-depth.")
    ] = None,
    proactive_budget: Annotated[int | None, typer.Option(help="Subtree nodes [16].")] = None,
    proactive_depth: Annotated[int | None, typer.Option(help="Subtree depth [3].")] = None,
    max_sessions: Annotated[int | None, typer.Option(help="Concurrent generations [8].")] = None,
    max_context: Annotated[int | None, typer.Option(help="Prompt + generated tokens.")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Name in /v1/models.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32|bfloat16|float16.")] = None,
    auth_token: Annotated[str | None, typer.Option(help="Bearer token for the server.")] = None,
    auth_token_file: Annotated[Path | None, typer.Option(help="File holding the token.")] = None,
    config: Annotated[Path | None, typer.Option(help="edge.yaml (flags override it).")] = None,
) -> None:
    """Run an edge: draft with MODEL, verify on SERVER, serve an OpenAI-compatible API."""
    from specedge.edge.app import run_edge
    from specedge.edge.config import load_edge_config

    flags = {
        "model": model,
        "server": server,
        "host": host,
        "port": port,
        "budget": budget,
        "depth": depth,
        "width": width,
        "beams": beams,
        "lookup": lookup,
        "proactive": proactive,
        "proactive_budget": proactive_budget,
        "proactive_depth": proactive_depth,
        "max_sessions": max_sessions,
        "max_context": max_context,
        "served_model_name": served_model_name,
        "device": device,
        "dtype": dtype,
        "auth_token": auth_token,
    }
    run_edge(load_edge_config(config, flags, auth_token_file))


@app.command()
def bench(
    target: Annotated[str | None, typer.Option(help="Target model (smollm2-135m).")] = None,
    draft: Annotated[str | None, typer.Option(help="Draft model (smollm2-135m-draft).")] = None,
    systems: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: specedge, specedge-no-proactive, specedge-no-pipelining, "
            "server-spec, server-ar, hf-assisted (default: all)."
        ),
    ] = None,
    clients: Annotated[str | None, typer.Option(help="Concurrent clients (1,2,4,8).")] = None,
    rtt_ms: Annotated[str | None, typer.Option(help="Edge-server RTTs, ms (0,15,30,50).")] = None,
    jitter_ms: Annotated[float | None, typer.Option(help="RTT jitter, ms (0).")] = None,
    prompts: Annotated[
        str | None,
        typer.Option(help="Spec-Bench style JSON Lines, or specbench (the bundled set, default)."),
    ] = None,
    categories: Annotated[str | None, typer.Option(help="Comma-separated (all).")] = None,
    num_prompts: Annotated[int | None, typer.Option(help="Requests per run (8).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Tokens per request (32).")] = None,
    temperature: Annotated[str | None, typer.Option(help="One or a list (0,0.7).")] = None,
    budget: Annotated[int | None, typer.Option(help="Draft tree nodes (32).")] = None,
    depth: Annotated[str | None, typer.Option(help="Draft tree depth, or auto (6).")] = None,
    prices: Annotated[str | None, typer.Option(help="$/h (server=4.05,edge=0.35).")] = None,
    out: Annotated[str | None, typer.Option(help="Output directory (bench-results).")] = None,
    config: Annotated[Path | None, typer.Option(help="bench.yaml (flags override it).")] = None,
    quick: Annotated[bool, typer.Option(help="A small run of everything (minutes).")] = False,
    report: Annotated[
        Path | None, typer.Option(help="Only re-render DIR's report.md and plots, run nothing.")
    ] = None,
) -> None:
    """Benchmark SpecEdge against server-only baselines: JSON results, report.md and plots."""
    from specedge.bench.config import load_bench_config
    from specedge.bench.report import rewrite_report
    from specedge.bench.runner import run_bench

    if report is not None:
        typer.echo(f"wrote {rewrite_report(report)}")
        return

    flags = {
        "target": target,
        "draft": draft,
        "systems": systems,
        "clients": clients,
        "rtt_ms": rtt_ms,
        "jitter_ms": jitter_ms,
        "prompts": prompts,
        "categories": categories,
        "num_prompts": num_prompts,
        "max_tokens": max_tokens,
        "temperatures": temperature,
        "budget": budget,
        "depth": depth,
        "prices": prices,
        "out": out,
        "quick": quick or None,
    }
    typer.echo(f"wrote {run_bench(load_bench_config(config, flags))}")


def _read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    if (prompt is None) == (prompt_file is None):
        raise InvalidRequestError("give exactly one of --prompt or --prompt-file")
    if prompt is not None:
        return [prompt]
    assert prompt_file is not None
    return read_prompt_file(prompt_file, "--prompt-file")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except SpecEdgeError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
