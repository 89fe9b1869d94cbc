"""Context parallelism: flashjit under torch's context_parallel on 2 GPUs against 1 GPU.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        benchmarks/bench_context_parallel.py [--out DIR] [--seqlens 131072 ... 1048576]

Setting: batch 1, 16 heads, head dim 128, bf16, causal; flashjit active as SDPA's flash
implementation (torch.nn.attention.activate_flash_attention_impl("flashjit")). One step is
F.scaled_dot_product_attention (flash backend) forward + backward:
  * 1 GPU: the whole sequence on rank 0 (rank 1 waits);
  * 2 GPUs: inside torch.distributed.tensor.experimental.context_parallel (head-tail load
    balancing), both ranks, in three configurations of torch's ring (--configs):
      allgather: torch's defaults (K/V all-gathered once; partial outputs merged in float32);
      alltoall: K/V passed to the next rank step by step (set_rotate_method("alltoall"));
      alltoall-nof32: as alltoall, merging in the inputs' dtype (_cp_options.convert_to_f32 off).
Times: median of CUDA-event timings of single steps (1-3 per point, after warm-up at the shortest
length; each step takes from ~0.1 s to ~30 s, so one step is its own batch), the slower rank's.
Scaling efficiency = t(1 GPU) / (2 t(2 GPUs)). Memory per GPU: the peak allocated during one step
beyond what was allocated before it, plus that GPU's inputs (q, k, v, dout: the whole sequence
on 1 GPU, its shard on 2), in GiB (torch shards the buffers in place with resize_, which keeps
their full-size storage allocated: that storage is left out, as in a model, where q, k, v are
computed from the sharded batch); also what the forward keeps for the backward (allocated
after a forward, beyond what was allocated before it: out, lse; per layer in a model). The
longest sequence one step fits is estimated from a straight line through the measured peaks
(memory is linear in the sequence) against the card's memory less 5%, not run: a step at that
length would take minutes (time grows as the square).
NVLink multicast must be off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1).

Writes context_parallel.json and context_parallel.md under benchmarks/results/<gpu>/ (rank 0).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor.experimental._attention import (_cp_options, context_parallel,
                                                              set_rotate_method)
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests" / "gpu"))
from common import attention_flops, env_header, environment, results_dir, write_json  # noqa: E402
from cp_worker import init_flashjit_cp  # noqa: E402  (NCCL, mesh, flashjit active)

BATCH, HEADS, HEAD_DIM, DTYPE = 1, 16, 128, torch.bfloat16
SEQLENS = [131072, 262144, 524288, 1048576]
GIB = 2**30


def step(q, k, v, dout):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.autograd.grad(out, (q, k, v), dout)


def kept_gib(q, k, v) -> float:
    """GiB a forward keeps allocated for its backward (out and what autograd saves)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.cuda.synchronize()
    kept = (torch.cuda.memory_allocated() - before) / GIB
    del out
    return kept


