"""The reference peer: Hugging Face transformers' `generate(assistant_model=...)`.

It runs in its own process on the server's core (`python -m specedge.bench.hf_assisted JOB
RECORDS`), one request at a time, with the same prompts, chat template, max tokens and
temperatures as the other systems, and writes one `RequestRecord` per request as JSON Lines.
Token arrival times come from a streamer: transformers hands it each assisted step's tokens
at once, so its calls count the verification rounds. It is a single-user system, so it runs
with one client and no network. When transformers cannot load the pair (e.g. a distilled
draft that shares tensors with its target or has a reduced vocabulary head), the process
exits with a message and the benchmark notes that the peer was skipped.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from specedge.bench.config import BenchConfig
from specedge.bench.metrics import (
    Prices,
    RequestRecord,
    ServerUsage,
    compute_run_metrics,
    run_window,
)
from specedge.bench.processes import ManagedProcess, Placement
from specedge.bench.prompts import BenchPrompt
from specedge.bench.results import RunResult, RunSpec
from specedge.errors import SpecEdgeError

CANNOT_LOAD_EXIT = 3


def run_hf_assisted(
    specs: Sequence[RunSpec],
    config: BenchConfig,
    prompts: Sequence[BenchPrompt],
    placement: Placement,
    log_dir: Path,
    prices: Prices,
) -> list[RunResult]:
    """One subprocess for every temperature; returns one run per spec."""
    log_dir.mkdir(parents=True, exist_ok=True)
    count = config.requests_for(1, len(prompts))
    prompts = [prompts[i % len(prompts)] for i in range(count)]
    job_path, records_path = log_dir / "hf-assisted-job.json", log_dir / "hf-assisted.jsonl"
    job = {
        "target": config.target,
        "draft": config.draft,
        "dtype": config.dtype,
        "max_tokens": config.max_tokens,
        "seed": config.seed,
        "temperatures": sorted({spec.temperature for spec in specs}),
        "prompts": [asdict(p) for p in prompts],
    }
    job_path.write_text(json.dumps(job))
    process = ManagedProcess(
        "hf-assisted peer",
        ["-m", "specedge.bench.hf_assisted", str(job_path), str(records_path)],
        log_dir / "hf-assisted.log",
        placement.server_cpus,
    )
    try:
        process.process.wait(timeout=config.request_timeout_s * max(1, len(prompts)))
    finally:
        process.stop()
    if process.process.returncode != 0:
        raise SpecEdgeError(
            f"skipped (exit status {process.process.returncode}): {process.log_tail(3)}"
        )
    by_temperature: dict[float, list[RequestRecord]] = {}
    for line in records_path.read_text().splitlines():
        data = json.loads(line)
        temperature = data.pop("temperature")
        data["chunk_times_s"] = tuple(data["chunk_times_s"])
        by_temperature.setdefault(temperature, []).append(RequestRecord(**data))
    results = []
    for spec in specs:
        records = by_temperature.get(spec.temperature, [])
        usage = ServerUsage(wall_s=run_window(records))
        metrics = compute_run_metrics(records, usage, prices)
        results.append(RunResult(spec, metrics, tuple(records), "one request at a time"))
    return results


class _TimingStreamer:
    """A transformers streamer that only notes when tokens arrive (the first `put` is the
    prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value: Any) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate_all(job: dict[str, Any], out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from specedge.model.loader import default_dtype, load_tokenizer, parse_dtype, resolve_model_dir

    torch.set_num_threads(1)
    dtype = parse_dtype(job["dtype"]) if job["dtype"] else default_dtype("cpu")
    target_dir, draft_dir = resolve_model_dir(job["target"]), resolve_model_dir(job["draft"])
    tokenizer = load_tokenizer(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype).eval()
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            draft_dir, dtype=dtype, output_loading_info=True
        )
        draft, info = loaded
        # transformers fills missing tensors with random ones: refuse rather than measure that.
        absent = [*info["missing_keys"], *(str(k) for k in info["mismatched_keys"])]
        if absent:
            raise ValueError(
                f"{len(absent)} tensors are not in its checkpoint (e.g. {sorted(absent)[0]}); "
                "a SpecEdge draft may share tensors with its target or have a reduced head"
            )
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(
                f"vocab {draft.config.vocab_size} vs the target's {target.config.vocab_size}"
            )
        draft.eval()
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        print(f"transformers cannot load the draft {job['draft']!r}: {error}", file=sys.stderr)
        sys.exit(CANNOT_LOAD_EXIT)
    with out.open("w") as records:
        for temperature in job["temperatures"]:
            for index, item in enumerate(job["prompts"]):
                prompt = BenchPrompt(**item)
                record = _one_request(tokenizer, target, draft, prompt, job, temperature, index)
                records.write(json.dumps({"temperature": temperature, **record.as_dict()}) + "\n")
                records.flush()


def _one_request(
    tokenizer: Any,
    target: Any,
    draft: Any,
    prompt: BenchPrompt,
    job: dict[str, Any],
    temperature: float,
    index: int,
) -> RequestRecord:
    import torch

    from specedge.text import encode_chat

    ids = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": prompt.text}])])
    torch.manual_seed(job["seed"] + index)
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
    streamer = _TimingStreamer()
    start = time.perf_counter()
    with torch.inference_mode():
        output = target.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            assistant_model=draft,
            max_new_tokens=job["max_tokens"],
            streamer=streamer,
            pad_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    end = streamer.times[-1] if streamer.times else time.perf_counter()
    tokens = int(output.shape[1] - ids.shape[1])
    return RequestRecord(
        client=0,
        prompt_id=prompt.prompt_id,
        category=prompt.category,
        start_s=start,
        first_token_s=streamer.times[0] if streamer.times else None,
        end_s=end,
        tokens=tokens,
        prompt_tokens=int(ids.shape[1]),
        # transformers streams each assisted step's tokens (accepted + bonus) in one `put`.
        rounds=len(streamer.times),
        accepted=max(0, tokens - len(streamer.times)),
        chunk_times_s=tuple(streamer.times),
    )


def main(argv: Sequence[str]) -> None:
    job_path, out_path = map(Path, argv)
    _generate_all(json.loads(job_path.read_text()), out_path)


if __name__ == "__main__":
    main(sys.argv[1:])
