"""Shared helpers of the benchmarks: timing with CUDA events, FLOP counts, environment record."""

from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import subprocess
from pathlib import Path

import torch


def bench_ms(fn, warmup: int = 5, repeats: int = 25, min_batch_ms: float = 20.0) -> float:
    """Median milliseconds per fn() call over `repeats` timed batches, after `warmup` calls.

    Each batch is `n` back-to-back calls between two CUDA events, n chosen from the warm-up so
    that a batch takes about `min_batch_ms`: the GPU then never waits for the host to enqueue the
    next call, so a short kernel is timed by its GPU time, not by the Python/launch cost of the
    call in front of it (bench_overhead.py measures that cost separately). n = 1 for calls longer
    than min_batch_ms. The same function times flashjit and every peer.
    """
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(warmup):
        fn()
    end.record()
    end.synchronize()
    per_call = start.elapsed_time(end) / max(warmup, 1)
    n = max(1, min(100, int(min_batch_ms / max(per_call, 1e-3))))
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


MIB = 2**20


def peak_mib(fn) -> float:
    """Peak memory allocated during one fn() beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MIB


def attention_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal, mode="fwd") -> float:
    """4 * b * h * n_q * n_k * d for the forward (two matmuls), halved for causal; backward is 2.5x
    the forward, forward + backward 3.5x."""
    f = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def visible_pairs(seqlen_q: int, seqlen_k: int, causal: bool = False, window=(-1, -1),
                  bottom_right: bool = True) -> int:
    """The exact number of (query, key) pairs attention computes, with flash-attn 2.x's
    window_size: query i sees key j iff i + off - left <= j <= i + off + right (a bound of -1 is
    absent; causal sets right to 0), off = seqlen_k - seqlen_q bottom-right, else 0."""
    left, right = window
    if causal:
        right = 0
    off = seqlen_k - seqlen_q if bottom_right else 0
    i = torch.arange(seqlen_q, dtype=torch.int64)
    hi = (i + off + right).clamp(max=seqlen_k - 1) if right >= 0 else torch.full_like(
        i, seqlen_k - 1)
    lo = (i + off - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
    return int((hi - lo + 1).clamp(min=0).sum())


def pairs_flops(batch, heads, pairs, head_dim, mode="fwd") -> float:
    """4 * b * h * pairs * d for the forward over `pairs` visible (query, key) pairs per head
    (visible_pairs); backward 2.5x the forward, forward + backward 3.5x."""
    return 4.0 * batch * heads * pairs * head_dim * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def gpu_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    name = name.lower().replace("nvidia", "").strip()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def environment() -> dict:
    """What produced a result: GPU, versions, date."""
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
    try:
        env["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                                     timeout=30).stdout.strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        env["nvcc"] = None
    try:
        clocks = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm,power.limit",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
        env["max_sm_clock_and_power_limit"] = clocks
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def results_dir(out: str | None) -> Path:
    """benchmarks/results/<gpu> (or <out>/<gpu> when given), created."""
    base = Path(out) if out else Path(__file__).resolve().parent / "results"
    path = base / gpu_slug()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}", flush=True)


def env_header(env: dict) -> str:
    return (f"{env.get('gpu')}, torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), "
            f"{env.get('nvcc')}, {env['date']}")


if os.environ.get("FLASHJIT_BENCH_DEBUG"):
    print(environment())
