"""TLS and the bearer token over real gRPC on loopback (`rpc.security`), with a certificate
authority made in the test (`tests/support/certificates.py`).

TLS: the edge's greedy tokens over TLS, and over mutual TLS with a token, equal the target's
reference; a plaintext edge, an edge trusting another CA, an edge expecting another server name,
a TLS edge against a plaintext server and (mutual TLS) an edge with no certificate or with one
from another CA are all refused, each with an error that says what to check. Token: a missing,
wrong or malformed token is refused with UNAUTHENTICATED before any message is read: the
server's metrics show refusals counted and no byte received, no session, no prefill, no round,
until the right token gets the same request served (the power check); the health service stays
open."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from specedge.core.generation import GenerationStats
from specedge.core.limits import TreeShape
from specedge.edge.app import Edge
from specedge.edge.client import HANDSHAKE, ClientIdentity, ServerConnection, ServerUnavailableError
from specedge.model.loader import LoadedModel
from specedge.rpc.codec import SessionOpened, VerifierClient, health_status
from specedge.rpc.security import AUTH_MESSAGE
from specedge.server.app import BackgroundServer
from tests.support.certificates import Pki, make_pki
from tests.support.models import TARGET_SEED, TINY_VOCAB, tiny_model
from tests.support.observe import metric, wait_for
from tests.support.reference import reference_tokens
from tests.support.scripted_edge import channel, expect_status, open_message, run
from tests.support.servers import edge_config, edge_generate, start_server, with_edge

PROMPT = [5, 17, 93, 2, 41]
MAX_TOKENS = 24
TOKEN = "tls-test-token"


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model(TARGET_SEED)


@pytest.fixture(scope="module")
def draft() -> LoadedModel:
    return tiny_model(12)  # disagrees with the target now and then: real rejections


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(target: LoadedModel, pki: Pki) -> Iterator[BackgroundServer]:
    server = start_server(target, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(target: LoadedModel, pki: Pki) -> Iterator[BackgroundServer]:
    """Mutual TLS (edges need a certificate the test CA signed) and a token."""
    server = start_server(
        target,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
        auth_token=TOKEN,
    )
    yield server
    server.stop()


def generate(config: Any, draft: LoadedModel) -> list[int]:
    async def body(edge: Edge) -> tuple[list[int], GenerationStats]:
        return await edge_generate(edge, PROMPT, MAX_TOKENS)

    tokens, _ = asyncio.run(with_edge(config, draft, body))
    return list(tokens)


def connect(config: Any, draft: LoadedModel) -> None:
    """One handshake attempt from an edge configured by `config`."""

    async def body(edge: Edge) -> object:
        return await edge.runtime.connection.connect()

    asyncio.run(with_edge(config, draft, body))


# ---- TLS ----------------------------------------------------------------------------------------
def test_tls_end_to_end(
    tls_server: BackgroundServer, target: LoadedModel, draft: LoadedModel, pki: Pki
) -> None:
    config = edge_config(tls_server, tls_ca=str(pki.ca))
    assert generate(config, draft) == reference_tokens(target, PROMPT, MAX_TOKENS)


def test_server_name_override(
    tls_server: BackgroundServer, target: LoadedModel, draft: LoadedModel, pki: Pki
) -> None:
    """Connecting by address, checking the certificate's name "localhost"."""
    config = edge_config(tls_server, tls_ca=str(pki.ca), tls_server_name="localhost")
    assert generate(config, draft) == reference_tokens(target, PROMPT, MAX_TOKENS)
    wrong = edge_config(tls_server, tls_ca=str(pki.ca), tls_server_name="elsewhere.test")
    with pytest.raises(ServerUnavailableError, match="does not name the host"):
        connect(wrong, draft)


def test_mutual_tls_with_a_token_end_to_end(
    mtls_server: BackgroundServer, target: LoadedModel, draft: LoadedModel, pki: Pki
) -> None:
    config = edge_config(
        mtls_server,
        tls_ca=str(pki.ca),
        tls_cert=str(pki.edge_cert),
        tls_key=str(pki.edge_key),
        auth_token=TOKEN,
    )
    assert generate(config, draft) == reference_tokens(target, PROMPT, MAX_TOKENS)


def test_plaintext_edge_is_refused(tls_server: BackgroundServer, draft: LoadedModel) -> None:
    with pytest.raises(ServerUnavailableError, match="if the server uses TLS, pass --tls-ca"):
        connect(edge_config(tls_server), draft)


def test_a_socket_closed_after_the_handshake_gets_no_tls_advice() -> None:
    """A server gone mid-session (SIGKILL) closes the socket just as a TLS mismatch does at
    the handshake; only the handshake's error carries the TLS advice."""
    identity = ClientIdentity("fingerprint", TINY_VOCAB, TreeShape())
    connection = ServerConnection("127.0.0.1:1", identity)
    closed = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
        details="Stream removed (Socket closed)",
    )  # fmt: skip
    assert "--tls-ca" in str(connection.error_from(closed, HANDSHAKE))
    mid_session = str(connection.error_from(closed, "a streamed round"))
    assert "Socket closed" in mid_session and "TLS" not in mid_session


def test_plaintext_client_is_refused(tls_server: BackgroundServer) -> None:
    async def main() -> grpc.aio.AioRpcError:
        async with channel(tls_server.port) as chan:  # a plain gRPC client
            return await expect_status(VerifierClient(chan).info(timeout=5))

    assert run(main()).code() == grpc.StatusCode.UNAVAILABLE


