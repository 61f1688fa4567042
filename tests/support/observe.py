"""Observing a running server or edge from a test: HTTP GETs, /health, /metrics samples, and
waiting for a condition."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def health(port: int) -> dict[str, Any]:
    return dict(json.loads(http_get(port, "/health")[1]))


def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample from /metrics: with `labels` the sample with exactly those,
    else the unlabelled one (0 when absent)."""
    for family in text_string_to_metric_families(http_get(port, "/metrics")[1]):
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return float(sample.value)
    return 0.0


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


async def async_wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
