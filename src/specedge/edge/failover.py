"""Failover: the edge's servers as one pool, and the retries that move a session between them.

A *pool* is the replicas of the listed servers (`--server A,B,...`, host names resolved to
their addresses: `edge.replicas`), each behind its own `ServerConnection`, polled in the
background for health and load. A new session opens on the best-placed replica
(`replicas.placement_order`), and when that fails on the next ones in turn. A *failover* is
a session re-opened after its stream broke (a crash, a restart, a partition, a draining
server): the edge sends the prompt plus every token emitted so far as the new prompt, with
the token allowance reduced by as many, so the new server continues where the old one
stopped; it tries the other replicas first and the broken one last (it may be restarting).
Tries are bounded by a deadline (`--failover-timeout`); between them the pool backs off
exponentially, with jitter, so edges do not storm a server that comes back.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from specedge.edge.client import (
    RemoteSession,
    ServerConnection,
    ServerIncompatibleError,
    ServerUnavailableError,
)
from specedge.edge.metrics import EdgeMetrics
from specedge.edge.replicas import (
    Replica,
    ReplicaHealth,
    ReplicaPolicy,
    ServerTarget,
    placement_order,
    resolve,
)
from specedge.rpc.codec import OpenSession, ServerInfo

logger = logging.getLogger(__name__)
# A replica's connection, made for its address (a resolved one of a host name's, or the target
# itself) and the target it came from.
ConnectionFactory = Callable[[str, ServerTarget], ServerConnection]
Resolver = Callable[[ServerTarget], Awaitable[list[str]]]


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
    """The replicas of the listed servers, with the connection interface the edge uses
    (`connect`, `wait_ready`, `open_session`, `close`), load-aware placement of new sessions
    and failover across replicas. The background polls (and re-resolution of host names)
    start with the first call that needs a server and stop at `close`."""

    def __init__(
        self,
        targets: Sequence[ServerTarget],
        connect: ConnectionFactory,
        policy: FailoverPolicy | None = None,
        *,
        replica_policy: ReplicaPolicy | None = None,
        metrics: EdgeMetrics | None = None,
        resolver: Resolver = resolve,
        rng: random.Random | None = None,
    ) -> None:
        assert targets, "a pool needs at least one server"
        self.targets = list(targets)
        self.policy = policy or FailoverPolicy()
        self.replica_policy = replica_policy or ReplicaPolicy()
        self.metrics = metrics or EdgeMetrics()
        self._connect = connect
        self._resolver = resolver
        self._rng = rng or random.Random()
        self.replicas: list[Replica] = []  # live ones, in the order of their targets
        self._retired: list[Replica] = []  # gone from DNS, closed at `close`
        self._turn = 0  # placements so far: replicas alike take turns
        self._started: asyncio.Task[None] | None = None
        self._tasks: dict[Replica | None, asyncio.Task[None]] = {}  # polls; None: resolution
        for target in self.targets:
            if not target.is_name and target.address() not in self._addresses():
                self._add(target.address(), target)

    @property
    def address(self) -> str:
        return ",".join(str(target) for target in self.targets)

    @property
    def connected(self) -> bool:
        return any(replica.connection.connected for replica in self.replicas)

    def describe(self) -> list[dict[str, Any]]:
        """Each live replica's state, for `/health`."""
        return [
            {
                "address": replica.address,
                "health": replica.health.value,
                "active_sessions": replica.load.active_sessions if replica.load else None,
                "busy_fraction": replica.load.busy_fraction if replica.load else None,
            }
            for replica in self.replicas
        ]

    async def connect(self) -> ServerInfo:
        """The best-placed replica's info, or the next one's that answers."""
        await self._start()
        error: ServerUnavailableError | None = None
        for replica in await self._order():
            try:
                return await replica.connection.connect()
            except ServerUnavailableError as failure:
                error = failure
        if error is None:
            raise ServerUnavailableError(f"no address found for the servers {self.address}")
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
        """Open `request` on the best-placed replica, else on the next ones in turn, backing
        off between tries, until one takes it or `deadline` (loop time; default the failover
        timeout from now) passes: then ServerUnavailableError. A failover (`after_failure_of`,
        the address whose stream broke) tries that replica last and waits for the server's
        answer to the Open, so that a refusal (a draining server) moves on too; a first open
        returns at once, the answer awaited with the first round."""
        await self._start()
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self.policy.timeout_s
        broken = None
        if after_failure_of is not None:
            broken = next((r for r in self.replicas if r.address == after_failure_of), None)
            self.metrics.failed_over(broken)
            if broken is not None:
                broken.health = ReplicaHealth.UNREACHABLE  # until its next poll says otherwise
        order = await self._order(last=broken)
        attempt = 0
        while True:
            if attempt and attempt % max(len(order), 1) == 0:  # a full pass: ask again
                order = await self._order(last=broken)
            replica = order[attempt % len(order)] if order else None
            if replica is not None:
                self._claim(replica, +1)  # now: concurrent opens see it before it answers
            try:
                if replica is None:
                    raise ServerUnavailableError(f"no address found for {self.address}")
                session = await replica.connection.open_session(request)
                if after_failure_of is not None:
                    await self._confirm(session)
            except BaseException as failure:
                if replica is not None:
                    self._claim(replica, -1)
                if not isinstance(failure, ServerUnavailableError):
                    raise
                if replica is not None and not isinstance(failure, ServerIncompatibleError):
                    replica.health = ReplicaHealth.UNREACHABLE
                attempt += 1
                wait = self.policy.backoff(attempt, self._rng)
                if loop.time() + wait >= deadline:
                    raise ServerUnavailableError(
                        f"no verification server took the session within the failover "
                        f"timeout of {self.policy.timeout_s:g} s (--failover-timeout); "
                        f"last: {failure}"
                    ) from None
                where = replica.address if replica is not None else self.address
                logger.info("server %s: %s; trying again", where, failure)
                await asyncio.sleep(wait)
                continue
            assert replica is not None
            self.metrics.replica_opened(replica)
            return session

    async def _order(self, last: Replica | None = None) -> list[Replica]:
        """Where to try a session now: the placement order, with `last` (a broken session's
        replica) moved to the end. With no replica (a name that did not resolve), the names
        are resolved again first."""
        if not self.replicas:
            await self._resolve_names()
        order = placement_order(self.replicas, self._turn)
        if last is not None and last in order:
            order.remove(last)
            order.append(last)
        return order

    def _claim(self, replica: Replica, sessions: int) -> None:
        """Count (+1) or uncount (-1) a session being opened on `replica`, in its score and
        in the turns that replicas alike take."""
        replica.opened += sessions
        self._turn += sessions

    @staticmethod
    async def _confirm(session: RemoteSession) -> None:
        """Await the server's answer to the Open; a caller gone meanwhile frees the session."""
        try:
            await session.opened()
        except asyncio.CancelledError:
            session.cancel()
            raise

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        if self._started is not None:
            tasks.append(self._started)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        replicas = [*self.replicas, *self._retired]
        await asyncio.gather(*(replica.connection.close() for replica in replicas))

    # ---- replicas ------------------------------------------------------------------------
    async def _start(self) -> None:
        """Resolve the host names (once; later in the background) and start the polls."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._first_start())
        await asyncio.shield(self._started)

    async def _first_start(self) -> None:
        await self._resolve_names()
        for replica in self.replicas:
            self._watch(replica)
        if any(target.is_name for target in self.targets):
            self._tasks[None] = asyncio.get_running_loop().create_task(self._keep_resolving())

    def _addresses(self) -> set[str]:
        return {replica.address for replica in self.replicas}

    def _add(self, address: str, target: ServerTarget) -> Replica:
        replica = Replica(self._connect(address, target), target)
        self.replicas.append(replica)
        self.metrics.replica_polled(replica)
        return replica

    def _watch(self, replica: Replica) -> None:
        self._tasks[replica] = asyncio.get_running_loop().create_task(self._keep_polling(replica))

    async def _keep_polling(self, replica: Replica) -> None:
        while True:
            try:
                await self._poll(replica)
            except Exception:  # a bug must not stop the polls, nor go unnoticed
                logger.exception("the poll of replica %s failed", replica.address)
            await asyncio.sleep(self.replica_policy.poll_interval_s)

    async def _poll(self, replica: Replica) -> None:
        """Ask `replica` for its health and load; log a change of health."""
        opened = replica.opened
        before = replica.health
        try:
            status = await replica.connection.poll(self.replica_policy.poll_timeout_s)
        except ServerIncompatibleError:
            replica.health, replica.load = ReplicaHealth.INCOMPATIBLE, None
        except ServerUnavailableError:
            replica.health, replica.load = ReplicaHealth.UNREACHABLE, None
        else:
            serving = ReplicaHealth.SERVING if status.serving else ReplicaHealth.NOT_SERVING
            replica.health, replica.load, replica.counted = serving, status.load, opened
        if replica.health != before and before != ReplicaHealth.UNKNOWN:
            logger.info("replica %s: %s -> %s", replica.address, before.value, replica.health.value)
        self.metrics.replica_polled(replica)

    async def _keep_resolving(self) -> None:
        while True:
            await asyncio.sleep(self.replica_policy.resolve_interval_s)
            await self._resolve_names()

    async def _resolve_names(self) -> None:
        """Bring the replicas of each host name in line with what it resolves to now; a name
        that does not resolve keeps the replicas it had."""
        self._retired = [r for r in self._retired if not r.connection.closed]
        for target in self.targets:
            if not target.is_name:
                continue
            try:
                addresses = await self._resolver(target)
            except (OSError, UnicodeError) as error:  # UnicodeError: a label IDNA refuses
                kept = sum(replica.target == target for replica in self.replicas)
                logger.warning("cannot resolve %s (%s); keeping its %d replicas",
                               target, error, kept)  # fmt: skip
                continue
            known = self._addresses()
            for address in addresses:
                if address not in known:
                    replica = self._add(address, target)
                    if self._started is not None and self._started.done():
                        self._watch(replica)
                    logger.info("replica %s of %s added", address, target)
            for replica in [r for r in self.replicas if r.target == target]:
                if replica.address not in addresses:
                    self._retire(replica)

    def _retire(self, replica: Replica) -> None:
        """`replica` left its name's addresses: no new sessions; its link closes once its
        sessions end (a session there that breaks moves as any other)."""
        logger.info("replica %s of %s retired", replica.address, replica.target)
        replica.retired = True
        self.replicas.remove(replica)
        self._retired.append(replica)
        task = self._tasks.pop(replica, None)
        if task is not None:
            task.cancel()
        replica.connection.retire()
        self.metrics.replica_retired(replica)
