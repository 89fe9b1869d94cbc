"""Forward TFLOP/s of flashjit (the family FLASHJIT_KERNEL_FAMILY picks) and SDPA cuDNN, bf16,
16k tokens x hidden 2048 as bench_peers.py; a first look at the sm90ws family. WS_DIMS: the
head dims (default "64 128"), WS_SEQLENS the sequence lengths (default "512 1024 8192").
WS_DROPOUT=p: flashjit with dropout p against flashjit without (the issue's "forward with
dropout <= 1.2x the plain forward"), no cuDNN. WS_SOFTCAP=c: likewise with softcap c (the variants
issue's "softcap overhead <= 10%"). WS_RESIDUAL=1: likewise with inputs that require grad (a
training forward: flashjit's forward then also writes O's rounding residual for the backward's D,
interface._FlashAttnFunction) against without, and cuDNN with them too."""
import os
import sys
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import flashjit  # noqa: E402
from common import attention_flops, bench_ms  # noqa: E402

fam = os.environ.get("FLASHJIT_KERNEL_FAMILY", "default")
dropout_p = float(os.environ.get("WS_DROPOUT", "0"))
softcap = float(os.environ.get("WS_SOFTCAP", "0"))
residual = os.environ.get("WS_RESIDUAL", "") not in ("", "0")


def cudnn_ms(q, k, v, causal):
    """SDPA's cuDNN backend on the same (b, s, h, d) tensors."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=causal), 3, 10)


def warm(fn, seconds=0.25):
    """Calls fn (compiling its spec on the first call) until `seconds` of GPU work have run: a
    compile leaves the GPU idle for seconds, and the first timing after it ran at a lower clock
    (512 tokens: 0.57-0.83x of the same kernel's time a moment later, logs/ws_residual.log)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()


for d in [int(x) for x in os.environ.get("WS_DIMS", "64 128").split()]:
    for s in [int(x) for x in os.environ.get("WS_SEQLENS", "512 1024 8192").split()]:
        for causal in (False, True):
            b, h = 16384 // s, 2048 // d
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            fl = attention_flops(b, h, s, s, d, causal)
            if softcap > 0 or dropout_p > 0:  # compile the variant's spec before timing either
                flashjit.flash_attn_func(q, k, v, causal=causal, softcap=softcap,
                                         dropout_p=dropout_p)
            warm(lambda: flashjit.flash_attn_func(q, k, v, causal=causal))
            ms = bench_ms(lambda: flashjit.flash_attn_func(q, k, v, causal=causal), 3, 10)
            if softcap > 0:
                mv = bench_ms(lambda: flashjit.flash_attn_func(q, k, v, causal=causal,
                                                               softcap=softcap), 3, 10)
                print(f"{fam} d{d} s{s} causal={int(causal)}: {fl / ms / 1e9:.0f} TFLOP/s, with "
                      f"softcap {softcap}: {fl / mv / 1e9:.0f} ({mv / ms:.2f}x the time)",
                      flush=True)
                continue
            if residual:
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                mg = bench_ms(lambda: flashjit.flash_attn_func(qg, kg, vg, causal=causal), 3, 10)
                mc = cudnn_ms(qg, kg, vg, causal)
                print(f"{fam} d{d} s{s} causal={int(causal)}: {fl / ms / 1e9:.0f} TFLOP/s, with "
                      f"inputs requiring grad: {fl / mg / 1e9:.0f} ({mg / ms:.2f}x the time); "
                      f"cuDNN with them {fl / mc / 1e9:.0f}", flush=True)
                continue
            if dropout_p > 0:
                md = bench_ms(lambda: flashjit.flash_attn_func(q, k, v, causal=causal,
                                                               dropout_p=dropout_p), 3, 10)
                print(f"{fam} d{d} s{s} causal={int(causal)}: {fl / ms / 1e9:.0f} TFLOP/s, with "
                      f"dropout {dropout_p}: {fl / md / 1e9:.0f} ({md / ms:.2f}x the time)",
                      flush=True)
                continue
            mc = cudnn_ms(q, k, v, causal)
            print(f"{fam} d{d} s{s} causal={int(causal)}: {fl / ms / 1e9:.0f} TFLOP/s, cuDNN "
                  f"{fl / mc / 1e9:.0f} ({mc / ms:.2f}x)", flush=True)
