"""Replicas: the verification servers one edge spreads its sessions over, and which one a new
session goes to.

A *target* is one entry of `--server`: `HOST:PORT`, or `dns:///HOST:PORT` (gRPC's spelling of
the same). An IP address is one replica; a host name is every address it resolves to, resolved
at start-up and again every `--resolve-interval` seconds: an address that appears becomes a
replica, one that disappears is *retired* (no new sessions; its sessions end where they run).
A name with addresses of both families keeps one family, IPv4 when it has any: a dual-stack
host is one server, not two.

A *replica* is one resolved address behind its own `ServerConnection` (one channel, with
keepalive). The pool (`edge.failover.ServerPool`) polls each one every
`--load-poll-interval` seconds for its *health* (the standard gRPC health service) and its
*load* (the Load call: active sessions, queued rounds and recent busy fraction, out of its
session slots). A replica's *score* is the load a new session would join: its busy fraction
plus its sessions and queued rounds per slot, counting the sessions this edge opened there
since the poll was sent, so that a burst does not all land on the replica that looked idle.
New sessions go to the serving replica with the lowest score (equal ones in turn). A replica
that did not answer its poll, and after it one that is NOT_SERVING (loading, draining,
degraded), come after every serving one: they get a new session only when no serving replica
takes it. A session stays on its replica until its stream breaks (then `edge.failover`).
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from specedge.config_file import MAX_PORT

if TYPE_CHECKING:  # at run time neither: the edge's config parses targets without grpc or torch
    from specedge.edge.client import ServerConnection
    from specedge.rpc.codec import ServerLoad

DNS_SCHEME = "dns:"


@dataclass(frozen=True)
class ReplicaPolicy:
    """How often the pool asks its replicas how they are, and re-resolves host names."""

    poll_interval_s: float = 1.0
    poll_timeout_s: float = 2.0
    resolve_interval_s: float = 30.0


class ReplicaHealth(enum.StrEnum):
    UNKNOWN = "unknown"  # not polled yet
    SERVING = "serving"
    NOT_SERVING = "not_serving"  # its health service says so: loading, draining, degraded
    UNREACHABLE = "unreachable"  # the latest poll (or session) could not reach it
    INCOMPATIBLE = "incompatible"  # its handshake fails (`client.ServerIncompatibleError`)


# Order of preference for new sessions (lower first); the score orders within a rank.
HEALTH_RANK = {
    ReplicaHealth.UNKNOWN: 0,
    ReplicaHealth.SERVING: 0,
    ReplicaHealth.UNREACHABLE: 1,
    ReplicaHealth.NOT_SERVING: 2,
    ReplicaHealth.INCOMPATIBLE: 3,
}


@dataclass(frozen=True)
class ServerTarget:
    """One `--server` entry: a host (an IP address or a name) and a port."""

    host: str  # an IPv6 address without its brackets
    port: int

    @classmethod
    def parse(cls, text: str) -> ServerTarget:
        """`HOST:PORT`, `[IPV6]:PORT` or `dns:///HOST:PORT`; ValueError saying what is wrong."""
        spec = text.strip()
        if spec.startswith(DNS_SCHEME):
            spec = spec[len(DNS_SCHEME) :]
            if spec.startswith("//"):
                authority, _, spec = spec[2:].partition("/")
                if authority:
                    raise ValueError(
                        f"{text!r} names a DNS server ({authority}); the edge uses the system's "
                        "resolver: write dns:///HOST:PORT"
                    )
        host, _, port = spec.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
        if not host or not port.isdigit() or not 0 < int(port) <= MAX_PORT:
            raise ValueError(f"{text!r} is not HOST:PORT (a port in 1..{MAX_PORT})")
        return cls(host, int(port))

    @property
    def is_name(self) -> bool:
        """A host name (resolved to its replicas), not an IP address (one replica)."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return True
        return False

    def address(self, host: str | None = None) -> str:
        """`HOST:PORT` of `host` (default: the target's own) at the target's port."""
        host = self.host if host is None else host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.address()


async def resolve(target: ServerTarget) -> list[str]:
    """The replica addresses of `target`, sorted: itself for an IP address, else what the
    system's resolver gives for the name (one family, IPv4 when there is any). OSError
    (`socket.gaierror`) when the name does not resolve."""
    if not target.is_name:
        return [target.address()]
    found = await asyncio.get_running_loop().getaddrinfo(
        target.host, target.port, type=socket.SOCK_STREAM
    )
    by_family: dict[int, set[str]] = {socket.AF_INET: set(), socket.AF_INET6: set()}
    for family, _, _, _, sockaddr in found:
        if family in by_family:
            by_family[family].add(str(sockaddr[0]))
    hosts = by_family[socket.AF_INET] or by_family[socket.AF_INET6]
    if not hosts:
        raise socket.gaierror(f"{target.host} resolves to no IPv4 or IPv6 address")
    return sorted(target.address(host) for host in hosts)


@dataclass(eq=False)
class Replica:
    """One resolved address of a target, behind its own connection, as last polled."""

    connection: ServerConnection
    target: ServerTarget
    health: ReplicaHealth = ReplicaHealth.UNKNOWN
    load: ServerLoad | None = None  # the latest report (None: none yet, or none available)
    opened: int = 0  # sessions this edge opened here
    counted: int = 0  # of those, the ones opened before the latest reported poll was sent
    retired: bool = False  # gone from the name's addresses: no new sessions

    @property
    def address(self) -> str:
        return self.connection.address

    def score(self) -> float:
        """The load a new session would join (see the module docstring); lower is better.
        Without a report, each session this edge opened here counts as a full slot, so that
        replicas without reports take new sessions in turn."""
        pending = max(self.opened - self.counted, 0)
        load = self.load
        if load is None:
            return float(pending)
        work = load.active_sessions + load.queued_rounds + pending
        return load.busy_fraction + work / max(load.max_sessions, 1)


def placement_order(replicas: list[Replica], turn: int) -> list[Replica]:
    """The live replicas to try for a new session, best first: by health rank, then score;
    replicas alike in both take turns (`turn` counts the placements so far)."""
    live = [replica for replica in replicas if not replica.retired]
    if not live:
        return []
    rotated = [live[(turn + offset) % len(live)] for offset in range(len(live))]
    return sorted(rotated, key=lambda replica: (HEALTH_RANK[replica.health], replica.score()))
