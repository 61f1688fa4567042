"""The OpenAI API's shapes as SpecEdge speaks them (edge and server alike): request bodies
(pydantic, unknown fields rejected), the error JSON, and the response / stream-chunk objects of
the chat and text completion endpoints."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from specedge.core.sampling import NO_TOP_K, SamplingParams

MAX_STOP_STRINGS = 4
MAX_SEED = 2**64 - 1
MAX_TOP_K = 2**32 - 1  # the edge's Open carries it as uint32 (past the vocabulary: no top-k)
NO_TOP_K_HTTP = -1  # vLLM's spelling of "no top-k", accepted with 0 (`sampling.NO_TOP_K`)


# ---- request bodies ---------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class GenerationBody(BaseModel):
    """Fields both endpoints share; unknown fields, and values of another JSON type than the
    schema's (no coercion: "1" or true is no integer), are rejected (400). Accepted ranges:
    temperature a finite number in [0, 2] (below `sampling.MIN_TEMPERATURE`: greedy, like 0);
    top_p in (0, 1]; top_k in [1, 2^32), or 0 or -1 for none (an extension); max_tokens >= 1,
    clamped to the context the prompt leaves; `model` any name (the served model answers).
    NaN and infinities are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=NO_TOP_K_HTTP, le=MAX_TOP_K)  # 0 or -1: none
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(param, message) for each accepted-but-unsupported setting."""
        problems = []
        if self.n != 1:
            problems.append(("n", f"only n=1 is supported, got n={self.n}"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                problems.append((name, f"{name} is not supported (only 0)"))
        if self.logit_bias:
            problems.append(("logit_bias", "logit_bias is not supported"))
        return problems

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise OpenAIError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
        return [stop for stop in stops if stop]

    def sampling(self) -> SamplingParams:
        temperature = 1.0 if self.temperature is None else self.temperature
        top_k = NO_TOP_K if self.top_k in (None, NO_TOP_K_HTTP) else self.top_k
        top_p = 1.0 if self.top_p is None else self.top_p
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=self.seed)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        problems = super().unsupported()
        if self.logprobs:
            problems.append(("logprobs", "logprobs are not supported"))
        if self.top_logprobs:
            problems.append(("top_logprobs", "top_logprobs are not supported"))
        return problems


class CompletionBody(GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        problems = super().unsupported()
        if self.echo:
            problems.append(("echo", "echo is not supported"))
        if self.suffix:
            problems.append(("suffix", "suffix is not supported"))
        if self.best_of not in (None, 1):
            problems.append(("best_of", "only best_of=1 is supported"))
        if self.logprobs:
            problems.append(("logprobs", "logprobs are not supported"))
        return problems


# ---- errors -----------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """The error JSON of `OpenAIError`, as /openapi.json documents it."""

    error: ErrorDetail


class OpenAIError(Exception):
    """An error answered as OpenAI's JSON: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def validation_error(error: RequestValidationError) -> OpenAIError:
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first.get("type") == "json_invalid":
        return OpenAIError(400, "the request body is not valid JSON")
    message = str(first.get("msg", "invalid request"))
    return OpenAIError(400, f"{param}: {message}" if param else message, param=param)


# ---- response shapes --------------------------------------------------------------------------
class ResponseFormat:
    """Builds one endpoint's response objects (ids, object names, choice shapes)."""

    object_name = ""
    chunk_name = ""
    id_prefix = ""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"{self.id_prefix}{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return self._envelope(self.chunk_name, []) | {"usage": usage}

    def complete(self, text: str, finish: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, text: str | None, finish: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def opening_chunk(self) -> dict[str, Any] | None:
        return None


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def complete(self, text: str, finish: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return self._envelope(self.object_name, [choice]) | {"usage": usage}

    def chunk(self, text: str | None, finish: str | None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._envelope(self.chunk_name, [choice])

    def opening_chunk(self) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._envelope(self.chunk_name, [choice])


class CompletionFormat(ResponseFormat):
    object_name = "text_completion"
    chunk_name = "text_completion"
    id_prefix = "cmpl-"

    def complete(self, text: str, finish: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return self._envelope(self.object_name, [choice]) | {"usage": usage}

    def chunk(self, text: str | None, finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return self._envelope(self.chunk_name, [choice])
