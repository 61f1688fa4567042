"""`specedge serve --tensor-parallel N`: the target split over N processes (ranks).

Rank 0 is the server process: it serves gRPC and the HTTP API, schedules and samples exactly
as without tensor parallelism, through a `TensorParallelRunner` (a `ModelRunner`, so the
engines do not change). `start_tensor_parallel` spawns ranks 1..N-1 as *worker* processes of
the server, meeting it on a loopback TCP store; rank 0 sends each its slices of the model
(`model.parallel.build_shard`), and every rank keeps a KV cache of its own heads, of the same
slots and blocks.

Before each model call rank 0 broadcasts one `Command` on a control group (gloo, also on
GPUs): the KV bookkeeping changes since the last command (`RecordedKVCache`: allocate, free,
set_length, compact, in the order rank 0 applied them), then the call (a forward's rows, or
the head over hidden rows that follow as a tensor). Workers replay the changes, so their slots
and blocks stay identical to rank 0's, and make the same call; the model's own collectives
(NCCL on GPUs, gloo on CPU) do the rest.

The workers' side is `server.tensor_parallel_worker`. Lifetime: `close` stops the workers (a
STOP command, then a join, then a kill); a worker also exits when rank 0 does (a closed
connection, or a parent that is gone), so none outlives the server. A worker that dies makes
every later model call raise TensorParallelError naming it.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from specedge.core.model_runner import ModelRunner, TreeRow
from specedge.model import attention
from specedge.model.config import ModelConfig
from specedge.model.kv_cache import DEFAULT_MEMORY_FRACTION, KVCache, free_memory_bytes
from specedge.model.loader import LoadedModel
from specedge.model.parallel import TensorParallelError, build_shard, local_config
from specedge.server.tensor_parallel_worker import (
    COLLECTIVE_TIMEOUT,
    FORWARD,
    HOST,
    IDLE_TIMEOUT,
    LOGITS,
    STARTUP_TIMEOUT,
    STOP,
    TOP_LOGPROBS,
    Command,
    KVChange,
    WorkerSpec,
    worker_main,
)

logger = logging.getLogger(__name__)

LOST_RANK_WAIT_S = 2.0  # for the exit of the worker that broke a collective to be seen
STOP_TIMEOUT_S = 10.0  # for workers to exit after STOP before they are killed


class RecordedKVCache(KVCache):
    """Rank 0's KV cache: applies every change of its slots, blocks and lengths and records
    it, in order, for the workers to replay (`take_changes`). Slots are opened and closed on
    the event loop while forwards run in the executor's thread, hence the lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.RLock()
        self._changes: list[KVChange] = []
        self._applying = False
        super().__init__(*args, **kwargs)

    def allocate(self, capacity: int | None = None) -> int:
        return int(self._apply("allocate", capacity))

    def free(self, slot: int) -> None:
        self._apply("free", slot)

    def set_length(self, slot: int, length: int) -> None:
        self._apply("set_length", slot, length)

    def compact(self, slot: int, start: int, kept_positions: Sequence[int]) -> None:
        self._apply("compact", slot, start, tuple(kept_positions))

    def take_changes(self) -> tuple[KVChange, ...]:
        with self._lock:
            changes, self._changes = tuple(self._changes), []
        return changes

    def _apply(self, method: str, *args: Any) -> Any:
        """Call KVCache's `method`, recording it unless it is nested in another recorded call
        (`compact` sets the length itself): the replay makes the same nested call."""
        with self._lock:
            if self._applying:
                return getattr(super(), method)(*args)
            self._applying = True
            try:
                result = getattr(super(), method)(*args)
            finally:
                self._applying = False
            self._changes.append(KVChange(method, args, result))
            return result


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: `loaded` holds rank 0's shard (and the whole model's config); every
    model call first tells the workers to make it too (see the module docstring)."""

    kv: RecordedKVCache
    failure: str | None = None  # why the model cannot run any more (a lost rank)

    def __init__(
        self,
        loaded: LoadedModel,
        workers: Sequence[multiprocessing.process.BaseProcess],
        control: Any,  # the gloo group commands travel on
        *,
        num_slots: int,
        max_context: int,
        max_block: int,
        kv_blocks: int | None = None,
        attention_kernel: str = attention.AUTO,
        restore_threads: int | None = None,
    ) -> None:
        self.tensor_parallel = len(workers) + 1
        self.workers = list(workers)
        self._control = control
        self._restore_threads = restore_threads
        super().__init__(
            loaded,
            num_slots=num_slots,
            max_context=max_context,
            max_block=max_block,
            kv_blocks=kv_blocks,
            attention_kernel=attention_kernel,
        )
        self._closed = False
        self._watcher = threading.Thread(
            target=self._watch_workers, name="specedge-tp-watch", daemon=True
        )
        self._watcher.start()

    def new_kv_cache(self, num_slots: int, max_len: int, num_blocks: int | None) -> RecordedKVCache:
        return RecordedKVCache(
            local_config(self.config, self.tensor_parallel),
            num_slots=num_slots,
            max_len=max_len,
            device=self.device,
            dtype=self.loaded.dtype,
            num_blocks=num_blocks,
        )

    @torch.inference_mode()
    def forward(self, rows: Sequence[TreeRow]) -> list[Tensor]:
        rows = tuple(rows)
        with self._collective():
            self._send(Command(FORWARD, rows=rows))
            return super().forward(rows)

    @torch.inference_mode()
    def logits(self, hidden: Tensor, upcast: bool = True) -> Tensor:  # [n, E] -> [n, V]
        with self._collective():
            self._send_hidden(Command(LOGITS, upcast=upcast), hidden)
            return super().logits(hidden, upcast)

    @torch.inference_mode()
    def top_logprobs(self, hidden: Tensor, k: int) -> tuple[Tensor, Tensor]:
        with self._collective():
            self._send_hidden(Command(TOP_LOGPROBS, k=k), hidden)
            return super().top_logprobs(hidden, k)

    def close(self) -> None:
        """Stop the workers (STOP, a join, then a kill) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        if self.failure is None:
            try:
                self._send(Command(STOP))
            except RuntimeError as error:  # a worker already gone: the kill below
                logger.warning("tensor parallelism: STOP not delivered (%s)", error)
        stop_workers(self.workers)
        dist.destroy_process_group()
        if self._restore_threads is not None:
            torch.set_num_threads(self._restore_threads)

    def _send(self, command: Command) -> None:
        if self.failure is not None:
            raise TensorParallelError(self.failure)
        command = replace(command, kv_changes=self.kv.take_changes())
        dist.broadcast_object_list([command], src=0, group=self._control)

    def _send_hidden(self, command: Command, hidden: Tensor) -> None:
        self._send(replace(command, hidden_shape=tuple(hidden.shape), hidden_dtype=hidden.dtype))
        dist.broadcast(hidden.contiguous(), src=0)

    @contextlib.contextmanager
    def _collective(self) -> Iterator[None]:
        """Around a model call, which the workers make too: any error in it leaves the ranks
        out of step (some wait in a collective the others never join), so it is the last
        call; the error becomes TensorParallelError naming the lost rank, if one was lost."""
        try:
            yield
        except TensorParallelError:
            raise
        except Exception as error:
            deadline = time.monotonic() + LOST_RANK_WAIT_S
            while self.failure is None and time.monotonic() < deadline:
                time.sleep(0.05)  # for the watcher to see which worker exited, if one did
            self.failure = self.failure or (
                f"the tensor-parallel ranks are out of step after an error on rank 0 "
                f"({type(error).__name__}: {error}); restart the server"
            )
            raise TensorParallelError(self.failure) from error

    def _watch_workers(self) -> None:
        """Log a worker's death when it happens, not only at the next model call."""
        ranks = {worker.sentinel: rank for rank, worker in enumerate(self.workers, start=1)}
        first = multiprocessing.connection.wait(list(ranks))[0]
        if self._closed:
            return
        rank = ranks[first]  # type: ignore[index]
        worker = self.workers[rank - 1]
        self.failure = (
            f"tensor-parallel rank {rank} (pid {worker.pid}) {_exit_reason(_exit_code(worker))}; "
            "the server cannot run its model any more: restart it"
        )
        logger.error("%s", self.failure)


