"""Processes of a benchmark (and of `specedge demo`): `specedge` subprocesses pinned to CPU
cores, their health checks, and the server's Prometheus counters.

Placement is explicit: the server gets its own core(s) and the edges, the clients and the
delaying proxies (this process) share the rest; every process runs torch with one thread, so
a process never spreads over another role's core. A subprocess is pinned by a two-line Python
launcher that sets its affinity and execs the command (no `taskset` needed). The demo starts
the same processes unpinned and with torch's own thread count (`single_thread=False`).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from specedge.errors import SpecEdgeError

STOP_TIMEOUT_S = 10.0
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_PIN_AND_EXEC = (
    "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


class BenchProcessError(SpecEdgeError):
    """A benchmark subprocess failed to start or died (the message points at its log)."""


@dataclass(frozen=True)
class Placement:
    """Which cores each role may use; None: no pinning (too few cores to separate roles)."""

    server_cpus: frozenset[int] | None
    edge_cpus: frozenset[int] | None  # edges, clients, proxies and this process

    @classmethod
    def plan(cls, server_cpus: Sequence[int] = (), edge_cpus: Sequence[int] = ()) -> Placement:
        """The given cores, or by default: the first available core for the server and the
        others for everything else. With one core nothing is pinned (and the report says so)."""
        available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if server_cpus or edge_cpus:
            unknown = sorted((set(server_cpus) | set(edge_cpus)) - set(available))
            if unknown:
                raise SpecEdgeError(f"cores {unknown} are not available (have {available})")
            return cls(frozenset(server_cpus) or None, frozenset(edge_cpus) or None)
        if len(available) < 2:
            return cls(None, None)
        return cls(frozenset(available[:1]), frozenset(available[1:]))

    def describe(self) -> list[str]:
        if self.server_cpus is None and self.edge_cpus is None:
            return [
                "no pinning: fewer than two cores available, so the server, the edges and the "
                "clients share the CPU (server throughput and latency are entangled)"
            ]
        return [
            f"server (`specedge serve`, target model; server-side drafting for server-spec; "
            f"vLLM; hf-assisted): cores {_cores(self.server_cpus)}",
            f"edges (`specedge edge`, draft model), benchmark clients and WAN proxies: cores "
            f"{_cores(self.edge_cpus)}",
            "every process runs torch with 1 thread (OMP_NUM_THREADS=1)",
        ]

    def pin_this_process(self) -> None:
        """Move this process (its current thread, and threads started afterwards) to the
        edge cores."""
        if self.edge_cpus is not None:
            os.sched_setaffinity(0, self.edge_cpus)


def _cores(cpus: frozenset[int] | None) -> str:
    return "any" if cpus is None else ",".join(map(str, sorted(cpus)))


_HANDED_OUT: set[int] = set()  # ports given to processes that may not have bound them yet


def free_port() -> int:
    """A free loopback port, never one this process handed out before: the OS may offer a
    port again until the process it was meant for binds it (two processes of one deployment
    then collide)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def specedge_args(*args: str) -> list[str]:
    """Arguments of `python` that run the `specedge` command line."""
    return ["-m", "specedge.cli", *args]


class ManagedProcess:
    """A subprocess of `python` (default: this one) with a log file, pinned to `cpus` (None:
    not pinned), running torch with one thread unless `single_thread` is False, with `env` added
    to this process's environment, stopped by `stop()` (or `managed`)."""

    def __init__(
        self,
        name: str,
        python_args: list[str],
        log_path: Path,
        cpus: frozenset[int] | None,
        *,
        single_thread: bool = True,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if cpus is None:
            command = [python, *python_args]
        else:
            command = [python, "-c", _PIN_AND_EXEC, _cores(cpus), *python_args]
        self.command = command
        threads = SINGLE_THREAD_ENV if single_thread else {}
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **threads, **(env or {})},
            )

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchProcessError(
                f"the {self.name} exited with status {self.process.returncode}; "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_healthy(self, url: str, timeout_s: float) -> None:
        """Poll `url` until it answers 200; fail early if the process dies."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            time.sleep(0.25)
        raise BenchProcessError(
            f"the {self.name} did not answer {url} within {timeout_s:.0f} s; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def managed(
    processes: list[ManagedProcess], failure_logs: TextIO | None = None
) -> Iterator[list[ManagedProcess]]:
    """Stop every process in the list on exit (the list may grow inside the block). If the block
    fails, the last lines of every process's log go to `failure_logs` first, unless the error is
    a `BenchProcessError` (its message carries the log of the process that failed)."""
    try:
        yield processes
    except Exception as error:
        if failure_logs is not None and not isinstance(error, BenchProcessError):
            for process in reversed(processes):
                failure_logs.write(f"--- {process.name} log (last lines) ---\n")
                failure_logs.write(process.log_tail() + "\n")
        raise
    finally:
        for process in reversed(processes):
            process.stop()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def scrape_metrics(metrics_url: str) -> str | None:
    """A Prometheus text endpoint's page; None when it does not answer."""
    try:
        return httpx.get(metrics_url, timeout=5.0).text
    except httpx.HTTPError:
        return None


def scrape_counter(metrics_url: str, name: str) -> float | None:
    """Sum of the samples of `name` (all label sets) on a Prometheus text endpoint; None when
    the endpoint does not answer or does not export it."""
    text = scrape_metrics(metrics_url)
    return None if text is None else parse_counter(text, name)


def parse_counter(text: str, name: str) -> float | None:
    values = [
        float(match.group(3))
        for line in text.splitlines()
        if (match := _SAMPLE.match(line)) and match.group(1) == name
    ]
    return sum(values) if values else None
