"""The generation protocol: a request, its statistics, and the backend that serves it.

A *backend* turns a `GenerationRequest` (prompt token ids, sampling parameters, limits) into
the tokens each verification round emits, filling a `GenerationStats` as it goes. Two backends
exist: the edge's (`edge.runtime.EdgeRuntime`: draft here, verify on a remote server) and the
server's own (`server.local_sessions.LocalSessions`: draft on the server, or decode
autoregressively). Both run the one round loop (`core.round_loop`); the HTTP API
(`openai_api`) knows neither and only speaks this protocol.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

from specedge.core.sampling import SamplingParams
from specedge.errors import InvalidRequestError


@dataclass(frozen=True)
class GenerationRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int | None  # None: as many as the context allows
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class GenerationStats:
    """Per-request speculation statistics (DESIGN.md section 8), `usage.speculative` of every
    response. Backends without proactive drafting or a wire leave those counters at 0."""

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    rounds: int = 0
    emitted: int = 0  # tokens the verifier emitted (accepted + bonus)
    accepted: int = 0  # accepted draft tokens
    proactive_attempts: int = 0  # rounds with a proactive subtree under way at the reply
    proactive_hits: int = 0  # rounds whose next tree started from that subtree
    bytes_sent: int = 0
    bytes_received: int = 0
    drafted_nodes: int = 0  # draft nodes sent
    verified_nodes: int = 0  # of those, the nodes the verifier verified (the prefixes it kept)
    cut_rounds: int = 0  # rounds whose non-empty tree was cut to nothing
    streamed_rounds: int = 0  # rounds the verifier decoded on its own (no tree sent)
    predicted_rounds: int = 0  # rounds whose tree carried acceptance estimates
    predicted_tokens: float = 0.0  # tokens their estimates predicted (1 + verified estimates)
    predicted_round_tokens: int = 0  # tokens those rounds emitted
    finish_reason: str | None = None  # the verifier's: "stop" (a stop token) or "length"
    finished_at: float | None = None  # when the verifier gave its finish reason

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Share of emitted tokens that were accepted draft tokens."""
        return self.accepted / self.emitted if self.emitted else 0.0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def ttft_ms(self) -> float:
        return 1000 * (self.ttft_s or 0.0)

    @property
    def tokens_per_s(self) -> float:
        """Emitted tokens per second from the request's start to its finish (or now)."""
        elapsed = (self.finished_at or time.perf_counter()) - self.started
        return self.emitted / elapsed if elapsed > 0 else 0.0

    def record_round(self, emitted: int, accepted: int, finish_reason: str | None) -> None:
        """One verification round's outcome (the first round also stamps the first token)."""
        self.rounds += 1
        self.emitted += emitted
        self.accepted += accepted
        self.finish_reason = finish_reason
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        if finish_reason is not None:
            self.finished_at = now

    def record_verification(
        self, drafted: int, verified: int, predicted: float | None, emitted: int
    ) -> None:
        """A round's tree: nodes sent, nodes verified, the tokens its estimates predicted for
        the verified prefix (None without estimates), and the tokens it emitted."""
        self.drafted_nodes += drafted
        self.verified_nodes += verified
        self.cut_rounds += drafted > 0 and verified == 0
        if predicted is not None:
            self.predicted_rounds += 1
            self.predicted_tokens += predicted
            self.predicted_round_tokens += emitted

    @property
    def predicted_tokens_per_round(self) -> float | None:
        """What the estimates predicted per round, against `tokens_per_round` (calibration)."""
        if not self.predicted_rounds:
            return None
        return self.predicted_tokens / self.predicted_rounds

    def as_dict(self) -> dict[str, Any]:
        ttft = self.ttft_s
        predicted = self.predicted_tokens_per_round
        return {
            "rounds": self.rounds,
            "tokens_per_round": round(self.tokens_per_round, 4),
            "predicted_tokens_per_round": None if predicted is None else round(predicted, 4),
            "predicted_rounds": self.predicted_rounds,
            "predicted_round_tokens": self.predicted_round_tokens,
            "drafted_nodes": self.drafted_nodes,
            "verified_nodes": self.verified_nodes,
            "cut_rounds": self.cut_rounds,
            "streamed_rounds": self.streamed_rounds,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "proactive_hits": self.proactive_hits,
            "proactive_attempts": self.proactive_attempts,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "ttft_ms": None if ttft is None else round(1000 * ttft, 3),
        }


def check_request(request: GenerationRequest, max_context: int, owner: str) -> int:
    """Validate a request against a context limit (`owner` says whose, e.g. "this edge's");
    returns its max new tokens: the one place a request's token allowance is clamped on the
    generating side (the verifier clamps again to its own context)."""
    prompt = len(request.prompt_token_ids)
    if prompt == 0:
        raise InvalidRequestError("the prompt is empty")
    if prompt >= max_context:
        raise InvalidRequestError(
            f"the prompt has {prompt} tokens; {owner} context limit is {max_context} "
            "(prompt + generated)"
        )
    room = max_context - prompt
    if request.max_tokens is None:
        return room
    if request.max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {request.max_tokens}")
    return min(request.max_tokens, room)


class GenerationBackend(Protocol):
    @property
    def max_context(self) -> int:
        """Prompt + generated tokens a request may use."""
        ...

    @property
    def active_sessions(self) -> int:
        """Generations in progress."""
        ...

    def check(self, request: GenerationRequest) -> int:
        """Validate a request (InvalidRequestError); returns its max new tokens."""
        ...

    def generate(
        self, request: GenerationRequest, stats: GenerationStats
    ) -> AsyncGenerator[list[int], None]:
        """The tokens emitted by each round, until a finish reason; closing the generator
        cancels the generation and frees what it holds."""
        ...

    def health(self) -> dict[str, Any]:
        """Fields of `GET /health`; a "status" other than "ok" makes it answer 503."""
        ...
