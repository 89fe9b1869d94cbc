"""Per-kernel GPU time of one attention config, flashjit vs SDPA's flash backend (torch.profiler).

    python benchmarks/kernel_times.py --d 128 --seqlen 1024 --causal

Shows where forward + backward time goes (which kernel, microseconds per call), to compare with
the peer kernel by kernel. Diagnostic only: the tables in results/ come from bench_peers.py.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import flashjit


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    b, h = 16384 // args.seqlen, 2048 // args.d
    q, k, v = (torch.randn(b, args.seqlen, h, args.d, device="cuda", dtype=dtype,
                           requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def flashjit_step():
        out = flashjit.flash_attn_func(q, k, v, causal=args.causal)
        torch.autograd.grad(out, (q, k, v), dout)

    def sdpa_step():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                                 is_causal=args.causal)
            torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2))

    print(f"{args.dtype} d{args.d} s{args.seqlen} b{b} h{h} causal={args.causal}: "
          f"GPU us per call, by kernel")
    for name, step in (("flashjit", flashjit_step), ("sdpa_flash", sdpa_step)):
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
        rows = [(e.key, e.device_time_total / args.iters) for e in prof.key_averages()
                if e.device_time_total > 0]
        rows.sort(key=lambda r: -r[1])
        total = sum(t for _, t in rows)
        print(f"  {name}: {total:.1f} us")
        for key, t in rows[:8]:
            print(f"    {t:8.1f}  {key[:110]}")


if __name__ == "__main__":
    main()
