"""A real `specedge serve` process on loopback (the tests that kill, drain or restart it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from tests.support.observe import wait_for

API = re.compile(r"OpenAI API on (http://[\d.]+:\d+)/v1")
READY = re.compile(r"serving \S+ on [\d.]+:(\d+)")
METRICS = re.compile(r"metrics on http://[\d.]+:(\d+)/metrics")
MAX_CONTEXT = 512


class Serve:
    """A `specedge serve` process with its HTTP API on; its stderr is collected in a thread
    (`log`). `port` 0 takes a free one; a given port lets a test restart a server where its
    edges expect it."""

    def __init__(self, model_dir: Path, *flags: str, port: int = 0) -> None:
        specedge = Path(sys.executable).with_name("specedge")
        if "--max-context" not in flags:  # given twice, the CLI keeps the first
            flags = ("--max-context", str(MAX_CONTEXT), *flags)
        self.process = subprocess.Popen(
            [str(specedge), "serve", "--model", str(model_dir), "--dtype", "float32",
             "--device", "cpu", "--port", str(port), "--metrics-port", "0", "--api-port", "0",
             "--max-sessions", "2", *flags],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: API.search(self.log) is not None or self.process.poll() is not None, 60)
        api = API.search(self.log)
        assert api is not None, "the server did not become ready:\n" + self.log
        self.api_url = api.group(1)
        self.port = int(_found(READY, self.log))
        self.metrics_port = int(_found(METRICS, self.log))

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def exit_code(self) -> int:
        code = self.process.wait(timeout=30)
        self._reader.join(timeout=5)
        return code

    def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def _found(pattern: re.Pattern[str], text: str) -> str:
    match = pattern.search(text)
    assert match is not None, text
    return match.group(1)
