"""`EdgeConfig`: defaults < edge.yaml < flags, validated once with messages that name the flag
and the YAML key; the `specedge edge` command reports a bad configuration in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from specedge.edge.config import EdgeConfigError, load_edge_config


def test_yaml_then_flags(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    config_file = tmp_path / "edge.yaml"
    config_file.write_text(
        "model: tiny\nserver: 10.0.0.5:50051\nbudget: 16\nproactive: add-depth\n"
        "reply-timeout: 5\nauth_token_file: token\nlookup: 4\n"
    )
    config = load_edge_config(config_file, {"budget": 24, "depth": None, "port": 0})
    assert (config.model, config.server, config.budget, config.depth) == (
        "tiny",
        "10.0.0.5:50051",
        "24",
        6,
    )
    assert config.proactive == "add-depth" and config.reply_timeout == 5.0 and config.port == 0
    assert config.auth_token == "s3cret"  # the file is relative to the YAML file
    assert config.tree_shape.budget == 24 and config.subtree_shape.depth == 3
    assert config.tree_shape.lookup == 4 and config.subtree_shape.lookup == 0


@pytest.mark.parametrize(
    ("yaml_text", "flags", "message"),
    [
        ("", {"server": "h:1"}, "no draft model: pass --model"),
        (
            "model: m\n",
            {"server": "nohost"},
            "--server (`server` in the config file) must be HOST:PORT",
        ),
        ("model: m\nserver: h:1\nproactive: maybe\n", {}, "off, keep-depth, add-depth"),
        (
            "model: m\nserver: h:1\n",
            {"budget": 0},
            "--budget (`budget` in the config file) must be auto or a node count >= 1",
        ),
        ("model: m\nserver: h:1\nbudgett: 3\n", {}, "unknown setting(s) budgett"),
        (
            "model: m\nserver: h:1\ndepth: deep\n",
            {},
            "--depth (`depth` in the config file) must be an integer",
        ),
        ("model: m\nserver: h:1\ndecay: 1.5\n", {}, "must be in (0, 1)"),
        (
            "model: m\nserver: h:1\n",
            {"lookup": -1},
            "--lookup (`lookup` in the config file) must be >= 0",
        ),
        ("model: m\nserver: h:1\ndevice: tpu\n", {}, "cpu, cuda or cuda:N"),
        ("- a list\n", {}, "must hold a mapping"),
    ],
)
def test_invalid_settings_say_how_to_fix(
    tmp_path: Path, yaml_text: str, flags: dict[str, object], message: str
) -> None:
    config_file = tmp_path / "edge.yaml"
    config_file.write_text(yaml_text)
    with pytest.raises(EdgeConfigError) as error:
        load_edge_config(config_file, flags)
    assert message in str(error.value)


def test_token_flag_and_file_are_exclusive(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("a\n")
    flags = {"model": "m", "server": "h:1", "auth_token": "b"}
    with pytest.raises(EdgeConfigError, match="not both"):
        load_edge_config(None, flags, tmp_path / "token")


def test_command_reports_a_bad_configuration() -> None:
    specedge = Path(sys.executable).with_name("specedge")
    result = subprocess.run(
        [str(specedge), "edge", "--model", "tiny", "--server", "no-port"],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 2
    assert "error: --server (`server` in the config file) must be HOST:PORT" in result.stderr