def _exit_code(worker: multiprocessing.process.BaseProcess, timeout: float = 2.0) -> int | None:
    """The exit code of a worker whose sentinel says it ended. Another thread may be reaping
    it at the same moment (a `join`): its `waitpid` then takes the status and ours sees none
    until that thread has stored it, so ask again for a moment before calling it unknown."""
    deadline = time.monotonic() + timeout
    worker.join(timeout)
    while worker.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return worker.exitcode


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "exited"
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"


def start_tensor_parallel(
    loaded: LoadedModel,
    world_size: int,
    *,
    num_slots: int,
    max_context: int,
    max_block: int,
    kv_blocks: int | None = None,
    attention_kernel: str = attention.AUTO,
) -> TensorParallelRunner:
    """Spawn ranks 1..world_size-1, split `loaded`'s model over all ranks (rank 0 keeps its
    shard; the whole model can then be freed) and return rank 0's runner. Raises
    TensorParallelError, with every worker stopped, if the model cannot be split or a worker
    fails to start."""
    shard_config = local_config(loaded.config, world_size)  # fails before spawning anything
    device = loaded.device
    if device.type == "cuda":
        first = device.index if device.index is not None else torch.cuda.current_device()
        if first + world_size > torch.cuda.device_count():
            raise TensorParallelError(
                f"--tensor-parallel {world_size} from {device} needs GPUs {first}.."
                f"{first + world_size - 1}; torch sees {torch.cuda.device_count()}"
            )
        device = torch.device("cuda", first)
        torch.cuda.set_device(device)  # NCCL runs on the current device
    if dist.is_initialized():
        raise TensorParallelError("this process already belongs to a process group")
    threads = torch.get_num_threads()
    rank_threads = max(1, threads // world_size) if device.type == "cpu" else threads
    store = dist.TCPStore(HOST, 0, world_size, is_master=True, wait_for_workers=False)
    spec = WorkerSpec(
        world_size=world_size,
        store_port=store.port,
        config=loaded.config,
        device=str(device),
        dtype=loaded.dtype,
        num_threads=rank_threads,
        num_slots=num_slots,
        max_context=max_context,
        max_block=max_block,
        kv_blocks=kv_blocks,
        attention_kernel=attention_kernel,
        parent_pid=os.getpid(),
        log_level=logging.getLogger().getEffectiveLevel(),
    )
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=worker_main, args=(replace(spec, rank=rank),), name=f"specedge-tp{rank}"
        )
        for rank in range(1, world_size)
    ]
    for worker in workers:
        worker.daemon = True  # also ended by multiprocessing when the server exits
        worker.start()
    try:
        _await_workers(store, workers)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=store, rank=0, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
        )
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        torch.set_num_threads(rank_threads)
        shard = build_shard(loaded.model, loaded.config, device, loaded.dtype)
        logger.info(
            "tensor parallelism: %d ranks (%s), each holds %s",
            world_size,
            backend,
            _describe_shard(shard_config),
        )
        return TensorParallelRunner(
            replace(loaded, model=shard),
            workers,
            control,
            num_slots=num_slots,
            max_context=max_context,
            max_block=max_block,
            kv_blocks=kv_blocks,
            attention_kernel=attention_kernel,
            restore_threads=threads if rank_threads != threads else None,
        )
    except BaseException as error:
        lost = _exits(workers)  # before the kill below
        torch.set_num_threads(threads)
        stop_workers(workers, timeout=0.0)
        if dist.is_initialized():
            dist.destroy_process_group()
        if isinstance(error, RuntimeError) and not isinstance(error, TensorParallelError):
            raise TensorParallelError(
                f"tensor parallelism failed to start ({lost or error}); see the log above"
            ) from error
        raise


