"""Speculative decoding is lossless. At temperature 0 the output with any draft (the target
itself, a perturbed copy, an unrelated model) and any tree shape equals plain greedy decoding
token for token. At temperature > 0 the first tokens of speculative outputs follow the target's
exact distribution (chi-square against probabilities computed from the target model), with
top-k and top-p too."""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specedge.core.draft import DraftEngine
from specedge.core.limits import TreeShape
from specedge.core.local import LocalGenerator
from specedge.core.model_runner import ModelRunner
from specedge.core.sampling import SamplingParams
from specedge.core.target import GenerationLimits, TargetEngine
from specedge.core.tree import DraftTree
from specedge.errors import TokenizerMismatchError
from specedge.model.loader import LoadedModel
from tests.support.models import causal_logits, tiny_hf_config, tiny_loaded_model

GREEDY = SamplingParams(temperature=0.0)


def perturbed_copy(loaded: LoadedModel, noise: float, seed: int, name: str) -> LoadedModel:
    """The same model with every weight moved by `noise` times its own spread: a draft that
    agrees with the target often, but not always."""
    model = copy.deepcopy(loaded.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(noise * param.std() * torch.randn(param.shape, generator=generator))
    return replace(loaded, name=name, model=model)


# ---- temperature 0 ---------------------------------------------------------------------------

PROMPTS = [[7], [10, 11, 12, 13, 14, 15, 16], [(31 * i) % 256 for i in range(37)]]
NUM_NEW_TOKENS = 24

SHAPES = {  # draft model only, but "default" (context lookup on) and "lookup"
    "one-node": TreeShape(budget=1, depth=1, width=1, beams=1, lookup=0),
    "chain-5": TreeShape(budget=5, depth=5, width=1, beams=1, lookup=0),
    "narrow": TreeShape(budget=6, depth=3, width=2, beams=1, lookup=0),
    "bushy": TreeShape(budget=24, depth=4, width=4, beams=8, lookup=0),
    "deep": TreeShape(budget=16, depth=10, width=2, beams=2, lookup=0),
    "default": TreeShape(),
    "lookup": TreeShape(budget=16, depth=6, width=2, beams=2, lookup=6),
}
CASES = [
    ("same", "default"),
    ("same", "chain-5"),
    ("same", "one-node"),
    ("perturbed", "bushy"),
    ("perturbed", "deep"),
    ("perturbed", "narrow"),
    ("perturbed", "default"),
    ("poor", "default"),
    ("poor", "chain-5"),
    ("same", "lookup"),
    ("perturbed", "lookup"),
    ("poor", "lookup"),
]


@pytest.fixture(scope="module")
def greedy_models() -> dict[str, LoadedModel]:
    """A target and three drafts of the same vocabulary; peaky logits keep argmax margins far
    above float rounding, so that tree and chain forwards agree on every argmax."""
    config = tiny_hf_config("llama")
    target = tiny_loaded_model(config, seed=100, name="target", logit_scale=4.0)
    return {
        "target": target,
        "same": replace(target, name="same"),
        "perturbed": perturbed_copy(target, noise=0.3, seed=101, name="perturbed"),
        "poor": tiny_loaded_model(config, seed=102, name="poor", logit_scale=4.0),
    }


@pytest.fixture(scope="module")
def greedy_reference(greedy_models: dict[str, LoadedModel]) -> list[list[int]]:
    """Plain autoregressive greedy outputs of the target for PROMPTS."""
    generator = LocalGenerator(greedy_models["target"])
    return [generator.generate(prompt, GREEDY, NUM_NEW_TOKENS, ()).token_ids for prompt in PROMPTS]


def test_reference_is_a_real_greedy_decode(
    greedy_models: dict[str, LoadedModel], greedy_reference: list[list[int]]
) -> None:
    """The autoregressive baseline itself equals argmax over full causal forwards."""
    model = greedy_models["target"].model
    for prompt, output in zip(PROMPTS, greedy_reference, strict=True):
        assert len(output) == NUM_NEW_TOKENS
        logits = causal_logits(model, torch.tensor([prompt + output]))[0]
        assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == output
        assert len(set(output)) > 3, "a degenerate continuation would make equality trivial"


@pytest.mark.parametrize(("draft_name", "shape_name"), CASES)
def test_greedy_speculative_equals_greedy_target(
    greedy_models: dict[str, LoadedModel],
    greedy_reference: list[list[int]],
    draft_name: str,
    shape_name: str,
) -> None:
    generator = LocalGenerator(
        greedy_models["target"], greedy_models[draft_name], SHAPES[shape_name]
    )
    total_tokens, total_rounds = 0, 0
    for prompt, expected in zip(PROMPTS, greedy_reference, strict=True):
        output = generator.generate(prompt, GREEDY, NUM_NEW_TOKENS, ())
        assert output.token_ids == expected
        assert output.finish_reason == "length"
        total_tokens += output.completion_tokens
        total_rounds += output.stats.rounds
    tokens_per_round = total_tokens / total_rounds
    if draft_name == "same" and shape_name != "one-node":
        assert tokens_per_round > 2.0, "the draft matching the target should be accepted"
    if draft_name == "poor" and not SHAPES[shape_name].lookup:
        assert tokens_per_round < 1.5, "an unrelated draft should mostly be rejected"


def test_greedy_speculative_stops_at_the_same_stop_token(
    greedy_models: dict[str, LoadedModel], greedy_reference: list[list[int]]
) -> None:
    """A stop token in the middle of an accepted path ends the output exactly where plain
    decoding ends it."""
    expected = greedy_reference[1]
    stop = expected[9]
    cut = expected[: expected.index(stop) + 1]
    target = greedy_models["target"]
    for draft_name in ("same", "perturbed"):
        generator = LocalGenerator(target, greedy_models[draft_name], SHAPES["deep"])
        output = generator.generate(PROMPTS[1], GREEDY, NUM_NEW_TOKENS, (stop,))
        assert output.token_ids == cut
        assert output.finish_reason == "stop"
    plain = LocalGenerator(target).generate(PROMPTS[1], GREEDY, NUM_NEW_TOKENS, (stop,))
    assert plain.token_ids == cut


def test_generation_up_to_the_context_limit() -> None:
    """With a draft, generation runs into the context limit exactly as plain decoding does:
    the last rounds' trees reach past it, but no token beyond the limit is emitted."""
    config = tiny_hf_config("llama", max_position_embeddings=40)
    target = tiny_loaded_model(config, seed=300, logit_scale=4.0)
    prompt = list(range(1, 11))
    plain = LocalGenerator(target).generate(prompt, GREEDY, 100, ())
    assert len(plain.token_ids) == 40 - len(prompt) and plain.finish_reason == "length"
    for shape_name in ("default", "chain-5"):
        generator = LocalGenerator(target, replace(target, name="same"), SHAPES[shape_name])
        output = generator.generate(prompt, GREEDY, 100, ())
        assert output.token_ids == plain.token_ids and output.finish_reason == "length"
    near_limit = LocalGenerator(target, replace(target, name="same"))
    last = near_limit.generate(list(range(1, 40)), GREEDY, 100, ())
    assert len(last.token_ids) == 1


def test_generator_is_reusable_and_deterministic(greedy_models: dict[str, LoadedModel]) -> None:
    """Seeded sampling through the same generator twice gives the same tokens."""
    generator = LocalGenerator(greedy_models["target"], greedy_models["perturbed"])
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=5)
    first = generator.generate(PROMPTS[1], params, 16, ()).token_ids
    second = generator.generate(PROMPTS[1], params, 16, ()).token_ids
    other = generator.generate(PROMPTS[1], replace(params, seed=6), 16, ()).token_ids
    assert first == second and len(first) == 16
    assert first != other


