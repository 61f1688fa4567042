"""`usage.completion_tokens` counts the tokens of the returned text: when a stop string cuts the
answer, the tokens generated past the cut (in the same verification round, or held back while
the stop string was still partial) are not counted, on the edge's API (speculative rounds of
several tokens) and the server's own API (one token per round), streaming or not. The tiny
models' tokenizer writes token t as "<t>", so a stop string can start inside a token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import openai
import pytest

from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.edge.app import BackgroundEdge
from specedge.edge.config import EdgeConfig
from specedge.model.loader import LoadedModel
from specedge.openai_api.api import tokens_covering
from specedge.server.app import BackgroundServer
from specedge.server.config import ServerConfig
from specedge.text import IncrementalDecoder
from tests.support.models import tiny_hf_config, tiny_loaded_model

PROMPT = [5, 6, 7, 8]
MAX_TOKENS = 30
MAX_CONTEXT = 256


def tiny_target() -> LoadedModel:
    return tiny_loaded_model(tiny_hf_config(), seed=11, name="tiny-target")


@dataclass
class Apis:
    target_tokens: list[int]  # the greedy answer to PROMPT, computed locally
    edge: BackgroundEdge
    server: BackgroundServer

    def client(self, api: str) -> openai.OpenAI:
        url = self.edge.url if api == "edge" else f"http://127.0.0.1:{self.server.api_port}"
        return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def apis() -> Iterator[Apis]:
    target = tiny_target()
    generator = LocalGenerator(target, max_context=MAX_CONTEXT)
    tokens = generator.generate(PROMPT, SamplingParams(), MAX_TOKENS, ()).token_ids
    # Every node of the edge's fixed 12-node trees is verified (the goodput selection is not
    # what these tests are about).
    server_config = ServerConfig(model="tiny-target", port=0, metrics_port=0, api_port=0,
                                 max_context=MAX_CONTEXT, drain_timeout=0.0,
                                 verify="all")  # fmt: skip
    server = BackgroundServer(server_config.validate(), target).start()
    # The draft has the target's weights: whole trees are accepted, rounds emit many tokens.
    edge_config = EdgeConfig(model="tiny-draft", server=f"127.0.0.1:{server.port}", port=0,
                             budget=12, depth=6, max_context=MAX_CONTEXT)  # fmt: skip
    edge = BackgroundEdge(edge_config.validate(), tiny_target()).start()
    yield Apis(tokens, edge, server)
    edge.stop()
    server.stop()


def token_texts(tokens: Sequence[int]) -> list[str]:
    return [f"<{token}>" for token in tokens]


def tokens_started_before(texts: list[str], num_chars: int) -> int:
    """How many tokens have their first character among the first `num_chars` of the text."""
    starts = [sum(map(len, texts[:index])) for index in range(len(texts))]
    return sum(start < num_chars for start in starts)


@pytest.mark.parametrize("api", ["edge", "server"])
@pytest.mark.parametrize(
    "cut",
    [
        "mid-token",  # the stop string starts inside token k: it is partly returned
        "boundary",  # the stop string starts with token k: tokens 0..k-1 are returned
        "first",  # the stop string starts with the first token: nothing is returned
    ],
)
def test_completion_tokens_stop_at_the_returned_text(apis: Apis, api: str, cut: str) -> None:
    texts = token_texts(apis.target_tokens)
    full = "".join(texts)
    # k: a token the answer has once (so the stop string occurs once), a few rounds in.
    tokens = apis.target_tokens
    index = (
        0
        if cut == "first"
        else next(k for k in range(5, MAX_TOKENS) if tokens.count(tokens[k]) == 1)
    )
    start = sum(map(len, texts[:index])) + (1 if cut == "mid-token" else 0)
    stop = full[start : start + 6]
    returned = full[: full.index(stop)]
    assert len(returned) == start  # the stop string does not occur earlier
    expected_tokens = tokens_started_before(texts, len(returned))
    assert expected_tokens == {"mid-token": index + 1, "boundary": index, "first": 0}[cut]

    client = apis.client(api)
    request = dict(model="m", prompt=PROMPT, temperature=0, max_tokens=MAX_TOKENS, stop=stop)
    answer = client.completions.create(**request)  # type: ignore[call-overload]
    assert answer.choices[0].text == returned and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens == expected_tokens
    assert answer.usage.total_tokens == len(PROMPT) + expected_tokens

    chunks = list(
        client.completions.create(
            stream=True,
            stream_options={"include_usage": True},
            **request,  # type: ignore[call-overload]
        )
    )
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == returned
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected_tokens


def test_edge_rounds_run_past_the_stop_string(apis: Apis) -> None:
    """The case the count is for: the edge's rounds emit several tokens, so the round that
    completes the stop string carries tokens beyond it."""
    answer = apis.client("edge").completions.create(
        model="m", prompt=PROMPT, temperature=0, max_tokens=MAX_TOKENS
    )
    assert answer.usage is not None and answer.usage.completion_tokens == MAX_TOKENS
    assert answer.usage.model_extra["speculative"]["tokens_per_round"] > 2  # type: ignore[index]


class ByteTokenizer:
    """Token t is the byte t: a character of several UTF-8 bytes spans several tokens."""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")


def test_tokens_covering_counts_a_character_split_over_tokens() -> None:
    decoder = IncrementalDecoder(ByteTokenizer())
    decoder.add(list("aé b".encode()))  # a, 0xC3 0xA9, space, b: five tokens, four characters
    assert [tokens_covering(decoder, chars) for chars in range(5)] == [0, 1, 3, 4, 5]
