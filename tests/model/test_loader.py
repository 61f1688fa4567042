"""Where models load (`loader.resolve_device`): `auto` picks CUDA exactly when torch sees a GPU
and says which it picked; a named device that is not there is refused before any weight moves."""

from __future__ import annotations

import logging

import pytest
import torch

from specedge.errors import ModelLoadError
from specedge.model.loader import AUTO_DEVICE, default_dtype, resolve_device


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")


def test_auto_is_the_cpu_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_gpus(monkeypatch, 0)
    with caplog.at_level(logging.INFO, logger="specedge.model.loader"):
        assert resolve_device(AUTO_DEVICE) == "cpu"
    assert "device auto: cpu" in caplog.text


def test_auto_is_cuda_with_a_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_gpus(monkeypatch, 1)
    with caplog.at_level(logging.INFO, logger="specedge.model.loader"):
        device = resolve_device(AUTO_DEVICE)
    assert device == "cuda"
    assert default_dtype(device) == torch.bfloat16
    assert "device auto: cuda (Fake GPU)" in caplog.text


def test_named_devices_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 2)
    assert [resolve_device(d) for d in ("cpu", "cuda", "cuda:1")] == ["cpu", "cuda", "cuda:1"]


def test_cuda_without_a_gpu_says_what_to_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 0)
    with pytest.raises(ModelLoadError, match=r"sees no CUDA GPU: use --device cpu \(or auto\)"):
        resolve_device("cuda")


def test_a_gpu_index_past_the_last_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(monkeypatch, 2)
    with pytest.raises(ModelLoadError, match="only 2 GPU"):
        resolve_device("cuda:2")
