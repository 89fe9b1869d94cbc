"""torch's context parallelism with flashjit as SDPA's flash implementation, on GPUs (NCCL).

Run as `python -m torch.distributed.run --standalone --nproc-per-node 2 tests/gpu/cp_worker.py`
(tests/gpu/test_context_parallel.py does, on a machine with two GPUs; NVLink multicast off:
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1). For each case, on every rank:
  * the whole sequence on one GPU: F.scaled_dot_product_attention with flashjit active
    (flash backend), and PyTorch's own same-dtype result (SDPA's memory-efficient backend), the
    float32 reference being that backend in float32 (linear memory, so 64k tokens fit);
  * the sequence sharded over the ranks by torch.distributed.tensor.experimental's
    context_parallel (head-tail load balancing for causal, as torch does), forward and
    backward through F.scaled_dot_product_attention, then unsharded;
  * the house criterion: the sharded out, dq, dk, dv within 2x of PyTorch's own error against the
    float32 reference (+1e-4); also printed: the distance to the one-GPU flashjit result, and the
    lse of the sharded flash op (called on DTensors, as SDPA calls it) against the reference's;
  * flashjit served every call the ring made (its provider's decision to hand a call to
    torch's kernel is counted, and must not happen), and, in the first case, the profiler
    shows flashjit:: forward and backward kernels and no pytorch_flash:: kernel;
  * the sharded results are also within that 2x of the one-GPU flashjit result.
flashjit's outputs start as NaN (flashjit.ops.POISON_OUTPUTS). Rank 0 prints one line per case,
other ranks print failures; exit status 1 on any failure; a rank that raises stops (torchrun
then stops the others) rather than desynchronise the collectives.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.experimental._attention import (_cp_options, context_parallel,
                                                              context_parallel_unshard,
                                                              set_rotate_method)
from torch.nn.attention import SDPBackend, activate_flash_attention_impl, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ranks import say  # noqa: E402
from reference import max_error  # noqa: E402

import flashjit  # noqa: E402,F401  (registers "flashjit" with torch's registry)
import flashjit.ops  # noqa: E402
from flashjit.integrations import sdpa as provider  # noqa: E402

FALLBACKS: list = []  # the calls flashjit's provider handed to torch's kernels (must stay empty)


def _counting(decide):
    def serve_or_fallback(op, keyset, reason, dropout_p, side_reason, args, kwargs):
        result = decide(op, keyset, reason, dropout_p, side_reason, args, kwargs)
        if result is not None:
            FALLBACKS.append(f"{op}: {reason or side_reason}")
        return result
    return serve_or_fallback

CASES = [  # (batch, heads, heads_k, seqlen, d, causal, dtype, rotate)
    (2, 8, 8, 8192, 128, True, torch.bfloat16, "allgather"),
    (1, 8, 8, 16384, 128, False, torch.bfloat16, "allgather"),
    (1, 8, 2, 32768, 128, True, torch.float16, "alltoall"),    # GQA 8:2
    (1, 8, 2, 16384, 128, False, torch.float16, "allgather"),  # GQA 8:2
    (1, 4, 4, 65536, 128, True, torch.bfloat16, "allgather"),
    (1, 8, 8, 8192, 64, True, torch.float16, "allgather"),
]
# the device's rule (KINDS.md): NVLink multicast stays off in NCCL, torch and NVSHMEM
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}
FWD = ("flash_fwd_kernel", "flash_fwd_sm90_kernel", "flash_fwd_ws_kernel")
BWD = ("flash_bwd_dk_dv_kernel", "flash_bwd_dk_dv_sm90_kernel")


def sdpa(backend, q, k, v, causal):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                              enable_gqa=k.shape[1] != q.shape[1])


def one_gpu(backend, q, k, v, dout, causal, dtype):
    """out and (dq, dk, dv) on the whole sequence, inputs cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    if backend == SDPBackend.EFFICIENT_ATTENTION and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]  # the efficient backend takes no GQA: expand K/V
        kk, vv = (t.repeat_interleave(rep, dim=1) for t in leaves[1:])
    else:
        kk, vv = leaves[1:]
    out = sdpa(backend, leaves[0], kk, vv, causal)
    out.backward(dout.to(dtype))
    return out.detach(), [t.grad for t in leaves]


def efficient_lse(q, k, v, causal, dtype):
    rep = q.shape[1] // k.shape[1]
    k, v = (t.to(dtype).repeat_interleave(rep, dim=1) for t in (k, v))
    lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q.to(dtype), k, v, None, True, is_causal=causal)[1]
    return lse[..., :q.shape[2]]  # (b, h, s) (padded to a multiple of 32 by that kernel)


