"""The edge against the real server when the server verifies less than it was sent (DESIGN.md
section 12): every cut, to nothing included and below a proactive bet, keeps the output the
target's (greedy equality; at T > 0 the same tokens as seeded autoregressive decoding, since a
token's draw depends only on its position); a server whose rows are too dear cuts every tree,
and the edge's trees shrink to a probe; cheap rows verify whole trees."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from specedge.core.calibration import temperature_regime
from specedge.core.draft import StepPlan, TreeBuilder
from specedge.core.goodput import FittedBatchCost, LinearBatchCost
from specedge.core.local import LocalGenerator
from specedge.core.round_loop import PROBE_STRIDE, ProbeScore
from specedge.core.sampling import SamplingParams
from specedge.core.tree import DraftTree
from specedge.edge.app import Edge
from specedge.model.loader import LoadedModel
from specedge.rpc.codec import OpenSession
from specedge.server.app import BackgroundServer
from specedge.server.executor import ServerSession, VerificationExecutor
from tests.support.models import TARGET_SEED, tiny_model
from tests.support.observe import metric
from tests.support.reference import reference_tokens
from tests.support.servers import edge_config, edge_generate, start_server, with_edge

PROMPTS = [[1, 2, 3, 4, 5], [200, 17, 93], [7] * 12]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model(TARGET_SEED)


@pytest.fixture(scope="module")
def server(target: LoadedModel) -> Iterator[BackgroundServer]:
    background = start_server(target)
    yield background
    background.stop()


@pytest.fixture(scope="module")
def references(target: LoadedModel) -> list[list[int]]:
    return [reference_tokens(target, prompt, MAX_TOKENS) for prompt in PROMPTS]


def executor_of(server: BackgroundServer) -> VerificationExecutor:
    executor = server.server.executor
    assert executor is not None
    return executor


@pytest.fixture
def random_cuts(server: BackgroundServer) -> Iterator[random.Random]:
    """The server verifies a random prefix of each tree (none, some or all of it), whatever
    the selection would choose: every cut position gets exercised."""
    executor = executor_of(server)
    rng = random.Random(0)

    def select(sessions: list[ServerSession]) -> list[DraftTree]:
        trees = []
        for session in sessions:
            assert session.tree is not None
            keep = rng.choice([0, rng.randint(0, session.tree.num_nodes), session.tree.num_nodes])
            trees.append(DraftTree(session.tree.tokens[:keep], session.tree.parents[:keep]))
        return trees

    executor._select = select  # type: ignore[method-assign]
    yield rng
    del executor._select


@pytest.fixture
def row_cost(server: BackgroundServer) -> Iterator[dict[str, float]]:
    """Pin the server's cost model: set `per_row_s` (seconds per verified row) in the dict."""
    executor = executor_of(server)
    saved = executor.batch_cost
    pinned: dict[str, float] = {}

    class Pinned(FittedBatchCost):
        def __call__(self, sequences: int, rows: int) -> float:
            return 0.001 + pinned["per_row_s"] * rows

    executor.batch_cost = Pinned(LinearBatchCost(0.001, 0.0, 0.0))
    yield pinned
    executor.batch_cost = saved


@pytest.mark.parametrize("policy", ["off", "keep-depth", "add-depth"])
def test_every_cut_keeps_greedy_output(
    server: BackgroundServer,
    random_cuts: random.Random,
    references: list[list[int]],
    policy: str,
) -> None:
    draft = tiny_model(TARGET_SEED)  # agrees with the target: bets on leaves beyond the cut

    async def body(edge: Edge) -> list[tuple[list[int], object]]:
        return await asyncio.gather(*(edge_generate(edge, p, MAX_TOKENS) for p in PROMPTS))

    config = edge_config(server, proactive=policy, budget="12")
    results = asyncio.run(with_edge(config, draft, body))
    drafted = verified = cut = 0
    for (tokens, stats), reference in zip(results, references, strict=True):
        assert tokens == reference
        drafted += stats.drafted_nodes  # type: ignore[attr-defined]
        verified += stats.verified_nodes  # type: ignore[attr-defined]
        cut += stats.cut_rounds  # type: ignore[attr-defined]
    assert 0 < verified < drafted and cut > 0


def test_sampled_output_with_cuts_equals_seeded_autoregressive_decoding(
    server: BackgroundServer, random_cuts: random.Random, target: LoadedModel
) -> None:
    """Each token is drawn at its position's own uniform: the edge's output with random cuts
    is exactly what seeded autoregressive decoding gives."""
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=21)
    expected = [
        LocalGenerator(target).generate(prompt, params, MAX_TOKENS, ()).token_ids
        for prompt in PROMPTS
    ]

    async def body(edge: Edge) -> list[list[int]]:
        runs = [edge_generate(edge, p, MAX_TOKENS, params) for p in PROMPTS]
        return [tokens for tokens, _ in await asyncio.gather(*runs)]

    assert asyncio.run(with_edge(edge_config(server), tiny_model(12), body)) == expected


