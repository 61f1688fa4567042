"""ServerConfig: defaults < YAML < flags, and a clear message for every invalid setting."""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from specedge.server.config import ConfigError, ServerConfig, load_server_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_need_only_a_model() -> None:
    config = load_server_config(overrides={"model": "smollm2-135m"})
    assert config == ServerConfig(model="smollm2-135m")
    assert (config.host, config.port, config.metrics_port) == ("127.0.0.1", 50051, 9400)
    with pytest.raises(FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


def test_yaml_then_flags(tmp_path: Path) -> None:
    yaml_file = write(
        tmp_path / "server.yaml",
        "model: smollm2-135m\nmax-batch: 4\nsession_timeout: 5\nport: 6000\ndtype: bf16\n",
    )
    config = load_server_config(yaml_file, {"port": 7000, "max_sessions": None})
    assert config.model == "smollm2-135m" and config.max_batch == 4
    assert config.session_timeout == 5.0 and isinstance(config.session_timeout, float)
    assert config.port == 7000  # the flag wins
    assert config.max_sessions == ServerConfig().max_sessions  # None = flag not given
    assert config.dtype == "bf16"


def test_auth_token_sources(tmp_path: Path) -> None:
    token_file = write(tmp_path / "token", "  abc123  \n")
    assert load_server_config(None, {"model": "m"}, token_file).auth_token == "abc123"
    yaml_file = write(tmp_path / "server.yaml", "model: m\nauth_token_file: token\n")
    assert load_server_config(yaml_file).auth_token == "abc123"  # relative to the YAML file
    assert load_server_config(yaml_file, {"auth_token": "flag"}).auth_token == "flag"
    with pytest.raises(ConfigError, match="either --auth-token or --auth-token-file"):
        load_server_config(None, {"model": "m", "auth_token": "x"}, token_file)
    with pytest.raises(ConfigError, match="is empty"):
        load_server_config(None, {"model": "m"}, write(tmp_path / "empty", "\n"))
    with pytest.raises(ConfigError, match="cannot read --auth-token-file"):
        load_server_config(None, {"model": "m"}, tmp_path / "missing")
    both = write(tmp_path / "both.yaml", "model: m\nauth_token: a\nauth_token_file: token\n")
    with pytest.raises(ConfigError, match="not both"):
        load_server_config(both)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": ""}, "no target model"),
        ({"port": 70000}, "--port"),
        ({"metrics_port": -1}, "--metrics-port"),
        ({"port": 9000, "metrics_port": 9000}, "pick two ports"),
        ({"max_batch": 0}, "--max-batch .* >= 1"),
        ({"max_sessions": 0}, "--max-sessions"),
        ({"max_tree_nodes": 0}, "--max-tree-nodes"),
        ({"max_context": 1}, "--max-context"),
        ({"max_tree_nodes": 64, "max_batch_tokens": 10}, "one full tree"),
        ({"session_timeout": 0.0}, "--session-timeout"),
        ({"batch_wait_ms": -1.0}, "--batch-wait-ms"),
        ({"lookup": -2}, "--lookup .* >= 0"),
        ({"device": "tpu"}, "cpu, cuda or cuda:N"),
        ({"dtype": "int8"}, "--dtype"),
        ({"auth_token": "  "}, "auth token is empty"),
        ({"attention": "flash"}, "--attention .* auto, sdpa, bmm, native, flex"),
    ],
)
def test_invalid_settings_say_what_to_fix(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server_config(overrides={"model": "m", **overrides})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: m\nbogus: 1\n", "unknown setting.*bogus"),
        ("model: m\nmax_batch: lots\n", "--max-batch .* must be an integer"),
        ("model: m\nmax_batch: true\n", "must be an integer"),
        ("model: m\nsession_timeout: soon\n", "must be a number"),
        ("model: [1, 2]\n", "--model .* must be a string"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_explained(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_server_config(write(tmp_path / "server.yaml", text))


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_server_config(tmp_path / "nope.yaml")
