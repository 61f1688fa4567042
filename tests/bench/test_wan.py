"""The delaying proxy adds the configured round-trip time and keeps the byte stream intact."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from specedge.bench.wan import DelayProxy


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        start = time.perf_counter()
        conn.sendall(payload)
        received = b""
        while len(received) < len(payload):
            received += conn.recv(65536)
        return received, time.perf_counter() - start


@pytest.mark.parametrize("rtt_ms", [0.0, 60.0])
def test_proxy_delays_by_rtt_and_preserves_bytes(rtt_ms: float) -> None:
    server, port = _echo_server()
    proxy = DelayProxy("127.0.0.1", port, rtt_ms=rtt_ms).start()
    try:
        payload = bytes(range(256)) * 4000  # ~1 MB, several chunks each way
        received, elapsed = _round_trip(proxy.port, payload)
        assert received == payload
        assert elapsed >= rtt_ms / 1000.0
        assert proxy.counters.uplink_bytes == len(payload)
        assert proxy.counters.downlink_bytes == len(payload)
    finally:
        proxy.stop()
        server.close()


def test_proxy_with_jitter_keeps_order() -> None:
    server, port = _echo_server()
    proxy = DelayProxy("127.0.0.1", port, rtt_ms=10.0, jitter_ms=8.0, seed=1).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
            sent = b""
            for i in range(50):
                piece = f"<{i}>".encode()
                conn.sendall(piece)
                sent += piece
            received = b""
            while len(received) < len(sent):
                received += conn.recv(65536)
        assert received == sent
    finally:
        proxy.stop()
        server.close()


def test_unreachable_upstream_closes_client() -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead_port = free.getsockname()[1]
    free.close()
    proxy = DelayProxy("127.0.0.1", dead_port).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
            conn.settimeout(5)
            assert conn.recv(10) == b""
    finally:
        proxy.stop()


def test_rejects_negative_delay() -> None:
    with pytest.raises(ValueError):
        DelayProxy("127.0.0.1", 1, rtt_ms=-1)


def _receives_nothing(conn: socket.socket, wait_s: float = 0.3) -> bool:
    conn.settimeout(wait_s)
    try:
        conn.recv(10)
    except TimeoutError:
        return True
    return False


def _closed(conn: socket.socket) -> bool:
    """The proxy closed (or reset) `conn`: a read ends at once."""
    conn.settimeout(5)
    try:
        return conn.recv(10) == b""
    except ConnectionResetError:
        return True


def test_partition_stops_every_byte_until_healed_then_closes_what_lived_through_it() -> None:
    server, port = _echo_server()
    proxy = DelayProxy("127.0.0.1", port).start()
    try:
        before = socket.create_connection(("127.0.0.1", proxy.port))
        assert _round_trip_on(before, b"ping") == b"ping"
        proxy.partition()
        assert proxy.partitioned
        before.sendall(b"lost")
        assert _receives_nothing(before)
        during = socket.create_connection(("127.0.0.1", proxy.port))  # accepted, no upstream
        during.sendall(b"lost too")
        assert _receives_nothing(during)
        assert proxy.counters.dropped_bytes == len(b"lost") + len(b"lost too")

        proxy.heal()
        assert not proxy.partitioned
        assert _closed(before) and _closed(during)  # their byte streams have a gap
        received, _ = _round_trip(proxy.port, b"after")
        assert received == b"after"
        before.close()
        during.close()
    finally:
        proxy.stop()
        server.close()


def test_drop_connections_closes_open_ones_and_keeps_forwarding_new_ones() -> None:
    server, port = _echo_server()
    proxy = DelayProxy("127.0.0.1", port, rtt_ms=10.0).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
            assert _round_trip_on(conn, b"ping") == b"ping"
            proxy.drop_connections()
            assert _closed(conn)
        received, _ = _round_trip(proxy.port, b"again")
        assert received == b"again"
    finally:
        proxy.stop()
        server.close()


def _round_trip_on(conn: socket.socket, payload: bytes) -> bytes:
    conn.settimeout(5)
    conn.sendall(payload)
    received = b""
    while len(received) < len(payload):
        received += conn.recv(65536)
    return received
