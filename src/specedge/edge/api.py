"""The edge's OpenAI-compatible HTTP API: the shared app (`specedge.openai_api`) over the
edge's `EdgeRuntime`. With `server/api.py`, the only module of a role that imports the HTTP
package."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from specedge.edge.metrics import EdgeMetrics
from specedge.edge.runtime import EdgeRuntime
from specedge.openai_api.api import ServedModel, StopMatcher
from specedge.openai_api.api import create_app as create_openai_app
from specedge.openai_api.auth import ApiAuth
from specedge.openai_api.limits import ApiLimits
from specedge.openai_api.serving import HttpApiServer

__all__ = ["ApiAuth", "ApiLimits", "HttpApiServer", "ServedModel", "StopMatcher", "create_app"]


def create_app(
    runtime: EdgeRuntime,
    served: ServedModel,
    metrics: EdgeMetrics | None = None,
    lifespan: Any = None,
    limits: ApiLimits | None = None,
    auth: ApiAuth | None = None,
) -> FastAPI:
    """The edge's HTTP app over a running `EdgeRuntime`."""
    metrics = metrics or EdgeMetrics()
    metrics.active_sessions.set_function(lambda: runtime.active_sessions)
    title = "SpecEdge edge"
    return create_openai_app(
        runtime, served, metrics, title=title, lifespan=lifespan, limits=limits, auth=auth
    )
