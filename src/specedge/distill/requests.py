"""Self-generated training requests ("Magpie", Xu et al. 2024): the target writes them.

An aligned chat model given its chat template up to the start of a user turn (the *pre-query
template*) continues with a plausible user request. `PreQuery.from_tokenizer` derives that
template from the tokenizer's own chat template (a conversation with a sentinel user message,
rendered and cut at the sentinel), with what ends a user turn and the template's markers.
`generate_requests` samples *candidates* (temperature about 1, top-p) through SpecEdge's own
batched engine: the verification executor with sessions that decode autoregressively
(`server.local_sessions`, the server's HTTP API backend), one KV slot per concurrent request.
Each candidate is judged (`distill.filters`) in index order and logged in the work directory:

- `requests.jsonl`: the kept requests, `{"index", "prompt", "tokens"}` a line (a valid
  `--prompts` file too);
- `rejected.jsonl`: the others, `{"index", "reason", "text"}`.

A rerun reads both back (the kept requests pass through the filters again, in order) and goes
on from the next index; candidate i always samples with the seed (seed, i), so a resumed run
writes what an uninterrupted one would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from specedge.core.generation import GenerationRequest, GenerationStats
from specedge.core.model_runner import ModelRunner
from specedge.core.sampling import SamplingParams
from specedge.core.target import TargetEngine
from specedge.distill.filters import DUPLICATE, KEPT, NEAR_DUPLICATE, RequestFilter
from specedge.errors import InvalidRequestError
from specedge.model.loader import LoadedModel
from specedge.server.executor import VerificationExecutor
from specedge.server.local_sessions import LocalSessions
from specedge.server.scheduler import SchedulerPolicy

logger = logging.getLogger(__name__)

KEPT_FILE = "requests.jsonl"
REJECTED_FILE = "rejected.jsonl"
# Letters only, so that templates that trim, escape or capitalise content keep it findable.
SENTINELS = ("SPECEDGESENTINELSYSTEM", "SPECEDGESENTINELUSER", "SPECEDGESENTINELASSISTANT")
_MARKER_SYMBOLS = re.compile(r"[<>\[\]|:]")
_LETTER = re.compile(r"[A-Za-z]")


@dataclass(frozen=True)
class RequestSettings:
    count: int = 2000  # requests to keep
    max_tokens: int = 128  # a request's token limit: one that runs past it is unfinished
    temperature: float = 1.0
    top_p: float = 0.95
    max_candidates_per_request: int = 4  # candidates sampled at most, per request to keep
    batch: int = 32  # candidates sampled concurrently (KV slots)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count < 1:
            raise InvalidRequestError(f"--self-prompts must be >= 1, got {self.count}")
        if self.max_tokens < 4 or self.batch < 1:
            raise InvalidRequestError(
                f"a request needs >= 4 tokens and >= 1 slot, got {self.max_tokens}, {self.batch}"
            )

    def seed_of(self, index: int) -> int:
        return (self.seed << 32) + index

    def satisfied(self, stats: RequestStats) -> bool:
        """Enough requests kept, or as many candidates tried as allowed."""
        max_candidates = self.count * self.max_candidates_per_request
        return len(stats.kept) >= self.count or stats.generated >= max_candidates


@dataclass(frozen=True)
class PreQuery:
    """What the target needs to write a user turn, and to recognise one it did not end."""

    prompt_ids: list[int]  # the chat template up to the user's first word
    stop_token_ids: tuple[int, ...]  # a user turn ends at one of these (the target's stops too)
    end_text: str  # text that ends a user turn when no single token does ("" otherwise)
    markers: tuple[str, ...]  # special tokens and template markers a request may not contain

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, stop_token_ids: Sequence[int]) -> PreQuery:
        """Cut from a conversation holding one sentinel user message: the text before it is
        the pre-query template, the first token after it (if special) ends a user turn."""
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "the target has no chat template to write requests with: pass --prompts "
                "templates or a file"
            )
        user = SENTINELS[1]
        text = _render(tokenizer, [{"role": "user", "content": user}])
        if text.count(user) != 1:
            raise InvalidRequestError(
                "the target's chat template does not render a user message as given, so no "
                "pre-query template can be cut from it: pass --prompts templates or a file"
            )
        prefix, suffix = text.split(user)
        prompt_ids = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        specials = _special_tokens(tokenizer)
        suffix_ids = list(tokenizer(suffix, add_special_tokens=False)["input_ids"])
        stops = set(stop_token_ids)
        end_text = ""
        if suffix_ids and tokenizer.convert_ids_to_tokens(suffix_ids[0]) in specials:
            stops.add(int(suffix_ids[0]))
        elif suffix.split():
            end_text = suffix.split()[0]
        if not stops:
            raise InvalidRequestError("the target has no stop token to end a user turn with")
        markers = specials | _template_markers(tokenizer, [prefix, suffix])
        return cls(prompt_ids, tuple(sorted(stops)), end_text, tuple(sorted(markers)))

    def text_of(self, tokenizer: Any, tokens: Sequence[int], stopped: bool) -> tuple[str, bool]:
        """A candidate's text (special tokens kept, so the filters see them) and whether its
        turn ended."""
        if stopped and tokens and tokens[-1] in self.stop_token_ids:
            tokens = tokens[:-1]
        text = str(tokenizer.decode(list(tokens), skip_special_tokens=False))
        if self.end_text and self.end_text in text:
            text, stopped = text[: text.index(self.end_text)], True
        return text.strip(), stopped


def _render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return str(text)


def _template_markers(tokenizer: Any, fallback: list[str]) -> set[str]:
    """Words of the template's own text around a system, a user and an assistant turn that
    hold a letter and a bracket, bar or colon (`[INST]`, `<|im_start|>user`, `User:`);
    `fallback`: the text around a user turn, for templates without a system role."""
    conversation = [
        {"role": role, "content": sentinel}
        for role, sentinel in zip(("system", "user", "assistant"), SENTINELS, strict=True)
    ]
    try:
        pieces = re.split("|".join(SENTINELS), _render(tokenizer, conversation))
    except (TemplateError, ValueError):  # the template refuses a system turn
        pieces = fallback
    words = {word for piece in pieces for word in piece.split()}
    return {word for word in words if _LETTER.search(word) and _MARKER_SYMBOLS.search(word)}


def _special_tokens(tokenizer: Any) -> set[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {str(t) for t in tokenizer.all_special_tokens} | {
        str(token.content) for token in added.values() if getattr(token, "special", False)
    }


@dataclass(frozen=True)
class KeptRequest:
    index: int
    text: str
    num_tokens: int


@dataclass
class RequestStats:
    """What the data card reports: every candidate's verdict, the kept requests in order."""

    counts: Counter[str] = field(default_factory=Counter)  # verdict (KEPT or a reason) -> n
    kept: list[KeptRequest] = field(default_factory=list)
    examples: dict[str, str] = field(default_factory=dict)  # the first text of each reason

    @property
    def generated(self) -> int:
        return sum(self.counts.values())

    @property
    def duplicate_rate(self) -> float:
        """Share of candidates dropped as exact or near duplicates of a kept request."""
        copies = self.counts[DUPLICATE] + self.counts[NEAR_DUPLICATE]
        return copies / self.generated if self.generated else 0.0

    def record(self, index: int, verdict: str, text: str, num_tokens: int) -> None:
        self.counts[verdict] += 1
        if verdict == KEPT:
            self.kept.append(KeptRequest(index, text, num_tokens))
        else:
            self.examples.setdefault(verdict, text)


