"""Benchmark configuration: sources in order, the quick preset, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from specedge.bench.config import QUICK, BenchConfigError, load_bench_config
from specedge.bench.results import ALL_SYSTEMS


def test_defaults_cover_the_paper_grid() -> None:
    config = load_bench_config()
    assert config.systems == ALL_SYSTEMS
    assert config.clients == (1, 2, 4, 8, 16) and config.rtt_ms == (0.0, 15.0, 30.0, 50.0)
    # The goodput protocol: closed-loop clients, 128 tokens, repeats, a random-text worst case.
    assert (config.max_tokens, config.requests_per_client, config.warmup_per_client) == (128, 4, 1)
    assert config.prompt_sets == ("specbench", "random")
    assert config.repeats_for("specedge", 15.0) == config.repeats_for("server-ar", 0.0) == 2
    assert (
        config.repeats_for("specedge", 50.0)
        == config.repeats_for("specedge-no-proactive", 15.0)
        == 1
    )
    assert config.prompt_sets_for("server-ar", 15.0) == ("specbench", "random")
    assert (
        config.prompt_sets_for("server-spec", 15.0)
        == config.prompt_sets_for("specedge", 0.0)
        == ("specbench",)
    )
    assert config.temperatures == (0.0, 0.7)
    assert config.price_table.server_per_hour == 4.05
    assert config.price_table.edge_per_hour == 0.35
    assert config.rtts_for("specedge") == (0.0, 15.0, 30.0, 50.0)
    assert config.rtts_for("server-spec") == (0.0, 15.0)
    assert config.rtts_for("specedge-no-proactive") == (15.0,)
    assert config.rtts_for("hf-assisted") == (0.0,) and config.clients_for("hf-assisted") == (1,)


def test_yaml_then_flags_then_quick_fills_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "bench.yaml"
    path.write_text("clients: [1, 3]\nrtt-ms: 0,20\nmax_tokens: 10\nquick: true\ndepth: 5\n")
    config = load_bench_config(path, {"max_tokens": 20, "temperatures": "0.7", "clients": None})
    assert config.clients == (1, 3)  # from the file (the flag was not given)
    assert config.rtt_ms == (0.0, 20.0)
    assert config.max_tokens == 20  # the flag wins
    assert config.temperatures == (0.7,)
    assert config.depth == "5"
    assert config.num_prompts == QUICK["num_prompts"]  # quick fills what nobody set
    assert config.out == QUICK["out"]
    assert config.rtts_for("server-spec") == (0.0,)
    assert config.rtts_for("specedge-no-pipelining") == (20.0,)


def test_quick_flag_alone() -> None:
    config = load_bench_config(None, {"quick": True})
    assert config.clients == (2,) and config.rtt_ms == (0.0, 15.0)
    assert config.systems == ALL_SYSTEMS


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"systems": "specedge,tgi"}, "unknown tgi"),
        ({"clients": "0,2"}, "--clients"),
        ({"clients": "two"}, "bad value"),
        ({"rtt_ms": "-5"}, "--rtt-ms"),
        ({"depth": "deep"}, "or 'auto'"),
        ({"proactive": "off"}, "specedge-no-proactive"),
        ({"prices": "gpu=3"}, "--prices"),
        ({"max_tokens": 0}, "--max-tokens"),
    ],
)
def test_bad_settings_name_the_flag(overrides: dict, message: str) -> None:
    with pytest.raises(BenchConfigError, match=message):
        load_bench_config(None, overrides)


def test_bad_files(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("clientz: 3\n")
    with pytest.raises(BenchConfigError, match="unknown setting"):
        load_bench_config(unknown)
    with pytest.raises(BenchConfigError, match="cannot read"):
        load_bench_config(tmp_path / "missing.yaml")
    assert load_bench_config(None, {"depth": "auto"}).auto_depth


def test_requests_per_run() -> None:
    assert load_bench_config().requests_for(clients=2, num_prompts=8) == 8  # 4 per client
    config = load_bench_config(None, {"requests_per_client": 0})
    assert config.requests_for(clients=2, num_prompts=8) == 8  # every prompt once
    assert config.requests_for(clients=16, num_prompts=8) == 16  # every client sends one
    per_client = load_bench_config(None, {"requests_per_client": 3})
    assert per_client.requests_for(clients=2, num_prompts=8) == 6
    with pytest.raises(BenchConfigError, match="requests-per-client"):
        load_bench_config(None, {"requests_per_client": -1})
