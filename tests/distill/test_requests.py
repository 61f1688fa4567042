"""Self-generated training requests: the pre-query template, the filters (benchmark overlap
included) and the resumable, batched sampling through the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from specedge.bench.prompts import SPECBENCH_FILE
from specedge.distill.filters import (
    BENCHMARK_OVERLAP,
    DUPLICATE,
    EMPTY,
    KEPT,
    NEAR_DUPLICATE,
    TEMPLATE_ECHO,
    TOO_SHORT,
    UNFINISHED,
    RequestFilter,
    benchmark_runs,
    normalise,
    read_benchmark_texts,
)
from specedge.distill.requests import (
    PreQuery,
    RequestLog,
    RequestSettings,
    RequestStats,
    generate_requests,
    replay,
)
from specedge.errors import InvalidRequestError
from specedge.model.loader import load_tokenizer, resolve_model_dir
from specedge.text import encode_chat
from tests.support.models import tiny_model

SHARED_DATA = Path("/work/shared/data")  # the evaluation data of this project, where present


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    return load_tokenizer(resolve_model_dir("smollm2-135m"))


@pytest.fixture(scope="module")
def specbench_runs() -> set[tuple[str, ...]]:
    texts = read_benchmark_texts(SPECBENCH_FILE)
    if SHARED_DATA.is_dir():
        texts += read_benchmark_texts(SHARED_DATA)
    return benchmark_runs(texts)


def specbench_turn(question_id: int) -> str:
    for line in SPECBENCH_FILE.read_text().splitlines():
        record = json.loads(line)
        if record["question_id"] == question_id:
            return str(record["turns"][0])
    raise AssertionError(question_id)


# ---- the pre-query template ---------------------------------------------------------------------


def test_pre_query_is_the_chat_template_up_to_the_user_turn(smollm2_tokenizer: Any) -> None:
    tokenizer = smollm2_tokenizer
    pre_query = PreQuery.from_tokenizer(tokenizer, (2,))
    text = tokenizer.decode(pre_query.prompt_ids)
    assert text.endswith("<|im_start|>user\n") and text.startswith("<|im_start|>system\n")
    # The same tokens a real conversation starts with.
    chat = encode_chat(tokenizer, [{"role": "user", "content": "Hello there"}])
    assert chat[: len(pre_query.prompt_ids)] == pre_query.prompt_ids
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in pre_query.stop_token_ids and pre_query.end_text == ""
    assert {"<|im_start|>", "<|im_end|>", "<|im_start|>assistant"} <= set(pre_query.markers)
    ids = tokenizer("Plan a trip to Rome.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert pre_query.text_of(tokenizer, ids, stopped=True) == ("Plan a trip to Rome.", True)


def test_a_template_whose_user_turn_ends_in_text_is_cut_there() -> None:
    tokenizer = load_tokenizer(resolve_model_dir("smollm2-135m"))  # a copy to change
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{% endif %}{% endfor %}"
    )
    pre_query = PreQuery.from_tokenizer(tokenizer, (2,))
    assert tokenizer.decode(pre_query.prompt_ids) == "[INST] "
    assert pre_query.end_text == "[/INST]"
    assert {"[INST]", "[/INST]"} <= set(pre_query.markers)
    ids = tokenizer("Tell me a joke. [/INST] Why did the", add_special_tokens=False)["input_ids"]
    assert pre_query.text_of(tokenizer, ids, stopped=False) == ("Tell me a joke.", True)


def test_a_target_without_a_chat_template_is_refused_with_advice() -> None:
    tokenizer = load_tokenizer(resolve_model_dir("smollm2-135m"))
    tokenizer.chat_template = None
    with pytest.raises(InvalidRequestError, match="--prompts templates"):
        PreQuery.from_tokenizer(tokenizer, (2,))


# ---- the filters --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "finished", "verdict"),
    [
        ("  \n ", True, EMPTY),
        ("?!", True, EMPTY),
        ("Write a poem.<|im_start|>assistant\nSure", True, TEMPLATE_ECHO),
        ("How do I bake bread at home", False, UNFINISHED),
        ("Help me", True, TOO_SHORT),
        ("How do I bake bread at home?", True, KEPT),
    ],
)
def test_each_rejection_reason(text: str, finished: bool, verdict: str) -> None:
    assert RequestFilter(["<|im_start|>"], set()).judge(text, finished) == verdict


def test_duplicates_are_found_after_normalising_and_by_shingle_overlap() -> None:
    request_filter = RequestFilter([], set())
    first = "Can you suggest three books to read on a long train trip through the Alps?"
    assert request_filter.judge(first, True) == KEPT
    assert request_filter.judge("can you SUGGEST three books, to read on a long train trip "
                                "through the alps", True) == DUPLICATE  # fmt: skip
    one_word_changed = first.replace("Alps", "Pyrenees")
    assert request_filter.judge(one_word_changed, True) == NEAR_DUPLICATE
    other = "Can you explain how a refrigerator keeps food cold without any ice?"
    assert request_filter.judge(other, True) == KEPT


def test_a_request_sharing_eight_words_with_specbench_is_dropped(
    specbench_runs: set[tuple[str, ...]],
) -> None:
    """An injected request holding an 8-word run of a Spec-Bench prompt (case and punctuation
    changed) is dropped; with 7 of those words it is kept: the filter is exactly 8 words."""
    words = normalise(specbench_turn(81)).split()  # the Hawaii travel blog prompt
    run = words[2:10]
    request_filter = RequestFilter([], specbench_runs)
    injected = f"Please, {' '.join(run).upper()}! I need it by Friday."
    assert request_filter.judge(injected, True) == BENCHMARK_OVERLAP
    near_miss = f"Please, {' '.join(run[:7])}, for my cousin who loves islands."
    assert request_filter.judge(near_miss, True) == KEPT


def test_an_overlapping_request_in_the_log_is_dropped_on_resume(
    tmp_path: Path, specbench_runs: set[tuple[str, ...]]
) -> None:
    """A kept request that overlaps a benchmark set given later (`--exclude`) leaves the
    training set when the run resumes, counted as an overlap."""
    extra = tmp_path / "my_eval.jsonl"
    extra.write_text(json.dumps({"prompt": "Name the seven largest lakes of central Finland"}))
    log = RequestLog(tmp_path)
    log.append(0, KEPT, "What should I pack for a week of hiking in Norway?", 14)
    log.append(1, KEPT, "Quick: name the seven largest lakes of central Finland, please", 12)
    log.append(2, TOO_SHORT, "Hi", 1)
    excluded = specbench_runs | benchmark_runs(read_benchmark_texts(extra))
    stats, next_index = replay(log, RequestFilter([], excluded))
    assert next_index == 3
    assert [request.index for request in stats.kept] == [0]
    assert stats.counts == {KEPT: 1, BENCHMARK_OVERLAP: 1, TOO_SHORT: 1}


def test_benchmark_files_give_every_turn_and_folders_their_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"turns": ["first turn", "second turn"]}) + "\n" + json.dumps({"prompt": "p"})
    )
    (tmp_path / "notes.txt").write_text("not a prompt set")
    assert read_benchmark_texts(tmp_path) == ["first turn", "second turn", "p"]
    runs = benchmark_runs(read_benchmark_texts(SPECBENCH_FILE))
    assert len(runs) > 10_000


# ---- sampling through the engine ----------------------------------------------------------------

# A tiny random target whose first 32 token ids all end a user turn, so that its requests
# (token i reads "<i>", one word after normalising) end after about 8 tokens.
TINY_PRE_QUERY = PreQuery([3, 4, 5], tuple(range(32)), "", ())


def sample(directory: Path, count: int, batch: int, seed: int = 0) -> RequestStats:
    directory.mkdir(exist_ok=True)
    settings = RequestSettings(count=count, batch=batch, max_tokens=16, seed=seed)
    request_filter = RequestFilter([], set())
    log = RequestLog(directory)
    stats, next_index = replay(log, request_filter)
    return generate_requests(
        tiny_model(), TINY_PRE_QUERY, settings, request_filter, log, stats, next_index
    )


def logged(directory: Path) -> list[dict[str, Any]]:
    return RequestLog(directory).read()


def test_a_resumed_run_writes_what_an_uninterrupted_one_does(tmp_path: Path) -> None:
    whole = sample(tmp_path / "whole", count=12, batch=4)
    assert len(whole.kept) == 12 and whole.generated > 12  # some were rejected
    assert {UNFINISHED, TOO_SHORT} & set(whole.counts)
    sample(tmp_path / "resumed", count=5, batch=4)  # interrupted after 5 kept
    resumed = sample(tmp_path / "resumed", count=12, batch=4)
    assert logged(tmp_path / "resumed") == logged(tmp_path / "whole")
    assert resumed.counts == whole.counts and resumed.kept == whole.kept


def test_the_requests_do_not_depend_on_the_batch_and_do_on_the_seed(tmp_path: Path) -> None:
    batched = sample(tmp_path / "batched", count=6, batch=6)
    alone = sample(tmp_path / "alone", count=6, batch=1)
    assert logged(tmp_path / "batched") == logged(tmp_path / "alone")
    other = sample(tmp_path / "other", count=6, batch=6, seed=1)
    assert {r.text for r in other.kept}.isdisjoint(r.text for r in batched.kept)
    assert alone.kept == batched.kept


def test_out_of_time_no_candidate_starts_and_those_under_way_count(tmp_path: Path) -> None:
    """`keep_sampling` (the time budget) says no after 5 candidates have started: exactly
    those 5 are judged and logged, the long ones too, with no gap in the indices."""
    asked: list[int] = []

    def keep_sampling(stats: RequestStats) -> bool:
        asked.append(stats.generated)
        return len(asked) <= 6  # the first ask is before any candidate

    settings = RequestSettings(count=50, batch=4, max_tokens=16)
    stats = generate_requests(
        tiny_model(), TINY_PRE_QUERY, settings, RequestFilter([], set()), RequestLog(tmp_path),
        RequestStats(), 0, keep_sampling,
    )  # fmt: skip
    assert stats.generated == 5
    assert [record["index"] for record in logged(tmp_path)] == [0, 1, 2, 3, 4]


def test_sampling_stops_after_its_candidate_allowance(tmp_path: Path) -> None:
    """A target whose every request echoes the template (its markers are in every text):
    sampling stops after `max_candidates_per_request` candidates per request asked for."""
    settings = RequestSettings(count=3, batch=2, max_tokens=4, max_candidates_per_request=2)
    echoing = PreQuery([3, 4, 5], (1,), "", ("<",))  # TinyTokenizer writes token i as "<i>"
    stats = generate_requests(
        tiny_model(), echoing, settings, RequestFilter(echoing.markers, set()),
        RequestLog(tmp_path), RequestStats(), 0,
    )  # fmt: skip
    assert stats.generated == 6 and not stats.kept
    assert len(logged(tmp_path)) == 6
