"""An asyncio event loop on a daemon thread: how `BackgroundServer` and `BackgroundEdge` run a
server or an edge inside another program (tests, in-process demos, benchmarks)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """`start(coro)` starts the loop and waits for `coro` (closing the loop if it raises);
    `run(coro)` waits for another coroutine on it; `close()` stops and joins it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self, coro: Coroutine[Any, Any, T]) -> T:
        self._thread.start()
        try:
            return self.run(coro)
        except BaseException:
            self.close()
            raise

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self, timeout: float = 10.0) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=timeout)
        self._loop.close()
