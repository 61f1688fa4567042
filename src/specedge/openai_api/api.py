"""The OpenAI-compatible HTTP API (FastAPI), over any `GenerationBackend`.

`POST /v1/chat/completions` and `POST /v1/completions` (`stream: true` for server-sent events,
`stream_options.include_usage`, `data: [DONE]`), `GET /v1/models`, `GET /health`, `/metrics`.
Supported parameters: temperature, top_p, top_k (extension), seed, max_tokens (and
max_completion_tokens), stop, n=1. Anything else, or an invalid value, gets OpenAI's error JSON
with status 400 (accepted ranges: `openai_api.types.GenerationBody`); a body over the API's
`max_body_bytes` gets 413 (`openai_api.limits`); a backend that cannot serve now
(`ServiceUnavailableError`: the verification server unreachable, full or shutting down, or no
session slot free within the queue timeout) gets 503 with `Retry-After`. A request's `model`
is not checked: every response names the served model (`ServedModel.name`; on the edge, the
target). A streaming client that leaves its stream unread for `stream_timeout` seconds loses
it, and its generation ends. Tokenization and chat templating run in a worker thread, off the
event loop that serves every other request. With API keys (`openai_api.auth`), a request
without `Authorization: Bearer KEY` gets 401 (`/health` and `/metrics` stay open unless
configured otherwise). Every
response carries `usage.speculative` (rounds, tokens_per_round, acceptance_rate,
proactive_hits, proactive_attempts, bytes_sent, bytes_received, ttft_ms). Streaming and
non-streaming answers come from the same delta stream, so they agree. The edge and the server
serve this same app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from specedge.core.generation import (
    GenerationBackend,
    GenerationRequest,
    GenerationStats,
)
from specedge.errors import InvalidRequestError, ServiceUnavailableError
from specedge.openai_api.auth import ApiAuth, ApiKeyAuth
from specedge.openai_api.limits import ApiLimits, BodyLimit, TimedStream
from specedge.openai_api.types import (
    ChatCompletionBody,
    ChatFormat,
    CompletionBody,
    CompletionFormat,
    ErrorBody,
    GenerationBody,
    OpenAIError,
    ResponseFormat,
    validation_error,
)
from specedge.text import IncrementalDecoder, encode_chat, encode_prompt

logger = logging.getLogger(__name__)
# Seconds a 503 asks clients to wait: a full server or a restarting one is back in seconds.
RETRY_AFTER_S = 1
# What /openapi.json says the generation endpoints answer: JSON, or server-sent events with
# `stream: true`, and each error status of the module docstring with OpenAI's error JSON.
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion, or server-sent events with `stream: true`",
        "content": {"text/event-stream": {}},
    },
    400: {"model": ErrorBody, "description": "An invalid or unsupported request"},
    401: {"model": ErrorBody, "description": "A missing or wrong API key"},
    413: {"model": ErrorBody, "description": "A body over the API's max_body_bytes"},
    503: {"model": ErrorBody, "description": "The backend cannot serve now (Retry-After)"},
}


class ApiMetrics(Protocol):
    """Where the API reports: the registry `GET /metrics` serves, a counter of requests by
    endpoint and outcome (HTTP status or "disconnected"), and each generation's statistics."""

    registry: CollectorRegistry

    def count_request(self, endpoint: str, outcome: str) -> None: ...

    def observe(self, stats: GenerationStats) -> None: ...


