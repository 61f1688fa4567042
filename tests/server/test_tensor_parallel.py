"""`serve --tensor-parallel 2` (`server.tensor_parallel`): the real server with its target
split over two gloo ranks gives, over real gRPC, the greedy tokens of the unsplit server; stopping
it leaves no worker process; a worker's death fails the next round with an error naming it; and
a worker never outlives a server process that is killed."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from specedge.core.tree import DraftTree
from specedge.model.config import ModelConfig
from specedge.model.kv_cache import KVCache
from specedge.model.loader import LoadedModel, load_model
from specedge.model.parallel import TensorParallelError
from specedge.server.app import BackgroundServer
from specedge.server.tensor_parallel import RecordedKVCache, TensorParallelRunner
from specedge.server.tensor_parallel_worker import replay
from tests.support.models import (
    TARGET_SEED,
    random_hf_model,
    tiny_hf_config,
    tiny_model,
    word_tokenizer,
)
from tests.support.reference import reference_tokens
from tests.support.scripted_edge import open_message, run, run_session
from tests.support.servers import start_server
from tests.support.trees import empty_tree, junk_tree, oracle_tree

PROMPTS = ([5, 17, 99, 3, 250, 42, 42, 7, 128, 64, 1, 2, 3, 200, 31, 8, 9, 77, 13], [9, 8, 7] * 9)
MAX_TOKENS = 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return tiny_model()


def split_runner(server: BackgroundServer) -> TensorParallelRunner:
    assert server.server.executor is not None
    runner = server.server.executor.engine.runner
    assert isinstance(runner, TensorParallelRunner)
    return runner


def is_gone(pid: int) -> bool:
    """No such process, or only its zombie (a container's init may not reap orphans)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def served_tokens(server: BackgroundServer, target: LoadedModel) -> list[list[int]]:
    """Each prompt's greedy tokens, three sessions at once per prompt: plain decoding, trees
    holding the reference, and junk trees (rejected)."""
    references = [reference_tokens(target, prompt, MAX_TOKENS) for prompt in PROMPTS]

    async def sessions() -> list[list[int]]:
        calls = []
        for prompt, reference in zip(PROMPTS, references, strict=True):
            message = open_message(target, prompt, MAX_TOKENS)
            for tree in (empty_tree, oracle_tree(reference, hits=3), junk_tree):
                calls.append(run_session(server.port, message, tree))
        return [result.tokens for result in await asyncio.gather(*calls)]

    return list(run(sessions()))


def test_two_ranks_serve_the_greedy_tokens_of_one_and_leave_no_worker(
    target: LoadedModel,
) -> None:
    unsplit = start_server(target)
    try:
        expected = served_tokens(unsplit, target)
    finally:
        unsplit.stop()
    server = start_server(target, tensor_parallel=2)
    try:
        workers = split_runner(server).workers
        assert len(workers) == 1 and workers[0].is_alive()
        assert served_tokens(server, target) == expected
    finally:
        server.stop()
    assert workers[0].exitcode == 0
    assert is_gone(workers[0].pid or 0)


def test_a_dead_worker_fails_the_next_round_with_an_error_naming_it(
    target: LoadedModel,
) -> None:
    server = start_server(target, tensor_parallel=2)
    try:
        [worker] = split_runner(server).workers

        def kill_after_first_round(generated: list[int]) -> DraftTree:
            if generated:
                os.kill(worker.pid or 0, signal.SIGKILL)
                worker.join(timeout=10)
            return DraftTree()

        message = open_message(target, PROMPTS[0], MAX_TOKENS)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            run(run_session(server.port, message, kill_after_first_round))
        details = failure.value.details() or ""
        assert f"tensor-parallel rank 1 (pid {worker.pid}) was killed by SIGKILL" in details
        assert "restart" in details
    finally:
        server.stop()


def test_replayed_kv_changes_give_the_same_slots_blocks_and_lengths() -> None:
    """Random session churn on rank 0's cache (opens of random sizes, prefills, rounds that
    keep random positions, closes, refusals when full); a plain cache replaying its changes
    after every step holds the same slots, blocks, lengths and KV positions."""
    config = ModelConfig.from_hf(tiny_hf_config())
    recorded = RecordedKVCache(config, num_slots=6, max_len=96, num_blocks=20)
    replica = KVCache(config, num_slots=6, max_len=96, num_blocks=20)
    rng = random.Random(0)
    open_slots: list[int] = []
    for _ in range(300):
        action = rng.random()
        if action < 0.3 and recorded.can_allocate(capacity := rng.randint(1, 96)):
            open_slots.append(recorded.allocate(capacity))
        elif action < 0.5 and open_slots:
            recorded.free(open_slots.pop(rng.randrange(len(open_slots))))
        elif open_slots:
            slot = rng.choice(open_slots)
            start = rng.randint(0, recorded.capacity(slot) - 1)
            room = range(start, recorded.capacity(slot))
            kept = sorted(rng.sample(room, rng.randint(0, min(8, len(room)))))
            recorded.set_length(slot, start)
            recorded.compact(slot, start, kept)
        replay(replica, recorded.take_changes())
        assert replica.lengths == recorded.lengths
        assert replica.num_free == recorded.num_free
        assert replica.num_free_blocks == recorded.num_free_blocks
        for slot in open_slots:
            capacity = recorded.capacity(slot)
            assert replica.capacity(slot) == capacity
            assert torch.equal(
                replica.physical(slot, 0, capacity), recorded.physical(slot, 0, capacity)
            )


def test_a_split_the_model_does_not_allow_fails_the_start_before_any_process(
    target: LoadedModel,
) -> None:
    with pytest.raises(TensorParallelError, match="pick a divisor of 2"):
        start_server(target, tensor_parallel=4)


KILLED_SERVER = """
import sys, time, torch
from tests.support.models import (
    TARGET_SEED,
    random_hf_model,
    tiny_hf_config,
    tiny_model,
    word_tokenizer,
)
from specedge.server.tensor_parallel import start_tensor_parallel
torch.set_num_threads(1)
runner = start_tensor_parallel(tiny_model(), 2, num_slots=1, max_context=32, max_block=4)
print(runner.workers[0].pid, flush=True)
time.sleep(120)
"""


def test_workers_exit_when_the_server_process_is_killed() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_SERVER],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        worker_pid = int(process.stdout.readline())
        assert not is_gone(worker_pid)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert wait_gone([worker_pid]) == []