@pytest.mark.parametrize("budget", ["auto", "fixed"])
def test_seeded_sampling_gives_the_autoregressive_tokens(
    greedy_models: dict[str, LoadedModel], budget: str
) -> None:
    """A token's draw depends only on the seed, its position and the target's distribution
    there: seeded speculative decoding (trees sized and cut by goodput, or fixed and whole)
    emits exactly the tokens of seeded autoregressive decoding."""
    target = greedy_models["target"]
    params = SamplingParams(temperature=0.8, top_k=50, seed=11)
    plain = LocalGenerator(target).generate(PROMPTS[1], params, 24, ()).token_ids
    spec = LocalGenerator(target, greedy_models["perturbed"], adaptive=budget == "auto")
    output = spec.generate(PROMPTS[1], params, 24, ())
    assert output.token_ids == plain
    assert output.stats.accepted > 0  # speculation happened
    if budget == "fixed":
        assert output.stats.verified_nodes == output.stats.drafted_nodes


def test_mismatched_vocabulary_is_rejected(greedy_models: dict[str, LoadedModel]) -> None:
    small = tiny_loaded_model(tiny_hf_config("llama", vocab_size=128), seed=3, name="small")
    with pytest.raises(TokenizerMismatchError, match="do not share a tokenizer"):
        LocalGenerator(greedy_models["target"], small)


