"""API keys for the HTTP API: `Authorization: Bearer KEY`, as OpenAI's clients send it.

`ApiKeyAuth` (ASGI middleware, outermost, so nothing of a refused request is read) answers 401
with OpenAI's error JSON and `WWW-Authenticate: Bearer` to a request without one of the keys
(`credentials.BearerKeys`: constant-time). `/health` and `/metrics` stay open for probes and
scrapers unless `ApiAuth.protect_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from specedge.credentials import BearerKeys
from specedge.openai_api.types import OpenAIError

OPEN_PATHS = frozenset({"/health", "/metrics"})
UNAUTHORIZED_MESSAGE = (
    "missing or wrong API key: send 'Authorization: Bearer KEY' with a key of the API's "
    "--api-key-file"
)


@dataclass(frozen=True)
class ApiAuth:
    keys: BearerKeys
    protect_metrics: bool = False  # require a key on /health and /metrics too


class ApiKeyAuth:
    """ASGI middleware: 401 for an HTTP request without an accepted key (see the module)."""

    def __init__(self, app: ASGIApp, auth: ApiAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._open(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = [value for key, value in scope.get("headers", ()) if key == b"authorization"]
        if len(given) == 1 and self.auth.keys.accepts(given[0]):
            await self.app(scope, receive, send)
            return
        refusal = OpenAIError(
            401,
            UNAUTHORIZED_MESSAGE,
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await refusal.response()(scope, receive, send)

    def _open(self, path: str) -> bool:
        return not self.auth.protect_metrics and path in OPEN_PATHS
