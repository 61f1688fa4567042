"""When the server should decode an edge's session itself (DESIGN.md section 12, "no round trip
when speculation does not pay").

A session that speculates pays a round trip per round: its tree comes back only after the
reply crossed the WAN and the edge drafted again, so it misses batches. Decoding it on the
server instead puts it in every batch with no round trip, one token per batch. `StreamPolicy`
watches a session's rounds and says stream when

- its trees were cut to nothing `CUT_STREAK` rounds running (the selection says they never
  pay), or
- over its recent rounds it emitted fewer tokens per round than the rounds' duration is worth
  in server-side steps: tokens per round < seconds per round / seconds per streamed step.

A streamed step is the batch the session would be in with one row instead of its tree
(`GoodputBatching.stream_step_seconds`): the recent batches' modelled time less its tree's
rows. Comparing with the recent batch itself would charge streaming for the trees it
replaces: at one client a 9-row tree batch takes 22 ms where a decoding step takes 16, and a
session whose trees gave 2.7 tokens per 53 ms round (20 ms a token, 15 streamed) kept
speculating.

The second ratio is also what the edge's trees must promise to win the session back: the edge
scores its draft against the streamed tokens and sends Resume above it.

A streamed step need not be one token. With an edge that takes runs of tokens per streamed
reply (`Open.accepts_token_runs`), each step verifies the session's *context lookup chain*
(`StreamLookup`: the tokens that followed an earlier occurrence of the context's last tokens,
`core.lookup`) with estimates from the session's own lookup record, and the goodput selection
keeps of it what pays, like any tree: nothing on prose, several tokens a step where the answer
copies its prompt (summaries, extraction, code edits) or repeats itself. No draft model and no
round trip; the target verifies every token, so the output is still exactly the target's.

A session's own record is short (a request of a hundred tokens) and a node the target rejects
costs what an accepted one does, so a session does not start from a guess: its estimates start
from the record of every streamed session of the server at the same temperature regime
(`pooled`, worth POOLED_WEIGHT tries), which its own record then overrides. With a flat prior
of 1/2 every new session verified chains before it knew whether its context copies, where at
batch 8 a row must come true about one time in three to pay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from specedge.core.lookup import LookupStats, TokenPositions, lookup_chain
from specedge.core.tree import DraftTree
from specedge.rpc.codec import TreeVerified, VerifyTree

CUT_STREAK = 3  # rounds cut to nothing in a row
MIN_ROUNDS = 8  # rounds of speculation observed before the rate rule applies
SMOOTHING = 0.2  # weight of the newest round in the moving averages
MARGIN = 1.1  # stream only when server-side decoding wins by this factor
POOLED_WEIGHT = 4.0  # tries the server-wide lookup record counts for in a session's estimate


@dataclass
class StreamPolicy:
    cut_streak: int = 0
    rounds: int = 0  # rounds since the session (re)started speculating
    tokens_per_round: float = 0.0
    round_seconds: float = 0.0
    rows_per_round: float = 1.0  # the root plus the nodes verified, smoothed
    _last_reply: float | None = None

    def observe(self, tree: VerifyTree | None, reply: TreeVerified, now: float) -> None:
        """One speculative round: its tree, the reply, when the reply went out."""
        sent = len(tree.tokens) if tree is not None else 0
        self.cut_streak = self.cut_streak + 1 if sent and reply.num_verified == 0 else 0
        emitted = len(reply.emitted_token_ids)
        rows = 1 + reply.num_verified
        if self._last_reply is not None:
            seconds = now - self._last_reply
            if self.rounds == 0:
                self.tokens_per_round, self.round_seconds = emitted, seconds
                self.rows_per_round = rows
            else:
                self.tokens_per_round += SMOOTHING * (emitted - self.tokens_per_round)
                self.round_seconds += SMOOTHING * (seconds - self.round_seconds)
                self.rows_per_round += SMOOTHING * (rows - self.rows_per_round)
            self.rounds += 1
        self._last_reply = now

    def resume_threshold(self, step_seconds: float) -> float:
        """Tokens per round speculation must reach to beat server-side decoding, whose steps
        take `step_seconds` (a streamed step's modelled time)."""
        if step_seconds <= 0.0 or self.rounds == 0:
            return 1.0
        return max(1.0, self.round_seconds / step_seconds)

    def should_stream(self, step_seconds: float) -> bool:
        if self.cut_streak >= CUT_STREAK:
            return True
        if self.rounds < MIN_ROUNDS or step_seconds <= 0.0:
            return False
        return MARGIN * self.tokens_per_round < self.resume_threshold(step_seconds)

    def resumed(self, now: float) -> None:
        """The edge took the session back: judge its trees afresh."""
        self.cut_streak = 0
        self.rounds = 0
        self._last_reply = now


@dataclass
class StreamLookup:
    """A streamed session's lookup chains: `tree` proposes the next step's chain (with each
    node's estimate that the target accepts the path to it), `record` learns from what the
    step emitted. At most `length` tokens, within `max_depth`. `pooled`: the record the
    server's sessions share, the prior of this one's estimates (None: a prior of 1/2)."""

    length: int
    max_depth: int
    pooled: LookupStats | None = None
    stats: LookupStats = field(default_factory=LookupStats)
    index: TokenPositions = field(default_factory=TokenPositions)
    _chain: tuple[list[int], int] = ([], 0)  # the chain proposed last and its matched n-gram
    tokens_per_step: float = 1.0  # tokens a streamed step emitted, smoothed

    def tree(self, context: list[int], room: int) -> tuple[DraftTree, tuple[float, ...]]:
        """The chain after `context` (the session's, grown since the last call; at most
        `room` nodes) and its estimates, best-first."""
        length = min(self.length, self.max_depth, room)
        ends = self.index.ends(context)
        chain, ngram = lookup_chain(context, length, ends=ends) if length > 0 else ([], 0)
        self._chain = (chain, ngram)
        if not chain:
            return DraftTree(), ()
        p = self.token_estimate(ngram)
        estimates = tuple(p ** (i + 1) for i in range(len(chain)))
        return DraftTree(tuple(chain), tuple(range(-1, len(chain) - 1))), estimates

    def token_estimate(self, ngram: int) -> float:
        """That a chain token after a suffix match of `ngram` tokens is right, given its parent
        is: the session's record on top of the pooled one's."""
        if self.pooled is None:
            return math.exp(self.stats.log_p(ngram))
        prior = math.exp(self.pooled.log_p(ngram))
        hits, tries = self.stats.hits.get(ngram, 0.0), self.stats.tries.get(ngram, 0.0)
        return (hits + POOLED_WEIGHT * prior) / (tries + POOLED_WEIGHT)

    def record(self, emitted: list[int]) -> None:
        """The step emitted `emitted` after the chain `tree` proposed."""
        self.stats.record(*self._chain, emitted)
        if self.pooled is not None:
            self.pooled.record(*self._chain, emitted)
        self._chain = ([], 0)
        self.tokens_per_step += SMOOTHING * (len(emitted) - self.tokens_per_step)