# ---- temperature > 0 -------------------------------------------------------------------------

STAT_VOCAB = 16
STAT_PROMPT = [3]  # one token: the root, so that no sequence needs a prefill forward
STAT_TOKENS = 3  # the joint distribution of the first three generated tokens is tested
STAT_SAMPLES = 2500
STAT_SHAPE = TreeShape(budget=6, depth=3, width=2, beams=2)
STAT_PARAMS = {
    "plain": SamplingParams(temperature=1.0),
    "top-k": SamplingParams(temperature=0.8, top_k=4),
    "top-k-top-p": SamplingParams(temperature=1.2, top_k=8, top_p=0.7),
}


@pytest.fixture(scope="module")
def stat_models() -> tuple[LoadedModel, LoadedModel]:
    target = tiny_loaded_model(
        tiny_hf_config("llama", vocab_size=STAT_VOCAB), seed=200, logit_scale=2.0
    )
    return target, perturbed_copy(target, noise=0.3, seed=201, name="draft")


def reference_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """transformers' warpers (temperature, top-k, top-p), then softmax: [n, V] -> [n, V]."""
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(params.temperature)(ids, logits)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    return scores.softmax(dim=-1)


def exact_joint_distribution(loaded: LoadedModel, params: SamplingParams) -> torch.Tensor:
    """P(first STAT_TOKENS tokens) as a [V] * STAT_TOKENS tensor, from full causal forwards
    over every continuation (V^(STAT_TOKENS - 1) sequences)."""
    vocab = STAT_VOCAB
    grid = torch.cartesian_prod(*[torch.arange(vocab)] * (STAT_TOKENS - 1))
    sequences = torch.cat([torch.tensor(STAT_PROMPT).expand(len(grid), -1), grid], dim=1)
    logits = causal_logits(loaded.model, sequences)  # [V^(T-1), P + T - 1, V]
    joint = torch.ones(len(grid), 1, dtype=torch.float64)
    for step in range(STAT_TOKENS):
        probs = reference_probabilities(logits[:, len(STAT_PROMPT) - 1 + step].double(), params)
        if step < STAT_TOKENS - 1:
            joint = joint * probs.gather(1, grid[:, step : step + 1])
        else:
            joint = joint * probs
    return joint.reshape([vocab] * STAT_TOKENS)


