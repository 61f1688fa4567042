"""The native row-attention kernel: equal to a float64 reference on every geometry it takes
(grouped heads, head sizes on and off its vectorised path, bf16 and float32), masked rows
included, writing only the rows it is given; a batch of decode steps and trees through it
equals the same batch through SDPA, fragmented slots and large trees (left to `bmm`)
included; where no compiler is at hand the engine falls back to `bmm`."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from specedge.core.model_runner import TreeRow, build_forward_inputs
from specedge.core.tree import ancestor_mask
from specedge.model import attention, native
from specedge.model.kv_cache import KVCache
from specedge.model.transformer import NATIVE_MAX_ROWS, chain_batch
from tests.support.models import random_hf_model, tiny_hf_config, to_specedge

GEOMETRIES = [  # (query heads, K/V heads, head dim): vectorised and portable paths
    (9, 3, 64),
    (8, 2, 128),
    (4, 4, 64),
    (16, 2, 64),  # a group of 8
    (6, 1, 48),  # not a multiple of 32: the portable path
    (32, 2, 32),  # a group of 16
]


def reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    num_heads: int,
    attended: torch.Tensor | None = None,  # [S] bool; None: every position
) -> torch.Tensor:  # [H, D] float64
    group = num_heads // keys.shape[0]
    q = queries[:num_heads].double()
    k = keys.double().repeat_interleave(group, dim=0)  # [H, S, D]
    v = values.double().repeat_interleave(group, dim=0)
    scores = torch.einsum("hd,hsd->hs", q, k) / math.sqrt(q.shape[-1])
    if attended is not None:
        scores = scores.masked_fill(~attended, -math.inf)
    return torch.einsum("hs,hsd->hd", scores.softmax(-1), v)


def assert_close_to_reference(got: torch.Tensor, expected: torch.Tensor) -> None:
    if got.dtype == torch.float32:
        torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-5)
    else:  # one rounding of the output, plus float32 sums of bf16 products
        torch.testing.assert_close(got.double(), expected, atol=4e-3, rtol=1.6e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), GEOMETRIES)
def test_kernel_equals_reference(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(num_heads * 1000 + head_dim)
    pool = 700
    keys = torch.randn(num_kv_heads, pool, head_dim, generator=generator).to(dtype)
    values = torch.randn(num_kv_heads, pool, head_dim, generator=generator).to(dtype)
    total_rows = 7
    # Queries beside keys in each row, as the model's fused projection leaves them.
    fused = torch.randn(total_rows, num_heads + num_kv_heads, head_dim, generator=generator)
    queries = (fused * 2).to(dtype)[:, :num_heads]
    rows = torch.tensor([5, 0, 3, 6])
    starts = torch.tensor([0, 17, 300, 650])
    lengths = torch.tensor([1, 260, 333, 50])
    out = torch.full((total_rows, num_heads, head_dim), 7.0, dtype=dtype)
    native.row_attention(queries, keys, values, rows, starts, lengths, out, num_heads)
    for row, start, length in zip(rows.tolist(), starts.tolist(), lengths.tolist(), strict=True):
        expected = reference(
            queries[row],
            keys[:, start : start + length],
            values[:, start : start + length],
            num_heads,
        )
        assert_close_to_reference(out[row], expected)
    untouched = sorted(set(range(total_rows)) - set(rows.tolist()))
    assert (out[untouched] == 7.0).all(), "rows it was not given were written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), GEOMETRIES)
def test_masked_rows_equal_the_reference(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    """Entries with masks over the end of their span (tree nodes: their ancestors), beside
    unmasked ones: each equals the reference over exactly the positions it attends."""
    generator = torch.Generator().manual_seed(num_heads * 7 + head_dim)
    keys = torch.randn(num_kv_heads, 400, head_dim, generator=generator).to(dtype)
    values = torch.randn(num_kv_heads, 400, head_dim, generator=generator).to(dtype)
    queries = (2 * torch.randn(6, num_heads, head_dim, generator=generator)).to(dtype)
    rows = torch.tensor([0, 1, 2, 3, 4, 5])
    starts = torch.tensor([10, 10, 10, 200, 0, 300])
    lengths = torch.tensor([40, 41, 43, 90, 1, 60])
    mask_starts = torch.tensor([38, 38, 38, 90, 1, 20])  # entries 3 and 4: no mask
    masks = [[1, 1], [1, 0, 1], [0, 1, 0, 1, 1], [], [], [1] * 30 + [0] * 9 + [1]]
    offsets = torch.tensor([0, *torch.tensor([len(m) for m in masks]).cumsum(0)[:-1].tolist()])
    flat = torch.tensor([b for m in masks for b in m], dtype=torch.uint8)
    out = torch.full((6, num_heads, head_dim), 7.0, dtype=dtype)
    native.row_attention(
        queries, keys, values, rows, starts, lengths, out, num_heads, flat, mask_starts, offsets
    )
    for i in range(6):
        start, length, mask_start = int(starts[i]), int(lengths[i]), int(mask_starts[i])
        attended = torch.ones(length, dtype=torch.bool)
        if mask_start < length:
            attended[mask_start:] = torch.tensor(masks[i], dtype=torch.bool)
        span = slice(start, start + length)
        expected = reference(queries[i], keys[:, span], values[:, span], num_heads, attended)
        assert_close_to_reference(out[i], expected)


def test_kernel_refuses_a_group_it_cannot_hold() -> None:
    keys = torch.zeros(1, 4, 16)
    out = torch.zeros(1, 17, 16)
    with pytest.raises(native.NativeKernelError, match="17/1"):
        native.row_attention(
            torch.zeros(1, 17, 16),
            keys,
            keys.clone(),
            torch.tensor([0]),
            torch.tensor([0]),
            torch.tensor([4]),
            out,
            17,
        )
    assert not native.supports(17, 1, 16, torch.float32)
    assert not native.supports(8, 8, 64, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_batch_equals_sdpa_with_fragmented_slots(dtype: torch.dtype) -> None:
    """Four sequences prefilled to different lengths, one of them in blocks scattered over
    the pool (read through the gather path), then one decode step of all four, as one flat
    batch: native logits equal SDPA's."""
    config, model = to_specedge(random_hf_model(tiny_hf_config(), seed=5))
    model = model.to(dtype)
    kv = KVCache(config, num_slots=7, max_len=40, block_size=4, dtype=dtype, num_blocks=38)
    holes = [kv.allocate(capacity=8) for _ in range(4)]
    kv.free(holes[0])
    kv.free(holes[2])  # two 2-block holes
    whole = [kv.allocate(capacity=40) for _ in range(3)]  # the rest of the pool
    slots = [kv.allocate(capacity=16), *whole]  # 4 blocks: the two holes
    assert not kv.is_contiguous(slots[0]) and all(kv.is_contiguous(s) for s in slots[1:])
    generator = torch.Generator().manual_seed(6)
    lengths = [13, 1, 22, 37]
    for slot, length in zip(slots, lengths, strict=True):
        tokens = torch.randint(0, config.vocab_size, (length,), generator=generator)
        with torch.inference_mode():
            model(tokens, torch.arange(length), chain_batch(kv, [(slot, 0, length)]), kv)
        kv.set_length(slot, length)
    step = torch.randint(0, config.vocab_size, (4,), generator=generator)
    positions = torch.tensor(lengths)
    logits = {}
    for kernel in (attention.SDPA, attention.NATIVE):
        batch = chain_batch(kv, [(s, n, 1) for s, n in zip(slots, lengths, strict=True)], kernel)
        with torch.inference_mode():
            logits[kernel] = model(step, positions, batch, kv)
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(
        logits[attention.NATIVE], logits[attention.SDPA], atol=tolerance, rtol=0
    )
    assert logits[attention.SDPA].std() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_of_trees_and_decode_steps_equals_sdpa(dtype: torch.dtype) -> None:
    """One flat batch of a decode step, small trees (the native kernel's, one with nodes
    already cached), a tree too large for it and a tree on a fragmented slot (both left to
    `bmm`): the native kernel's logits equal SDPA's."""
    config, model = to_specedge(random_hf_model(tiny_hf_config(), seed=8))
    model = model.to(dtype)
    kv = KVCache(config, num_slots=6, max_len=64, block_size=4, dtype=dtype, num_blocks=70)
    hole = kv.allocate(capacity=8)
    kv.allocate(capacity=8)  # keeps the hole's two blocks apart from the rest
    kv.free(hole)
    whole = [kv.allocate(capacity=64) for _ in range(4)]
    fragmented = kv.allocate(capacity=16)  # the hole's two blocks and the pool's last two
    slots = [fragmented, *whole]
    assert not kv.is_contiguous(fragmented) and all(kv.is_contiguous(s) for s in whole)
    generator = torch.Generator().manual_seed(9)
    contexts = [7, 20, 11, 3, 25]
    for slot, length in zip(slots, contexts, strict=True):
        tokens = torch.randint(0, config.vocab_size, (length,), generator=generator)
        with torch.inference_mode():
            model(tokens, torch.arange(length), chain_batch(kv, [(slot, 0, length)]), kv)
        kv.set_length(slot, length)
    tree_parents = [
        [-1, 0, 0, 1],  # fragmented slot: bmm
        [-1],  # a decode step
        [-1, 0, 1, 0, 3, 3, -1],  # a small tree: native
        [*range(-1, NATIVE_MAX_ROWS + 3)],  # too many rows for native: bmm
        [-1, 0, 1, 2, 1],  # its first two nodes cached (written by a forward before)
    ]
    cached = [0, 0, 0, 0, 2]
    tokens = [
        torch.randint(0, config.vocab_size, (len(p),), generator=generator).tolist()
        for p in tree_parents
    ]
    with torch.inference_mode():  # the cached nodes of the last tree, written first
        first = [TreeRow(slots[4], contexts[4], tree_parents[4][:2], tokens[4][:2])]
        inputs = build_forward_inputs(first, kv, attention.SDPA)
        model(inputs.tokens, inputs.positions, inputs.batch, kv)
    rows = [
        TreeRow(slot, context, parents, node_tokens[skip:], num_cached=skip)
        for slot, context, parents, node_tokens, skip in zip(
            slots, contexts, tree_parents, tokens, cached, strict=True
        )
    ]
    logits = {}
    for kernel in (attention.SDPA, attention.NATIVE):
        inputs = build_forward_inputs(rows, kv, kernel)
        with torch.inference_mode():
            logits[kernel] = model(inputs.tokens, inputs.positions, inputs.batch, kv)
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(
        logits[attention.NATIVE], logits[attention.SDPA], atol=tolerance, rtol=0
    )
    assert logits[attention.SDPA].std() > 0.5
    assert ancestor_mask(tree_parents[2]).sum() < len(tree_parents[2]) ** 2  # a real tree


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native.load.cache_clear()
    yield
    native.load.cache_clear()


