"""The `specedge` command line. Each role's command lives with its role; this module only
collects them and turns the package's typed errors into one-line messages. A role's options
are the fields of its settings dataclass (`settings_options`): a setting is added there, once."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from specedge.bench.config import BenchConfig, load_bench_config
from specedge.bench.profile import ProfileSettings
from specedge.config_file import DEFAULT_DEVICE, DEVICE_HELP, MODEL_HELP, settings_options
from specedge.edge.config import EdgeConfig, load_edge_config
from specedge.errors import InvalidRequestError, SpecEdgeError
from specedge.local_cli import GenerateSettings, run_generate
from specedge.server.config import ServerConfig, load_server_config
from specedge.sim.config import SimConfig, load_sim_config
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


@app.command()
@settings_options(GenerateSettings)
def generate(
    prompt: Annotated[str | None, typer.Option(help="Prompt text.")] = None,
    prompt_file: Annotated[
        Path | None,
        typer.Option(help="One prompt per line, or JSON Lines with a 'prompt' field."),
    ] = None,
    *,
    flags: dict[str, Any],
) -> None:
    """Generate text locally: autoregressive, or tree speculative decoding with a draft."""
    run_generate(GenerateSettings(**flags), _read_prompts(prompt, prompt_file))


@app.command()
@settings_options(ServerConfig)
def serve(
    auth_token_file: Annotated[Path | None, typer.Option(help="File holding the token.")] = None,
    config: Annotated[Path | None, typer.Option(help="server.yaml (flags override it).")] = None,
    *,
    flags: dict[str, Any],
) -> None:
    """Run the verification server: batched tree verification for many edges over gRPC, and
    with --api-port an OpenAI-compatible API for users with no edge."""
    from specedge.server.app import run_server

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
    init_from: Annotated[
        str | None, typer.Option(help="Continue training this draft (alias or directory).")
    ] = None,
    prompts: Annotated[
        str, typer.Option(help="Comma-separated: self (the target writes them), templates, FILE.")
    ] = "self",
    self_prompts: Annotated[int, typer.Option(help="Self-generated requests to keep.")] = 2000,
    exclude: Annotated[
        list[Path] | None, typer.Option(help="Benchmark prompts to keep out (besides Spec-Bench).")
    ] = None,
    max_minutes: Annotated[float, typer.Option(help="Requests + teacher data + training.")] = 30.0,
    head_tokens: Annotated[int, typer.Option(help="LM head size, 0 = full vocabulary.")] = 8192,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = DEFAULT_DEVICE,
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
        init_from=init_from,
        prompts=prompts,
        self_prompts=self_prompts,
        exclude=tuple(exclude or ()),
        max_minutes=max_minutes,
        head_tokens=head_tokens,
        device=device,
        dtype=dtype,
        seed=seed,
        command=command,
    )
    typer.echo(f"wrote {run_distill(config)}")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help=f"The model to export: {MODEL_HELP}.")],
    directory: Annotated[Path, typer.Argument(help="The Hugging Face folder to write.")],
    dtype: Annotated[
        str, typer.Option(help="float32|bfloat16|float16 of the written weights.")
    ] = "float32",
    force: Annotated[
        bool, typer.Option(help="Replace DIRECTORY if it is not empty (deletes its contents).")
    ] = False,
) -> None:
    """Write MODEL as a Hugging Face folder (config, safetensors, tokenizer) that
    transformers, vLLM and specedge load."""
    from specedge.model.export import check_destination, export_model
    from specedge.model.loader import load_model, parse_dtype

    check_destination(directory, force)  # before a load that may take minutes
    loaded = load_model(model, dtype=parse_dtype(dtype))
    typer.echo(f"wrote {export_model(loaded, directory, force=force)}")


@app.command()
@settings_options(EdgeConfig)
def edge(
    auth_token_file: Annotated[Path | None, typer.Option(help="File holding the token.")] = None,
    config: Annotated[Path | None, typer.Option(help="edge.yaml (flags override it).")] = None,
    *,
    flags: dict[str, Any],
) -> None:
    """Run an edge: draft with MODEL, verify on SERVER, serve an OpenAI-compatible API."""
    from specedge.edge.app import run_edge

    run_edge(load_edge_config(config, flags, auth_token_file))


@app.command()
@settings_options(BenchConfig)
def bench(
    config: Annotated[Path | None, typer.Option(help="bench.yaml (flags override it).")] = None,
    report: Annotated[
        Path | None, typer.Option(help="Only re-render DIR's report.md and plots, run nothing.")
    ] = None,
    *,
    flags: dict[str, Any],
) -> None:
    """Benchmark SpecEdge against server-only baselines: JSON results, report.md and plots."""
    from specedge.bench.report import rewrite_report
    from specedge.bench.runner import run_bench

    if report is not None:
        typer.echo(f"wrote {rewrite_report(report)}")
        return
    typer.echo(f"wrote {run_bench(load_bench_config(config, flags))}")


@app.command()
@settings_options(ProfileSettings)
def profile(
    quick: Annotated[bool, typer.Option(help="A tiny grid in seconds (a smoke test).")] = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Measure this device's verification, draft-step and prefill costs: the profile JSON that
    `specedge simulate` reads."""
    from specedge.bench.profile import load_profile_settings, run_profile

    typer.echo(f"wrote {run_profile(load_profile_settings(flags, quick=quick))}")


@app.command()
@settings_options(SimConfig)
def simulate(
    config: Annotated[Path | None, typer.Option(help="sim.yaml (flags override it).")] = None,
    *,
    flags: dict[str, Any],
) -> None:
    """Simulate N edges and M server replicas from a device profile (discrete events): the
    benchmark's results, report and plots."""
    from specedge.sim.run import run_simulation

    typer.echo(f"wrote {run_simulation(load_sim_config(config, flags))}")


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
