"""Smoke check of the warp-specialised Hopper forward (FLASHJIT_KERNEL_FAMILY=sm90ws): a few
shapes against SDPA (math) in float32, max |difference|, and the time against the sm90 family.
A first look, not the test suite (tests/gpu/test_fwd.py through device_run.sh's testws)."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flashjit  # noqa: E402
from flashjit import ops  # noqa: E402

torch.manual_seed(0)
for (b, s, h, d, causal) in [(1, 128, 1, 128, False), (2, 1000, 4, 128, False), (2, 1000, 4, 128, True),
                              (1, 4096, 16, 128, False), (2, 777, 8, 64, True)]:
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.float().transpose(1, 2) for x in (q, k, v)), is_causal=causal).transpose(1, 2)
    t0 = time.time()
    out = flashjit.flash_attn_func(q, k, v, causal=causal)
    torch.cuda.synchronize()
    err = (out.float() - ref).abs().max().item()
    nan = out.isnan().any().item()
    print(f"b{b} s{s} h{h} d{d} causal={causal}: max|diff| {err:.3g} nan={nan} "
          f"({time.time() - t0:.1f} s incl. build)", flush=True)
print("specs:", sorted(k[0] for k in ops._resolved), flush=True)