# ---- errors -----------------------------------------------------------------------------------
def as_openai_error(error: Exception) -> OpenAIError:
    """Any failure as OpenAI's error JSON: 400 for a bad request, 503 when the backend cannot
    serve now, 500 (logged) otherwise."""
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, InvalidRequestError):
        return OpenAIError(400, str(error))
    if isinstance(error, ServiceUnavailableError):
        return OpenAIError(
            503,
            str(error),
            type="server_error",
            code="server_unavailable",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    logger.exception("request failed", exc_info=error)
    return OpenAIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error")


# ---- generation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedModel:
    """The model an API serves. `name` is the model whose tokens the answers are (the target:
    a draft only proposes them); `draft`, when one proposes, is listed with it."""

    name: str  # what /v1/models lists and every response's `model` says
    tokenizer: Any
    stop_token_ids: tuple[int, ...]
    vocab_size: int
    draft: str | None = None

    def card(self, created: int) -> dict[str, Any]:
        """The model object of `GET /v1/models`."""
        card = {"id": self.name, "object": "model", "created": created, "owned_by": "specedge"}
        return card if self.draft is None else card | {"draft": self.draft}


@dataclass(frozen=True)
class Delta:
    text: str
    finish_reason: str | None = None  # set on the last delta only


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that could still
    become one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string matched (nothing follows it)."""
        buffer = self.held + text
        matches = [index for stop in self.stops if (index := buffer.find(stop)) >= 0]
        if matches:
            self.held = ""
            return buffer[: min(matches)], True
        keep = max((self._partial(buffer, stop) for stop in self.stops), default=0)
        self.held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    @staticmethod
    def _partial(buffer: str, stop: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of `stop`."""
        for length in range(min(len(stop) - 1, len(buffer)), 0, -1):
            if buffer.endswith(stop[:length]):
                return length
        return 0


class Generation:
    """One request's text: `deltas()` yields text pieces, the last with the finish reason.

    `completion_tokens` (usage) counts the tokens of the returned text. When a stop string
    cuts the text, that is the fewest leading generated tokens whose text covers what was
    returned: the token that completes the text before the stop string counts (also when the
    stop string starts inside it), tokens after it do not, although the backend generated them
    in the same round. With no stop string matched, every generated token counts.
    """

    def __init__(
        self,
        backend: GenerationBackend,
        served: ServedModel,
        prompt_token_ids: list[int],
        body: GenerationBody,
        max_tokens: int | None,
    ) -> None:
        self.backend = backend
        self.served = served
        self.stops = StopMatcher(body.stop_strings())
        self.request = GenerationRequest(
            prompt_token_ids=prompt_token_ids,
            params=body.sampling(),
            max_tokens=max_tokens,
            stop_token_ids=served.stop_token_ids,
        )
        backend.check(self.request)
        self.stats = GenerationStats()
        self.completion_tokens = 0
        self._returned_chars = 0  # characters of text yielded so far

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "speculative": self.stats.as_dict(),
        }

    async def deltas(self) -> AsyncGenerator[Delta, None]:
        decoder = IncrementalDecoder(self.served.tokenizer)
        async with aclosing(self.backend.generate(self.request, self.stats)) as rounds:
            async for tokens in rounds:
                self.completion_tokens += len(tokens)
                text, matched = self.stops.feed(decoder.add(tokens))
                if matched:
                    yield self._stopped(decoder, text)
                    return
                if text:
                    yield self._delta(text)
        text, matched = self.stops.feed(decoder.text()[decoder.emitted :])
        if matched:
            yield self._stopped(decoder, text)
            return
        finish = "stop" if self.stats.finish_reason == "stop" else "length"
        yield self._delta(text + self.stops.flush(), finish)

    def _delta(self, text: str, finish_reason: str | None = None) -> Delta:
        self._returned_chars += len(text)
        return Delta(text, finish_reason)

    def _stopped(self, decoder: IncrementalDecoder, text: str) -> Delta:
        """The last delta of a text cut by a stop string; usage drops the tokens past the cut."""
        delta = self._delta(text, "stop")
        self.completion_tokens = tokens_covering(decoder, self._returned_chars)
        return delta


def tokens_covering(decoder: IncrementalDecoder, num_chars: int) -> int:
    """The fewest leading tokens of `decoder.tokens` whose decoded text has at least
    `num_chars` complete characters (a trailing U+FFFD, an incomplete UTF-8 sequence, does not
    count). Scans back from the end: past a stop string there are only a round's tokens and
    the held-back tail, a few decodes."""
    tokens = decoder.tokens
    count = len(tokens)
    while count > 0:
        text = decoder.tokenizer.decode(
            tokens[: count - 1], skip_special_tokens=decoder.skip_special_tokens
        )
        if len(text.rstrip("\ufffd")) < num_chars:
            break
        count -= 1
    return count


