"""The original FlashAttention README benchmark: flashjit vs plain PyTorch attention, fwd + bwd.

Forward + backward time and peak memory of each.

    python benchmarks/benchmark_flash_attention.py [--out DIR] [--seqlens 128 ... 16384] [--quick]

Setting (as in the FlashAttention README, BERT-base-like): batch 8, 12 heads, head dim 64, fp16,
seqlen 128 .. 16k, non-causal, in four settings: plain, dropout 0.1, key-padding mask (each batch
element has a random length between seqlen/2 and seqlen, fixed seed), dropout + key padding.

PyTorch attention is the standard one on (batch, heads, seq, d) tensors: matmul(q, k^T) * scale,
masked_fill(padding, -inf), softmax, dropout, matmul(p, v). flashjit runs flash_attn_func, or with
key padding flash_attn_varlen_func on the packed real tokens (packed once, outside the timing; the
call's cu_seqlens check is part of what is timed, as for any user). Time: median ms of CUDA-event
timings of one forward + backward (torch.autograd.grad). Memory: peak allocated during one forward +
backward minus what was allocated before (inputs and dout excluded), in MiB. Where PyTorch runs
out of memory the row says OOM.

Writes flash_attention.json, flash_attention.md, and (when matplotlib is importable) speedup.png
and memory.png under benchmarks/results/<gpu>/ (or <--out>/<gpu>/).
"""

from __future__ import annotations

import argparse
import json
import gc
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flashjit  # noqa: E402
from common import (MIB, attention_flops, bench_ms, env_header, environment,  # noqa: E402
                    peak_mib, results_dir, write_json)

BATCH, HEADS, HEAD_DIM, DTYPE = 8, 12, 64, torch.float16
DEVICE = "cuda"
SEQLENS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
QUICK_SEQLENS = [128, 1024, 4096]
DROPOUT_P = 0.1
# name: (dropout_p, key padding, label)
SETTINGS = {
    "plain": (0.0, False, "plain"),
    "dropout": (DROPOUT_P, False, "dropout 0.1"),
    "padding": (0.0, True, "key padding"),
    "dropout_padding": (DROPOUT_P, True, "dropout + key padding"),
}


# ------------------------------------------------------------------------------------------------
# The two implementations
# ------------------------------------------------------------------------------------------------
def attention_pytorch(q, k, v, dropout_p, pad):
    """Standard attention on (b, h, s, d). pad: bool (b, 1, 1, s), True = padded key, or None.
    One variable is reused so that no intermediate outlives what autograd saves."""
    x = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if pad is not None:
        x = x.masked_fill(pad, float("-inf"))
    x = torch.softmax(x, dim=-1)
    if dropout_p > 0.0:
        x = F.dropout(x, dropout_p, training=True)
    return torch.matmul(x, v)


