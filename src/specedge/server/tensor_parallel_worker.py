"""The worker side of `serve --tensor-parallel N`: ranks 1..N-1, each a process spawned by
the server (see `server.tensor_parallel` for rank 0 and the whole picture).

A worker joins the group, receives its shard of the model from rank 0, builds a KV cache of its
own heads with the same slots and blocks as rank 0's, then runs `Command`s until STOP: each
replays rank 0's KV bookkeeping changes (`KVChange`, in rank 0's order) and makes the same model
call, whose collectives meet rank 0's. It exits when told to, when rank 0's connection breaks,
or when its parent process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from specedge.core.model_runner import ModelRunner, TreeRow
from specedge.model.config import ModelConfig
from specedge.model.kv_cache import KVCache
from specedge.model.loader import LoadedModel
from specedge.model.parallel import build_shard, local_config

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"  # ranks meet on loopback: they are processes of one server
STARTUP_TIMEOUT = timedelta(minutes=5)  # for every worker to start and join
COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # a model collective some rank never joins
IDLE_TIMEOUT = timedelta(days=365)  # workers wait this long for rank 0's next command
PARENT_POLL_S = 1.0

FORWARD, LOGITS, TOP_LOGPROBS, STOP = "forward", "logits", "top_logprobs", "stop"


@dataclass(frozen=True)
class KVChange:
    """One call that changed rank 0's KV bookkeeping, to replay: `method(*args)`, which
    returned `result` there (the slot, for `allocate`)."""

    method: str
    args: tuple[Any, ...]
    result: Any = None


@dataclass(frozen=True)
class Command:
    """What every rank does next: replay `kv_changes`, then `action` (FORWARD over `rows`;
    LOGITS or TOP_LOGPROBS (`k`) over the hidden rows broadcast next; STOP)."""

    action: str
    kv_changes: tuple[KVChange, ...] = ()
    rows: tuple[TreeRow, ...] = ()
    hidden_shape: tuple[int, ...] = ()
    hidden_dtype: torch.dtype = torch.float32
    upcast: bool = True
    k: int = 0


def replay(kv: KVCache, changes: Sequence[KVChange]) -> None:
    for change in changes:
        result = getattr(kv, change.method)(*change.args)
        assert result == change.result, f"KV replay diverged at {change}"


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs (sent once, at spawn)."""

    world_size: int
    store_port: int
    config: ModelConfig  # the whole model's
    device: str  # rank 0's; rank r runs on the r-th device after it (GPUs) or the CPU
    dtype: torch.dtype
    num_threads: int
    num_slots: int
    max_context: int
    max_block: int
    kv_blocks: int | None
    attention_kernel: str
    parent_pid: int
    log_level: int
    rank: int = 0

    @property
    def rank_device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda":
            return torch.device("cuda", (device.index or 0) + self.rank)
        return device


def worker_main(spec: WorkerSpec) -> None:
    """The body of a worker process: join, receive the shard, replay commands until STOP."""
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s tp-rank{spec.rank} %(levelname)s %(name)s: %(message)s",
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for rank 0, which stops us
    threading.Thread(target=_exit_with_parent, args=(spec.parent_pid,), daemon=True).start()
    torch.set_num_threads(spec.num_threads)
    device = spec.rank_device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(
        HOST, spec.store_port, spec.world_size, is_master=False, timeout=STARTUP_TIMEOUT
    )
    store.set(f"joined/{spec.rank}", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=store, rank=spec.rank, world_size=spec.world_size, timeout=COLLECTIVE_TIMEOUT
    )
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    try:
        runner = _worker_runner(spec, device)
        _serve_commands(runner, control)
    except RuntimeError as error:  # rank 0 is gone (or failed): nothing left to serve
        logger.error("tensor-parallel rank %d stops: %s", spec.rank, error)
        _leave(1)
    dist.destroy_process_group()
    _leave(0)


def _leave(code: int) -> None:
    """Exit now: torch's C++ teardown at interpreter exit sometimes aborts (a thread destroyed
    unjoined) after all work is done, which would turn a clean stop into SIGABRT."""
    logging.shutdown()
    os._exit(code)


def _worker_runner(spec: WorkerSpec, device: torch.device) -> ModelRunner:
    """A plain runner over this rank's shard, with a KV cache of its heads."""
    shard = build_shard(None, spec.config, device, spec.dtype)
    shard_config = local_config(spec.config, spec.world_size)
    loaded = LoadedModel(
        name=f"rank {spec.rank}",
        model=shard,
        tokenizer=None,
        config=shard_config,
        stop_token_ids=(),
        directory=Path(),
    )
    return ModelRunner(
        loaded,
        num_slots=spec.num_slots,
        max_context=spec.max_context,
        max_block=spec.max_block,
        kv_blocks=spec.kv_blocks,
        attention_kernel=spec.attention_kernel,
    )


@torch.inference_mode()
def _serve_commands(runner: ModelRunner, control: Any) -> None:
    while True:
        received: list[Any] = [None]
        dist.broadcast_object_list(received, src=0, group=control)
        command: Command = received[0]
        replay(runner.kv, command.kv_changes)
        if command.action == STOP:
            return
        if command.action == FORWARD:
            runner.forward(command.rows)
            continue
        hidden = torch.empty(command.hidden_shape, device=runner.device, dtype=command.hidden_dtype)
        dist.broadcast(hidden, src=0)
        if command.action == LOGITS:
            runner.logits(hidden, command.upcast)
        else:
            runner.top_logprobs(hidden, command.k)


def _exit_with_parent(parent_pid: int) -> None:
    """Exit as soon as rank 0's process is gone (a worker must never outlive its server)."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)