def test_dear_rows_cut_every_tree_then_the_server_decodes_the_session(
    server: BackgroundServer, row_cost: dict[str, float], references: list[list[int]]
) -> None:
    row_cost["per_row_s"] = 10.0  # no node can pay for its row
    cut_before = metric(server.metrics_port, "specedge_server_cut_rounds_total")

    async def body(edge: Edge) -> tuple[list[int], object]:
        return await edge_generate(edge, PROMPTS[0], MAX_TOKENS)

    config = edge_config(server, budget="auto")
    tokens, stats = asyncio.run(with_edge(config, tiny_model(TARGET_SEED), body))
    assert tokens == references[0]
    assert stats.verified_nodes == 0 and stats.tokens_per_round == 1.0  # type: ignore[attr-defined]
    # Cut three times running, the session is decoded server-side: no round trip per token.
    assert stats.cut_rounds >= 3 and stats.streamed_rounds > stats.rounds / 2  # type: ignore[attr-defined]
    assert stats.cut_rounds + stats.streamed_rounds == stats.rounds  # type: ignore[attr-defined]
    # Between streams the edge sizes its trees to what the server takes (fixed trees would
    # have sent the server's cap of 16 nodes every round).
    assert stats.drafted_nodes < 0.25 * 16 * stats.rounds  # type: ignore[attr-defined]
    cut_after = metric(server.metrics_port, "specedge_server_cut_rounds_total")
    assert cut_after - cut_before == stats.cut_rounds  # type: ignore[attr-defined]


def test_free_rows_verify_whole_trees(
    server: BackgroundServer, row_cost: dict[str, float], references: list[list[int]]
) -> None:
    row_cost["per_row_s"] = 0.0

    async def body(edge: Edge) -> tuple[list[int], object]:
        return await edge_generate(edge, PROMPTS[0], MAX_TOKENS)

    # With a model this small the server would rather decode the session itself (its steps
    # take a millisecond, the edge's round trip several): off here, this is about the cut.
    config = edge_config(server, server_decoding=False)
    tokens, stats = asyncio.run(with_edge(config, tiny_model(TARGET_SEED), body))
    assert tokens == references[0]
    # Every node with a non-zero estimate pays; only estimates that quantise to 0 are cut.
    assert stats.verified_nodes >= 0.8 * stats.drafted_nodes  # type: ignore[attr-defined]
    assert stats.accepted > 5  # type: ignore[attr-defined]


def test_a_session_like_one_that_ended_streaming_starts_streaming(
    server: BackgroundServer, row_cost: dict[str, float], target: LoadedModel
) -> None:
    """The edge remembers, per temperature regime, that the server ended up decoding its
    last session: the next starts that way (no rounds of cut trees first), and its tokens are
    still exactly seeded autoregressive decoding's."""
    row_cost["per_row_s"] = 10.0
    params = SamplingParams(temperature=0.8, seed=3)
    expected = LocalGenerator(target).generate(PROMPTS[1], params, MAX_TOKENS, ()).token_ids

    async def body(edge: Edge) -> list[tuple[list[int], object]]:
        first = await edge_generate(edge, PROMPTS[0], MAX_TOKENS, params)
        second = await edge_generate(edge, PROMPTS[1], MAX_TOKENS, params)
        return [first, second]

    draft = tiny_model(12)  # disagrees with the target: its probes never win trees back
    (_, first), (tokens, second) = asyncio.run(with_edge(edge_config(server), draft, body))
    assert first.cut_rounds >= 3  # type: ignore[attr-defined]
    assert second.cut_rounds == 0 and second.streamed_rounds == second.rounds  # type: ignore[attr-defined]
    assert tokens == expected


