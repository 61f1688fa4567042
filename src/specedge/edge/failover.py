"""Failover: the edge's servers as one pool, and the retries that move a session between them.

A *pool* is the listed servers (`--server A,B,...`), each behind its own `ServerConnection`.
A session opens on the *preferred* server (the last one that took a session), and when that
fails on the next listed ones in turn. A *failover* is a session re-opened after its stream
broke (a crash, a restart, a partition, a draining server): the edge sends the prompt plus
every token emitted so far as the new prompt, with the token allowance reduced by as many,
so the new server continues where the old one stopped. Tries are bounded by a deadline
(`--failover-timeout`); between them the pool backs off exponentially, with jitter, so
edges do not storm a server that comes back.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from specedge.edge.client import RemoteSession, ServerConnection, ServerUnavailableError
from specedge.rpc.codec import OpenSession, ServerInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailoverPolicy:
    """How long and how often to try the servers again after a failure."""

    timeout_s: float = 5.0  # from the first failure to giving up
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    jitter: float = 0.5  # each wait is scaled by a uniform factor in [1 - jitter, 1]

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before try `attempt` (0 is the first: no wait)."""
        if attempt == 0:
            return 0.0
        base = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        return base * rng.uniform(1.0 - self.jitter, 1.0)


class ServerPool:
    """The listed servers, with the connection interface the edge uses (`connect`,
    `wait_ready`, `open_session`, `close`) and failover across them."""

    def __init__(
        self,
        connections: Sequence[ServerConnection],
        policy: FailoverPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        assert connections, "a pool needs at least one server"
        self.connections = list(connections)
        self.policy = policy or FailoverPolicy()
        self._rng = rng or random.Random()
        self._preferred = 0  # index of the server that took the latest session

    @property
    def address(self) -> str:
        return ",".join(connection.address for connection in self.connections)

    @property
    def connected(self) -> bool:
        return any(connection.connected for connection in self.connections)

    async def connect(self) -> ServerInfo:
        """The preferred server's info, or the first other listed server's that answers."""
        error: ServerUnavailableError | None = None
        for index in self._order(self._preferred):
            try:
                return await self.connections[index].connect()
            except ServerUnavailableError as failure:
                error = failure
        assert error is not None
        raise error

    async def wait_ready(self, timeout_s: float) -> ServerInfo:
        """Retry `connect` until a server answers or `timeout_s` passes (start-up)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                return await self.connect()
            except ServerUnavailableError:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
                await asyncio.sleep(0.2)

    async def open_session(
        self,
        request: OpenSession,
        *,
        after_failure_of: str | None = None,
        deadline: float | None = None,
    ) -> RemoteSession:
        """Open `request` on the preferred server, else on the next ones in turn, backing off
        between tries, until one takes it or `deadline` (loop time; default the failover
        timeout from now) passes: then ServerUnavailableError. A failover (`after_failure_of`,
        the address whose stream broke) starts at the next server and waits for the server's
        answer to the Open, so that a refusal (a draining server) moves on too; a first open
        returns at once, the answer awaited with the first round."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.policy.timeout_s
        start = self._preferred
        if after_failure_of is not None:
            failed = [c.address for c in self.connections].index(after_failure_of)
            start = (failed + 1) % len(self.connections)
        attempt = 0
        while True:
            connection = self.connections[(start + attempt) % len(self.connections)]
            try:
                session = await connection.open_session(request)
                if after_failure_of is not None:
                    await self._confirm(session)
            except ServerUnavailableError as failure:
                attempt += 1
                wait = self.policy.backoff(attempt, self._rng)
                if loop.time() + wait >= deadline:
                    raise ServerUnavailableError(
                        f"no verification server took the session within the failover "
                        f"timeout of {self.policy.timeout_s:g} s (--failover-timeout); "
                        f"last: {failure}"
                    ) from None
                logger.info("server %s: %s; trying again", connection.address, failure)
                await asyncio.sleep(wait)
                continue
            self._preferred = self.connections.index(connection)
            return session

    @staticmethod
    async def _confirm(session: RemoteSession) -> None:
        """Await the server's answer to the Open; a caller gone meanwhile frees the session."""
        try:
            await session.opened()
        except asyncio.CancelledError:
            session.cancel()
            raise

    async def close(self) -> None:
        await asyncio.gather(*(connection.close() for connection in self.connections))

    def _order(self, start: int) -> list[int]:
        count = len(self.connections)
        return [(start + offset) % count for offset in range(count)]