def make_inputs(seqlen, padding):
    """flashjit and PyTorch inputs of one configuration (same values), with their dout."""
    q, k, v = (torch.randn(BATCH, seqlen, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
               for _ in range(3))
    dout = torch.randn_like(q)
    inputs = {"lengths": None}
    # PyTorch: (b, h, s, d) leaf tensors
    inputs["torch"] = tuple(t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    inputs["torch_dout"] = dout.transpose(1, 2).contiguous()
    inputs["torch_pad"] = None
    if not padding:
        inputs["flash"] = tuple(t.clone().requires_grad_() for t in (q, k, v))
        inputs["flash_dout"] = dout
        return inputs
    gen = torch.Generator().manual_seed(seqlen)  # fixed lengths per seqlen, the same per setting
    lengths = torch.randint(seqlen // 2, seqlen + 1, (BATCH,), generator=gen)
    keep = torch.arange(seqlen)[None, :] < lengths[:, None]  # (b, s), True = real token
    keep = keep.to(DEVICE)
    inputs["lengths"] = lengths.tolist()
    inputs["torch_pad"] = (~keep)[:, None, None, :].contiguous()
    # flashjit: the real tokens packed, (total, h, d), sequence b at rows cu[b] .. cu[b+1]-1
    inputs["flash"] = tuple(t[keep].contiguous().requires_grad_() for t in (q, k, v))
    inputs["flash_dout"] = dout[keep].contiguous()
    inputs["cu_seqlens"] = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)
    inputs["max_seqlen"] = int(lengths.max())
    return inputs


def fwd_bwd_fns(inputs, dropout_p):
    """(flashjit fwd+bwd, PyTorch fwd+bwd) closures."""
    fq, fk, fv = inputs["flash"]
    fdout = inputs["flash_dout"]
    if inputs["lengths"] is None:
        def flash():
            out = flashjit.flash_attn_func(fq, fk, fv, dropout_p=dropout_p)
            torch.autograd.grad(out, (fq, fk, fv), fdout)
    else:
        cu, max_len = inputs["cu_seqlens"], inputs["max_seqlen"]

        def flash():
            out = flashjit.flash_attn_varlen_func(fq, fk, fv, cu, cu, max_len, max_len,
                                                  dropout_p=dropout_p)
            torch.autograd.grad(out, (fq, fk, fv), fdout)
    tq, tk, tv = inputs["torch"]
    tdout, pad = inputs["torch_dout"], inputs["torch_pad"]

    def pytorch():
        out = attention_pytorch(tq, tk, tv, dropout_p, pad)
        torch.autograd.grad(out, (tq, tk, tv), tdout)
    return flash, pytorch


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------
def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def measure(fn, warmup, repeats):
    """(ms, MiB, status): status None when measured, else 'OOM' or the error."""
    status = None
    try:
        # timing first: an OOM shows at the first warm-up call, and one-time allocations (cuBLAS
        # workspace, first-use buffers) are made before the memory measurement
        ms = bench_ms(fn, warmup, repeats)
        mib = peak_mib(fn)
    except torch.cuda.OutOfMemoryError:
        status = "OOM"
    except Exception as e:  # noqa: BLE001 - record why, go on with the other configurations
        msg = str(e)
        oom = "out of memory" in msg.lower() or "ALLOC_FAILED" in msg
        status = "OOM" if oom else f"{type(e).__name__}: {msg[:160]}"
    if status is not None:  # outside the except block: its traceback no longer holds tensors
        free_memory()
        return None, None, status
    return ms, mib, None


def useful_flops(seqlen, lengths):
    """Forward+backward FLOPs of the real (unpadded) tokens."""
    if lengths is None:
        return attention_flops(BATCH, HEADS, seqlen, seqlen, HEAD_DIM, False, "fwd_bwd")
    return sum(attention_flops(1, HEADS, n, n, HEAD_DIM, False, "fwd_bwd") for n in lengths)


def run(args):
    env = environment()
    print(env_header(env), flush=True)
    rows = []
    configs = [(s, name) for s in args.seqlens for name in args.settings]
    for i, (seqlen, name) in enumerate(configs, 1):
        dropout_p, padding, _ = SETTINGS[name]
        inputs = make_inputs(seqlen, padding)
        flash, pytorch = fwd_bwd_fns(inputs, dropout_p)
        row = dict(seqlen=seqlen, setting=name, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM,
                   dtype="fp16", dropout_p=dropout_p, key_padding=padding,
                   lengths=inputs["lengths"])
        ms, mib, status = measure(flash, args.warmup, args.repeats)
        row.update(flashjit_ms=ms and round(ms, 4), flashjit_mib=mib and round(mib, 1))
        if status:
            row["flashjit_status"] = status
        elif ms:
            row["flashjit_tflops"] = round(useful_flops(seqlen, inputs["lengths"]) / ms / 1e9, 1)
        if args.max_torch_seqlen and seqlen > args.max_torch_seqlen:
            ms, mib, status = None, None, f"skipped: > {args.max_torch_seqlen}"
        else:
            ms, mib, status = measure(pytorch, args.warmup, args.repeats)
        row.update(torch_ms=ms and round(ms, 4), torch_mib=mib and round(mib, 1))
        if status:
            row["torch_status"] = status
        if row["flashjit_ms"] and row["torch_ms"]:
            row["speedup"] = round(row["torch_ms"] / row["flashjit_ms"], 2)
        if row["flashjit_mib"] and row["torch_mib"]:
            row["memory_ratio"] = round(row["torch_mib"] / row["flashjit_mib"], 1)
        rows.append(row)
        print(f"[{i}/{len(configs)}] s{seqlen} {name}: flashjit {progress(row, 'flashjit')} | "
              f"pytorch {progress(row, 'torch')} | speedup {fmt_x(row.get('speedup'))} | "
              f"memory {fmt_x(row.get('memory_ratio'))}", flush=True)
        del inputs, flash, pytorch
        free_memory()
    return env, rows


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------
def cell(row, impl, what):
    """A measured value, or the status (OOM, skipped, error) that replaced it."""
    value = row.get(f"{impl}_{what}")
    if value is not None:
        return f"{value:.3f}" if what == "ms" else f"{value:.0f}"
    status = row.get(f"{impl}_status")
    if status is None:
        return "-"
    return "OOM" if status == "OOM" else ("skipped" if status.startswith("skipped") else "error")


def progress(row, impl):
    if row.get(f"{impl}_status"):
        return row[f"{impl}_status"]
    return f"{row[f'{impl}_ms']:.3f} ms {row[f'{impl}_mib']:.0f} MiB"


def fmt_x(x):
    return f"{x:.2f}x" if x is not None else "-"


def pivot(rows, key, seqlens, settings):
    """seqlen rows x setting columns of one ratio, 'PyTorch OOM' where it ran out of memory."""
    lines = ["| seqlen | " + " | ".join(SETTINGS[s][2] for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    by = {(r["seqlen"], r["setting"]): r for r in rows}
    for s in seqlens:
        cells = []
        for name in settings:
            r = by.get((s, name))
            if r is None:
                cells.append("-")
            elif r.get(key) is not None:
                cells.append(fmt_x(r[key]))
            else:
                cells.append("PyTorch " + cell(r, "torch", "ms") if r.get("torch_status")
                             else "flashjit " + cell(r, "flashjit", "ms"))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def markdown(env, rows, seqlens, settings):
    lines = ["# flashjit vs PyTorch attention: the FlashAttention README benchmark", "",
             env_header(env), "",
             f"Batch {BATCH}, {HEADS} heads, d {HEAD_DIM}, fp16, non-causal; forward + backward. "
             "PyTorch: matmul, softmax, dropout, matmul on (b, h, s, d). Key padding: random "
             "lengths in [seqlen/2, seqlen]; flashjit runs flash_attn_varlen_func on the packed "
             "tokens. Memory: peak over what was allocated before the call. Speedup = PyTorch ms "
             "/ flashjit ms; memory ratio = PyTorch MiB / flashjit MiB. OOM: PyTorch ran out of "
             "GPU memory.", "",
             "## Speedup", ""] + pivot(rows, "speedup", seqlens, settings) + [
             "", "## Memory saving", ""] + pivot(rows, "memory_ratio", seqlens, settings) + [
             "", "## All measurements", "",
             "| seqlen | setting | flashjit ms | PyTorch ms | speedup | flashjit MiB | PyTorch MiB "
             "| memory ratio | flashjit TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in settings:
        for r in (r for r in rows if r["setting"] == name):
            lines.append(f"| {r['seqlen']} | {SETTINGS[name][2]} | {cell(r, 'flashjit', 'ms')} | "
                         f"{cell(r, 'torch', 'ms')} | {fmt_x(r.get('speedup'))} | "
                         f"{cell(r, 'flashjit', 'mib')} | {cell(r, 'torch', 'mib')} | "
                         f"{fmt_x(r.get('memory_ratio'))} | {r.get('flashjit_tflops', '-')} |")
    notes = sorted({f"{r['seqlen']} {r['setting']}: {impl} {r[f'{impl}_status']}"
                    for r in rows for impl in ("flashjit", "torch")
                    if r.get(f"{impl}_status") and r[f"{impl}_status"] != "OOM"})
    if notes:
        lines += ["", "Not measured:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(rows, settings, out_dir, gpu_mib):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.transforms import blended_transform_factory
    except ImportError:
        print("matplotlib not installed: no plots (pip install flashjit[bench])", flush=True)
        return
    colors = dict(zip(SETTINGS, ("C0", "C1", "C2", "C3")))
    oom = sorted({r["seqlen"] for r in rows if r.get("torch_status") == "OOM"})

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in settings:
        sel = [r for r in rows if r["setting"] == name and r.get("speedup")]
        ax.plot([r["seqlen"] for r in sel], [r["speedup"] for r in sel], marker="o",
                color=colors[name], label=SETTINGS[name][2])
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for s in oom:
        which = [SETTINGS[r["setting"]][2] for r in rows
                 if r["seqlen"] == s and r.get("torch_status") == "OOM"]
        text = "PyTorch OOM"
        if len(which) < len(settings):
            text += "\n(" + ", ".join(which) + ")"
        ax.axvline(s, color="grey", linestyle=":")
        ax.plot([s], [0.02], marker="x", color="red", markersize=10, transform=trans, clip_on=False)
        ax.text(s, 0.97, text, transform=trans, rotation=90, ha="right", va="top",
                fontsize=8, color="red")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["seqlen"] for r in rows}))
    ax.set_xticklabels([str(s) for s in sorted({r["seqlen"] for r in rows})])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("speedup over PyTorch (fwd + bwd)")
    ax.set_title(f"flashjit vs PyTorch attention, b{BATCH} h{HEADS} d{HEAD_DIM} fp16")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "speedup.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in settings:
        sel = [r for r in rows if r["setting"] == name]
        fx = [(r["seqlen"], r["flashjit_mib"]) for r in sel if r.get("flashjit_mib")]
        tx = [(r["seqlen"], r["torch_mib"]) for r in sel if r.get("torch_mib")]
        if fx:
            ax.plot(*zip(*fx), marker="o", color=colors[name],
                    label=f"flashjit, {SETTINGS[name][2]}")
        if tx:
            ax.plot(*zip(*tx), marker="s", linestyle="--", color=colors[name],
                    label=f"PyTorch, {SETTINGS[name][2]}")
        ox = [r["seqlen"] for r in sel if r.get("torch_status") == "OOM"]
        if ox:
            ax.plot(ox, [gpu_mib] * len(ox), marker="x", linestyle="none", color=colors[name],
                    markersize=10)
    if oom:
        ax.axhline(gpu_mib, color="red", linestyle=":", linewidth=0.8)
        ax.annotate("PyTorch OOM", (oom[0], gpu_mib), textcoords="offset points", xytext=(-60, 6),
                    color="red", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["seqlen"] for r in rows}))
    ax.set_xticklabels([str(s) for s in sorted({r["seqlen"] for r in rows})])
    ax.set_xlabel("sequence length")
    ax.set_ylabel("peak memory of fwd + bwd (MiB, log)")
    ax.set_title("memory beyond the inputs; x = PyTorch out of memory (at the GPU's capacity)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "memory.png", dpi=100)
    plt.close(fig)
    print(f"wrote {out_dir / 'speedup.png'} and {out_dir / 'memory.png'}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", nargs="+", type=int, default=None,
                   help=f"default {' '.join(map(str, SEQLENS))}")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--quick", action="store_true",
                   help=f"seqlens {' '.join(map(str, QUICK_SEQLENS))}, 5 repeats: a smoke run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--max-torch-seqlen", type=int, default=None,
                   help="skip PyTorch attention above this seqlen (default: try every one)")
    p.add_argument("--out", default=None, help="results base folder (default benchmarks/results)")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="no GPU: redraw the table and plots from a saved flash_attention.json")
    args = p.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        rows, env, out_dir = saved["rows"], saved["environment"], Path(args.replot).parent
        seqlens = sorted({r["seqlen"] for r in rows})
        (out_dir / "flash_attention.md").write_text(markdown(env, rows, seqlens, args.settings))
        plot(rows, args.settings, out_dir, env.get("memory_gib", 80) * 1024)
        return
    if args.seqlens is None:
        args.seqlens = QUICK_SEQLENS if args.quick else SEQLENS
    if args.quick:
        args.warmup, args.repeats = min(args.warmup, 2), min(args.repeats, 5)
    if not torch.cuda.is_available():
        sys.exit(f"{Path(__file__).name}: no CUDA device (torch {torch.__version__}, CUDA "
                 f"{torch.version.cuda}): this benchmark runs on an NVIDIA GPU")
    torch.manual_seed(0)
    env, rows = run(args)
    out_dir = results_dir(args.out)
    write_json(out_dir / "flash_attention.json",
               {"environment": env, "warmup": args.warmup, "repeats": args.repeats, "rows": rows})
    md = markdown(env, rows, args.seqlens, args.settings)
    (out_dir / "flash_attention.md").write_text(md)
    print(f"wrote {out_dir / 'flash_attention.md'}", flush=True)
    plot(rows, args.settings, out_dir,
         torch.cuda.get_device_properties(0).total_memory / MIB)
    print("\n".join(["", "Speedup (PyTorch ms / flashjit ms), forward + backward:"]
                    + pivot(rows, "speedup", args.seqlens, args.settings)
                    + ["", "Memory saving (PyTorch MiB / flashjit MiB):"]
                    + pivot(rows, "memory_ratio", args.seqlens, args.settings)), flush=True)


if __name__ == "__main__":
    main()
