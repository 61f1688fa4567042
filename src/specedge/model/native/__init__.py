"""Native CPU kernels (`kernels.c`), compiled on first use: row attention (decode steps and
small trees), and for bf16 forwards RMSNorm and RoPE fused with the KV write.

Why native code: a decode step's attention is one query row per sequence against its whole
context, a pass over the KV memory that should run at memory bandwidth. torch has no CPU
kernel for it that reads a paged pool: its SDPA runs it at 4-5 GB/s on one core of this
project's machine (about a seventh of the core's bandwidth) and needs one call per sequence
and layer. The kernel here reads each sequence's keys and values once, in place, for all the
query heads of a group, all sequences in one call per layer: 4x faster at 300 and 1,500
positions (benchmarks/results/decode_attention.md). The same kernel takes the rows of small
trees and lookup chains, each with its mask over its own block, so that a batch of decode
steps with a few short trees among them stays one call per layer (through torch, each tree is
a dozen small kernels per layer: one 2-node chain in a batch of 8 cost a quarter of the
step). The libraries that ship such kernels (vLLM's, IPEX's) are built for particular torch
releases and would pin ours.

The other two take a decode step's small operations out of torch's dispatch: torch's CPU
rms_norm is half a dozen kernels (20 us a call for one 576-wide row), RoPE and the KV write
nine more per layer; each kernel here is one call doing the same roundings in the same order
(bit for bit the same, tests/model/test_native.py). A one-token step of the bundled target: 14.4
-> 13.6 ms on one core.

The source is compiled with the machine's C compiler (`$CC`, else `cc`) for the machine's own
CPU (`-march=native`, so AVX512-BF16 where the CPU has it, portable C elsewhere), once per
source, compiler and CPU, into the user cache folder. `load()` returns None where that fails
(no compiler, say), and the engine then keeps torch's kernels (`attention.resolve_attention`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
# -fassociative-math (with its prerequisites) lets the compiler vectorise the softmax's sums;
# the kernel's own reductions already run in a fixed vector order.
FLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-fassociative-math",
    "-DPREFETCH_ROWS=16",
    "-shared",
    "-fPIC",
)
DTYPES = (torch.bfloat16, torch.float32)
_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64
_ATTENTION: list[Any] = [_POINTER, _INT64, _POINTER, _POINTER, _INT64]
_ATTENTION += [_POINTER] * 6 + [_INT64] * 4 + [ctypes.c_float, _POINTER, _INT64, ctypes.c_int]
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {  # name: (argument types, result type)
    "row_attention_bf16": (_ATTENTION, ctypes.c_int),
    "row_attention_f32": (_ATTENTION, ctypes.c_int),
    "rms_norm_bf16": ([_POINTER] * 3 + [_INT64] * 2 + [ctypes.c_float], None),
    "rope_store_bf16": (
        [_POINTER, _INT64] * 2 + [_POINTER] * 3 + [_INT64] * 4 + [_POINTER] * 3 + [_INT64],
        None,
    ),
}


class NativeKernelError(RuntimeError):
    """The kernel refused a call (a shape it does not take, no scratch memory)."""


def _cpu_signature() -> str:
    """What `-march=native` compiles for: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = [
                line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))
            ]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


def _library_path(compiler_version: str) -> Path:
    from specedge.model.loader import cache_root  # imported here: the loader imports the model

    key = hashlib.sha256(
        "\0".join(
            (SOURCE.read_text(), " ".join(FLAGS), compiler_version, _cpu_signature())
        ).encode()
    ).hexdigest()[:16]
    return cache_root() / "native" / f"kernels-{platform.machine()}-{key}.so"


