"""`specedge distill` end to end on tiny random targets (one that writes its own requests),
and its building blocks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from specedge.bench.prompts import SPECBENCH_FILE
from specedge.core.limits import TreeShape
from specedge.core.local import LocalGenerator
from specedge.core.sampling import SamplingParams
from specedge.distill import DistillConfig, run_distill
from specedge.distill.prompts import builtin_prompts
from specedge.distill.student import layer_sources, select_head_tokens
from specedge.distill.teacher import TeacherSample, encode_prompts, load_shards
from specedge.model.loader import build_model, load_model, load_tokenizer, resolve_model_dir
from specedge.model.weights import convert_hf_state_dict
from specedge.text import encode_prompt

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer, 64-wide random Llama with SmolLM2's tokenizer (vocab 49152)."""
    directory = tmp_path_factory.mktemp("tiny-target")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    source = resolve_model_dir("smollm2-135m")
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    return directory


def tiny_config(target: Path, out: Path, **overrides: object) -> DistillConfig:
    settings: dict[str, object] = {
        "target": str(target),
        "out": out,
        "layers": 2,
        "frozen_layers": 1,
        "max_minutes": 0.2,
        "dtype": "float32",
        "head_tokens": 512,
        "max_new_tokens": 24,
        "generate_batch": 16,
        "max_teacher_tokens": 2000,
        "heldout_fraction": 0.005,
        "acceptance_prompts": 2,
        "acceptance_tokens": 16,
        "prompts": "templates",
    }
    settings.update(overrides)
    return DistillConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_draft(tiny_target: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A draft distilled for `tiny_target` from the built-in prompts."""
    return run_distill(tiny_config(tiny_target, tmp_path_factory.mktemp("tiny") / "draft"))


def test_distill_writes_a_loadable_draft_that_generates_losslessly(
    tiny_target: Path, tiny_draft: Path
) -> None:
    out = tiny_draft
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "specedge_draft.json").read_text())
    stored = load_file(out / "model.safetensors")
    # Shared tensors (embeddings, the frozen bottom layer) come from the target, not the file.
    assert "model.embed_tokens.weight" in meta["shared_from_target"]
    assert "model.layers.0.mlp.up_proj.weight" in meta["shared_from_target"]
    assert not set(meta["shared_from_target"]) & set(stored)
    assert len(meta["head_token_ids"]) == 512
    card = (out / "README.md").read_text()
    assert "held-out top-1 agreement" in card and "tokens per verification round" in card

    target = load_model(str(tiny_target), dtype=torch.float32)
    draft = load_model(str(out), dtype=torch.float32)
    assert draft.config.num_layers == 2 and draft.config.head_token_ids is not None
    assert torch.equal(
        draft.model.layers[0].feed_forward.w2.weight, target.model.layers[0].feed_forward.w2.weight
    )
    prompt = encode_prompt(target.tokenizer, "Tell me about the sea.", chat=True)
    params = SamplingParams(temperature=0.0)
    shape = TreeShape(budget=8, depth=3)
    spec = LocalGenerator(target, draft, shape).generate(prompt, params, 12, ())
    ar = LocalGenerator(target).generate(prompt, params, 12, ())
    assert spec.token_ids == ar.token_ids


END_OF_TURN = 2  # <|im_end|> in SmolLM2's tokenizer
END_OF_TURN_LOGIT = 9.1  # about 1 in 8 of the probability beside 49151 near-zero logits


@pytest.fixture(scope="module")
def chat_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer and chat template that ends a
    turn after about 8 tokens, so that the user requests it writes end: every embedding has
    the same first coordinate, which the final norm turns into a near-constant feature (the
    other weights are Hugging Face's small initial ones), read only by the end-of-turn row of
    the untied head. Every other token stays about equally likely: requests of random
    words."""
    directory = tmp_path_factory.mktemp("chat-target")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=END_OF_TURN,
        pad_token_id=END_OF_TURN,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[:, 0] = 0.0
        # The feature is about sqrt(hidden) = 8 after the final norm.
        model.lm_head.weight[END_OF_TURN, 0] = END_OF_TURN_LOGIT / 8
    model.save_pretrained(directory)
    source = resolve_model_dir("smollm2-135m")
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    assert load_tokenizer(directory).chat_template  # the pre-query template comes from it
    return directory


def test_distill_with_no_prompt_file_trains_on_requests_the_target_wrote(
    chat_target: Path, tmp_path: Path
) -> None:
    """Must-show 2 of issue 15: the command with no --prompts, end to end; the data card
    shows the requests, and the teacher answered exactly those."""
    from specedge import cli

    out = tmp_path / "draft"
    args = ["distill", "--target", str(chat_target), "--out", str(out), "--layers", "2"]
    args += ["--self-prompts", "12", "--max-minutes", "0.4", "--head-tokens", "512"]
    result = CliRunner().invoke(cli.app, [*args, "--dtype", "float32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    kept = [json.loads(line) for line in (out / ".distill" / "requests.jsonl").open()]
    assert len(kept) >= 3
    card = (out / "data_card.md").read_text()
    assert "## Counts" in card and "## Length of the kept requests" in card
    sampled = len(kept) + len((out / ".distill" / "rejected.jsonl").read_text().splitlines())
    assert f"| {sampled} | {len(kept)} |" in card  # sampled, kept, then each reason
    for request in kept[:10]:
        assert " ".join(request["prompt"].split()) in card
    assert "requests the target wrote itself" in (out / "README.md").read_text()
    tokenizer = load_tokenizer(chat_target)
    prompts = {tuple(encode_prompts(tokenizer, [r["prompt"]])[0]) for r in kept}
    answered = [s for shard in load_shards(out / ".distill" / "data") for s in shard]
    assert answered and {tuple(s.tokens[: s.num_prompt]) for s in answered} <= prompts
    assert load_model(str(out), dtype=torch.float32).config.num_layers == 2
    # The held-out requests ship with the draft (for later measurements), none trained on.
    heldout = [json.loads(line)["prompt"] for line in (out / "heldout_prompts.jsonl").open()]
    heldout_ids = {tuple(encode_prompts(tokenizer, [text])[0]) for text in heldout}
    trained = {
        tuple(s.tokens[: s.num_prompt])
        for shard in load_shards(out / ".distill" / "data")[1:]
        for s in shard
    }
    assert heldout and set(heldout) <= {r["prompt"] for r in kept} and not heldout_ids & trained


def test_training_continues_from_a_draft(
    tiny_target: Path, tiny_draft: Path, tmp_path: Path
) -> None:
    """--init-from: the new draft keeps the old one's layers (whatever --layers says), head
    tokens and shared tensors, and its card says where it started."""
    out = run_distill(
        tiny_config(tiny_target, tmp_path / "next", init_from=str(tiny_draft), layers=3)
    )
    before = json.loads((tiny_draft / "specedge_draft.json").read_text())
    after = json.loads((out / "specedge_draft.json").read_text())
    assert after["head_token_ids"] == before["head_token_ids"]
    assert after["shared_from_target"] == before["shared_from_target"]
    draft = load_model(str(out), dtype=torch.float32)
    assert draft.config.num_layers == 2  # the old draft's, not --layers
    assert f"training continued from the draft `{tiny_draft}`" in (out / "README.md").read_text()


def test_distill_resumes_from_its_work_directory(tiny_target: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_target, tmp_path / "draft", max_minutes=0.1)
    run_distill(config)
    work = tmp_path / "draft" / ".distill"
    shards = {p.name: p.stat().st_mtime_ns for p in (work / "data").glob("shard-*.pt")}
    step = torch.load(work / "checkpoint.pt")["state"]["step"]
    run_distill(tiny_config(tiny_target, tmp_path / "draft", max_minutes=0.15))
    after = {p.name: p.stat().st_mtime_ns for p in (work / "data").glob("shard-*.pt")}
    assert {name: after[name] for name in shards} == shards  # kept, not regenerated
    assert torch.load(work / "checkpoint.pt")["state"]["step"] >= step


def test_requests_past_their_time_still_leave_teacher_data(
    tiny_target: Path, tmp_path: Path
) -> None:
    """A run whose requests took the whole budget (those under way finish past it) still
    gets the held-out shard and one training shard, and writes a draft."""
    work = tmp_path / "draft" / ".distill"
    work.mkdir(parents=True)
    (work / "state.json").write_text(json.dumps({"request_seconds": 3600.0}))
    out = run_distill(tiny_config(tiny_target, tmp_path / "draft"))
    assert sorted(p.name for p in (work / "data").glob("shard-*.pt")) == [
        "shard-00-0000.pt",
        "shard-00-0001.pt",
    ]
    assert (out / "model.safetensors").is_file()


def test_reduced_head_gives_full_vocab_logits_with_minus_inf_outside(tiny_target: Path) -> None:
    full = load_model(str(tiny_target), dtype=torch.float32)
    head = (0, 2, 7, 100, 49151)
    state = convert_hf_state_dict(load_file(tiny_target / "model.safetensors"), full.config)
    from dataclasses import replace

    reduced = build_model(replace(full.config, head_token_ids=head), state, "cpu", torch.float32)
    hidden = torch.randn(3, full.config.hidden_size)
    expected = full.model.logits(hidden)
    logits = reduced.logits(hidden)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits[:, list(head)], expected[:, list(head)])
    outside = torch.ones(full.config.vocab_size, dtype=torch.bool)
    outside[list(head)] = False
    assert torch.isneginf(logits[:, outside]).all()
    # The draft's top-k path stays on the head's columns and gives the same children.
    for model in (reduced, full.model):
        values, tokens = model.top_logprobs(hidden, 3)
        reference = torch.topk(model.logits(hidden).log_softmax(-1), 3)
        torch.testing.assert_close(values, reference.values)
        assert torch.equal(tokens, reference.indices)


def test_builtin_prompts_do_not_overlap_the_evaluation_set() -> None:
    prompts = builtin_prompts()
    assert len(set(prompts)) == len(prompts) > 1500
    assert builtin_prompts(100, seed=1) == builtin_prompts(100, seed=1) != builtin_prompts(100)
    turns = [
        turn.strip()
        for line in SPECBENCH_FILE.read_text().splitlines()
        for turn in json.loads(line)["turns"]
    ]
    assert not {p.strip() for p in prompts} & set(turns)
    evaluation_runs = set().union(*(word_runs(turn) for turn in turns))
    shared = [p for p in prompts if word_runs(p) & evaluation_runs]
    assert not shared, shared[:3]


def word_runs(text: str, length: int = 8) -> set[str]:
    words = text.split()
    return {" ".join(words[i : i + length]) for i in range(len(words) - length + 1)}


def test_layer_sources_take_bottom_and_top_layers() -> None:
    assert layer_sources(30, 4) == [0, 1, 28, 29]
    assert layer_sources(30, 3) == [0, 1, 29]
    assert layer_sources(30, 1) == [0]


def test_head_tokens_are_the_most_frequent_plus_stop_tokens() -> None:
    sample = TeacherSample(
        tokens=[5, 9, 9, 9, 4, 4],
        num_prompt=1,
        topk_ids=torch.tensor([[9], [9], [9], [4], [4]], dtype=torch.int32),
        topk_logits=torch.zeros(5, 1, dtype=torch.bfloat16),
    )
    assert select_head_tokens([sample], vocab_size=20, count=3, always=[2]) == [2, 4, 9]
    assert select_head_tokens([sample], vocab_size=20, count=0, always=[2]) == list(range(20))


def test_cli_builds_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from specedge import cli

    seen: list[DistillConfig] = []

    def fake_run(config: DistillConfig) -> Path:
        seen.append(config)
        return config.out

    monkeypatch.setattr("specedge.distill.run_distill", fake_run)
    args = [
        "distill",
        "--target",
        "t",
        "--out",
        str(tmp_path),
        "--layers",
        "3",
        "--max-minutes",
        "5",
        "--seed",
        "7",
        "--no-init-from-target",
        "--prompts",
        "self,templates,mine.txt",
        "--self-prompts",
        "50",
        "--exclude",
        "eval.jsonl",
        "--init-from",
        "smollm2-135m-draft",
    ]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert (config.layers, config.max_minutes, config.seed) == (3, 5.0, 7)
    assert not config.init_from_target
    assert config.sources == ["self", "templates", "mine.txt"] and config.self_prompts == 50
    assert config.exclude == (Path("eval.jsonl"),) and config.init_from == "smollm2-135m-draft"
    assert DistillConfig(target="t", out=tmp_path).sources == ["self"]  # the default
