"""Readers of deploy/ for tests/test_deploy.py: compose files as `docker compose` reads them
with no variable set, the Dockerfile's instructions, the kustomizations rendered as `kubectl
kustomize` renders them (for the fields the manifests use), the `specedge` command lines they
run parsed by the real CLI, and the metric names the servers' and edges' registries expose."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
import yaml
from prometheus_client import CollectorRegistry

from specedge.cli import app
from specedge.edge.config import EdgeConfig, load_edge_config
from specedge.edge.metrics import EdgeMetrics
from specedge.server.config import ServerConfig, load_server_config
from specedge.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = sorted(path.parent for path in K8S.rglob("kustomization.yaml"))


# ---- reading the files -----------------------------------------------------------------------
def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def interpolated(text: str) -> str:
    """compose's `${NAME:-default}` as it reads with no variable set (every one has a default,
    so `docker compose up` needs no environment)."""

    def default(match: re.Match[str]) -> str:
        assert match[2] is not None, f"${{{match[1]}}} has no default"
        return match[2]

    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", default, text)


def compose_file(name: str) -> dict[str, Any]:
    return yaml.safe_load(interpolated((DEPLOY / name).read_text()))  # type: ignore[no-any-return]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = (line.strip() for line in text.splitlines())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def seconds(duration: str | int) -> float:
    """compose's durations: 45s, 1m30s, 15m."""
    if isinstance(duration, int):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"unreadable duration {duration!r}"
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * unit[u] for n, u in parts)


# ---- the CLI ---------------------------------------------------------------------------------
ROLE_LOADERS: dict[str, Callable[..., Any]] = {
    "serve": load_server_config,
    "edge": load_edge_config,
}


def parse_command_line(argv: list[str]) -> ServerConfig | EdgeConfig:
    """`specedge ARGV` parsed by the real CLI (an unknown flag or a bad value fails, as at the
    shell) and validated as `serve` / `edge` validate at start-up; returns the role's config."""
    name, *rest = argv
    assert name in ROLE_LOADERS, f"`specedge {name}`: deploy/ runs only serve and edge"
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    try:
        params = command.make_context(name, rest).params
    except typer.TyperException as error:  # typer's click errors (NoSuchOption, BadParameter)
        pytest.fail(f"`specedge {shlex.join(argv)}`: {error}")
    config_file, token_file = params.pop("config"), params.pop("auth_token_file")
    return ROLE_LOADERS[name](config_file, params, token_file)  # type: ignore[no-any-return]


def image_command_line() -> list[str]:
    """The image's ENTRYPOINT + CMD, after `specedge`."""
    arrays = {op: json.loads(args) for op, args in dockerfile() if op in ("ENTRYPOINT", "CMD")}
    argv = arrays["ENTRYPOINT"] + arrays.get("CMD", [])
    assert "specedge" in argv, f"the entrypoint does not run specedge: {argv}"
    return argv[argv.index("specedge") + 1 :]  # type: ignore[no-any-return]


def compose_command_lines() -> Iterator[tuple[str, list[str]]]:
    """(service, its command) of each compose.yaml service that runs the SpecEdge image."""
    for name, service in compose_file("compose.yaml")["services"].items():
        if service.get("image", "").startswith("specedge"):
            yield name, [str(word) for word in service["command"]]


def specedge_containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(Deployment name, container) of every container that runs the SpecEdge image."""
    for obj in objects:
        if obj["kind"] == "Deployment":
            for container in obj["spec"]["template"]["spec"]["containers"]:
                if container["image"].startswith("specedge"):
                    yield obj["metadata"]["name"], container


def k8s_command_line(directory: Path, deployment: str) -> list[str]:
    """The args of the rendered Deployment's one container (the image's entrypoint runs them)."""
    pod = find(render(directory), "Deployment", deployment)["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert "command" not in container, f"{deployment}: keep the image's entrypoint"
    return container["args"]  # type: ignore[no-any-return]


# ---- kustomize, as far as these manifests use it ---------------------------------------------
def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize DIRECTORY` builds, for the fields used here: resources
    (files and directories), strategic-merge patches, images and namespace."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "namespace", "resources", "images"}
    assert unsupported <= {"patches"}, f"{directory}: render() does not do {unsupported}"
    assert kustomization["kind"] == "Kustomization"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        assert path.exists(), f"{directory}/kustomization.yaml lists {entry}, which is missing"
        objects += render(path) if path.is_dir() else yaml_documents(path)
    for patch in kustomization.get("patches", []):
        assert (directory / patch["path"]).is_file(), f"{directory}: no patch {patch['path']}"
        for document in yaml_documents(directory / patch["path"]):
            key = (document["kind"], document["metadata"]["name"])
            targets = [obj for obj in objects if (obj["kind"], obj["metadata"]["name"]) == key]
            assert len(targets) == 1, f"{directory}: patch {patch['path']} targets no {key}"
            merge_patch(targets[0], document)
    for image in kustomization.get("images", []):
        for _, container in specedge_containers(objects):
            name = container["image"].rsplit(":", 1)[0]
            if name == image["name"]:
                tag = image.get("newTag", container["image"].partition(":")[2])
                container["image"] = f"{image.get('newName', name)}:{tag}".rstrip(":")
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] != "Namespace":
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Strategic merge: maps merge, lists of named maps merge by name, other lists replace."""
    for key, value in patch.items():
        old = target.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            merge_patch(old, value)
        elif isinstance(value, list) and isinstance(old, list) and all("name" in v for v in value):
            for item in value:
                same = [each for each in old if each.get("name") == item["name"]]
                if same:
                    merge_patch(same[0], item)
                else:
                    old.append(item)
        else:
            target[key] = value


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in objects if obj["kind"] == kind and obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    named = [each["containerPort"] for each in container["ports"] if each.get("name") == port]
    assert named, f"container {container['name']} has no port named {port!r}"
    return named[0]  # type: ignore[no-any-return]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


# ---- metrics ---------------------------------------------------------------------------------
def exposed_names(registry: CollectorRegistry) -> set[str]:
    """The series names a registry's /metrics can show (counters as NAME_total, ...)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "stateset": ("",),  # an Enum: NAME{NAME="state"}
        "info": ("_info",),
    }
    return {f.name + end for f in registry.collect() for end in suffixes[f.type]}


METRIC_NAMES = exposed_names(ServerMetrics().registry) | exposed_names(EdgeMetrics().registry)


def unknown_metrics(expr: str) -> set[str]:
    """The specedge series a PromQL expression names that no registry defines."""
    named = set(re.findall(r"\bspecedge_\w+", expr))
    assert named, f"{expr!r} charts no SpecEdge metric"
    return named - METRIC_NAMES
