"""Fuzzing real servers and edges on loopback: the hypothesis settings of the bounded runs,
good sessions that run meanwhile on the fuzzer's client loop, the fuzzed stacks (a gRPC server;
the server's and the edge's HTTP APIs), and the schemathesis property of an HTTP request. The
gRPC stream's messages and their property are `tests.support.fuzz_messages`; the long runs,
`benchmarks/fuzz.py`."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import openai
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case, CheckFunction, GenerationMode, Response
from schemathesis.specs.openapi.checks import positive_data_acceptance

from specedge.background import LoopThread
from specedge.edge.app import BackgroundEdge
from specedge.model.loader import LoadedModel, tokenizer_fingerprint
from specedge.server.app import BackgroundServer
from tests.support.fuzz_messages import ServerLimits
from tests.support.models import TARGET_SEED, tiny_model
from tests.support.reference import reference_tokens
from tests.support.scripted_edge import open_message, run_session
from tests.support.servers import SERVER_CONFIG, edge_config, start_server
from tests.support.trees import junk_tree

T = TypeVar("T")


def fuzz_settings(max_examples: int) -> settings:
    """Deterministic hypothesis settings for a fuzz test: a fixed number of examples, derived
    from the test's name (no database, no random seed), no deadline (a real server on a shared
    core answers in its own time)."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=False,
    )