def sharded(mesh, q, k, v, dout, causal):
    """context_parallel over F.scaled_dot_product_attention (flash backend): unsharded out,
    grads and the flash op's lse."""
    cq, ck, cv, cdo = (t.clone() for t in (q, k, v, dout))
    _cp_options.enable_load_balance = causal  # torch balances causal only
    with context_parallel(mesh, buffers=[cq, ck, cv, cdo], buffer_seq_dims=[2, 2, 2, 2],
                          no_restore_buffers={cq, ck, cv, cdo}):
        for t in (cq, ck, cv):
            t.requires_grad_()
        with torch.enable_grad():
            out = sdpa(SDPBackend.FLASH_ATTENTION, cq, ck, cv, causal)
            out.backward(cdo)
            qd, kd, vd = (DTensor.from_local(t.detach(), mesh, [Shard(2)], run_check=False)
                          for t in (cq, ck, cv))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                lse = torch.ops.aten._scaled_dot_product_flash_attention(
                    qd, kd, vd, 0.0, causal, False)[1].to_local()
    return context_parallel_unshard(mesh, [out.detach(), cq.grad, ck.grad, cv.grad,
                                           lse[..., None]], [2] * 5)


def kernel_names(fn) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def run_case(mesh, i, b, h, hk, s, d, causal, dtype, rotate):
    g = torch.Generator(device="cuda").manual_seed(1000 + i)  # same inputs on every rank
    q = torch.randn(b, h, s, d, device="cuda", generator=g)
    k, v = (torch.randn(b, hk, s, d, device="cuda", generator=g) for _ in range(2))
    dout = torch.randn(b, h, s, d, device="cuda", generator=g)
    set_rotate_method(rotate)
    eff = SDPBackend.EFFICIENT_ATTENTION
    ref_out, ref_grads = one_gpu(eff, q, k, v, dout, causal, torch.float32)
    pt_out, pt_grads = one_gpu(eff, q, k, v, dout, causal, dtype)
    fj_out, fj_grads = one_gpu(SDPBackend.FLASH_ATTENTION, q, k, v, dout, causal, dtype)
    x = [t.to(dtype) for t in (q, k, v, dout)]
    FALLBACKS.clear()
    out, dq, dk, dv, lse = sharded(mesh, *x, causal)
    served = not FALLBACKS
    ok, parts = True, []
    for name, got, ref, pt, one in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv),
                                       (ref_out, *ref_grads), (pt_out, *pt_grads),
                                       (fj_out, *fj_grads)):
        err, err_pt = max_error(got, ref), max_error(pt, ref)
        diff = max_error(got, one)  # against one-GPU flashjit, by the same yardstick
        good = got.shape == ref.shape and err <= 2 * err_pt + 1e-4 and diff <= 2 * err_pt + 1e-4
        ok &= good
        parts.append(f"{name} {err:.2e}/{err_pt:.2e} (1-GPU flashjit {max_error(one, ref):.2e},"
                     f" diff {diff:.2e}){'' if good else ' FAILED'}")
    lse_ref = efficient_lse(q, k, v, causal, torch.float32)
    lse_pt = efficient_lse(q, k, v, causal, dtype)
    err, err_pt = max_error(lse[..., 0], lse_ref), max_error(lse_pt, lse_ref)
    good = err <= 2 * err_pt + 1e-4
    ok &= good and served
    parts.append(f"lse {err:.2e}/{err_pt:.2e}{'' if good else ' FAILED'}")
    parts.append("every call served by flashjit" if served else f"FAILED: fell back {FALLBACKS}")
    if i == 0:  # which kernels ran under context parallelism
        names = kernel_names(lambda: sharded(mesh, *x, causal))
        ran = all(any("flashjit::" in n and any(f in n for f in kernels) for n in names)
                  for kernels in (FWD, BWD))
        theirs = [n for n in names if "pytorch_flash::" in n]
        ok &= ran and not theirs
        parts.append(f"kernels: flashjit fwd+bwd {'ran' if ran else 'MISSING'}, "
                     f"torch flash kernels {len(theirs)}")
    return ok, parts


def init_flashjit_cp():
    """Under torchrun: NCCL (NVLink multicast off, as the device requires), this rank's GPU, a
    1-D mesh over all ranks, flashjit active as SDPA's flash implementation. (rank, world, mesh)"""
    for name, off in MULTICAST_OFF.items():
        assert os.environ.get(name) == off, f"{name} must be {off} (NVLink multicast off)"
    # below the wrappers' timeouts, so a rank stuck in a collective fails with NCCL's report
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=240))
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    activate_flash_attention_impl("flashjit")
    provider._serve_or_fallback = _counting(provider._serve_or_fallback)
    return dist.get_rank(), dist.get_world_size(), mesh


def main() -> int:
    rank, world, mesh = init_flashjit_cp()
    flashjit.ops.POISON_OUTPUTS = True
    torch.backends.cuda.matmul.allow_tf32 = False
    failed = 0
    for i, case in enumerate(CASES):
        try:
            ok, parts = run_case(mesh, i, *case)
        except Exception as e:
            # report, then stop this rank: its peer may be waiting in a collective of this case,
            # and torchrun tears the other ranks down when one exits with an error
            say(f"rank {rank} FAILED: {case} raised {type(e).__name__}: {str(e)[:400]}")
            raise
        failed += not ok
        b, h, hk, s, d, causal, dtype, rotate = case
        if rank == 0 or not ok:
            say(f"rank {rank} {'ok' if ok else 'FAILED'}: b{b} h{h}:{hk} s{s} d{d} "
                f"causal={causal} {str(dtype)[6:]} {rotate}, error/PyTorch's: " + "; ".join(parts))
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
