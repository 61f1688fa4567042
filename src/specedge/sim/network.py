"""The simulated WAN: a link between an edge (or a user) and a server, one FIFO per direction.

A message sent at t is delivered at t + rtt/2 + jitter/2 (jitter uniform in +-`jitter_s`, as
`bench.wan.DelayProxy` delays chunks), plus `rto_s` for each time it is lost (each try lost
with probability `loss`: a lost segment of a request-reply stream is resent after the
retransmission timeout), and never before the message sent ahead of it in the same direction
(one TCP connection keeps its byte order).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import simpy

UP = 0  # edge -> server
DOWN = 1  # server -> edge


@dataclass(frozen=True)
class LinkSpec:
    rtt_s: float
    jitter_s: float = 0.0
    loss: float = 0.0
    rto_s: float = 0.2

    def one_way(self, rng: random.Random) -> float:
        jitter = rng.uniform(-self.jitter_s, self.jitter_s) if self.jitter_s else 0.0
        delay = max(0.0, self.rtt_s / 2 + jitter / 2)
        while self.loss and rng.random() < self.loss:
            delay += self.rto_s
        return delay


class Link:
    def __init__(self, env: simpy.Environment, spec: LinkSpec, rng: random.Random) -> None:
        self.env = env
        self.spec = spec
        self.rng = rng
        self._last = [0.0, 0.0]  # latest delivery time per direction
        self.bytes = 0

    def send(self, direction: int, deliver: Callable[[], Any], size: int = 0) -> float:
        """Call `deliver()` when the message arrives; returns the delivery time."""
        due = max(self.env.now + self.spec.one_way(self.rng), self._last[direction])
        self._last[direction] = due
        self.bytes += size
        timer = self.env.timeout(due - self.env.now)
        timer.callbacks.append(lambda _: deliver())
        return due


# Bytes on the wire, modelled (protobuf + gRPC framing): a tree of n nodes sends a token id,
# a parent index and an estimate byte per node; a reply a token id per emitted token.
TREE_BYTES, TREE_NODE_BYTES = 24, 6
REPLY_BYTES, REPLY_TOKEN_BYTES = 20, 4