class RequestLog:
    """The two JSON Lines files of a run's candidates (module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.kept_path = directory / KEPT_FILE
        self.rejected_path = directory / REJECTED_FILE

    def read(self) -> list[dict[str, Any]]:
        """Every logged candidate, in index order."""
        records = [
            *(r | {"reason": KEPT} for r in _read_jsonl(self.kept_path)),
            *_read_jsonl(self.rejected_path),
        ]
        return sorted(records, key=lambda r: int(r["index"]))

    def append(self, index: int, verdict: str, text: str, num_tokens: int) -> None:
        if verdict == KEPT:
            path, record = self.kept_path, {"index": index, "prompt": text, "tokens": num_tokens}
        else:
            path, record = self.rejected_path, {"index": index, "reason": verdict, "text": text}
        with path.open("a") as file:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the torn last line of an interrupted run
            logger.warning("%s: skipping an incomplete line", path)
    return records


def replay(log: RequestLog, request_filter: RequestFilter) -> tuple[RequestStats, int]:
    """The stats of the candidates logged so far, with their kept requests passed through
    `request_filter` again (so it knows them); returns the next candidate index too."""
    stats = RequestStats()
    next_index = 0
    for record in log.read():
        index = int(record["index"])
        if record["reason"] == KEPT:
            text = str(record["prompt"])
            stats.record(index, request_filter.judge(text, True), text, int(record["tokens"]))
        else:
            stats.record(index, str(record["reason"]), str(record["text"]), 0)
        next_index = index + 1
    return stats, next_index


@dataclass(frozen=True)
class Candidate:
    index: int
    tokens: list[int]  # the target's continuation of the pre-query template
    stopped: bool  # it ended with a stop token (not at the token limit)


def generate_requests(
    target: LoadedModel,
    pre_query: PreQuery,
    settings: RequestSettings,
    request_filter: RequestFilter,
    log: RequestLog,
    stats: RequestStats,
    next_index: int,
    keep_sampling: Callable[[RequestStats], bool] = lambda stats: True,
) -> RequestStats:
    """Sample candidates from `next_index` on, judge and log each, until `settings.count` are
    kept or `settings.max_candidates_per_request` per request were tried (then at once), or
    `keep_sampling` (asked before each new candidate: the time budget, a progress bar) says
    no (then the candidates under way still finish and count)."""

    def consume(candidate: Candidate) -> bool:
        text, ended = pre_query.text_of(target.tokenizer, candidate.tokens, candidate.stopped)
        verdict = request_filter.judge(text, ended)
        log.append(candidate.index, verdict, text, len(candidate.tokens))
        stats.record(candidate.index, verdict, text, len(candidate.tokens))
        return not settings.satisfied(stats)

    if not settings.satisfied(stats) and keep_sampling(stats):
        sampling = _sample(
            target, pre_query, settings, next_index, consume, lambda: keep_sampling(stats)
        )
        asyncio.run(sampling)
    return stats


async def _sample(
    target: LoadedModel,
    pre_query: PreQuery,
    settings: RequestSettings,
    first_index: int,
    consume: Callable[[Candidate], bool],
    may_start: Callable[[], bool],
) -> None:
    """`settings.batch` concurrent sessions on a private executor, each sampling candidates
    one after another while `may_start()`; `consume` sees them in index order, and when it
    says stop, the candidates under way are cancelled."""
    max_context = len(pre_query.prompt_ids) + settings.max_tokens + 1
    runner = ModelRunner(target, num_slots=settings.batch, max_context=max_context, max_block=1)
    executor = VerificationExecutor(TargetEngine(runner), SchedulerPolicy(max_batch=settings.batch))
    executor.start()
    sessions = LocalSessions(executor, None, max_sessions=settings.batch)
    stopped = asyncio.Event()
    finished: dict[int, Candidate] = {}
    next_index, next_commit = first_index, first_index

    async def sample_one(index: int) -> Candidate:
        params = SamplingParams(settings.temperature, settings.top_p, seed=settings.seed_of(index))
        request = GenerationRequest(
            pre_query.prompt_ids, params, settings.max_tokens, pre_query.stop_token_ids
        )
        stats = GenerationStats()
        tokens: list[int] = []
        async for emitted in sessions.generate(request, stats):
            tokens.extend(emitted)
        return Candidate(index, tokens, stats.finish_reason == "stop")

    async def worker() -> None:
        nonlocal next_index, next_commit
        # The flag, not only the cancellation below: Python 3.11's `asyncio.wait_for` (taking
        # a session slot) can swallow a cancellation that arrives as the slot frees.
        while not stopped.is_set() and may_start():
            index, next_index = next_index, next_index + 1
            finished[index] = await sample_one(index)
            # In index order, so the filters see the same sequence however sessions interleave
            # (a long candidate holds back the commits behind it, not the sampling).
            while next_commit in finished and not stopped.is_set():
                if not consume(finished.pop(next_commit)):
                    stopped.set()
                next_commit += 1

    workers = [asyncio.create_task(worker()) for _ in range(settings.batch)]
    every_worker = asyncio.gather(*workers)  # done when all are, or at the first that raises
    stop = asyncio.create_task(stopped.wait())
    try:
        either: list[asyncio.Future[Any]] = [stop, every_worker]
        done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if every_worker in done:
            every_worker.result()
    finally:
        stop.cancel()
        every_worker.cancel()  # and with it every worker still running
        await asyncio.gather(stop, every_worker, return_exceptions=True)  # retrieved: no warning
        await executor.stop()
