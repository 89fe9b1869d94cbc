"""torch's context parallelism over flashjit's SDPA provider ops, on the CPU with gloo.

Run as `python -m torch.distributed.run --standalone --nproc-per-node N cp_gloo_worker.py`
(tests/cpu/test_context_parallel_cpu.py does). What runs is what runs on GPUs, but for the kernel:
  * torch's context parallelism (torch.distributed.tensor.experimental): sharding of the
    buffers (with its head-tail load balancer for causal), the ring over K/V (all-gather or
    all-to-all rotation), the merge of the partial outputs by their lse, the backward's ring;
  * flashjit's aten op implementations (flashjit/integrations/sdpa.py: sdpa_flash_forward and
    sdpa_flash_backward, with their layout and lse unit conversions), registered here for the
    CPU dispatch key, the kernels (ops.call_fwd, ops.call_bwd) replaced by a float32 reference
    of their contract (out and lse in log2 units; gradients from the given global out and lse:
    tests/reference.py); their decision to serve checks that flashjit would take every call the
    ring makes (only "not CUDA" is waived).
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
from ranks import say  # noqa: E402
from reference import attention_grads_ref, attention_ref  # noqa: E402

from flashjit import ops  # noqa: E402
from flashjit.integrations import sdpa  # noqa: E402

LN2 = math.log(2.0)

# FLASHJIT_CP_BREAK=local-lse: the test's own check that it can fail
BREAK = os.environ.get("FLASHJIT_CP_BREAK", "")
# pieces against a float64 whole, relative to the largest reference value: float32 pieces; bf16
# ones (inputs and the op's outputs rounded to bf16, ~4e-3 each, merged in float32)
TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2}


def kernel_fwd(q, k, v, cu_q, cu_k, seqused_k, block_table, max_q, max_k, softmax_scale, causal,
               bottom_right, left, right, softcap, alibi, sink, dropout_p, rng, residual):
    """ops.call_fwd's contract in float32: (out like q, (b, s, h, d); lse in LOG2 units (b, h,
    s); residual), so flashjit's own lse conversion and layout code runs around it."""
    assert cu_q is None and seqused_k is None and block_table is None
    assert dropout_p == 0.0 and softcap == 0.0
    assert (max_q, max_k) == (q.shape[1], k.shape[1]), "max_q/max_k must follow the tensors"
    out, lse = attention_ref(q.float(), k.float(), v.float(), causal=causal,
                             softmax_scale=softmax_scale, bottom_right=bottom_right)
    return out.to(q.dtype), lse.float() / LN2, None


def kernel_bwd(dout, q, k, v, out, residual, lse_log2, cu_q, cu_k, seqused_k, max_q, max_k,
               softmax_scale, causal, bottom_right, left, right, softcap, alibi, sink, dropout_p,
               rng, deterministic):
    """ops.call_bwd's contract: (dq, dk, dv, D) from the GIVEN out and lse (log2 units)."""
    assert (max_q, max_k) == (q.shape[1], k.shape[1]), "max_q/max_k must follow the tensors"
    lse = lse_log2 * LN2
    if BREAK == "local-lse":  # a backward that ignores the lse it is given: the ring must fail
        lse = attention_ref(q.float(), k.float(), v.float(), causal=causal,
                            softmax_scale=softmax_scale, bottom_right=bottom_right)[1]
    grads = attention_grads_ref(dout, q, k, v, out, lse, causal=causal,
                                softmax_scale=softmax_scale, bottom_right=bottom_right)
    return (*grads, None)


def serve_checked(op, keyset, reason, dropout_p, side_reason, args, kwargs):
    """sdpa._serve_or_fallback, deciding to serve: on a real install CPU tensors go to torch's
    kernel (reason: not CUDA), here they are served; every other reason (a shape, dtype or
    layout the ring passes that flashjit would refuse) fails the test."""
    assert side_reason is None, f"{op}: flashjit would refuse this ring call: {side_reason}"
    assert reason is None or "not CUDA" in reason, f"{op}: flashjit would refuse: {reason}"
    return None


def install_cpu_ops():
    """flashjit's op implementations for the CPU key, its kernels replaced by the reference."""
    ops.call_fwd, ops.call_bwd = kernel_fwd, kernel_bwd
    sdpa._serve_or_fallback = serve_checked
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
    cases = [  # (batch, heads, heads_k, seqlen, d, causal, rotate, dtype)
        (2, 4, 4, 64, 32, True, "allgather", torch.float32),
        (1, 4, 4, 96, 16, False, "allgather", torch.float32),
        (2, 4, 2, 64, 32, True, "alltoall", torch.float32),   # GQA 4:2
        (1, 6, 2, 128, 16, False, "alltoall", torch.float32),
        (2, 4, 2, 64, 32, True, "allgather", torch.bfloat16),  # the ring's half round trips
    ]
    failed = 0
    for i, (b, h, hk, s, d, causal, rotate, dtype) in enumerate(cases):
        g = torch.Generator().manual_seed(100 + i)  # the same inputs on every rank
        q = torch.randn(b, h, s, d, generator=g)
        k, v = (torch.randn(b, hk, s, d, generator=g) for _ in range(2))
        dout = torch.randn(b, h, s, d, generator=g)
        q, k, v, dout = (t.to(dtype).float() for t in (q, k, v, dout))  # both sides see these
        set_rotate_method(rotate)
        ref_out, ref_lse, ref_grads = whole(q, k, v, dout, causal)
        out, lse, dq, dk, dv = sharded(mesh, *(t.to(dtype) for t in (q, k, v, dout)), causal)
        tol = TOL[dtype]
        errors = {}
        for name, x, ref in (("out", out, ref_out), ("lse", lse[..., 0], ref_lse),
                             ("dq", dq, ref_grads[0]), ("dk", dk, ref_grads[1]),
                             ("dv", dv, ref_grads[2])):
            assert x.shape == ref.shape, (name, x.shape, ref.shape)
            errors[name] = float((x.detach().double() - ref).abs().max() / ref.abs().max())
        ok = all(math.isfinite(e) and e <= tol for e in errors.values())
        failed += not ok
        line = " ".join(f"{n} {e:.1e}{'' if e <= tol else ' FAILED'}" for n, e in errors.items())
        if rank == 0 or not ok:  # one line per case (both ranks check; exit status covers both)
            say(f"rank {rank} case b{b} h{h}:{hk} s{s} d{d} causal={causal} {rotate} "
                f"{str(dtype)[6:]} ({world} ranks): {'ok' if ok else 'FAILED'} {line}")
    # Teardown: every rank past its last collective before the group goes, and no interpreter
    # shutdown after it (a CI run saw rank 0 abort there with "terminate called without an
    # active exception" after all its cases passed: gloo's threads at exit, torch 2.13).
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