READY = re.compile(r"serving \S+ on [\d.]+:(\d+)")


def test_serve_tensor_parallel_2_as_a_process_serves_and_stops_cleanly(tmp_path: Path) -> None:
    """`specedge serve --tensor-parallel 2` from the command line: its own worker process
    (a child of the server), the greedy tokens of the model, and SIGTERM ends both."""
    folder = tmp_path / "tiny"
    random_hf_model(tiny_hf_config(), TARGET_SEED).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    model = load_model(str(folder), "cpu", torch.float32)
    flags = ["--model", str(folder), "--tensor-parallel", "2", "--device", "cpu",
             "--dtype", "float32", "--port", "0", "--metrics-port", "0", "--max-sessions", "2",
             "--max-context", "256"]  # fmt: skip
    specedge = Path(sys.executable).with_name("specedge")
    process = subprocess.Popen(
        [str(specedge), "serve", *flags], stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        port, lines = wait_until_ready(process)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        workers = [pid for pid in children if b"spawn_main" in command_line(int(pid))]
        assert len(workers) == 1, lines  # (besides multiprocessing's resource tracker)
        stops = model.stop_token_ids
        message = open_message(model, PROMPTS[0], MAX_TOKENS, stop_token_ids=stops)
        result = run(run_session(port, message, empty_tree))
        assert result.tokens == reference_tokens(
            model, PROMPTS[0], MAX_TOKENS, stop_token_ids=stops
        )
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=30)
    assert wait_gone([int(pid) for pid in children]) == []


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Those of `pids` still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while any(not is_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if not is_gone(pid)]


def command_line(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def wait_until_ready(process: subprocess.Popen[str]) -> tuple[int, list[str]]:
    """The gRPC port from the server's readiness line (and the lines before it)."""
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        if match := READY.search(line):
            return int(match.group(1)), lines
        if not line and process.poll() is not None:
            break
    raise AssertionError("the server did not become ready:\n" + "".join(lines))