def test_without_a_compiler_auto_falls_back_to_bmm(no_compiler: None) -> None:
    assert native.load() is None
    assert attention.resolve_attention("auto", "cpu") == attention.BMM
    with pytest.raises(ValueError, match="could not be compiled"):
        attention.resolve_attention("native", "cpu")


def test_native_is_a_cpu_kernel() -> None:
    assert attention.resolve_attention("auto", "cpu") == attention.NATIVE
    with pytest.raises(ValueError, match="CPU only"):
        attention.resolve_attention("native", "cuda")


def test_threads_split_the_work_without_changing_a_bit() -> None:
    """With several torch threads the (sequence, K/V head) pairs are shared out between them;
    each pair's arithmetic is the same, so the output is the same bit for bit."""
    generator = torch.Generator().manual_seed(9)
    keys = torch.randn(3, 900, 64, generator=generator).to(torch.bfloat16)
    values = torch.randn(3, 900, 64, generator=generator).to(torch.bfloat16)
    queries = torch.randn(5, 9, 64, generator=generator).to(torch.bfloat16)
    rows, starts = torch.arange(5), torch.tensor([0, 100, 200, 300, 400])
    lengths = torch.tensor([500, 3, 77, 600, 250])
    outputs = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            out = torch.empty(5, 9, 64, dtype=torch.bfloat16)
            native.row_attention(queries, keys, values, rows, starts, lengths, out, 9)
            outputs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("shape", [(1, 576), (37, 576), (5, 9, 64), (3, 1000)])
