"""Shared fixtures (the helpers they use live in tests/support)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from specedge.model.loader import LoadedModel
from tests.support.models import bundled_model

# The tests run many small forwards, on machines whose few cores are shared with other test
# processes: intra-op threads then only add synchronisation (measured 4x slower with 2 threads
# under load). One thread keeps the suite fast and its timing predictable.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Servers cache their cost profile (`server.cost_profile`) here, not in the user's home."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPECEDGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def smollm2() -> Iterator[LoadedModel]:
    """The bundled SmolLM2-135M-Instruct in fp32 (the first load converts the GGUF, ~30 s)."""
    yield bundled_model()