def speculative_samples(
    target: LoadedModel,
    draft: LoadedModel,
    params: SamplingParams,
    num_samples: int,
    cut: random.Random | None = None,
) -> tuple[torch.Tensor, float]:
    """Counts ([V] * STAT_TOKENS) of the first STAT_TOKENS tokens of `num_samples`
    speculative generations (seeds 0, 1, ...), and the mean emitted tokens per round.

    The sequences are verified together, one batched forward per round; the draft grows each
    distinct prefix's tree once (drafting is deterministic: every sequence with that prefix
    would grow the same tree). With `cut`, each round verifies a random prefix of its tree
    (none of it included), as goodput selection may."""
    batch_size = 500
    limits = GenerationLimits(max_tree_nodes=STAT_SHAPE.budget, max_tree_depth=STAT_SHAPE.depth)
    runner = ModelRunner(target, num_slots=batch_size, max_context=16, max_block=16)
    engine = TargetEngine(runner, limits)
    draft_runner = ModelRunner(draft, num_slots=1, max_context=16, max_block=STAT_SHAPE.max_block)
    draft_engine = DraftEngine(draft_runner, STAT_SHAPE)
    trees: dict[tuple[int, ...], DraftTree] = {}

    def tree_for(committed: Sequence[int]) -> DraftTree:
        key = tuple(committed)
        if key not in trees:
            draft_seq = draft_engine.open(committed)
            draft_engine.prefill(draft_seq)
            builder = draft_engine.builder(draft_seq)
            builder.grow()
            trees[key] = builder.sent_tree().tree
            draft_engine.close(draft_seq)
        return trees[key]

    counts = torch.zeros([STAT_VOCAB] * STAT_TOKENS, dtype=torch.float64)
    rounds = emitted = 0
    for first_seed in range(0, num_samples, batch_size):
        seeds = range(first_seed, min(first_seed + batch_size, num_samples))
        active = [engine.open(STAT_PROMPT, replace(params, seed=s), STAT_TOKENS) for s in seeds]
        sequences = list(active)
        for seq in active:
            engine.prefill(seq)
        while active:
            batch = [(seq, cut_tree(tree_for(seq.committed), cut)) for seq in active]
            for result in engine.verify(batch):
                rounds += 1
                emitted += len(result.emitted_tokens)
            active = [seq for seq in active if seq.finish_reason is None]
        for seq in sequences:
            counts[tuple(seq.committed[len(STAT_PROMPT) :])] += 1
            engine.close(seq)
    return counts, emitted / rounds


def cut_tree(tree: DraftTree, rng: random.Random | None) -> DraftTree:
    if rng is None:
        return tree
    keep = rng.randint(0, tree.num_nodes)
    return tree.prefix(keep)


def chi_square_pvalue(observed: torch.Tensor, exact: torch.Tensor) -> float:
    """Goodness of fit of observed counts to an exact distribution over the cells it can
    produce, pooling the cells whose expected count is below 5 into one."""
    observed, exact = observed.flatten(), exact.flatten()
    expected = observed.sum() * exact
    large = expected >= 5
    observed_bins, expected_bins = observed[large], expected[large]
    pooled = ~large & (exact > 0)
    if pooled.any():
        observed_bins = torch.cat([observed_bins, observed[pooled].sum().reshape(1)])
        expected_bins = torch.cat([expected_bins, expected[pooled].sum().reshape(1)])
    assert large.sum() >= 10, "too few well-populated cells for a meaningful test"
    return float(chisquare(observed_bins.numpy(), expected_bins.numpy()).pvalue)


@pytest.mark.parametrize("cuts", ["whole", "cut"])
@pytest.mark.parametrize("params_name", STAT_PARAMS)
def test_sampled_distribution_equals_target_distribution(
    stat_models: tuple[LoadedModel, LoadedModel], params_name: str, cuts: str
) -> None:
    target, draft = stat_models
    params = STAT_PARAMS[params_name]
    exact = exact_joint_distribution(target, params)
    torch.testing.assert_close(exact.sum().item(), 1.0)
    rng = random.Random(7) if cuts == "cut" else None
    counts, tokens_per_round = speculative_samples(target, draft, params, STAT_SAMPLES, rng)
    assert counts.sum() == STAT_SAMPLES
    impossible = (counts > 0) & (exact == 0)
    assert not impossible.any(), f"sampled what the target cannot: {impossible.nonzero()[:5]}"
    assert chi_square_pvalue(counts, exact) > 1e-3
    # Speculation happened: rounds often emitted accepted draft tokens before the bonus.
    assert tokens_per_round > (1.1 if cuts == "cut" else 1.3)
    # The test has power: outputs with a fifth of their mass following the draft's
    # distribution (restricted to what the target can produce) would fail it.
    draft_exact = exact_joint_distribution(draft, params) * (exact > 0)
    contaminated = 0.8 * exact + 0.2 * draft_exact / draft_exact.sum()
    assert chi_square_pvalue(STAT_SAMPLES * contaminated, exact) < 1e-6