def test_rms_norm_equals_torch_bit_for_bit(shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x = (3 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=generator)).to(torch.bfloat16)
    expected = weight * torch.nn.functional.rms_norm(x, (shape[-1],), eps=1e-5)
    got = native.rms_norm(x, weight, 1e-5)
    assert got is not None and torch.equal(got, expected)
    assert native.rms_norm(x.float(), weight.float(), 1e-5) is None  # float32 keeps torch's
    strided = torch.ones(4, 2 * shape[-1], dtype=torch.bfloat16)[:, : shape[-1]]
    assert native.rms_norm(strided, weight, 1e-5) is None  # rows not packed: torch's


@pytest.mark.parametrize("case", ["llama", "qwen3"])
def test_fused_rope_and_store_change_no_bit(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 prefill and a decode step with RoPE and the KV write fused into one native call,
    and the same with torch's ops: the same logits and the same KV pool, bit for bit (Qwen3:
    q/k norms before RoPE)."""
    overrides = {"head_dim": 32} if case == "qwen3" else {}
    config, model = to_specedge(random_hf_model(tiny_hf_config(case, **overrides), seed=8))
    model = model.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(10)
    prompt = torch.randint(0, config.vocab_size, (19,), generator=generator)
    results = []
    calls = []
    real_rope_store = native.rope_store
    monkeypatch.setattr(
        native, "rope_store", lambda *args: calls.append(1) or real_rope_store(*args)
    )
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(native, "fuses_rope", lambda dtype, device: False)
        kv = KVCache(config, num_slots=2, max_len=32, block_size=4, dtype=torch.bfloat16)
        kv.allocate(capacity=8)
        slot = kv.allocate()
        with torch.inference_mode():
            first = model(prompt, torch.arange(19), chain_batch(kv, [(slot, 0, 19)]), kv)
            kv.set_length(slot, 19)
            step = chain_batch(kv, [(slot, 19, 1)], attention.NATIVE)
            second = model(prompt[:1], torch.tensor([19]), step, kv)
        index = kv.physical(slot, 0, 20)
        results.append((first, second, kv.keys[:, :, index], kv.values[:, :, index]))
    assert len(calls) == 2 * config.num_layers  # the fused pass went through the kernel
    for fused, unfused in zip(*results, strict=True):
        assert torch.equal(fused, unfused)