def _build() -> Path:
    """The compiled library, compiling it if this source, compiler and CPU have none yet."""
    compiler = _compiler()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    path = _library_path(version)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: processes starting together never load half a file.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so", delete=False) as partial:
        partial_path = Path(partial.name)
    try:
        subprocess.run(
            [compiler, *FLAGS, "-o", str(partial_path), str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        os.replace(partial_path, path)
    finally:
        partial_path.unlink(missing_ok=True)
    return path


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel library, or None (logged once) where it cannot be compiled or loaded."""
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        log.warning("native kernels unavailable, using torch's: %s", detail)
        return None
    for name, (arguments, result) in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = arguments
        function.restype = result
    return library


MAX_HEAD_DIM = 256  # as kernels.c
MAX_GROUP = 16


def supports(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this geometry and dtype (and could be compiled here)."""
    return (
        dtype in DTYPES
        and head_dim <= MAX_HEAD_DIM
        and num_heads // num_kv_heads <= MAX_GROUP
        and load() is not None
    )


def row_attention(
    queries: Tensor,  # [T, >= H, D]: row r's heads; rows may have more heads (q beside k)
    keys: Tensor,  # [H_kv, P, D] one layer of the pool, contiguous
    values: Tensor,  # [H_kv, P, D]
    rows: Tensor,  # [N] int64: each entry's query row
    starts: Tensor,  # [N] int64: the pool position of its sequence's slot position 0
    lengths: Tensor,  # [N] int64: the slot positions it spans (0..length-1)
    out: Tensor,  # [T, H, D], contiguous: rows `rows` are written
    num_heads: int,
    masks: Tensor | None = None,  # uint8, flat: every masked entry's mask bytes
    mask_starts: Tensor | None = None,  # [N] int64: the first slot position its mask governs
    mask_offsets: Tensor | None = None,  # [N] int64: where its mask bytes begin in `masks`
) -> None:
    """softmax(q k^T / sqrt(D)) v for each entry's query row over its slot's keys and values,
    read in place; an entry attends every position before its mask start and, from there on,
    those whose mask byte is nonzero (`mask_starts[i] >= lengths[i]`: no mask). The model's
    dtype in and out, float32 within."""
    library = load()
    assert library is not None, "native row attention is not available"
    head_dim = keys.shape[-1]
    assert queries.dtype == keys.dtype == values.dtype == out.dtype
    assert queries.stride(-1) == 1 and queries.stride(-2) == head_dim
    assert keys.is_contiguous() and values.is_contiguous() and out.is_contiguous()
    assert rows.dtype == starts.dtype == lengths.dtype == torch.int64
    mask_pointers: tuple[int | None, ...] = (None, None, None)
    if masks is not None:
        assert mask_starts is not None and mask_offsets is not None
        assert masks.dtype == torch.uint8 and masks.is_contiguous()
        assert mask_starts.dtype == mask_offsets.dtype == torch.int64
        assert mask_starts.is_contiguous() and mask_offsets.is_contiguous()
        mask_pointers = (masks.data_ptr(), mask_starts.data_ptr(), mask_offsets.data_ptr())
    function = (
        library.row_attention_bf16 if queries.dtype == torch.bfloat16 else library.row_attention_f32
    )
    status = function(
        queries.data_ptr(),
        queries.stride(0),
        keys.data_ptr(),
        values.data_ptr(),
        keys.stride(0),
        rows.data_ptr(),
        starts.data_ptr(),
        lengths.data_ptr(),
        *mask_pointers,
        rows.numel(),
        num_heads,
        keys.shape[0],
        head_dim,
        1.0 / math.sqrt(head_dim),
        out.data_ptr(),
        out.stride(0),
        torch.get_num_threads(),
    )
    if status != 0:
        raise NativeKernelError(
            f"native row attention refused heads {num_heads}/{keys.shape[0]} x {head_dim} "
            f"(status {status})"
        )


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:  # [..., E] bf16
    """`weight * F.rms_norm(x)` for a contiguous bf16 `x` in one call (torch's CPU rms_norm is
    half a dozen kernels, 20 us a call for one 576-wide row here); None where the kernel is
    not available or does not take these tensors."""
    library = load()
    if (
        library is None
        or x.dtype != torch.bfloat16
        or weight.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or not x.is_contiguous()
        or not weight.is_contiguous()
    ):
        return None
    out = torch.empty_like(x)
    dim = x.shape[-1]
    library.rms_norm_bf16(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps
    )
    return out


def fuses_rope(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `rope_store` takes a forward of this dtype and device."""
    return dtype == torch.bfloat16 and device.type == "cpu" and load() is not None


def rope_store(
    qk: Tensor,  # [T, H + H_kv, D] bf16: queries then keys, last two dims packed
    v: Tensor,  # [T, H_kv, D] bf16, last two dims packed
    cos: Tensor,  # [T, 1, D] bf16, contiguous
    sin: Tensor,  # [T, 1, D]
    index: Tensor,  # [T] int64: pool positions
    keys: Tensor,  # [H_kv, P, D] one layer of the pool, contiguous
    values: Tensor,
    num_heads: int,
) -> Tensor:  # [T, H, D] the rotated queries
    """RoPE on `qk` and the rotated keys and `v` written into the pool at `index`, in one call:
    equal bit for bit to `qk * cos + rotate_half(qk) * sin` and `KVCache.write` in bf16."""
    library = load()
    assert library is not None and fuses_rope(qk.dtype, qk.device)
    rows, heads, head_dim = qk.shape
    assert qk.stride(-1) == 1 and qk.stride(-2) == head_dim
    assert v.stride(-1) == 1 and v.stride(-2) == head_dim
    assert cos.is_contiguous() and sin.is_contiguous() and index.dtype == torch.int64
    assert keys.is_contiguous() and values.is_contiguous() and index.is_contiguous()
    assert qk.dtype == v.dtype == cos.dtype == sin.dtype == keys.dtype == values.dtype
    q = qk.new_empty(rows, num_heads, head_dim)
    library.rope_store_bf16(
        qk.data_ptr(),
        qk.stride(0),
        v.data_ptr(),
        v.stride(0),
        cos.data_ptr(),
        sin.data_ptr(),
        index.data_ptr(),
        rows,
        num_heads,
        heads - num_heads,
        head_dim,
        q.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        keys.stride(0),
    )
    return q
