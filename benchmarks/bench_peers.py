"""flashjit vs the peers on one GPU: TFLOP/s of forward, backward and forward+backward.

    python benchmarks/bench_peers.py [--modes fwd bwd fwd_bwd] [--dtypes bf16 fp16] [--out DIR]

Setting (../shared/TARGETS.md): 16k tokens per batch (batch = 16384 / seqlen), hidden 2048
(heads = 2048 / d), d 64 and 128, seqlen 512..16k, causal and not. Peers in the same run: torch
SDPA's flash (FA2 port), cuDNN and memory-efficient backends. FLOPs: 4*b*h*n*n*d forward, halved
for causal; backward 2.5x; forward+backward 3.5x. Time: common.bench_ms, the median over 10
CUDA-event-timed batches of back-to-back calls (>= 20 ms per batch) after warm-up: GPU throughput,
with the host cost of each call hidden behind the GPU work of the previous ones, for flashjit and
the peers alike (bench_overhead.py measures the host cost). Inputs are 64 MiB per tensor, larger
than L2. Writes peers.json and peers.md (and
peers_d<d>.png when matplotlib is present) under benchmarks/results/<gpu>/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flashjit  # noqa: E402
from common import (attention_flops, bench_ms, env_header, environment, results_dir,  # noqa: E402
                    write_json)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PEERS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def make_fns(impl, q, k, v, causal):
    """{mode: fn} for one implementation: forward, backward (of one forward kept for it, graph
    retained) and forward+backward; tensors are (b, s, h, d)."""
    if impl == "flashjit":
        def fwd():
            return flashjit.flash_attn_func(q, k, v, causal=causal)
    else:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def fwd():
            with sdpa_kernel(PEERS[impl]):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    dout = torch.randn_like(q)
    dout_t = dout if impl == "flashjit" else dout.transpose(1, 2)

    def fwd_bwd():
        out = fwd()
        torch.autograd.grad(out, (q, k, v), dout_t)

    kept = {}

    def bwd():
        if "out" not in kept:  # the first (warm-up) call runs the forward once, untimed after
            kept["out"] = fwd()
        torch.autograd.grad(kept["out"], (q, k, v), dout_t, retain_graph=True)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd_bwd}


def run(args):
    env = environment()
    print(env_header(env), flush=True)
    rows = []
    impls = ["flashjit"] + list(PEERS)
    configs = [(dt, d, s, c) for dt in args.dtypes for d in args.head_dims for s in args.seqlens
               for c in (False, True)]
    for i, (dtype_name, d, seqlen, causal) in enumerate(configs, 1):
        batch, heads = args.tokens // seqlen, args.hidden // d
        dtype = DTYPES[dtype_name]
        q, k, v = (torch.randn(batch, seqlen, heads, d, device="cuda", dtype=dtype,
                               requires_grad=True) for _ in range(3))
        row = dict(dtype=dtype_name, d=d, seqlen=seqlen, causal=causal, batch=batch, heads=heads)
        for impl in impls:
            fns = make_fns(impl, q, k, v, causal)
            for mode in args.modes:
                try:
                    ms = bench_ms(fns[mode], args.warmup, args.repeats)
                    tflops = attention_flops(batch, heads, seqlen, seqlen, d, causal, mode) / ms / 1e9
                    row[f"{impl}_{mode}_ms"] = round(ms, 4)
                    row[f"{impl}_{mode}_tflops"] = round(tflops, 1)
                except Exception as e:  # a peer backend may not support a config: record why
                    row[f"{impl}_{mode}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        summary = "  ".join(
            f"{impl} {row.get(f'{impl}_{m}_tflops', '-')}" for m in args.modes for impl in impls)
        print(f"[{i}/{len(configs)}] {dtype_name} d{d} s{seqlen} causal={causal}: {summary}",
              flush=True)
        del q, k, v
    return env, rows


def ratio(row, mode, peer):
    a, b = row.get(f"flashjit_{mode}_tflops"), row.get(f"{peer}_{mode}_tflops")
    return f"{a / b:.2f}x" if a and b else "-"


def markdown(env, rows, modes):
    lines = [f"# flashjit vs peers, TFLOP/s ({env_header(env)})", "",
             "16k tokens per batch, hidden 2048. Ratios are flashjit / peer.", ""]
    for mode in modes:
        lines += [f"## {mode}", "",
                  "| dtype | d | seqlen | causal | flashjit | SDPA flash | SDPA cuDNN | SDPA efficient "
                  "| vs flash | vs cuDNN |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cells = [str(r.get(f"{impl}_{mode}_tflops", "-"))
                     for impl in ("flashjit", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient")]
            lines.append(f"| {r['dtype']} | {r['d']} | {r['seqlen']} | {'yes' if r['causal'] else 'no'}"
                         f" | {' | '.join(cells)} | {ratio(r, mode, 'sdpa_flash')} | "
                         f"{ratio(r, mode, 'sdpa_cudnn')} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows, modes, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install flashjit[bench])")
        return
    for d in sorted({r["d"] for r in rows}):
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, 4 * len(modes)), squeeze=False)
        for mi, mode in enumerate(modes):
            for ci, causal in enumerate((False, True)):
                ax = axes[mi][ci]
                sel = [r for r in rows if r["d"] == d and r["causal"] == causal
                       and r["dtype"] == rows[0]["dtype"]]
                for impl in ("flashjit", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"):
                    ys = [r.get(f"{impl}_{mode}_tflops") for r in sel]
                    xs = [str(r["seqlen"]) for r, y in zip(sel, ys) if y]
                    ax.plot(xs, [y for y in ys if y], marker="o", label=impl)
                ax.set_title(f"{mode}, d={d}, causal={causal}, {rows[0]['dtype']}")
                ax.set_xlabel("seqlen")
                ax.set_ylabel("TFLOP/s")
                ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"peers_d{d}.png", dpi=90)
        plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["fwd", "bwd", "fwd_bwd"],
                   choices=["fwd", "bwd", "fwd_bwd"])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=list(DTYPES))
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--seqlens", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="results base folder (default benchmarks/results)")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="no GPU: redraw the table and plots from a saved peers.json")
    args = p.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        out_dir = Path(args.replot).parent
        (out_dir / "peers.md").write_text(markdown(saved["environment"], saved["rows"], args.modes))
        plot(saved["rows"], args.modes, out_dir)
        return
    env, rows = run(args)
    out_dir = results_dir(args.out)
    write_json(out_dir / "peers.json", {"environment": env, "rows": rows})
    md = markdown(env, rows, args.modes)
    (out_dir / "peers.md").write_text(md)
    plot(rows, args.modes, out_dir)
    print(md)


if __name__ == "__main__":
    main()
