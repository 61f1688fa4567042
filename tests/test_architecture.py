"""The import direction of docs/architecture.md, checked on the source: core knows no role, no
network and no HTTP; edge and server never import each other and reach the HTTP package only
from their glue modules; one module imports the generated protobuf code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "specedge"
HTTP_GLUE = {"edge/api.py", "server/api.py"}


def imports_of(path: Path) -> set[str]:
    """Every `specedge...` module a file imports (at any depth, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("specedge")}


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.py"))


def names(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


@pytest.mark.parametrize("path", modules("core"), ids=names)
def test_core_imports_no_role_network_or_http(path: Path) -> None:
    banned = ("specedge.edge", "specedge.server", "specedge.openai_api", "specedge.rpc")
    assert not [name for name in imports_of(path) if name.startswith(banned)]


@pytest.mark.parametrize("path", modules("edge") + modules("server"), ids=names)
def test_roles_stay_apart_and_reach_http_only_from_their_glue(path: Path) -> None:
    role = path.parent.name
    other = "specedge.server" if role == "edge" else "specedge.edge"
    imported = imports_of(path)
    assert not [name for name in imported if name.startswith(other)]
    if names(path) not in HTTP_GLUE:
        assert not [name for name in imported if name.startswith("specedge.openai_api")]


def test_only_the_codec_imports_generated_protobuf_code() -> None:
    importers = {
        names(path)
        for path in PACKAGE.rglob("*.py")
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
        and any(name.endswith(("_pb2", "_pb2_grpc")) for name in imports_of(path))
    }
    assert importers == {"rpc/codec.py"}


def test_the_generation_protocol_lives_in_core() -> None:
    protocol = {"GenerationRequest", "GenerationStats", "GenerationBackend", "RoundLoopBackend"}
    for path in modules("openai_api"):
        defined = {
            node.name
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef)
        }
        assert not defined & protocol, names(path)
