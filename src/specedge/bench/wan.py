"""User-space WAN emulation: a TCP proxy that delays every byte by half the round-trip time.

The kernel here has no `netem`, so the demo and the benchmark put this proxy on the gRPC path
between edge and server. Each direction is a FIFO of chunks stamped with a due time
(arrival + rtt/2 + jitter); a chunk is forwarded at its due time, never before the chunk ahead
of it, so the byte stream keeps its order. The proxy also counts the bytes in each direction.

Faults, for the soak test: `partition()` cuts the link without closing it, as a network
partition looks to both ends (no byte crosses any more, new connections get no upstream), until
their own timeouts fire; `heal()` ends it and closes every connection that lived through it,
whose byte streams now have a gap (TCP would have given up on them); `drop_connections()`
closes every open connection at once, as a middlebox that resets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

READ_SIZE = 65536


@dataclass
class TrafficCounters:
    uplink_bytes: int = 0  # client -> upstream (edge -> server)
    downlink_bytes: int = 0  # upstream -> client
    connections: int = 0
    dropped_bytes: int = 0  # read during a partition and never forwarded


@dataclass(eq=False)
class _Connection:
    """One proxied connection; a `cut` one forwards nothing (a partition went through it)."""

    writers: list[asyncio.StreamWriter]
    cut: bool = False

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()


@dataclass
class DelayProxy:
    """Forward `listen_host:listen_port` to `upstream_host:upstream_port` with delay.

    Use `start()` / `stop()` to run it on a background thread (demo, benchmark), or await
    `serve()` inside an event loop. `listen_port=0` picks a free port (see `port` after start).
    """

    upstream_host: str
    upstream_port: int
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    seed: int = 0
    counters: TrafficCounters = field(default_factory=TrafficCounters)

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.jitter_ms < 0:
            raise ValueError("rtt_ms and jitter_ms must be >= 0")
        self._random = random.Random(self.seed)
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._connections: set[_Connection] = set()  # open ones, touched on the loop only
        self._partitioned = False
        self.port = self.listen_port

    # -- lifecycle -------------------------------------------------------------------------------
    async def serve(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.listen_host, self.listen_port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        logger.info(
            "delay proxy %s:%d -> %s:%d, rtt %.1f ms",
            self.listen_host,
            self.port,
            self.upstream_host,
            self.upstream_port,
            self.rtt_ms,
        )
        async with self._server:
            with contextlib.suppress(asyncio.CancelledError):
                await self._server.serve_forever()

    def start(self) -> DelayProxy:
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve()), daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("delay proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._server:
            self._loop.call_soon_threadsafe(self._server.close)
            for task in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(task.cancel)
        if self._thread:
            self._thread.join(timeout=5)

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    # -- faults (callable from any thread) -----------------------------------------------------
    @property
    def partitioned(self) -> bool:
        return self._partitioned

    def partition(self) -> None:
        """From now on no byte crosses any open connection, and new ones are held open with
        no upstream, until `heal()`."""
        self._on_loop(self._partition)

    def heal(self) -> None:
        """End the partition: close every connection that lived through it; new connections
        are forwarded again."""
        self._on_loop(self._heal)

    def drop_connections(self) -> None:
        """Close every open connection now (new ones are forwarded as usual)."""
        self._on_loop(self._drop)

    def _on_loop(self, action: Callable[[], None]) -> None:
        """Run `action` on the proxy's event loop and return once it has run."""
        assert self._loop is not None, "the proxy is not running"
        with contextlib.suppress(RuntimeError):  # no loop running in this thread
            if asyncio.get_running_loop() is self._loop:
                action()
                return
        done = threading.Event()

        def run() -> None:
            try:
                action()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(timeout=10):
            raise RuntimeError("delay proxy did not answer")

    def _partition(self) -> None:
        self._partitioned = True
        for connection in self._connections:
            connection.cut = True
        logger.info("delay proxy %s: partitioned", self.address)

    def _heal(self) -> None:
        self._partitioned = False
        self._drop(only_cut=True)
        logger.info("delay proxy %s: healed", self.address)

    def _drop(self, only_cut: bool = False) -> None:
        for connection in list(self._connections):
            if connection.cut or not only_cut:
                connection.cut = True
                connection.abort()

    # -- forwarding ------------------------------------------------------------------------------
    def _one_way_delay_s(self) -> float:
        jitter = self._random.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        return max(0.0, self.rtt_ms / 2 + jitter / 2) / 1000.0

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        self.counters.connections += 1
        connection = _Connection([client_writer], cut=self._partitioned)
        self._connections.add(connection)
        try:
            if connection.cut:  # no upstream across a partition: read and drop until healed
                await self._pump(client_reader, client_writer, uplink=True, connection=connection)
                return
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError as error:
                logger.warning("delay proxy: upstream unreachable: %s", error)
                return
            connection.writers.append(upstream_writer)
            pumps = [
                asyncio.create_task(
                    self._pump(client_reader, upstream_writer, uplink=True, connection=connection)
                ),
                asyncio.create_task(
                    self._pump(upstream_reader, client_writer, uplink=False, connection=connection)
                ),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in pumps:
                    task.cancel()
        finally:
            self._connections.discard(connection)
            for writer in connection.writers:
                writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        uplink: bool,
        connection: _Connection,
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer))
        last_due = 0.0
        try:
            while True:
                try:
                    chunk = await reader.read(READ_SIZE)
                except ConnectionError:  # aborted by a fault
                    chunk = b""
                if not chunk:
                    break
                if connection.cut:
                    self.counters.dropped_bytes += len(chunk)
                    continue
                if uplink:
                    self.counters.uplink_bytes += len(chunk)
                else:
                    self.counters.downlink_bytes += len(chunk)
                last_due = max(last_due, time.monotonic() + self._one_way_delay_s())
                queue.put_nowait((last_due, chunk))
            queue.put_nowait((last_due, b""))
            await sender
        finally:
            sender.cancel()

    @staticmethod
    async def _send(
        queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter
    ) -> None:
        while True:
            due, chunk = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if writer.is_closing():  # the other side went away, or a fault aborted it
                return
            if not chunk:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(chunk)
            try:
                await writer.drain()
            except ConnectionError:
                return
