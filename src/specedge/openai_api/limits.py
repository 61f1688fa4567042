"""The HTTP API's limits on what one client may hold: the size of a request body and the time
a streaming client may leave its stream unread.

`BodyLimit` (ASGI middleware) answers 413 with OpenAI's error JSON to a body over
`max_body_bytes`, from its Content-Length before reading anything, else as soon as the bytes
read pass the limit; a body within it is handed on whole. `TimedStream` is a streaming response
whose every chunk must be taken by the client's connection within `stream_timeout` seconds:
a client that stops reading fills the socket buffers, the chunk's send blocks, and when the
time is up the stream ends and closing its body ends the generation behind it (freeing its
session slot and KV cache), instead of holding them for as long as the client lingers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiLimits:
    max_body_bytes: int = 4 << 20
    stream_timeout: float = 30.0  # seconds


def _error(status: int, message: str, code: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": code}}  # fmt: skip
    return JSONResponse(body, status_code=status)


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes` (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = _error(
            413,
            f"the request body exceeds {self.max_bytes} bytes (the API's --max-body-bytes)",
            "request_too_large",
        )
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _error(400, "invalid Content-Length", "invalid_request")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await too_large(scope, receive, send)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` that hands out `body` whole first, then what the client sends next (its
    disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


class TimedStream(StreamingResponse):
    """Server-sent events whose chunks must each leave within `send_timeout` seconds (see the
    module docstring)."""

    def __init__(
        self, events: AsyncGenerator[str, None], send_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(events, **kwargs)
        self.events = events
        self.send_timeout = send_timeout

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self.events:
                data = chunk.encode(self.charset)
                try:
                    async with asyncio.timeout(self.send_timeout):
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                except TimeoutError:
                    logger.info(
                        "a client left its stream unread for %g s: its generation ended "
                        "(--stream-timeout)",
                        self.send_timeout,
                    )
                    return  # the server closes the connection: the response is incomplete
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.events.aclose()  # ends the generation now, not when it is collected
