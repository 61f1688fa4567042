"""A throw-away public key infrastructure for TLS tests, made with the `openssl` command line
(the `cryptography` package is not a dependency): a certificate authority, a server
certificate for localhost / 127.0.0.1 and an edge (client) certificate it signed, and a second,
unrelated authority with an edge certificate of its own. P-256 keys, valid for a day."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Pki:
    ca: Path  # the authority's certificate (what a peer trusts)
    server_cert: Path
    server_key: Path
    edge_cert: Path
    edge_key: Path
    other_ca: Path  # an authority that signed nothing of the above
    other_edge_cert: Path  # an edge certificate signed by `other_ca`
    other_edge_key: Path


def make_pki(folder: Path) -> Pki:
    """Write the certificates and keys into `folder` (skips the test when openssl is missing)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    _authority(folder, "ca")
    _authority(folder, "other-ca")
    _leaf(folder, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    _leaf(folder, "edge", "ca", "DNS:edge.test")
    _leaf(folder, "other-edge", "other-ca", "DNS:edge.test")
    return Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        edge_cert=folder / "edge.pem",
        edge_key=folder / "edge.key",
        other_ca=folder / "other-ca.pem",
        other_edge_cert=folder / "other-edge.pem",
        other_edge_key=folder / "other-edge.key",
    )


_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _authority(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", *_NEW_KEY, "-days", "1", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem")  # fmt: skip


def _leaf(folder: Path, name: str, authority: str, names: str) -> None:
    """A certificate for `names` (subjectAltName) signed by `authority`."""
    _openssl(folder, "req", *_NEW_KEY, "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr")  # fmt: skip
    (folder / f"{name}.ext").write_text(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\n")
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{authority}.pem",
             "-CAkey", f"{authority}.key", "-CAcreateserial", "-days", "1",
             "-extfile", f"{name}.ext", "-out", f"{name}.pem")  # fmt: skip


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)