def streamed_from_the_start(edge: Edge, params: SamplingParams) -> None:
    """The edge's next session in `params`' regime starts server-side decoded."""
    edge.runtime._latest_streamed[temperature_regime(params.temperature)] = True


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(temperature=0.7, top_k=3, seed=5)]
)
def test_streamed_steps_verify_the_lookup_chain(
    server: BackgroundServer, row_cost: dict[str, float], target: LoadedModel,
    params: SamplingParams, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """While the server decodes a session itself, each step also verifies the session's
    context lookup chain (rows are free here, so all of it): a repetitive context streams
    several tokens a step, and the tokens are exactly (seeded) autoregressive decoding's."""
    row_cost["per_row_s"] = 0.0
    # The edge never takes the session back (its probes would, against the low resume
    # threshold free rows give): every step is the server's.
    monkeypatch.setattr(ProbeScore, "wants_trees", lambda self, threshold: False)
    prompt = [5, 6, 7, 8] * 6
    expected = LocalGenerator(target).generate(prompt, params, MAX_TOKENS, ()).token_ids
    lookup_before = metric(server.metrics_port, "specedge_server_lookup_tokens_total")

    async def body(edge: Edge) -> tuple[list[int], object]:
        streamed_from_the_start(edge, params)
        return await edge_generate(edge, prompt, MAX_TOKENS, params)

    tokens, stats = asyncio.run(with_edge(edge_config(server), tiny_model(12), body))
    assert tokens == expected
    assert stats.streamed_rounds == stats.rounds  # type: ignore[attr-defined]
    assert stats.rounds < len(tokens)  # type: ignore[attr-defined]
    # Every token beyond one a step came from the lookup chain, and the server counts them
    # (the last step may end on a chain token, the length limit leaving no room for its own).
    taken = metric(server.metrics_port, "specedge_server_lookup_tokens_total") - lookup_before
    extra = len(tokens) - stats.rounds  # type: ignore[attr-defined]
    assert extra <= taken <= extra + 1


def test_an_edge_without_token_runs_streams_one_token_a_step(
    server: BackgroundServer, row_cost: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edge that did not say it takes several tokens a streamed reply (an older one) gets
    plain decoding steps."""
    row_cost["per_row_s"] = 0.0
    monkeypatch.setattr(ProbeScore, "wants_trees", lambda self, threshold: False)
    prompt = [5, 6, 7, 8] * 6

    async def body(edge: Edge) -> tuple[list[int], object]:
        streamed_from_the_start(edge, SamplingParams())
        original = edge.runtime.connection.open_session

        async def old_open(message: OpenSession, **kwargs: object) -> object:
            return await original(replace(message, accepts_token_runs=False), **kwargs)

        edge.runtime.connection.open_session = old_open  # type: ignore[method-assign]
        return await edge_generate(edge, prompt, MAX_TOKENS)

    tokens, stats = asyncio.run(with_edge(edge_config(server), tiny_model(12), body))
    assert stats.streamed_rounds == stats.rounds == len(tokens)  # type: ignore[attr-defined]


def test_streamed_tokens_are_all_scored_by_a_probe_forward_every_few(
    server: BackgroundServer, row_cost: dict[str, float], references: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """While the server decodes the session, the edge runs one draft forward every
    `PROBE_STRIDE` streamed tokens, over the tokens since the last, and scores its guess
    after every one of them: a draft equal to the target guesses each of them right."""
    row_cost["per_row_s"] = 10.0  # one token a streamed step (no lookup chain pays)
    observed: list[bool] = []
    forwards = [0]
    monkeypatch.setattr(ProbeScore, "wants_trees", lambda self, threshold: False)
    monkeypatch.setattr(ProbeScore, "observe", lambda self, hit: observed.append(hit))
    finish_step = TreeBuilder.finish_step

    def counted(self: TreeBuilder, plan: StepPlan, hidden: torch.Tensor | None) -> bool:
        forwards[0] += 1
        return finish_step(self, plan, hidden)

    monkeypatch.setattr(TreeBuilder, "finish_step", counted)

    async def body(edge: Edge) -> tuple[list[int], object]:
        streamed_from_the_start(edge, SamplingParams())
        return await edge_generate(edge, PROMPTS[0], MAX_TOKENS)

    tokens, stats = asyncio.run(with_edge(edge_config(server), tiny_model(TARGET_SEED), body))
    assert tokens == references[0]
    assert stats.streamed_rounds == stats.rounds == len(tokens)  # type: ignore[attr-defined]
    probes = len(tokens) // PROBE_STRIDE
    assert forwards[0] == probes
    # Each probe scores the stride's tokens once its reply came; a probe of the last round
    # (which ends the session before anything is committed) scores none.
    scored = probes - (len(tokens) % PROBE_STRIDE == 0)
    assert len(observed) == scored * PROBE_STRIDE
    # The scores in arrears are the draft's own next-token guesses, the target's greedy
    # tokens; each probe's last score is its best node, which may be a lookup candidate.
    in_arrears = [hit for i, hit in enumerate(observed) if i % PROBE_STRIDE != PROBE_STRIDE - 1]
    assert all(in_arrears)