def test_edge_trusting_another_ca_is_refused(
    tls_server: BackgroundServer, draft: LoadedModel, pki: Pki
) -> None:
    config = edge_config(tls_server, tls_ca=str(pki.other_ca))
    with pytest.raises(ServerUnavailableError, match="not signed by a CA this edge trusts"):
        connect(config, draft)


def test_tls_edge_to_a_plaintext_server_is_refused(
    target: LoadedModel, draft: LoadedModel, pki: Pki
) -> None:
    server = start_server(target)
    try:
        with pytest.raises(ServerUnavailableError, match="the server does not speak TLS"):
            connect(edge_config(server, tls_ca=str(pki.ca)), draft)
    finally:
        server.stop()


def test_mutual_tls_refuses_an_edge_without_a_certificate(
    mtls_server: BackgroundServer, draft: LoadedModel, pki: Pki
) -> None:
    config = edge_config(mtls_server, tls_ca=str(pki.ca), auth_token=TOKEN)
    with pytest.raises(ServerUnavailableError, match="pass --tls-cert and --tls-key"):
        connect(config, draft)


def test_mutual_tls_refuses_a_certificate_of_another_ca(
    mtls_server: BackgroundServer, draft: LoadedModel, pki: Pki
) -> None:
    config = edge_config(
        mtls_server,
        tls_ca=str(pki.ca),
        tls_cert=str(pki.other_edge_cert),
        tls_key=str(pki.other_edge_key),
        auth_token=TOKEN,
    )
    with pytest.raises(ServerUnavailableError, match="may not have signed this edge's"):
        connect(config, draft)


# ---- the token ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refusal:
    info: grpc.StatusCode
    listening: grpc.StatusCode  # a Session that sends nothing
    opening: grpc.StatusCode  # a Session that sends its Open first
    details: str


# When a client's write is in flight as the server's refusal arrives, grpc-python (1.85) may
# replace the call's status with INTERNAL "Internal error from Core" (`set_internal_error`
# after a failed send). The server refused all the same; the edge never meets this, since its
# handshake (Info, a unary call) is refused first.
LOST_RACE = grpc.StatusCode.INTERNAL


BAD_METADATA = {
    "missing": (),
    "wrong": (("authorization", f"Bearer {TOKEN}x"),),
    "no scheme": (("authorization", TOKEN),),
    "other scheme": (("authorization", f"Basic {TOKEN}"),),
    "prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
}
SERVER_METRICS = ["prefill_tokens", "rounds", "received_bytes", "emitted_tokens"]


async def attempt(port: int, target: LoadedModel, metadata: Any) -> Refusal:
    async with channel(port) as chan:
        client = VerifierClient(chan, metadata)
        info = await expect_status(client.info(timeout=5))
        listening = await expect_status(client.session().receive())
        call = client.session()

        async def open_and_listen() -> None:
            await call.send(open_message(target, PROMPT * 20, MAX_TOKENS))
            await call.receive()

        opening = await expect_status(open_and_listen())
    return Refusal(info.code(), listening.code(), opening.code(), info.details() or "")


def test_bad_tokens_are_refused_before_any_model_work(target: LoadedModel) -> None:
    server = start_server(target, auth_token=TOKEN)
    try:
        port = server.metrics_port
        for name, metadata in BAD_METADATA.items():
            refusal = run(attempt(server.port, target, metadata))
            unauthenticated = grpc.StatusCode.UNAUTHENTICATED
            assert refusal.info == refusal.listening == unauthenticated, name
            assert refusal.details == AUTH_MESSAGE, name
            assert refusal.opening in (unauthenticated, LOST_RACE), name
        assert metric(port, "specedge_server_auth_failures_total") == 3 * len(BAD_METADATA)
        for name in SERVER_METRICS:  # nothing was read, nothing computed
            assert metric(port, f"specedge_server_{name}_total") == 0, name
        assert metric(port, "specedge_server_active_sessions") == 0
        # The power check: the same request with the right token moves every counter.
        good = (("authorization", f"Bearer {TOKEN}"),)

        async def served() -> object:
            async with channel(server.port) as chan:
                call = VerifierClient(chan, good).session()
                await call.send(open_message(target, PROMPT * 20, MAX_TOKENS))
                return await call.receive()

        assert isinstance(run(served()), SessionOpened)
        assert metric(port, "specedge_server_received_bytes_total") > 0
        # The prefill may still be running when Opened arrives.
        wait_for(lambda: metric(port, "specedge_server_prefill_tokens_total") > 0)
        assert metric(port, "specedge_server_auth_failures_total") == 3 * len(BAD_METADATA)
    finally:
        server.stop()


def test_health_service_needs_no_token(mtls_server: BackgroundServer, pki: Pki) -> None:
    """Probes reach the standard health service with a certificate but no token."""
    credentials = grpc.ssl_channel_credentials(
        Path(pki.ca).read_bytes(), Path(pki.edge_key).read_bytes(), Path(pki.edge_cert).read_bytes()
    )

    async def main() -> str:
        address = f"127.0.0.1:{mtls_server.port}"
        async with grpc.aio.secure_channel(address, credentials) as chan:
            return await health_status(chan, timeout=5)

    assert run(main()) == "SERVING"