def time_steps(fn, budget_s: float = 40.0):
    """(median ms, runs, peak GiB beyond the memory allocated before a step)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    while len(times) < 3 and (not times or sum(times) / 1e3 + times[-1] / 1e3 <= budget_s):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), len(times), (torch.cuda.max_memory_allocated() - before) / GIB


def inputs(seqlen):
    g = torch.Generator(device="cuda").manual_seed(seqlen)  # the same sequence on every rank
    q, k, v, dout = (torch.randn(BATCH, HEADS, seqlen, HEAD_DIM, device="cuda", generator=g,
                                 dtype=DTYPE) for _ in range(4))
    return q, k, v, dout


def nbytes(*ts) -> float:
    return sum(t.numel() * t.element_size() for t in ts) / GIB


def one_gpu(seqlen):
    q, k, v, dout = inputs(seqlen)
    for t in (q, k, v):
        t.requires_grad_()
    ms, runs, peak = time_steps(lambda: step(q, k, v, dout))
    return ms, runs, peak + nbytes(q, k, v, dout), kept_gib(q, k, v)


CONFIGS = {  # name: (rotate method, merge in float32)
    "allgather": ("allgather", True),
    "alltoall": ("alltoall", True),
    "alltoall-nof32": ("alltoall", False),
}


def two_gpus(mesh, seqlen, config="allgather"):
    q, k, v, dout = inputs(seqlen)
    rotate, f32 = CONFIGS[config]
    set_rotate_method(rotate)
    _cp_options.convert_to_f32 = f32
    _cp_options.enable_load_balance = True
    with context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2],
                          no_restore_buffers={q, k, v, dout}):
        for t in (q, k, v):
            t.requires_grad_()
        ms, runs, peak = time_steps(lambda: step(q, k, v, dout))
        shard = nbytes(q, k, v, dout)  # resized in place to this rank's shard
        kept = kept_gib(q, k, v)
    return ms, runs, peak + shard, kept


def line_fit(xs, ys):
    """(intercept, slope) of the least-squares line through the points."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--seqlens", type=int, nargs="+", default=SEQLENS)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    rank, world, mesh = init_flashjit_cp()
    one_gpu(min(args.seqlens))            # warm-up: kernels loaded, allocator primed
    for config in args.configs:
        two_gpus(mesh, min(args.seqlens), config)
    rows = []
    for seqlen in args.seqlens:
        single = one_gpu(seqlen) if rank == 0 else None
        dist.barrier()
        torch.cuda.empty_cache()
        for config in args.configs:
            multi = two_gpus(mesh, seqlen, config)
            gathered = [None] * world
            dist.all_gather_object(gathered, multi)
            torch.cuda.empty_cache()
            if rank != 0:
                continue
            t2 = max(g[0] for g in gathered)
            flops = attention_flops(BATCH, HEADS, seqlen, seqlen, HEAD_DIM, True, "fwd_bwd")
            row = dict(seqlen=seqlen, config=config, ms_1gpu=single[0], runs_1gpu=single[1],
                       ms_2gpu=t2, runs_2gpu=min(g[1] for g in gathered), gib_1gpu=single[2],
                       gib_2gpu=max(g[2] for g in gathered), kept_gib_1gpu=single[3],
                       kept_gib_2gpu=max(g[3] for g in gathered),
                       tflops_per_gpu_1=flops / single[0] / 1e9,
                       tflops_per_gpu_2=flops / t2 / 1e9 / world,
                       efficiency=single[0] / (world * t2))
            rows.append(row)
            print(f"{seqlen:>8} {config:>15}: 1 GPU {single[0] / 1e3:7.2f} s, {single[2]:6.1f} "
                  f"GiB | {world} GPUs {t2 / 1e3:7.2f} s, {row['gib_2gpu']:6.1f} GiB | "
                  f"efficiency {row['efficiency']:.1%}", flush=True)
    if rank == 0:
        write(args, rows, world)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def write(args, rows, world):
    env = environment()
    usable = 0.95 * torch.cuda.get_device_properties(0).total_memory / GIB
    longest = {}
    firsts = [r for r in rows if r["config"] == rows[0]["config"]]
    if len(firsts) >= 2:
        a, b = line_fit([r["seqlen"] for r in firsts], [r["gib_1gpu"] for r in firsts])
        longest["1 GPU"] = dict(gib_per_million_tokens=b * 2**20, fixed_gib=a,
                                tokens=int((usable - a) / b))
    for config in args.configs:
        mine = [r for r in rows if r["config"] == config]
        if len(mine) >= 2:
            a, b = line_fit([r["seqlen"] for r in mine], [r["gib_2gpu"] for r in mine])
            longest[f"{world} GPUs, {config}"] = dict(gib_per_million_tokens=b * 2**20,
                                                      fixed_gib=a, tokens=int((usable - a) / b))
    out = results_dir(args.out)
    write_json(out / "context_parallel.json", dict(
        env=env, world=world, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, dtype="bf16",
        causal=True, configs={c: CONFIGS[c] for c in args.configs}, rows=rows,
        usable_gib=usable, longest_estimate=longest))
    lines = [
        "# flashjit under torch's context parallelism: 1 GPU against 2",
        "",
        f"{env_header(env)}; {world} GPUs, NCCL, NVLink multicast off. batch {BATCH}, {HEADS} "
        f"heads, d {HEAD_DIM}, bf16, causal; one step = F.scaled_dot_product_attention forward + "
        "backward with flashjit as SDPA's flash implementation; 2 GPUs: torch's "
        "`context_parallel` with head-tail load balancing; configurations of torch's ring: "
        "allgather = torch's defaults (K/V all-gathered, float32 merge), alltoall = K/V passed "
        "rank to rank, nof32 = merge in bf16. "
        "Produced by `benchmarks/bench_context_parallel.py` (method in its docstring). Peak = "
        "the step's peak allocation with its inputs; kept = what the forward keeps for the "
        "backward (per layer in a model).",
        "",
        "| seqlen | ring | 1 GPU s/step | 2 GPUs s/step | efficiency | TFLOP/s per GPU (1 / 2) "
        "| peak GiB per GPU (1 / 2) | kept GiB per GPU (1 / 2) | runs (1 / 2) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['seqlen'] // 1024}k | {r['config']} | {r['ms_1gpu'] / 1e3:.2f} | "
                     f"{r['ms_2gpu'] / 1e3:.2f} | {r['efficiency']:.1%} | "
                     f"{r['tflops_per_gpu_1']:.0f} / {r['tflops_per_gpu_2']:.0f} | "
                     f"{r['gib_1gpu']:.1f} / {r['gib_2gpu']:.1f} | "
                     f"{r['kept_gib_1gpu']:.2f} / {r['kept_gib_2gpu']:.2f} | "
                     f"{r['runs_1gpu']} / {r['runs_2gpu']} |")
    if longest:
        lines += ["", f"Longest sequence one attention step fits (estimate from a line through "
                      f"the peaks above, against {usable:.0f} GiB per GPU; not run):", ""]
        for name, e in longest.items():
            lines.append(f"- {name}: {e['tokens'] / 2**20:.1f}M tokens "
                         f"({e['gib_per_million_tokens']:.1f} GiB per million tokens per GPU "
                         f"{'+' if e['fixed_gib'] >= 0 else '-'} {abs(e['fixed_gib']):.1f} GiB)")
    (out / "context_parallel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