def rank_kv_memory(kv_memory: float | None, device: torch.device, world_size: int) -> float | None:
    """GB of KV cache for each rank: `--kv-memory` as given (each rank has its own pool of its
    own heads), and by default on the CPU the default share of free memory split over the
    ranks (they share the host's memory; GPUs each have theirs)."""
    if kv_memory is not None or world_size == 1 or device.type != "cpu":
        return kv_memory
    return DEFAULT_MEMORY_FRACTION * free_memory_bytes(device) / world_size / 1e9


def _await_workers(store: Any, workers: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """Wait until every worker has joined the store, or fail as soon as one has died."""
    keys = [f"joined/{rank}" for rank in range(1, len(workers) + 1)]
    deadline = time.monotonic() + STARTUP_TIMEOUT.total_seconds()
    while not store.check(keys):
        lost = _exits(workers)
        if lost:
            raise TensorParallelError(f"tensor parallelism failed to start: {lost}")
        if time.monotonic() > deadline:
            raise TensorParallelError(
                f"tensor-parallel workers did not start within {STARTUP_TIMEOUT}"
            )
        time.sleep(0.05)


def _exits(workers: Sequence[multiprocessing.process.BaseProcess]) -> str:
    exited = [
        f"rank {rank} (pid {worker.pid}) {_exit_reason(worker.exitcode)}"
        for rank, worker in enumerate(workers, start=1)
        if worker.exitcode is not None
    ]
    return ", ".join(exited)


def stop_workers(
    workers: Sequence[multiprocessing.process.BaseProcess], timeout: float = STOP_TIMEOUT_S
) -> None:
    """Join every worker within `timeout` seconds (all together), then kill what is left."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            logger.warning("tensor parallelism: killing worker pid %d", worker.pid)
            worker.kill()
            worker.join()


def _describe_shard(shard: ModelConfig) -> str:
    return (
        f"{shard.num_heads} query and {shard.num_kv_heads} key-value heads, "
        f"a feed-forward width of {shard.intermediate_size} and {shard.vocab_size} vocabulary rows"
    )