# ---- good sessions meanwhile -------------------------------------------------------------------
@dataclass
class GoodSessions:
    """Good sessions (`session()`, a coroutine function returning the session's output) run
    back to back on a client event loop on its own thread, while the fuzzer runs its calls on
    the same loop (`run`): the server serves both at once. `outputs` holds each finished
    session's output, `failures` what a session raised."""

    session: Callable[[], Awaitable[Any]]
    outputs: list[Any] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop = LoopThread()
        self._stop = threading.Event()
        self._task: asyncio.Future[None] | None = None

    async def _start(self) -> None:
        self._task = asyncio.ensure_future(self._repeat())

    async def _repeat(self) -> None:
        while not self._stop.is_set():
            try:
                self.outputs.append(await self.session())
            except Exception as error:  # the test reports it, with the others
                self.failures.append(error)
                await asyncio.sleep(0.05)

    async def _finish(self) -> None:
        assert self._task is not None
        await self._task

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a fuzzer's coroutine on the loop the good sessions use."""
        return self._loop.run(coro)

    def __enter__(self) -> GoodSessions:
        self._loop.start(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        """Let the session in flight finish, then stop the loop."""
        self._stop.set()
        try:
            self._loop.run(self._finish())
        finally:
            self._loop.close()


# ---- the HTTP APIs (schemathesis) ------------------------------------------------------------
# Checks left out of schemathesis' defaults: positive_data_acceptance wants every
# schema-valid body answered 2xx, but the schema is OpenAI's request shape, and the limits
# past it (n=1, the context, an empty prompt, token ids in the vocabulary, four stop strings,
# no logprobs) are refused with a documented 400 on purpose.
EXCLUDED_CHECKS: list[CheckFunction] = [positive_data_acceptance]


def http_cases(base_url: str) -> st.SearchStrategy[Case]:
    """Requests to every operation of the API at `base_url`, from its own /openapi.json (real
    HTTP): schema-valid ones, and invalid bodies for the POST operations (GETs take no
    input to break)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    negative = schema.include(method="POST").as_strategy(GenerationMode.NEGATIVE)
    return st.one_of(schema.as_strategy(GenerationMode.POSITIVE), negative)


def whole_answers(ctx: Any, response: Response, case: Case) -> bool | None:
    """A 200 generation is a whole answer: JSON with one choice and its usage, or events that
    parse and end with `data: [DONE]` and carry no in-band error (a failure after the
    headers: the 5xx of a stream)."""
    if response.status_code != 200 or not case.path.endswith("completions"):
        return None
    content_type = response.headers.get("content-type", [""])[0]
    if content_type.startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        payloads = [json.loads(event) for event in events if event != "[DONE]"]
        errors = [payload["error"] for payload in payloads if "error" in payload]
        assert not errors, f"an in-band error: {errors[0]}"
        assert response.stream_cut_short or events[-1:] == ["[DONE]"], "no data: [DONE]"
        return True
    body = response.json()
    assert len(body["choices"]) == 1 and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    return True


def check_http_case(case: Case, base_url: str) -> Response:
    """The fuzz property of one request: schemathesis' checks (no 5xx, a documented status,
    content type and body) and `whole_answers`; their failures raise."""
    return case.call_and_validate(
        base_url=base_url,
        timeout=60,
        excluded_checks=EXCLUDED_CHECKS,
        additional_checks=[whole_answers],
    )


# ---- the fuzzed stacks and their good sessions ---------------------------------------------
GOOD_PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
GOOD_TOKENS = 24
MAX_MESSAGE = 4096  # bytes of one gRPC message: a fuzzer reaches it with a wide tree
HTTP_CONTEXT = 64  # a short context keeps each generated answer short
DRAFT_SEED = 5  # the edge's draft: it disagrees with the target at times


def start_grpc_target() -> tuple[LoadedModel, BackgroundServer, ServerLimits]:
    """The harness's small server (`servers.SERVER_CONFIG`) of the tiny target, with a gRPC
    message size a fuzzed tree can pass, and what it accepts."""
    target = tiny_model()
    server = start_server(target, max_message_bytes=MAX_MESSAGE)
    limits = ServerLimits(
        vocab_size=target.config.vocab_size,
        max_tree_nodes=SERVER_CONFIG.max_tree_nodes,
        max_tree_depth=SERVER_CONFIG.max_tree_depth,
        max_context=SERVER_CONFIG.max_context,
        max_message_bytes=MAX_MESSAGE,
        fingerprint=tokenizer_fingerprint(target.tokenizer),
    )
    return target, server, limits


def good_grpc_session(target: LoadedModel, port: int) -> Callable[[], Awaitable[list[int]]]:
    """A greedy edge session of GOOD_TOKENS over gRPC (mostly rejected trees): its tokens."""

    async def session() -> list[int]:
        message = open_message(target, GOOD_PROMPT, GOOD_TOKENS)
        return (await run_session(port, message, junk_tree)).tokens

    return session


@dataclass
class HttpApis:
    """The server with its HTTP API (`serve --api-port`) and an edge with its own over it,
    both of a short context, the tiny target with real text."""

    target: LoadedModel
    server: BackgroundServer
    edge: BackgroundEdge

    @classmethod
    def start(cls) -> HttpApis:
        target = tiny_model(TARGET_SEED, char_tokenizer=True)
        server = start_server(target, api_port=0, max_context=HTTP_CONTEXT)
        draft = replace(tiny_model(DRAFT_SEED, char_tokenizer=True), name="tiny-draft")
        edge = BackgroundEdge(edge_config(server, max_context=HTTP_CONTEXT), draft).start()
        return cls(target, server, edge)

    def stop(self) -> None:
        self.edge.stop()
        self.server.stop()

    def url(self, role: str) -> str:
        """The base URL of the "server"'s or the "edge"'s API."""
        return f"http://127.0.0.1:{self.server.api_port}" if role == "server" else self.edge.url

    def expected_text(self) -> str:
        """What a good completion answers: the target's greedy text."""
        return str(
            self.target.tokenizer.decode(reference_tokens(self.target, GOOD_PROMPT, GOOD_TOKENS))
        )

    def good_completion(self, role: str) -> Callable[[], Awaitable[str]]:
        """A greedy completion of GOOD_TOKENS through `role`'s API (the openai client)."""
        client = openai.AsyncOpenAI(base_url=f"{self.url(role)}/v1", api_key="-", max_retries=0)

        async def completion() -> str:
            answer = await client.completions.create(
                model="m", prompt=GOOD_PROMPT, max_tokens=GOOD_TOKENS, temperature=0
            )
            return answer.choices[0].text

        return completion
