"""Serving the HTTP API with uvicorn on a socket bound up front.

Binding first means a taken port fails at once with a message naming the flag to change,
before any model is loaded. uvicorn handles SIGINT/SIGTERM itself only when it is the process's
only service (`handle_signals`, the edge); a process that drains several services on a signal
(the server) turns that off and calls `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

from specedge.errors import SpecEdgeError


class _QuietSignalsServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave the process's signal handlers to its owner."""
        yield


class HttpApiServer:
    """One ASGI app on `host:port` (port 0 picks a free one: read `port`). `flag` names the
    setting to change when the port is taken."""

    def __init__(self, host: str, port: int, flag: str = "--port") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._socket = socket.create_server((host, port), family=family)
        except OSError as error:
            raise SpecEdgeError(
                f"cannot serve HTTP on {host}:{port} ({error.strerror}); pick another {flag}"
            ) from None
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, app: Any, *, handle_signals: bool = True) -> None:
        """Serve `app` on the bound socket; returns once it accepts requests."""
        config = uvicorn.Config(app, log_level="warning")
        server_class = uvicorn.Server if handle_signals else _QuietSignalsServer
        self._server = server = server_class(config)
        self._serving = asyncio.create_task(server.serve(sockets=[self._socket]))
        while not server.started:
            if self._serving.done():
                self._serving.result()  # uvicorn's start-up error, if it raised one
                raise SpecEdgeError(f"the HTTP API on {self.url} did not start")
            await asyncio.sleep(0.02)

    async def wait(self) -> None:
        """Until the API stops (a signal it handles, or `stop`)."""
        assert self._serving is not None
        await self._serving

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting requests; running ones get `grace` seconds (None: no limit), then
        they are cancelled."""
        if self._server is None or self._serving is None:
            self._socket.close()
            return
        # uvicorn counts whole seconds, and times out at once at 0 even with nothing to wait for.
        timeout = None if grace is None else max(math.ceil(grace), 1)
        self._server.config.timeout_graceful_shutdown = timeout
        self._server.should_exit = True
        await self._serving
