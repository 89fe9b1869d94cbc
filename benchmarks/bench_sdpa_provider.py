"""F.scaled_dot_product_attention through flashjit (the SDPA flash provider) vs SDPA's own backends.

    python benchmarks/bench_sdpa_provider.py [--seqlens 1024 4096 16384] [--out DIR]

One row per (d, seqlen, causal), bf16, 16k tokens per batch, hidden 2048 (../shared/TARGETS.md's
setting), SDPA's usual input: (batch, heads, seq, d) views of (batch, seq, heads, d) memory.
Columns, each in the same run: SDPA under sdpa_kernel(FLASH_ATTENTION) with flashjit activated
(torch.nn.attention.activate_flash_attention_impl("flashjit")); the same with torch's own flash
kernels (its FA2 port, after restore_flash_attention_impl()); SDPA cuDNN; and flashjit.
flash_attn_func called directly, whose difference to the first column is the provider's cost
(the Python override and the layout). Time: common.bench_ms (median of CUDA-event-timed batches
of back-to-back calls after warm-up); TFLOP/s with 4*b*h*n*n*d forward (halved for causal),
backward 2.5x. Writes sdpa_provider.json and sdpa_provider.md under <out>/<gpu>/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import make_fns  # noqa: E402  (imports flashjit: the provider is registered)
from common import (attention_flops, bench_ms, env_header, environment, results_dir,  # noqa: E402
                    write_json)

IMPLS = ("sdpa_flashjit", "sdpa_flash", "sdpa_cudnn", "flashjit_direct")
TITLES = {"sdpa_flashjit": "SDPA via flashjit", "sdpa_flash": "SDPA flash (FA2 port)",
          "sdpa_cudnn": "SDPA cuDNN", "flashjit_direct": "flash_attn_func"}
# each column's calls: bench_peers.make_fns's implementation of that name ("sdpa_flash" is SDPA
# under sdpa_kernel(FLASH_ATTENTION), flashjit's kernels while the provider is active)
PEER_IMPL = {"sdpa_flashjit": "sdpa_flash", "sdpa_flash": "sdpa_flash",
             "sdpa_cudnn": "sdpa_cudnn", "flashjit_direct": "flashjit"}
MODES = ("fwd", "fwd_bwd")


def run(args):
    env = environment()
    print(env_header(env), flush=True)
    rows = []
    configs = [(d, s, c) for d in args.head_dims for s in args.seqlens for c in (False, True)]
    for i, (d, seqlen, causal) in enumerate(configs, 1):
        batch, heads = args.tokens // seqlen, args.hidden // d
        q, k, v = (torch.randn(batch, seqlen, heads, d, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        row = dict(dtype="bf16", d=d, seqlen=seqlen, causal=causal, batch=batch, heads=heads)
        for impl in IMPLS:
            if impl == "sdpa_flashjit":
                activate_flash_attention_impl("flashjit")
            try:
                fns = make_fns(PEER_IMPL[impl], q, k, v, causal)
                for mode in MODES:
                    try:
                        ms = bench_ms(fns[mode], args.warmup, args.repeats)
                        flops = attention_flops(batch, heads, seqlen, seqlen, d, causal, mode)
                        row[f"{impl}_{mode}_ms"] = round(ms, 4)
                        row[f"{impl}_{mode}_tflops"] = round(flops / ms / 1e9, 1)
                    except Exception as e:  # a backend may refuse a config: record why
                        row[f"{impl}_{mode}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            finally:
                if impl == "sdpa_flashjit":
                    restore_flash_attention_impl()
        rows.append(row)
        print(f"[{i}/{len(configs)}] d{d} s{seqlen} causal={causal}: " + "  ".join(
            f"{impl} {row.get(f'{impl}_{m}_tflops', '-')}" for m in MODES
            for impl in IMPLS), flush=True)
        del q, k, v
    return env, rows


def _ratio(row, mode, a, b):
    x, y = row.get(f"{a}_{mode}_tflops"), row.get(f"{b}_{mode}_tflops")
    return f"{x / y:.2f}x" if x and y else "-"


def markdown(env, rows):
    lines = [f"# SDPA through flashjit vs SDPA's backends, TFLOP/s ({env_header(env)})", "",
             "bf16, 16k tokens per batch, hidden 2048, SDPA inputs (b, h, s, d) views of "
             "(b, s, h, d) memory. Ratios: SDPA via flashjit / peer.", ""]
    for mode in MODES:
        lines += [f"## {mode}", "",
                  "| d | seqlen | causal | " + " | ".join(TITLES[i] for i in IMPLS)
                  + " | vs SDPA flash | vs cuDNN |",
                  "|---|---|---|" + "---|" * (len(IMPLS) + 2)]
        for r in rows:
            cells = [str(r.get(f"{impl}_{mode}_tflops", "-")) for impl in IMPLS]
            lines.append(f"| {r['d']} | {r['seqlen']} | {'yes' if r['causal'] else 'no'} | "
                         + " | ".join(cells)
                         + f" | {_ratio(r, mode, 'sdpa_flashjit', 'sdpa_flash')}"
                         f" | {_ratio(r, mode, 'sdpa_flashjit', 'sdpa_cudnn')} |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--seqlens", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None, help="results base folder (default benchmarks/results)")
    args = p.parse_args()
    env, rows = run(args)
    out_dir = results_dir(args.out)
    write_json(out_dir / "sdpa_provider.json", {"environment": env, "rows": rows})
    md = markdown(env, rows)
    (out_dir / "sdpa_provider.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
