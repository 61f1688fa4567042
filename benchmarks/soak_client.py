"""The soak's HTTP side: one streamed greedy request read the way a client behaviour says
(at full speed, slowly, or hanging up mid-stream), and the slot probe.

A request's errors are named by how they surfaced (see `soak_report`): `http-NNN` before the
stream started, `error-event` in it, `connection-broken` or `connect-failed` at the transport,
`timeout`, `http-error` (any other httpx failure), `bad-json`, and `truncated` for a stream
that ended with neither `[DONE]` nor an error event.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from specedge.bench.client import CHAT_PATH, MODEL_PLACEHOLDER

COMPLETIONS_PATH = "/v1/completions"
ERROR_CHARS = 300


@dataclass(frozen=True)
class SoakPrompt:
    text: str
    chat: bool  # through the chat template (the model has one), else a plain completion

    @property
    def path(self) -> str:
        return CHAT_PATH if self.chat else COMPLETIONS_PATH

    def body(self, max_tokens: int) -> dict[str, Any]:
        """A greedy streamed request with usage."""
        body: dict[str, Any] = {
            "model": MODEL_PLACEHOLDER,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.chat:
            body["messages"] = [{"role": "user", "content": self.text}]
        else:
            body["prompt"] = self.text
        return body


@dataclass(frozen=True)
class Behaviour:
    """How a client reads its stream."""

    name: str = "normal"
    disconnect_after: int | None = None  # hang up after this many chunks with text
    read_delay_s: float = 0.0  # after every chunk with text
    pause_after: int | None = None  # one long pause after this many chunks with text
    pause_s: float = 0.0


NORMAL = Behaviour()


@dataclass
class Received:
    """What one streamed request got, and how it ended."""

    pieces: list[str] = field(default_factory=list)
    first_token_at: float | None = None  # time.monotonic()
    completion_tokens: int | None = None  # from usage
    finish_reason: str | None = None
    done: bool = False  # `data: [DONE]` arrived
    disconnected: bool = False  # the client hung up on purpose
    error_kind: str | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def fail(self, kind: str, message: str) -> None:
        self.error_kind, self.error = kind, message[:ERROR_CHARS]

    def take(self, chunk: dict[str, Any]) -> None:
        """One SSE chunk of a chat or completion stream."""
        if "error" in chunk:
            error = chunk["error"]
            self.fail("error-event", str(error.get("message", error)))
            return
        for choice in chunk.get("choices") or []:
            piece = _text_of(choice)
            if piece:
                self.pieces.append(piece)
                self.first_token_at = self.first_token_at or time.monotonic()
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if chunk.get("usage"):
            self.completion_tokens = int(chunk["usage"]["completion_tokens"])


def _text_of(choice: dict[str, Any]) -> str:
    return str((choice.get("delta") or {}).get("content") or choice.get("text") or "")


async def send_request(
    http: httpx.AsyncClient,
    base_url: str,
    prompt: SoakPrompt,
    max_tokens: int,
    behaviour: Behaviour = NORMAL,
) -> Received:
    """Send one greedy streamed completion and read it as `behaviour` says."""
    received = Received()
    try:
        async with http.stream(
            "POST", base_url + prompt.path, json=prompt.body(max_tokens)
        ) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                received.fail(f"http-{response.status_code}", body)
                return received
            await _read(response, received, behaviour)
    except httpx.ConnectError as error:
        received.fail("connect-failed", str(error))
    except (httpx.RemoteProtocolError, httpx.ReadError) as error:
        received.fail("connection-broken", f"{type(error).__name__}: {error}")
    except httpx.TimeoutException as error:
        received.fail("timeout", f"{type(error).__name__}: {error}")
    except httpx.HTTPError as error:  # any other transport failure
        received.fail("http-error", f"{type(error).__name__}: {error}")
    except json.JSONDecodeError as error:
        received.fail("bad-json", str(error))
    if received.error_kind is None and not received.disconnected and not received.done:
        received.fail("truncated", "the stream ended with neither [DONE] nor an error event")
    return received


async def _read(response: httpx.Response, received: Received, behaviour: Behaviour) -> None:
    paused = False
    async for line in response.aiter_lines():
        if line == "data: [DONE]":
            received.done = True
            return
        if not line.startswith("data: "):
            continue
        received.take(json.loads(line.removeprefix("data: ")))
        chunks = len(received.pieces)
        if received.error_kind is not None:
            return
        if behaviour.disconnect_after is not None and chunks >= behaviour.disconnect_after:
            received.disconnected = True  # leaving the block closes the connection
            return
        if chunks and chunks == behaviour.pause_after and not paused:
            paused = True
            await asyncio.sleep(behaviour.pause_s)
        elif chunks and behaviour.read_delay_s:
            await asyncio.sleep(behaviour.read_delay_s)


async def probe_slots(
    api_url: str, slots: int, prompt: SoakPrompt, max_tokens: int, timeout_s: float
) -> int:
    """Open `slots` streams on a server's own API at once; each holds its session (it stops
    reading after its first token) until every stream has a token or one has failed. Returns
    how many held one: `slots` when every slot of the server could be taken at once."""
    held = 0
    everyone, failed = asyncio.Event(), asyncio.Event()

    async def hold(http: httpx.AsyncClient) -> None:
        nonlocal held
        try:
            async with http.stream("POST", api_url + prompt.path, json=prompt.body(max_tokens)) as (
                response
            ):
                if response.status_code != 200:
                    return
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line.removeprefix("data: "))
                        if any(_text_of(choice) for choice in chunk.get("choices") or []):
                            held += 1
                            if held == slots:
                                everyone.set()
                            await _first_of(everyone, failed)
                            return
        except httpx.HTTPError:
            return
        finally:
            if not everyone.is_set():
                failed.set()

    limits = httpx.Limits(max_connections=slots + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as http:
        await asyncio.gather(*(hold(http) for _ in range(slots)))
    return held


async def _first_of(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
