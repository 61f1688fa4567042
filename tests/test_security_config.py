"""The security settings of both roles (TLS files, API keys), checked once at start-up with a
message that says what to fix (`config_file.check_certificate`, `check_ca_file`,
`check_key_file`), their paths in a config file relative to it, and the start-up warnings for
plaintext or open doors on an address others can reach (`exposure_warnings`)."""

from __future__ import annotations

import logging
import subprocess

import pytest

from specedge.edge.config import EdgeConfigError, load_edge_config
from specedge.server.config import ConfigError, load_server_config
from tests.support.certificates import Pki, make_pki
from tests.support.models import tiny_model
from tests.support.servers import start_server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def files(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Good and bad files by name."""
    folder = tmp_path_factory.mktemp("files")
    (folder / "garbage.pem").write_text("not a certificate\n")
    (folder / "keys").write_text("sk-1\n")
    (folder / "no-keys").write_text("# none yet\n")
    encrypted = folder / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.server_key), "-aes256", "-passout",
                    "pass:secret", "-out", str(encrypted)], check=True)  # fmt: skip
    named = {
        "ca": pki.ca,
        "cert": pki.server_cert,
        "key": pki.server_key,
        "edge_key": pki.edge_key,
        "encrypted": encrypted,
        "garbage": folder / "garbage.pem",
        "missing": folder / "missing.pem",
        "keys": folder / "keys",
        "no_keys": folder / "no-keys",
    }
    return {name: str(path) for name, path in named.items()}


def server(**settings: object) -> object:
    return load_server_config(overrides={"model": "m", **settings})


def edge(**settings: object) -> object:
    return load_edge_config(overrides={"model": "m", "server": "verifier.test:50051", **settings})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_cert": "cert"}, "--tls-cert needs --tls-key"),
        ({"tls_key": "key"}, "--tls-key needs --tls-cert"),
        ({"tls_cert": "missing", "tls_key": "key"}, "--tls-cert .*cannot read .*missing.pem"),
        ({"tls_cert": "cert", "tls_key": "edge_key"}, "do not load .*KEY_VALUES_MISMATCH"),
        ({"tls_cert": "garbage", "tls_key": "key"}, "do not load .*must be PEM"),
        ({"tls_cert": "cert", "tls_key": "encrypted"}, "is encrypted.*openssl pkey"),
        ({"tls_client_ca": "ca"}, "--tls-client-ca needs --tls-cert and --tls-key"),
        ({"tls_cert": "cert", "tls_key": "key", "tls_client_ca": "garbage"}, "no PEM CA"),
        ({"api_port": 0, "api_key_file": "no_keys"}, "--api-key-file .*holds no key"),
        ({"api_port": 0, "api_key_file": "missing"}, "--api-key-file .*cannot read"),
        ({"api_key_file": "keys"}, "add --api-port"),
        ({"api_port": 0, "protect_metrics": True}, "--protect-metrics needs --api-key-file"),
    ],
)
def test_bad_server_security_says_what_to_fix(
    files: dict[str, str], settings: dict[str, object], message: str
) -> None:
    resolved = {k: files.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(ConfigError, match=message):
        server(**resolved)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_cert": "cert", "tls_key": "key"}, "--tls-cert .*is for a TLS link: add --tls-ca"),
        ({"tls_server_name": "localhost"}, "--tls-server-name .*is for a TLS link"),
        ({"tls_ca": "garbage"}, "--tls-ca .*holds no PEM CA certificate"),
        ({"tls_ca": "missing"}, "--tls-ca .*cannot read"),
        ({"tls": True, "tls_cert": "cert"}, "--tls-cert needs --tls-key"),
        ({"api_key_file": "no_keys"}, "holds no key"),
        ({"protect_metrics": True}, "--protect-metrics needs --api-key-file"),
    ],
)
def test_bad_edge_security_says_what_to_fix(
    files: dict[str, str], settings: dict[str, object], message: str
) -> None:
    resolved = {k: files.get(v, v) if isinstance(v, str) else v for k, v in settings.items()}
    with pytest.raises(EdgeConfigError, match=message):
        edge(**resolved)


def test_good_security_settings_load(files: dict[str, str]) -> None:
    config = server(tls_cert=files["cert"], tls_key=files["key"], tls_client_ca=files["ca"],
                    api_port=0, api_key_file=files["keys"], protect_metrics=True)  # fmt: skip
    assert config.tls_client_ca == files["ca"]  # type: ignore[attr-defined]
    assert edge(tls=True).use_tls  # type: ignore[attr-defined]
    assert edge(tls_ca=files["ca"]).use_tls  # type: ignore[attr-defined]
    assert not edge().use_tls  # type: ignore[attr-defined]


def test_config_file_paths_are_relative_to_it(pki: Pki) -> None:
    folder = pki.ca.parent
    (folder / "server.yaml").write_text(
        "model: m\ntls_cert: server.pem\ntls_key: server.key\ntls_client_ca: ca.pem\n"
    )
    config = load_server_config(folder / "server.yaml")
    assert config.tls_cert == str(pki.server_cert) and config.tls_client_ca == str(pki.ca)
    (folder / "edge.yaml").write_text(
        "model: m\nserver: h:1\ntls: true\ntls_cert: edge.pem\ntls_key: edge.key\n"
    )
    edge_config = load_edge_config(folder / "edge.yaml")
    assert edge_config.tls and edge_config.tls_key == str(pki.edge_key)


def test_exposure_warnings(files: dict[str, str]) -> None:
    exposed = server(host="0.0.0.0", api_port=0).exposure_warnings()  # type: ignore[attr-defined]
    assert len(exposed) == 3
    assert "plaintext" in exposed[0] and "--tls-cert" in exposed[0]
    assert "--auth-token-file" in exposed[1] and "--api-key-file" in exposed[2]
    closed = server(host="0.0.0.0", api_port=0, tls_cert=files["cert"], tls_key=files["key"],
                    auth_token="t", api_key_file=files["keys"])  # fmt: skip
    assert closed.exposure_warnings() == []  # type: ignore[attr-defined]
    assert server(host="127.0.0.1").exposure_warnings() == []  # type: ignore[attr-defined]
    assert server(host="::1").exposure_warnings() == []  # type: ignore[attr-defined]
    remote = edge().exposure_warnings()  # type: ignore[attr-defined]
    assert len(remote) == 1 and "--tls-ca" in remote[0]
    assert edge(tls=True).exposure_warnings() == []  # type: ignore[attr-defined]
    local = load_edge_config(overrides={"model": "m", "server": "localhost:1", "host": "0.0.0.0"})
    assert ["--api-key-file" in w for w in local.exposure_warnings()] == [True]


def test_server_warns_when_it_listens_in_plaintext_beyond_loopback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="specedge.server.app"):
        background = start_server(tiny_model(), host="0.0.0.0")
        background.stop()
    assert any("plaintext" in record.getMessage() for record in caplog.records)