# ---- the app ----------------------------------------------------------------------------------
def create_app(
    backend: GenerationBackend,
    served: ServedModel,
    metrics: ApiMetrics,
    *,
    title: str = "SpecEdge",
    lifespan: Any = None,
    limits: ApiLimits | None = None,
    auth: ApiAuth | None = None,
) -> FastAPI:
    """The HTTP app over a running backend; with `auth`, only for callers with an API key."""
    limits = limits or ApiLimits()
    app = FastAPI(title=title, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if auth is not None:  # added last: the outermost, before any byte of the body is read
        app.add_middleware(ApiKeyAuth, auth=auth)
    started = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        headers = dict(error.headers or {})  # a 405's Allow
        return OpenAIError(
            error.status_code, str(error.detail), type=kind, headers=headers
        ).response()

    @app.exception_handler(Exception)
    async def _any(request: Request, error: Exception) -> JSONResponse:
        return as_openai_error(error).response()

    @app.get(
        "/health",
        responses={
            503: {
                "description": "Loading, draining or degraded",
                "content": {"application/json": {}},
            }
        },
    )
    async def health() -> JSONResponse:
        body = {"status": "ok", "model": served.name} | backend.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served.card(started)]}

    @app.post("/v1/chat/completions", response_model=None, responses=GENERATION_RESPONSES)
    async def chat(body: ChatCompletionBody) -> Response:
        def start() -> Generation:
            messages = [message.as_template_message() for message in body.messages]
            prompt = encode_chat(served.tokenizer, messages)
            max_tokens = body.max_completion_tokens or body.max_tokens
            return Generation(backend, served, prompt, body, max_tokens)

        return await _respond("chat", body, start, ChatFormat(served.name))

    @app.post("/v1/completions", response_model=None, responses=GENERATION_RESPONSES)
    async def completions(body: CompletionBody) -> Response:
        def start() -> Generation:
            prompt = _completion_prompt(body.prompt, served)
            return Generation(backend, served, prompt, body, body.max_tokens)

        return await _respond("completions", body, start, CompletionFormat(served.name))

    async def _respond(
        endpoint: str, body: GenerationBody, start: Callable[[], Generation], form: ResponseFormat
    ) -> Response:
        try:
            for param, message in body.unsupported():
                raise OpenAIError(400, message, param=param)
            generation = await asyncio.to_thread(start)  # tokenizing is CPU work
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = await _sse(generation, form, include_usage, metrics, endpoint)
                return TimedStream(stream, limits.stream_timeout, media_type="text/event-stream")
            pieces = []
            try:
                async with aclosing(generation.deltas()) as deltas:
                    async for delta in deltas:
                        pieces.append(delta)
            finally:
                metrics.observe(generation.stats)
            text = "".join(delta.text for delta in pieces)
            answer = form.complete(text, pieces[-1].finish_reason, generation.usage())
        except Exception as error:  # every failure leaves as OpenAI's error JSON
            failure = as_openai_error(error)
            metrics.count_request(endpoint, str(failure.status))
            return failure.response()
        metrics.count_request(endpoint, "200")
        return JSONResponse(answer)

    return app


async def _sse(
    generation: Generation,
    form: ResponseFormat,
    include_usage: bool,
    metrics: ApiMetrics,
    endpoint: str,
) -> AsyncGenerator[str, None]:
    """Server-sent events of a generation. The first delta is awaited before the response
    starts, so that a failure to reach the server is still an HTTP error status."""
    deltas = generation.deltas()
    try:
        first = await anext(deltas)
    except BaseException:
        await deltas.aclose()
        metrics.observe(generation.stats)
        raise

    async def events() -> AsyncGenerator[str, None]:
        usage_field = {"usage": None} if include_usage else {}
        outcome = "200"
        try:
            opening = form.opening_chunk()
            if opening is not None:
                yield _event(opening | usage_field)
            delta: Delta | None = first
            while delta is not None:
                if delta.text:
                    yield _event(form.chunk(delta.text, None) | usage_field)
                if delta.finish_reason is not None:
                    yield _event(form.chunk(None, delta.finish_reason) | usage_field)
                    break
                delta = await anext(deltas, None)
            if include_usage:
                yield _event(form.usage_chunk(generation.usage()))
            yield "data: [DONE]\n\n"
        except Exception as error:  # headers are out: report in-band, as OpenAI does
            failure = as_openai_error(error)
            outcome = str(failure.status)
            yield _event(failure.body)
        except BaseException:  # the client went away: closing `deltas` cancels the session
            outcome = "disconnected"
            raise
        finally:
            await deltas.aclose()
            metrics.observe(generation.stats)
            metrics.count_request(endpoint, outcome)

    return events()


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _completion_prompt(
    prompt: str | list[int] | list[str] | list[list[int]], served: ServedModel
) -> list[int]:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise OpenAIError(400, "only one prompt per request is supported", param="prompt")
        prompt = prompt[0]  # type: ignore[assignment]
    if isinstance(prompt, str):
        return encode_prompt(served.tokenizer, prompt, chat=False)
    token_ids = [int(token) for token in prompt]  # type: ignore[union-attr, arg-type]
    bad = [token for token in token_ids if not 0 <= token < served.vocab_size]
    if bad:
        raise OpenAIError(
            400, f"prompt token id {bad[0]} outside vocab [0, {served.vocab_size})", param="prompt"
        )
    return token_ids
