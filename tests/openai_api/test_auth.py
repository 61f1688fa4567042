"""API keys on the HTTP APIs (`--api-key-file`, `openai_api.auth`), over real HTTP on loopback
with the `openai` client and httpx, on the server's own API and on the edge's: no key or a wrong
one gets 401 with OpenAI's error JSON (and no generation starts), either key of the file gets
the target's greedy text; `/health` and `/metrics` stay open unless `--protect-metrics`, which
also guards the server's metrics port; `credentials.BearerKeys` accepts exactly its keys."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest

from specedge.credentials import BearerKeys, read_key_file
from specedge.edge.app import BackgroundEdge
from specedge.model.loader import LoadedModel
from specedge.server.app import BackgroundServer
from tests.support.models import TARGET_SEED, tiny_model
from tests.support.observe import metric
from tests.support.reference import reference_tokens
from tests.support.servers import SERVER_CONFIG, edge_config, start_server

KEYS = ["sk-first-key", "sk-second-key"]  # two keys: one can be rotated out
PROMPT = [3, 1, 4, 1, 5, 9]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model(TARGET_SEED, char_tokenizer=True)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# keys of the test\n{KEYS[0]}\n\n  {KEYS[1]}  \n")
    return path


@pytest.fixture(scope="module")
def server(target: LoadedModel, key_file: Path) -> Iterator[BackgroundServer]:
    """The server's own API behind the keys; its metrics port open."""
    config = replace(SERVER_CONFIG, api_port=0, api_key_file=str(key_file)).validate()
    background = BackgroundServer(config, target).start()
    yield background
    background.stop()


@pytest.fixture(scope="module")
def edge(target: LoadedModel, key_file: Path) -> Iterator[BackgroundEdge]:
    """An edge behind the keys, /health and /metrics guarded too, over an open server."""
    verifier = start_server(target)
    config = edge_config(verifier, api_key_file=str(key_file), protect_metrics=True)
    background = BackgroundEdge(config, replace(target, name="tiny-draft")).start()
    yield background
    background.stop()
    verifier.stop()


def server_url(server: BackgroundServer) -> str:
    return f"http://127.0.0.1:{server.api_port}"


def complete(url: str, api_key: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
    answer = client.completions.create(
        model="x", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    return answer.choices[0].text or ""


def expected(target: LoadedModel) -> str:
    return str(target.tokenizer.decode(reference_tokens(target, PROMPT, MAX_TOKENS)))


@pytest.mark.parametrize("role", ["server", "edge"])
def test_no_key_or_a_wrong_key_gets_401(
    role: str, server: BackgroundServer, edge: BackgroundEdge, target: LoadedModel
) -> None:
    url = server_url(server) if role == "server" else edge.url
    for wrong in ("sk-wrong", KEYS[0][:-1], KEYS[0] + "x"):
        with pytest.raises(openai.AuthenticationError) as refused:
            complete(url, wrong)
        assert refused.value.status_code == 401
        assert refused.value.code == "invalid_api_key"
    for headers in ({}, {"Authorization": KEYS[0]}, {"Authorization": f"Basic {KEYS[0]}"}):
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and "--api-key-file" in error["message"]
    assert httpx.get(f"{url}/v1/models").status_code == 401


def test_refused_requests_start_no_generation(
    server: BackgroundServer, target: LoadedModel
) -> None:
    port = server.metrics_port
    before = metric(port, "specedge_server_prefill_tokens_total")
    with pytest.raises(openai.AuthenticationError):
        complete(server_url(server), "sk-wrong")
    assert metric(port, "specedge_server_prefill_tokens_total") == before
    assert complete(server_url(server), KEYS[0]) == expected(target)
    assert metric(port, "specedge_server_prefill_tokens_total") > before  # the power check


@pytest.mark.parametrize("role", ["server", "edge"])
def test_either_key_is_served(
    role: str, server: BackgroundServer, edge: BackgroundEdge, target: LoadedModel
) -> None:
    url = server_url(server) if role == "server" else edge.url
    for key in KEYS:
        assert complete(url, key) == expected(target)


def test_health_and_metrics_stay_open_by_default(server: BackgroundServer) -> None:
    for port in (server.metrics_port, server.api_port):
        for path in ("/health", "/metrics"):
            assert httpx.get(f"http://127.0.0.1:{port}{path}").status_code == 200, (port, path)


def test_protect_metrics_guards_health_and_metrics(
    edge: BackgroundEdge, target: LoadedModel, key_file: Path
) -> None:
    for path in ("/health", "/metrics"):
        assert httpx.get(f"{edge.url}{path}").status_code == 401
        headers = {"Authorization": f"Bearer {KEYS[1]}"}
        assert httpx.get(f"{edge.url}{path}", headers=headers).status_code == 200
    config = replace(
        SERVER_CONFIG, api_port=0, api_key_file=str(key_file), protect_metrics=True
    ).validate()
    server = BackgroundServer(config, target).start()
    try:
        for port in (server.metrics_port, server.api_port):
            url = f"http://127.0.0.1:{port}/metrics"
            assert httpx.get(url).status_code == 401
            assert httpx.get(url, headers={"Authorization": "Bearer no"}).status_code == 401
            ok = httpx.get(url, headers={"Authorization": f"Bearer {KEYS[0]}"})
            assert ok.status_code == 200 and "specedge_server" in ok.text
    finally:
        server.stop()


# ---- credentials.BearerKeys ---------------------------------------------------------------------
def test_bearer_keys_accept_exactly_their_keys(key_file: Path) -> None:
    keys = BearerKeys(read_key_file(key_file))
    assert read_key_file(key_file) == KEYS  # comments, blank lines and padding skipped
    for key in KEYS:
        assert keys.accepts(f"Bearer {key}")
        assert keys.accepts(f"bearer  {key} ".encode())  # the scheme in any case, bytes
    for refused in [None, "", "Bearer", "Bearer ", KEYS[0], f"Basic {KEYS[0]}",
                    f"Bearer {KEYS[0]}x", f"Bearer {KEYS[0][:-1]}", f"Bearer {KEYS[0]} {KEYS[1]}",
                    f"Bearer {KEYS[0].upper()}"]:  # fmt: skip
        assert not keys.accepts(refused), refused


def test_a_key_file_without_keys_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# no key yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_key_file(empty)
