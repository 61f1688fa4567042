"""Settings declared once (`specedge.config_file`): a dataclass field is a command-line option
with its help and default, only flags given on the command line override, declared ranges are
checked with messages naming the flag and the YAML key; and every role command carries every
field of its config."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from specedge import cli
from specedge.bench.config import BenchConfig
from specedge.config_file import (
    DEFAULT_DEVICE,
    check_device_and_dtype,
    check_ranges,
    flag_of,
    setting,
    settings_options,
)
from specedge.core.limits import TreeShape
from specedge.edge.config import EdgeConfig
from specedge.local_cli import GenerateSettings
from specedge.server.config import ServerConfig


class ToyError(Exception):
    pass


@dataclass(frozen=True)
class Toy:
    name: str = setting("x", "A name.")
    count: int = setting(2, "A count.", minimum=1)
    rate: float = setting(0.5, "A rate.", minimum=0, maximum=1, exclusive=True)
    sizes: tuple[int, ...] = setting((1, 2), "Sizes.", minimum=1)
    loud: bool = setting(False, "Shout.")
    temperatures: tuple[float, ...] = setting((0.0,), "Temperatures.", flag="temperature")


def toy_app(seen: list[dict[str, Any]]) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @settings_options(Toy)
    def toy(config: Path | None = None, *, flags: dict[str, Any]) -> None:
        seen.append({"config": config, **flags})

    return app


def invoke(*args: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []
    result = CliRunner().invoke(toy_app(seen), list(args))
    assert result.exit_code == 0, result.output
    (flags,) = seen
    return flags


def test_only_flags_on_the_command_line_override() -> None:
    assert invoke() == {"config": None}  # defaults are left to the config file and dataclass
    flags = invoke("--count", "2", "--no-loud", "--temperature", "0.7", "--config", "a.yaml")
    # A flag equal to its default was still given, so it still wins over the config file.
    assert flags == {"config": Path("a.yaml"), "count": 2, "loud": False, "temperatures": "0.7"}
    assert invoke("--sizes", "3,4", "--loud", "--rate", "0.25") == {
        "config": None,
        "sizes": "3,4",  # tuples arrive as text for the role's loader to split
        "loud": True,
        "rate": 0.25,
    }


def test_help_lists_every_option_with_its_default() -> None:
    result = CliRunner().invoke(toy_app([]), ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag, text in [
        ("--name", "A name. [default: x]"),
        ("--count", "A count. [default: 2]"),
        ("--sizes", "Sizes. [default: 1,2]"),
        ("--temperature", "Temperatures. [default: 0.0]"),
        ("--loud", "Shout. [default: no-loud]"),
        ("--config", ""),
    ]:
        assert flag in result.output and text in result.output


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"count": 0}, "--count (`count` in the config file) must be >= 1, got 0"),
        ({"rate": 1.0}, "--rate (`rate` in the config file) must be in (0, 1), got 1.0"),
        ({"rate": float("nan")}, "--rate (`rate` in the config file) must be in (0, 1), got nan"),
        ({"sizes": (1, 0)}, "--sizes (`sizes` in the config file) must be >= 1, got (1, 0)"),
    ],
)
def test_declared_ranges_are_checked(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(ToyError) as error:
        check_ranges(Toy(**bad), ToyError)
    assert str(error.value) == message
    check_ranges(Toy(), ToyError)


def test_an_option_can_have_its_own_name() -> None:
    assert flag_of(Toy, "temperatures") == "--temperature"
    assert flag_of(BenchConfig, "temperatures") == "--temperature"
    assert flag_of(GenerateSettings, "json_output") == "--json"


@pytest.mark.parametrize(
    ("command", "settings_class"),
    [
        ("serve", ServerConfig),
        ("edge", EdgeConfig),
        ("bench", BenchConfig),
        ("generate", GenerateSettings),
    ],
)
def test_every_field_is_an_option_of_its_command(command: str, settings_class: type) -> None:
    group = typer.main.get_command(cli.app)
    params = {p.name: p for p in group.commands[command].params}  # type: ignore[attr-defined]
    for each in fields(settings_class):
        option = params[each.name]
        assert flag_of(settings_class, each.name) in option.opts
        assert option.help, f"{command} {each.name} has no help"
        expected = each.default
        if isinstance(expected, tuple):
            expected = ",".join(map(str, expected)) or None
        if expected is not MISSING:
            assert option.default == expected


def test_tree_defaults_come_from_tree_shape() -> None:
    shape = TreeShape()
    for config in (ServerConfig(), EdgeConfig(), GenerateSettings(model="m")):
        assert config.tree_shape == TreeShape(
            shape.budget, shape.depth, shape.width, shape.beams, lookup=shape.lookup
        )
    assert (BenchConfig().budget, BenchConfig().depth) == ("auto", str(shape.depth))
    assert all(c.adaptive for c in (ServerConfig(), EdgeConfig(), GenerateSettings(model="m")))


def test_serve_flag_beats_file_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs: list[ServerConfig] = []
    monkeypatch.setattr("specedge.server.app.run_server", configs.append)
    path = tmp_path / "server.yaml"
    path.write_text("model: t\nbudget: 16\ndepth: 5\nbatch-wait-ms: 3\n")
    args = ["serve", "--config", str(path), "--budget", "24", "--drain-timeout", "1"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    (config,) = configs
    assert (config.budget, config.depth, config.width) == ("24", 5, TreeShape().width)
    assert not config.adaptive and config.tree_shape.budget == 24
    assert (config.batch_wait_ms, config.drain_timeout) == (3.0, 1.0)


# ---- devices -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placed:
    device: str = "auto"
    dtype: str | None = None


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_every_device_spelling_is_accepted(device: str) -> None:
    check_device_and_dtype(Placed(device), ToyError)


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:", "cuda:x", "cudaa", "CPU", ""])
def test_other_devices_are_refused_with_the_choices(device: str) -> None:
    with pytest.raises(ToyError, match=r"--device .* must be auto, cpu, cuda or cuda:N"):
        check_device_and_dtype(Placed(device), ToyError)


@pytest.mark.parametrize("settings_class", [ServerConfig, EdgeConfig, GenerateSettings])
def test_roles_place_models_automatically_by_default(settings_class: type) -> None:
    """`auto` is the loader's word for "CUDA when present" (spelled in both, so that the
    command line loads no torch)."""
    from specedge.model.loader import AUTO_DEVICE

    (device,) = (f for f in fields(settings_class) if f.name == "device")
    assert device.default == DEFAULT_DEVICE == AUTO_DEVICE
    assert "auto" in device.metadata["help"]
