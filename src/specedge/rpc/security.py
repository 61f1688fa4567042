"""Who may use the gRPC link: TLS for the channel and the bearer token every call carries.

- **TLS.** `ServerTls` (`serve --tls-cert --tls-key [--tls-client-ca]`) gives the server's port
  credentials; with a client CA the server requires every edge to present a certificate it
  signed (mutual TLS). `ChannelSecurity` (`edge --tls-ca | --tls [--tls-cert --tls-key]
  [--tls-server-name]`) opens the edge's channel, TLS or plaintext, and `hint` turns what gRPC
  reports of a failed connection (a refused handshake reads as "Socket closed") into advice.
  Files are PEM, keys unencrypted; the configs check them at start-up.
- **Token.** An edge sends `authorization: Bearer TOKEN` as call metadata (`VerifierClient`).
  `TokenAuth`, a server interceptor, checks it before the call reaches its handler: a missing
  or wrong token ends the call with UNAUTHENTICATED before any message of a stream is read or
  any model work is done (a unary request, Info's empty message, is read by gRPC itself before
  any handler). The standard health service (`OPEN_SERVICES`) stays open, as `/health` does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from specedge.credentials import BearerKeys

logger = logging.getLogger(__name__)

AUTH_MESSAGE = (
    "missing or wrong bearer token: send metadata 'authorization: Bearer <token>' with the "
    "server's --auth-token"
)
# Services any caller may use: load balancers probe health without a token.
OPEN_SERVICES = ("grpc.health.v1.Health",)
REFUSAL_LOG_INTERVAL_S = 10.0  # at most one warning per interval; the metric counts them all


# ---- TLS ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerTls:
    """The server's certificate chain and key, and the CA that signs edges' certificates (None:
    edges need none)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def credentials(self) -> grpc.ServerCredentials:
        client_ca = _read(self.client_ca_file) if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(_read(self.key_file), _read(self.cert_file))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@dataclass(frozen=True)
class ChannelSecurity:
    """How the edge reaches the server. `tls` off: plaintext. On: the server's certificate must
    be signed by `ca_file` (None: the system's CAs) and name the host of the address (or
    `server_name`); `cert_file`/`key_file` are the edge's own, for mutual TLS."""

    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=list(options))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file) if self.ca_file else None,
            private_key=_read(self.key_file) if self.key_file else None,
            certificate_chain=_read(self.cert_file) if self.cert_file else None,
        )
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return grpc.aio.secure_channel(address, credentials, options=list(options))

    def hint(self, details: str) -> str:
        """Advice for a connection that failed with `details` ("" when there is none)."""
        if "CERTIFICATE_VERIFY_FAILED" in details:
            trusted = f"--tls-ca {self.ca_file}" if self.ca_file else "the system's CAs"
            return (
                f"the server's certificate is not signed by a CA this edge trusts ({trusted}); "
                "pass the CA that signed the server's --tls-cert"
            )
        if "Hostname Verification" in details:
            return (
                "the server's certificate does not name the host of --server; connect by a name "
                "it carries, or pass that name with --tls-server-name"
            )
        if "WRONG_VERSION_NUMBER" in details:
            return (
                "the server does not speak TLS: start it with --tls-cert and --tls-key, or "
                "connect without --tls/--tls-ca"
            )
        if "Socket closed" not in details and "reset by peer" not in details:
            return ""
        if not self.tls:
            return "if the server uses TLS, pass --tls-ca FILE (or --tls for the system's CAs)"
        if self.cert_file is None:
            return (
                "if the server requires client certificates (its --tls-client-ca), pass "
                "--tls-cert and --tls-key"
            )
        return (
            "if the server requires client certificates, its --tls-client-ca may not have "
            "signed this edge's --tls-cert"
        )


def _read(path: str | None) -> bytes:
    assert path is not None
    return Path(path).read_bytes()


# ---- the token ----------------------------------------------------------------------------------
class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses every call without `authorization: Bearer <one of keys>` (UNAUTHENTICATED)
    before its handler runs; `on_refused()` counts each refusal."""

    def __init__(self, keys: BearerKeys, on_refused: Callable[[], None]) -> None:
        self._keys = keys
        self._on_refused = on_refused
        self._last_logged = -REFUSAL_LOG_INTERVAL_S
        self._unlogged = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.lstrip("/").startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        given = [value for key, value in metadata if key == "authorization"]
        if len(given) == 1 and self._keys.accepts(given[0]):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return handler
        return self._refusal(handler, method)

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """A handler of `handler`'s kind that aborts at once, reading nothing."""

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            self._on_refused()
            self._log(method, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, AUTH_MESSAGE)

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)

    def _log(self, method: str, peer: str) -> None:
        """One warning per interval, however many calls are refused."""
        self._unlogged += 1
        now = time.monotonic()
        if now - self._last_logged < REFUSAL_LOG_INTERVAL_S:
            return
        logger.warning(
            "refused %d call(s) with a missing or wrong bearer token (latest: %s from %s)",
            self._unlogged,
            method,
            peer,
        )
        self._last_logged, self._unlogged = now, 0
