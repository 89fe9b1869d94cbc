"""Where a decode call's time goes: the GPU kernels of flashjit.flash_attn_with_kvcache and of
SDPA's cuDNN backend on the same decode shapes, each kernel's GPU time (torch.profiler), and the
device-to-device copy bandwidth measured three ways (copy_ eager, copy_ in a CUDA graph, and a
read-only pass: torch.sum of a 2 GiB bf16 buffer).

Decode shapes as bench_decode.py's (seqlen_q 1, 32 query heads, d 128, bf16). With --ncu-shape
"gqa,64,4096" it runs just that shape's flashjit and cuDNN calls a few times, for
``ncu --clock-control none`` to read the kernels' counters (device_run.sh's `decodeprof` step).

    python benchmarks/profile_decode.py [--shapes gqa,1,1024 mha,64,4096 ...]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flashjit  # noqa: E402
from bench_decode import (DEVICE, DTYPE, GIB, HEAD_DIM, HEADS, LAYOUTS, PEERS,  # noqa: E402
                          graph_ms, sdpa_call)
from common import bench_ms  # noqa: E402

DEFAULT_SHAPES = ["gqa,1,1024", "gqa,1,4096", "mha,1,16384", "gqa,8,1024", "gqa,64,4096",
                  "mha,8,4096"]


def parse_shape(text: str):
    layout, batch, seqlen_k = text.split(",")
    return layout, int(batch), int(seqlen_k)


def tensors(layout: str, batch: int, seqlen_k: int):
    heads_k = LAYOUTS[layout]
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(batch, seqlen_k, heads_k, HEAD_DIM, device=DEVICE, dtype=DTYPE)
            for _ in range(2))
    return q, k, v


def kernel_times(fn, calls: int = 20) -> dict:
    """{kernel name: mean GPU microseconds per fn() call} over `calls` profiled eager calls."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:90]] += event.device_time / calls
    return dict(totals)


def copy_bandwidths(repeats: int) -> dict:
    """GB/s: copy_ eager and in a graph (bytes read + written), and a read-only torch.sum."""
    src = torch.empty(2 * GIB // 4, dtype=torch.float32, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()
    eager = bench_ms(lambda: dst.copy_(src), warmup=3, repeats=repeats, min_batch_ms=20.0)
    graph = graph_ms(lambda: dst.copy_(src), 2, repeats)
    half = src.view(torch.bfloat16)
    read = bench_ms(lambda: half.sum(), warmup=3, repeats=repeats, min_batch_ms=20.0)
    return {"copy_eager": 2 * nbytes / eager / 1e6, "copy_graph": 2 * nbytes / graph / 1e6,
            "sum_read": nbytes / read / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    ap.add_argument("--ncu-shape", default=None)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.ncu_shape:
        q, k, v = tensors(*parse_shape(args.ncu_shape))
        fn, _ = sdpa_call(PEERS["cudnn"], q, k, v)
        for _ in range(3):
            flashjit.flash_attn_with_kvcache(q, k, v)
            fn()
        torch.cuda.synchronize()
        return
    for name, gbs in copy_bandwidths(args.repeats).items():
        print(f"{name}: {gbs:.0f} GB/s", flush=True)
    for text in args.shapes:
        layout, batch, seqlen_k = parse_shape(text)
        q, k, v = tensors(layout, batch, seqlen_k)
        kv_bytes = 2 * k.numel() * k.element_size()
        cudnn, how = sdpa_call(PEERS["cudnn"], q, k, v)
        for who, fn in (("flashjit", lambda: flashjit.flash_attn_with_kvcache(q, k, v)),
                        ("cudnn" + (f" ({how})" if how else ""), cudnn)):
            if fn is None:
                print(f"{text} {who}: refused ({how})")
                continue
            ms = graph_ms(fn, max(1, min(20, GIB // kv_bytes)), args.repeats)
            print(f"{text} {who}: {ms * 1e3:.1f} us per call in a graph, "
                  f"{kv_bytes / ms / 1e6:.0f} GB/s of K/V", flush=True)
            for kernel, us in sorted(kernel_times(fn).items(), key=lambda kv: -kv[1]):
                print(f"    {us:8.1f} us  {kernel}")
        q = k = v = cudnn = None  # free before the next shape
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
