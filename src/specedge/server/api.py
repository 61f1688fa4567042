"""The server's own OpenAI-compatible HTTP API (`--api-port`): the shared app
(`specedge.openai_api`) over the server's `LocalSessions`. With `edge/api.py`, the only
module of a role that imports the HTTP package."""

from __future__ import annotations

from fastapi import FastAPI

from specedge.openai_api.api import ServedModel
from specedge.openai_api.api import create_app as create_openai_app
from specedge.openai_api.auth import ApiAuth
from specedge.openai_api.limits import ApiLimits
from specedge.openai_api.serving import HttpApiServer
from specedge.server.local_sessions import LocalSessions
from specedge.server.metrics import ServerMetrics

__all__ = ["ApiAuth", "ApiLimits", "HttpApiServer", "ServedModel", "create_app"]


def create_app(
    sessions: LocalSessions,
    served: ServedModel,
    metrics: ServerMetrics,
    limits: ApiLimits | None = None,
    auth: ApiAuth | None = None,
) -> FastAPI:
    """The server's HTTP app over its running `LocalSessions`."""
    return create_openai_app(
        sessions, served, metrics, title="SpecEdge server", limits=limits, auth=auth
    )
