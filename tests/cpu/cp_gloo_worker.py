"""torch's context parallelism over flashjit's SDPA provider ops, on the CPU with gloo.

Run as `python -m torch.distributed.run --standalone --nproc-per-node 2 cp_gloo_worker.py`
(tests/cpu/test_context_parallel_cpu.py does). What runs is what runs on GPUs, but for the kernel:
  * torch's context parallelism (torch.distributed.tensor.experimental): sharding of the
    buffers (with its head-tail load balancer for causal), the ring over K/V (all-gather or
    all-to-all rotation), the merge of the partial outputs by their lse, the backward's ring;
  * flashjit's aten op implementations (flashjit/integrations/sdpa.py: sdpa_flash_forward and
    sdpa_flash_backward), registered here for the CPU dispatch key, with their kernel calls
    (run_forward, run_backward) replaced by a float32 reference of the same contract (out and
    natural-log lse; gradients from the given global out and lse: tests/reference.py).
On the GPU the same path goes through F.scaled_dot_product_attention (tests/gpu/cp_worker.py);
on the CPU SDPA never picks these ops, so the op is called on DTensors, as SDPA would call it.
Each rank checks the unsharded output, lse and gradients against the reference on the whole
sequence (float64); rank 0 prints one line per case (the others print failures); the exit
status is 1 on any failure.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
# torch 2.11-2.14 export these here (context_parallel also from ...experimental)
from torch.distributed.tensor.experimental._attention import (_cp_options, context_parallel,
                                                              context_parallel_unshard,
                                                              set_rotate_method)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from reference import attention_grads_ref, attention_ref  # noqa: E402

from flashjit.integrations import sdpa  # noqa: E402

# FLASHJIT_CP_BREAK=local-lse: the test's own check that it can fail
BREAK = os.environ.get("FLASHJIT_CP_BREAK", "")
TOL = 1e-4  # float32 pieces against a float64 whole, relative to the largest reference value


def reference_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale,
                      window_left=None, window_right=None):
    """sdpa.run_forward's contract in float32: (out (b, s, h, d), lse natural log, rng)."""
    assert cu_q is None and dropout_p == 0.0 and window_left is None and window_right is None
    out, lse = attention_ref(q.float(), k.float(), v.float(), causal=is_causal,
                             softmax_scale=scale)
    return out.to(q.dtype), lse.float(), torch.zeros(2, dtype=torch.int64).view(torch.uint64)


def reference_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal,
                       rng_state, scale, window_left=None, window_right=None):
    if BREAK == "local-lse":  # a backward that ignores the lse it is given: the ring must fail
        lse = attention_ref(q.float(), k.float(), v.float(), causal=is_causal,
                            softmax_scale=scale)[1]
    return attention_grads_ref(dout, q, k, v, out, lse, causal=is_causal, softmax_scale=scale)


def install_cpu_ops():
    """flashjit's op implementations for the CPU key, kernels replaced by the reference. The
    decision to serve is skipped (it refuses CPU tensors, rightly, on a real install)."""
    sdpa.run_forward, sdpa.run_backward = reference_forward, reference_backward
    sdpa._serve_or_fallback = lambda *args, **kwargs: None
    lib = torch.library.Library("aten", "IMPL", "CPU")
    for name in ("_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_flash_attention_backward"):
        lib.impl(name, sdpa.OVERRIDES[name], "CPU", with_keyset=True)
    return lib


def whole(q, k, v, dout, causal):
    """Reference on the whole sequence, float64: out, lse (b, h, s, d / b, h, s) and grads."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out, lse = attention_ref(*(t.transpose(1, 2) for t in leaves), causal=causal)
    out = out.transpose(1, 2)
    out.backward(dout.double())
    return out.detach(), lse, [t.grad for t in leaves]


def sharded(mesh, q, k, v, dout, causal):
    """torch's context parallelism over the flash op: unsharded out, lse and grads."""
    cq, ck, cv, cdo = (t.clone() for t in (q, k, v, dout))
    _cp_options.enable_load_balance = causal  # torch balances causal only (head-tail order)
    with context_parallel(mesh, buffers=[cq, ck, cv, cdo], buffer_seq_dims=[2, 2, 2, 2],
                          no_restore_buffers={cq, ck, cv, cdo}):
        for t in (cq, ck, cv):
            t.requires_grad_()
        with torch.enable_grad():
            qd, kd, vd = (DTensor.from_local(t, mesh, [Shard(2)], run_check=False)
                          for t in (cq, ck, cv))
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                qd, kd, vd, 0.0, causal, False)[:2]
            out, lse = out.to_local(), lse.to_local()
            out.backward(cdo)
    # lse (b, h, s_local) is sharded like the sequence: unshard it as (b, h, s, 1)
    return context_parallel_unshard(mesh, [out.detach(), lse[..., None], cq.grad, ck.grad,
                                           cv.grad], [2] * 5)


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    lib = install_cpu_ops()  # noqa: F841 (the registration lives as long as lib)
    cases = [  # (batch, heads, heads_k, seqlen, d, causal, rotate)
        (2, 4, 4, 64, 32, True, "allgather"),
        (1, 4, 4, 96, 16, False, "allgather"),
        (2, 4, 2, 64, 32, True, "alltoall"),   # GQA 4:2
        (1, 6, 2, 128, 16, False, "alltoall"),
    ]
    failed = 0
    for i, (b, h, hk, s, d, causal, rotate) in enumerate(cases):
        g = torch.Generator().manual_seed(100 + i)  # the same inputs on every rank
        q = torch.randn(b, h, s, d, generator=g)
        k, v = (torch.randn(b, hk, s, d, generator=g) for _ in range(2))
        dout = torch.randn(b, h, s, d, generator=g)
        set_rotate_method(rotate)
        ref_out, ref_lse, ref_grads = whole(q, k, v, dout, causal)
        out, lse, dq, dk, dv = sharded(mesh, q, k, v, dout, causal)
        errors = {}
        for name, x, ref in (("out", out, ref_out), ("lse", lse[..., 0], ref_lse),
                             ("dq", dq, ref_grads[0]), ("dk", dk, ref_grads[1]),
                             ("dv", dv, ref_grads[2])):
            assert x.shape == ref.shape, (name, x.shape, ref.shape)
            errors[name] = float((x.detach().double() - ref).abs().max() / ref.abs().max())
        ok = all(math.isfinite(e) and e <= TOL for e in errors.values())
        failed += not ok
        line = " ".join(f"{n} {e:.1e}" for n, e in errors.items())
        if rank == 0 or not ok:  # one line per case (both ranks check; exit status covers both)
            print(f"rank {rank} case b{b} h{h}:{hk} s{s} d{d} causal={causal} {rotate}: "
                  f"{'ok' if ok else 'FAILED'} {line}", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
