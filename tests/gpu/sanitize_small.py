"""A small run of every kernel for compute-sanitizer (memcheck, racecheck); see device_run.sh.

    compute-sanitizer --tool racecheck python3 tests/gpu/sanitize_small.py [head dims...]

Head dims given: only the calls at those head dims (a quicker check of one bucket's kernels).
"""

import sys

import torch

import flashjit

torch.manual_seed(0)
ONLY = {int(a) for a in sys.argv[1:]}


def wanted(d: int) -> bool:
    return not ONLY or d in ONLY


# On sm90a the forwards run the sm90ws family (d 64/128 with 2-3 consumer warpgroups, d 160-256
# with P V in 64-column panels) and the backwards the sm90 one (d 160-256 by column halves, uneven
# at 160-192; the deterministic calls add its dQ kernel); the fourth call has dropout.
for dtype, d, causal, deterministic, dropout_p in [(torch.float16, 64, False, False, 0.0),
                                                   (torch.bfloat16, 128, True, False, 0.0),
                                                   (torch.bfloat16, 128, False, True, 0.0),
                                                   (torch.float16, 64, True, False, 0.2),
                                                   (torch.bfloat16, 256, True, False, 0.0),
                                                   (torch.bfloat16, 256, False, True, 0.0),
                                                   (torch.float16, 192, False, False, 0.0),
                                                   (torch.bfloat16, 192, True, True, 0.0),
                                                   # padded buckets (sm90ws: 160 -> 192 and
                                                   # 224 -> 256 columns), the second with dropout
                                                   (torch.float16, 160, True, False, 0.0),
                                                   (torch.bfloat16, 224, False, False, 0.2),
                                                   # the wgmma backward's 128-column kernels at
                                                   # bucket 96: deterministic dQ, dropout
                                                   (torch.bfloat16, 96, True, True, 0.0),
                                                   (torch.float16, 96, False, False, 0.2)]:
    if not wanted(d):
        continue
    q = torch.randn(1, 130, 2, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(1, 77, 1, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(1, 77, 1, d, device="cuda", dtype=dtype, requires_grad=True)
    out = flashjit.flash_attn_func(q, k, v, causal=causal, deterministic=deterministic,
                                   dropout_p=dropout_p)
    out.sum().backward()
# d 64 past the short-sequence switch (640 query and key rows): the sm90ws forward's three-consumer
# kernel, whose round-robin turns the short calls above never reach
if wanted(64):
    q, k, v = (torch.randn(1, 640, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flashjit.flash_attn_func(q, k, v)
# the sm90ws forward's persistent grid (not causal, fixed length, d <= 128): more tiles than CTA
# slots (132 SMs: 160 tiles at d 128; d 64's short tile, two CTAs per SM: 400 tiles), so CTAs
# run a second tile with the K/V buffers, barriers and turns of the first; keys end inside a
# block (a V tail in each tile)
for d, sq in [(d, sq) for d, sq in ((128, 256), (64, 300)) if wanted(d)]:
    q = torch.randn(1, sq, 80, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, sq - 19, 80, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flashjit.flash_attn_func(q, k, v)
    flashjit.flash_attn_func(q, k, v, causal=True)  # grouped longest-first order (branch)
# varlen with rows past the last sequence (the tail-zeroing kernel), at a bucket the sm90ws
# forward and the sm90 backward pad to whole panels (96 -> 128 columns), and a head dim that is
# padded (59 -> 64)
for d in [d for d in (96, 59) if wanted(d) or (d == 59 and wanted(64))]:
    q = torch.randn(150, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(120, 1, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(120, 1, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu_q = torch.tensor([0, 60, 130], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, 50, 100], device="cuda", dtype=torch.int32)
    out = flashjit.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 70, 50, causal=True)
    out.sum().backward()
# every variant at once (causal + sliding window + softcap + ALiBi + sink; specs prebuilt by
# device_run.sh), atomic and deterministic dQ, and with dropout
for dtype, d, deterministic, dropout_p in [(torch.float16, 128, False, 0.0),
                                           (torch.float16, 128, True, 0.0),
                                           (torch.bfloat16, 64, False, 0.2)]:
    if not wanted(d):
        continue
    q = torch.randn(2, 130, 2, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(2, 150, 1, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(2, 150, 1, d, device="cuda", dtype=dtype, requires_grad=True)
    sink = torch.randn(2, device="cuda", requires_grad=True)
    out = flashjit.flash_attn_func(q, k, v, causal=True, window_size=(40, 0), softcap=20.0,
                                   alibi_slopes=torch.rand(2, device="cuda"), sink=sink,
                                   deterministic=deterministic, dropout_p=dropout_p)
    out.sum().backward()
torch.cuda.synchronize()
print("sanitize_small: ok")
