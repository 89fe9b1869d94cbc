"""Where the time of a small attention call goes: host overhead per call, and kernel time alone.

    python benchmarks/bench_overhead.py [--profile]

1. Host cost per call: many calls on a tiny input (1 x 128 x 1 x 64, bf16) with one
   synchronisation at the end, so the wall time per call is the Python/dispatcher cost.
2. Kernel time without host overhead: the forward at d 128, seqlen 1k and 4k (16k tokens), causal
   and not, captured in a CUDA graph and timed by replaying it, for flashjit and SDPA flash.
Prints a table; used to tell host overhead from kernel speed in bench_peers.py's short sequences.
`--profile`: instead, where the host cost of flashjit's forward+backward on the tiny input goes:
layer by layer (host_breakdown), cProfile's top functions by own time, and torch.profiler's CPU
ops and GPU kernels per call.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flashjit  # noqa: E402
from common import attention_flops, bench_ms  # noqa: E402


def host_us(fn, calls=2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def graph_ms(fn) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay, 5, 20)


class _Floor(torch.autograd.Function):
    """The least a Python autograd.Function attention can cost on the host: the allocations a
    forward and a backward need at least (out and lse; dq, dk, dv) and no kernel."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def host_breakdown(q, k, v, dout):
    """Host cost of forward+backward, layer by layer: a Python autograd.Function with no kernel
    (the floor of this design), flashjit with its kernel launches skipped (ops._launch a no-op:
    the Python path and allocations), flashjit, SDPA flash (C++ all the way)."""
    from flashjit import ops

    def grad(out):
        return torch.autograd.grad(out, (q, k, v), dout)
    launch = ops._launch
    rows = [("autograd.Function floor (5 allocations, no kernel)", lambda: grad(_Floor.apply(q, k, v)[0]))]
    try:
        ops._launch = lambda *a: None
        rows.append(("flashjit, kernels not launched", host_us(
            lambda: grad(flashjit.flash_attn_func(q, k, v)))))
    finally:
        ops._launch = launch
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt)
    rows += [("flashjit", lambda: grad(flashjit.flash_attn_func(q, k, v))),
             ("SDPA flash", lambda: torch.autograd.grad(sdpa(), (q, k, v), dout.transpose(1, 2)))]
    print("| host cost of forward+backward (tiny input) | us |\n|---|---|")
    for name, fn in rows:
        us = fn if isinstance(fn, float) else host_us(fn)
        print(f"| {name} | {us:.1f} |", flush=True)
    print()


def profile_fwd_bwd(q, k, v, dout, calls=300):
    """host_breakdown, then cProfile and torch.profiler over `calls` forward+backward calls
    (after warm-up)."""
    import cProfile
    import pstats

    def step():
        torch.autograd.grad(flashjit.flash_attn_func(q, k, v), (q, k, v), dout)
    host_us(step, calls=50)
    host_breakdown(q, k, v, dout)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    prof.disable()
    print(f"cProfile, {calls} forward+backward calls, by own time")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    print("torch.profiler, 20 forward+backward calls")
    print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_overhead.py: no CUDA device")
    q, k, v = (torch.randn(1, 128, 1, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    dout = torch.randn_like(q)
    if "--profile" in sys.argv[1:]:
        return profile_fwd_bwd(q, k, v, dout)

    def sdpa(causal=False):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    rows = [
        ("flashjit fwd, no grad", lambda: flashjit.flash_attn_func(q.detach(), k.detach(), v.detach())),
        ("flashjit fwd", lambda: flashjit.flash_attn_func(q, k, v)),
        ("flashjit fwd+bwd", lambda: torch.autograd.grad(flashjit.flash_attn_func(q, k, v),
                                                         (q, k, v), dout)),
        ("SDPA flash fwd", sdpa),
        ("SDPA flash fwd+bwd", lambda: torch.autograd.grad(sdpa(), (q, k, v), dout.transpose(1, 2))),
    ]
    print("| host cost per call (tiny input) | us |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {host_us(fn):.1f} |", flush=True)
    print("\n| forward kernel alone (CUDA graph), bf16 | flashjit TFLOP/s | SDPA flash TFLOP/s |")
    print("|---|---|---|")
    for d in (64, 128):
        for seqlen in (1024, 4096):
            for causal in (False, True):
                b, h = 16384 // seqlen, 2048 // d
                q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16)
                           for _ in range(3))
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                flops = attention_flops(b, h, seqlen, seqlen, d, causal)
                ours = graph_ms(lambda: flashjit.flash_attn_func(q, k, v, causal=causal))

                def peer():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                theirs = graph_ms(peer)
                print(f"| d{d} s{seqlen} causal={causal} | {flops / ours / 1e9:.1f} | "
                      f"{flops / theirs / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
