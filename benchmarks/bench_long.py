"""Long sequences: flashjit forward + backward at 16k .. 128k tokens, time and memory.

    python benchmarks/bench_long.py [--out DIR] [--seqlens 16384 32768 65536 131072]

Setting: batch 1, 16 heads, head dim 128, bf16, causal and not. For each length: median ms of
CUDA-event timings of one forward + backward (torch.autograd.grad), TFLOP/s (4*b*h*n*n*d forward,
halved for causal, x3.5 for forward + backward), and the peak memory allocated during one forward +
backward beyond the inputs (q, k, v, dout), in MiB and per token. Exact attention that never forms
the n x n score matrix needs memory linear in n: the report gives each length's peak over that of
the shortest length beside the ratio of the lengths (quadratic would be the square). Runs of 64k
and longer use fewer repeats (--long-warmup, --long-repeats).

Writes long.json and long.md under benchmarks/results/<gpu>/ (or <--out>/<gpu>/).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flashjit  # noqa: E402
from common import (MIB, attention_flops, bench_ms, env_header, environment,  # noqa: E402
                    peak_mib, results_dir, write_json)

BATCH, HEADS, HEAD_DIM, DTYPE = 1, 16, 128, torch.bfloat16
DEVICE = "cuda"
SEQLENS = [16384, 32768, 65536, 131072]
LONG = 65536  # from here on: --long-warmup / --long-repeats


def measure(seqlen, causal, warmup, repeats):
    """(ms, peak MiB, input MiB) of one forward + backward; the tensors die on return."""
    q, k, v = (torch.randn(BATCH, seqlen, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE,
                           requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def fwd_bwd():
        out = flashjit.flash_attn_func(q, k, v, causal=causal)
        torch.autograd.grad(out, (q, k, v), dout)

    ms = bench_ms(fwd_bwd, warmup, repeats)  # first: one-time allocations happen here
    return ms, peak_mib(fwd_bwd), 4 * q.numel() * q.element_size() / MIB


def run(args):
    env = environment()
    print(env_header(env), flush=True)
    rows = []
    configs = [(s, c) for s in args.seqlens for c in args.causal]
    for i, (seqlen, causal) in enumerate(configs, 1):
        warmup, repeats = ((args.long_warmup, args.long_repeats) if seqlen >= LONG
                           else (args.warmup, args.repeats))
        row = dict(seqlen=seqlen, causal=causal, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM,
                   dtype="bf16", warmup=warmup, repeats=repeats)
        error = None
        try:
            ms, mib, input_mib = measure(seqlen, causal, warmup, repeats)
        except Exception as e:  # noqa: BLE001 - record why, go on with the other lengths
            error = f"{type(e).__name__}: {str(e)[:160]}"
        if error:  # outside the except block: its traceback no longer holds the tensors
            row["error"] = error
            print(f"[{i}/{len(configs)}] s{seqlen} causal={causal}: {error}", flush=True)
        else:
            flops = attention_flops(BATCH, HEADS, seqlen, seqlen, HEAD_DIM, causal, "fwd_bwd")
            row.update(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1),
                       input_mib=round(input_mib, 1), peak_mib=round(mib, 1),
                       kib_per_token=round(mib * 1024 / (BATCH * seqlen), 2))
            print(f"[{i}/{len(configs)}] s{seqlen} causal={causal}: {ms:.1f} ms, "
                  f"{row['tflops']} TFLOP/s, peak {mib:.0f} MiB ({row['kib_per_token']} KiB/token)",
                  flush=True)
        rows.append(row)
        gc.collect()
        torch.cuda.empty_cache()
    # memory growth against the shortest length measured, per causal setting
    for causal in args.causal:
        sel = [r for r in rows if r["causal"] == causal and r.get("peak_mib")]
        if not sel:
            continue
        base = min(sel, key=lambda r: r["seqlen"])
        for r in sel:
            r["memory_vs_shortest"] = round(r["peak_mib"] / base["peak_mib"], 2)
            r["length_vs_shortest"] = round(r["seqlen"] / base["seqlen"], 2)
    return env, rows


def markdown(env, rows):
    lines = ["# flashjit at long sequence lengths", "", env_header(env), "",
             f"Batch {BATCH}, {HEADS} heads, d {HEAD_DIM}, bf16, forward + backward. Peak memory: "
             "allocated during one forward + backward beyond the inputs (q, k, v, dout). "
             "Memory x: peak over the peak at the shortest length; length x: the lengths' ratio "
             "(linear memory: the two agree; quadratic: memory x = length x squared).", "",
             "| seqlen | causal | ms | TFLOP/s | inputs MiB | peak MiB | KiB / token | memory x "
             "| length x |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["causal"], r["seqlen"])):
        if "error" in r:
            lines.append(f"| {r['seqlen']} | {'yes' if r['causal'] else 'no'} | error: "
                         f"{r['error'][:80]} | | | | | | |")
            continue
        lines.append(f"| {r['seqlen']} | {'yes' if r['causal'] else 'no'} | {r['ms']:.1f} | "
                     f"{r['tflops']} | {r['input_mib']:.0f} | {r['peak_mib']:.0f} | "
                     f"{r['kib_per_token']} | {r.get('memory_vs_shortest', '-')} | "
                     f"{r.get('length_vs_shortest', '-')} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", nargs="+", type=int, default=SEQLENS)
    p.add_argument("--causal", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--long-warmup", type=int, default=2, help=f"for seqlen >= {LONG}")
    p.add_argument("--long-repeats", type=int, default=5, help=f"for seqlen >= {LONG}")
    p.add_argument("--out", default=None, help="results base folder (default benchmarks/results)")
    args = p.parse_args()
    args.causal = [c == "yes" for c in dict.fromkeys(args.causal)]
    if not torch.cuda.is_available():
        sys.exit(f"{Path(__file__).name}: no CUDA device (torch {torch.__version__}, CUDA "
                 f"{torch.version.cuda}): this benchmark runs on an NVIDIA GPU")
    torch.manual_seed(0)
    env, rows = run(args)
    out_dir = results_dir(args.out)
    write_json(out_dir / "long.json", {"environment": env, "rows": rows})
    md = markdown(env, rows)
    (out_dir / "long.md").write_text(md)
    print(f"wrote {out_dir / 'long.md'}", flush=True)
    print(md, flush=True)


if __name__ == "__main__":
    main()
