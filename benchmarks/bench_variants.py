"""Attention variants: sliding windows at long sequences; softcap, ALiBi and sink overheads.

flashjit against itself (plain kernel, full causal) and FlexAttention, in the same run.

    python benchmarks/bench_variants.py [--out DIR] [--parts window overhead] [--no-flex]

Part "window": batch 1, 16 heads, d 128, bf16; window_size (4096, 0) with causal=True (each
query sees itself and the 4096 keys before it) at 8k .. 128k tokens, forward and forward +
backward. The work per token is constant, so the time per token should stay flat as the
sequence grows ("x shortest": time per token over the shortest length's). Beside it: flashjit
full causal up to --causal-max tokens, and FlexAttention (torch.compile'd) with a sliding-window
block mask at --flex-window-seqlens.

Part "overhead": 16k tokens per batch (batch = 16384 / seqlen), hidden 2048 (heads = 2048 / d),
bf16, d 64 and 128, seqlen 4k and 16k, causal and not: flashjit plain, softcap 30, ALiBi (the
standard slopes, (heads,)) and a sink per head (requiring grad in forward + backward), reported
as time over the plain kernel's (goals: <= 1.10 forward, <= 1.15 forward + backward). Beside it:
FlexAttention plain, with a softcap score_mod and with an ALiBi score_mod at --flex-overhead
shapes (each one compile: capped).

FLOPs: 4 * b * h * pairs * d forward over the pairs actually computed: n_q * n_k, halved for
causal (the convention of the other benchmarks), exact for a window (common.visible_pairs);
backward 2.5x, forward + backward 3.5x. Variants count as the plain kernel's FLOPs.
Time: common.bench_ms, the median of CUDA-event-timed batches of back-to-back calls (>= 20 ms
per batch) after warm-up; each implementation's first call (JIT load or torch.compile) is
untimed. Inputs require grad in both modes, as in training (the forward then also saves what
the backward needs). A failing implementation is recorded in its row, not fatal; FlexAttention
rows past --budget-s seconds from the start are skipped (recorded as such) so that the run ends
inside device_run.sh's timeout.

Writes variants.json and variants.md under benchmarks/results/<gpu>/ (or <--out>/<gpu>/).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flashjit  # noqa: E402
from common import (attention_flops, bench_ms, env_header, environment, pairs_flops,  # noqa: E402
                    results_dir, visible_pairs, write_json)

DEVICE = "cuda"
DTYPE = torch.bfloat16
MODES = ("fwd", "fwd_bwd")
GOALS = {"fwd": 1.10, "fwd_bwd": 1.15}  # variant time / plain time
WINDOW_HEADS, WINDOW_D = 16, 128
WINDOW = 4096
SOFTCAP = 30.0
LONG = 65536  # from here on: --long-warmup / --long-repeats
VARIANTS = ("plain", "softcap", "alibi", "sink")
FLEX_VARIANTS = ("plain", "softcap", "alibi")  # FlexAttention has no sink


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes 2^(-8 i / heads), i = 1 .. heads, float32 on the GPU."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], device=DEVICE)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def describe(e: Exception) -> str:
    """One line for an exception: its type and the first line of its message."""
    lines = [line.strip() for line in str(e).strip().splitlines()]
    text = lines[0] if lines else ""
    # torch.compile wraps the cause: "Observed exception ... Developer debug context: raised ..."
    context = next((line for line in lines if line.startswith("Developer debug context")), None)
    if context:
        text += " (" + context.removeprefix("Developer debug context:").strip() + ")"
    return f"{type(e).__name__}: {text[:300]}"


def timed(fn, warmup: int, repeats: int):
    """(ms, None), or (None, error text) when fn fails. The first call is untimed (JIT load,
    torch.compile)."""
    error = None
    try:
        fn()
        torch.cuda.synchronize()
        return bench_ms(fn, warmup, repeats), None
    except Exception as e:  # noqa: BLE001 - a failing implementation is a result, not the end
        error = describe(e)
    # outside the except block: its traceback no longer holds the failed call's tensors
    gc.collect()
    torch.cuda.empty_cache()
    return None, error


def record(row: dict, key: str, ms, error, flops: float, tokens: int) -> None:
    """Stores one measurement in `row` under key_ms, key_tflops, key_us_per_token (or
    key_error)."""
    if error is not None:
        row[f"{key}_error"] = error
        return
    row[f"{key}_ms"] = round(ms, 4)
    row[f"{key}_tflops"] = round(flops / ms / 1e9, 1)
    row[f"{key}_us_per_token"] = round(ms * 1e3 / tokens, 5)


def leaves(batch, seqlen, heads, d, layout="bshd"):
    """q, k, v (requiring grad) and dout, randn bf16, (batch, seqlen, heads, d) for flashjit or
    (batch, heads, seqlen, d) for FlexAttention."""
    shape = (batch, seqlen, heads, d) if layout == "bshd" else (batch, heads, seqlen, d)
    q, k, v = (torch.randn(shape, device=DEVICE, dtype=DTYPE, requires_grad=True)
               for _ in range(3))
    return q, k, v, torch.randn(shape, device=DEVICE, dtype=DTYPE)


def flashjit_fns(q, k, v, dout, **kwargs):
    """{mode: fn} for flashjit with these keyword arguments; a sink requiring grad gets its
    gradient in forward + backward."""
    inputs = (q, k, v)
    sink = kwargs.get("sink")
    if sink is not None and sink.requires_grad:
        inputs += (sink,)

    def fwd():
        return flashjit.flash_attn_func(q, k, v, **kwargs)

    def fwd_bwd():
        torch.autograd.grad(fwd(), inputs, dout)
    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


class Flex:
    """FlexAttention compiled with torch.compile (fullgraph), one configuration at a time:
    torch._dynamo.reset() before each, so recompile limits never send a call to the eager
    (score-matrix) path; a limit hit raises where torch can say so."""

    def __init__(self):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        config = torch._dynamo.config
        for name, value in (("recompile_limit", 64), ("cache_size_limit", 64),
                            ("fail_on_recompile_limit_hit", True)):
            if hasattr(config, name):
                setattr(config, name, value)
        self.flex = torch.compile(flex_attention, fullgraph=True)
        self.create_block_mask = torch.compile(create_block_mask)

    def block_mask(self, mask_mod, seqlen):
        return self.create_block_mask(mask_mod, None, None, seqlen, seqlen, device=DEVICE)

    def fns(self, q, k, v, dout, score_mod=None, block_mask=None):
        torch._dynamo.reset()

        def fwd():
            return self.flex(q, k, v, score_mod=score_mod, block_mask=block_mask)

        def fwd_bwd():
            torch.autograd.grad(fwd(), (q, k, v), dout)
        return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def causal_mask(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


def sliding_window_mask(b, h, q_idx, kv_idx):  # flashjit's window_size (4096, 0), causal
    return (kv_idx <= q_idx) & (q_idx - kv_idx <= WINDOW)


def softcap_mod(score, b, h, q_idx, kv_idx):
    return SOFTCAP * torch.tanh(score / SOFTCAP)


def alibi_mod_for(slopes):
    def alibi_mod(score, b, h, q_idx, kv_idx):  # flash-attn's ALiBi: -slope * |i - j|
        return score - slopes[h] * torch.abs(q_idx - kv_idx)
    return alibi_mod


# ------------------------------------------------------------------------------------------------
# Part "window": sliding window at long sequences
# ------------------------------------------------------------------------------------------------
def window_flashjit(args) -> list:
    rows = []
    for i, n in enumerate(args.window_seqlens, 1):
        warmup, repeats = ((args.long_warmup, args.long_repeats) if n >= LONG
                           else (args.warmup, args.repeats))
        pairs = visible_pairs(n, n, causal=True, window=(WINDOW, 0))
        row = dict(seqlen=n, batch=1, heads=WINDOW_HEADS, d=WINDOW_D, window=[WINDOW, 0],
                   window_pairs=pairs)
        q, k, v, dout = leaves(1, n, WINDOW_HEADS, WINDOW_D)
        impls = {"window": dict(causal=True, window_size=(WINDOW, 0))}
        if n <= args.causal_max:
            impls["causal"] = dict(causal=True)
        for impl, kwargs in impls.items():
            fns = flashjit_fns(q, k, v, dout, **kwargs)
            for mode in MODES:
                flops = (pairs_flops(1, WINDOW_HEADS, pairs, WINDOW_D, mode) if impl == "window"
                         else attention_flops(1, WINDOW_HEADS, n, n, WINDOW_D, True, mode))
                ms, error = timed(fns[mode], warmup, repeats)
                record(row, f"flashjit_{impl}_{mode}", ms, error, flops, n)
        rows.append(row)
        print(f"[window {i}/{len(args.window_seqlens)}] s{n}: " + "  ".join(
            f"{impl} {mode} {row.get(f'flashjit_{impl}_{mode}_ms', 'failed')} ms"
            for impl in impls for mode in MODES), flush=True)
        del q, k, v, dout, fns
        gc.collect()
        torch.cuda.empty_cache()
    for mode in MODES:  # time per token over the shortest length's
        key = f"flashjit_window_{mode}_us_per_token"
        timed_rows = [r for r in rows if key in r]
        if timed_rows:
            base = min(timed_rows, key=lambda r: r["seqlen"])[key]
            for r in timed_rows:
                r[f"flashjit_window_{mode}_vs_shortest"] = round(r[key] / base, 3)
    return rows


def window_flex(args, flex: Flex, rows: list, deadline: float) -> None:
    for n in args.flex_window_seqlens:
        row = next((r for r in rows if r["seqlen"] == n), None)
        if row is None:
            continue
        if time.monotonic() > deadline:
            for mode in MODES:
                row[f"flex_window_{mode}_error"] = "skipped: time budget (--budget-s)"
            continue
        warmup, repeats = ((args.long_warmup, args.long_repeats) if n >= LONG
                           else (args.warmup, args.repeats))
        q, k, v, dout = leaves(1, n, WINDOW_HEADS, WINDOW_D, layout="bhsd")
        try:
            mask = flex.block_mask(sliding_window_mask, n)
        except Exception as e:  # noqa: BLE001
            mask, error = None, f"block mask: {describe(e)}"
        if mask is None:
            for mode in MODES:
                row[f"flex_window_{mode}_error"] = error
        else:
            fns = flex.fns(q, k, v, dout, block_mask=mask)
            for mode in MODES:
                ms, error = timed(fns[mode], warmup, repeats)
                record(row, f"flex_window_{mode}", ms, error,
                       pairs_flops(1, WINDOW_HEADS, row["window_pairs"], WINDOW_D, mode), n)
            del fns
        print(f"[flex window] s{n}: " + "  ".join(
            f"{mode} {row.get(f'flex_window_{mode}_ms', row.get(f'flex_window_{mode}_error'))}"
            for mode in MODES), flush=True)
        del q, k, v, dout, mask
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Part "overhead": softcap, ALiBi, sink against the plain kernel
# ------------------------------------------------------------------------------------------------
def overhead_configs(args):
    return [(d, n, causal) for d in args.head_dims for n in args.seqlens
            for causal in (False, True)]


def overhead_flashjit(args) -> list:
    rows = []
    configs = overhead_configs(args)
    for i, (d, n, causal) in enumerate(configs, 1):
        batch, heads = args.tokens // n, args.hidden // d
        row = dict(d=d, seqlen=n, causal=causal, batch=batch, heads=heads)
        q, k, v, dout = leaves(batch, n, heads, d)
        sink = torch.randn(heads, device=DEVICE, requires_grad=True)
        kwargs = {"plain": {}, "softcap": dict(softcap=SOFTCAP),
                  "alibi": dict(alibi_slopes=alibi_slopes(heads)), "sink": dict(sink=sink)}
        for variant in VARIANTS:
            fns = flashjit_fns(q, k, v, dout, causal=causal, **kwargs[variant])
            for mode in MODES:
                ms, error = timed(fns[mode], args.warmup, args.repeats)
                record(row, f"flashjit_{variant}_{mode}", ms, error,
                       attention_flops(batch, heads, n, n, d, causal, mode), batch * n)
        add_ratios(row, "flashjit", VARIANTS)
        rows.append(row)
        print(f"[overhead {i}/{len(configs)}] d{d} s{n} causal={causal}: " + "  ".join(
            f"{mode} plain {row.get(f'flashjit_plain_{mode}_ms', 'failed')} ms "
            + " ".join(f"{v} {row.get(f'flashjit_{v}_{mode}_vs_plain', '-')}x"
                       for v in VARIANTS[1:]) for mode in MODES), flush=True)
        del q, k, v, dout, sink, fns
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def add_ratios(row: dict, impl: str, variants) -> None:
    for mode in MODES:
        base = row.get(f"{impl}_plain_{mode}_ms")
        for variant in variants[1:]:
            ms = row.get(f"{impl}_{variant}_{mode}_ms")
            if base and ms:
                row[f"{impl}_{variant}_{mode}_vs_plain"] = round(ms / base, 3)


def overhead_flex(args, flex: Flex, rows: list, deadline: float) -> None:
    selected = {(int(d), int(n)) for d, n in (s.split(":") for s in args.flex_overhead)}
    for row in rows:
        d, n, causal = row["d"], row["seqlen"], row["causal"]
        if (d, n) not in selected:
            continue
        batch, heads = row["batch"], row["heads"]
        q, k, v, dout = leaves(batch, n, heads, d, layout="bhsd")
        mods = {"plain": None, "softcap": softcap_mod, "alibi": alibi_mod_for(alibi_slopes(heads))}
        mask = None
        for variant in FLEX_VARIANTS:
            if time.monotonic() > deadline:
                for mode in MODES:
                    row[f"flex_{variant}_{mode}_error"] = "skipped: time budget (--budget-s)"
                continue
            error = None
            if causal and mask is None:
                try:
                    mask = flex.block_mask(causal_mask, n)
                except Exception as e:  # noqa: BLE001
                    error = f"block mask: {describe(e)}"
            if error:
                for mode in MODES:
                    row[f"flex_{variant}_{mode}_error"] = error
                continue
            fns = flex.fns(q, k, v, dout, score_mod=mods[variant], block_mask=mask)
            for mode in MODES:
                ms, error = timed(fns[mode], args.warmup, args.repeats)
                record(row, f"flex_{variant}_{mode}", ms, error,
                       attention_flops(batch, heads, n, n, d, causal, mode), batch * n)
            del fns
        add_ratios(row, "flex", FLEX_VARIANTS)
        print(f"[flex overhead] d{d} s{n} causal={causal}: " + "  ".join(
            f"{mode} {v} {row.get(f'flex_{v}_{mode}_ms', 'failed')} ms"
            for mode in MODES for v in FLEX_VARIANTS), flush=True)
        del q, k, v, dout, mask
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def cell(row: dict, key: str, fmt: str = "{}") -> str:
    if key in row:
        return fmt.format(row[key])
    error = row.get(key.rsplit("_", 1)[0] + "_error") if key.endswith(
        ("_ms", "_tflops")) else None
    return "skipped" if error and error.startswith("skipped") else ("error" if error else "-")


def speedup(row: dict, slow: str, fast: str) -> str:
    a, b = row.get(f"{slow}_ms"), row.get(f"{fast}_ms")
    return f"{a / b:.2f}x" if a and b else "-"


def ratio_cell(row: dict, key: str, goal: float) -> str:
    """row[key] (a ratio), bold above `goal`; else why it is missing ('error', 'skipped', '-')."""
    value = row.get(key)
    if value is None:
        return cell(row, key.replace("_vs_plain", "_ms"))
    return f"**{value:.3f}**" if value > goal else f"{value:.3f}"


def failures(rows: list, keys) -> list:
    """Markdown list items for every recorded error in `rows`, named by the row's `keys`."""
    items = []
    for r in rows:
        where = " ".join(f"{k} {r[k]}" for k in keys)
        items += [f"- {where}: {key.removesuffix('_error')}: {value}"
                  for key, value in r.items() if key.endswith("_error")]
    return items


def markdown(env: dict, settings: dict, window_rows: list, overhead_rows: list) -> str:
    lines = ["# Attention variants", "", env_header(env), ""]
    names = {"fwd": "forward", "fwd_bwd": "forward + backward"}
    if window_rows:
        lines += [f"## Sliding window {WINDOW} (window_size ({WINDOW}, 0), causal) at long "
                  "sequences", "",
                  f"Batch 1, {WINDOW_HEADS} heads, d {WINDOW_D}, bf16. us/token: time per query "
                  "token; x shortest: that over the shortest length's (flat = 1.0). TFLOP/s of "
                  "the window over the pairs it computes; of causal with the n^2/2 convention. "
                  "flashjit vs Flex: FlexAttention's time over flashjit's.", ""]
        for mode in MODES:
            lines += [f"### {names[mode]}", "",
                      "| seqlen | window ms | us/token | x shortest | TFLOP/s | causal ms | "
                      "causal TFLOP/s | Flex window ms | Flex TFLOP/s | flashjit vs Flex |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for r in window_rows:
                w, c, f = (f"{impl}_{mode}" for impl in ("flashjit_window", "flashjit_causal",
                                                         "flex_window"))
                lines.append(
                    f"| {r['seqlen']} | {cell(r, w + '_ms', '{:.3f}')} | "
                    f"{cell(r, w + '_us_per_token', '{:.4f}')} | "
                    f"{cell(r, w + '_vs_shortest', '{:.2f}')} | {cell(r, w + '_tflops')} | "
                    f"{cell(r, c + '_ms', '{:.3f}')} | {cell(r, c + '_tflops')} | "
                    f"{cell(r, f + '_ms', '{:.3f}')} | {cell(r, f + '_tflops')} | "
                    f"{speedup(r, f, w)} |")
            lines.append("")
    if overhead_rows:
        lines += ["## Softcap, ALiBi and sink against the plain kernel", "",
                  f"{settings['tokens']} tokens per batch, hidden {settings['hidden']}, bf16. "
                  f"softcap {SOFTCAP}; ALiBi slopes (heads,); sink (heads,) float32 (its "
                  "gradient computed in forward + backward). Columns x: time over the plain "
                  "kernel's of the same implementation; goals <= "
                  f"{GOALS['fwd']:.2f} forward, <= {GOALS['fwd_bwd']:.2f} forward + backward "
                  "(bold: over the goal). vs Flex: FlexAttention's time over flashjit's "
                  "(same variant).", ""]
        for mode in MODES:
            goal = GOALS[mode]
            lines += [f"### {names[mode]}", "",
                      "| d | seqlen | causal | plain ms | TFLOP/s | softcap x | ALiBi x | sink x "
                      "| Flex plain ms | Flex softcap x | Flex ALiBi x | vs Flex plain | "
                      "vs Flex softcap | vs Flex ALiBi |", "|---" * 14 + "|"]
            for r in overhead_rows:
                fj = lambda v: f"flashjit_{v}_{mode}"  # noqa: E731
                fx = lambda v: f"flex_{v}_{mode}"  # noqa: E731
                lines.append(
                    f"| {r['d']} | {r['seqlen']} | {'yes' if r['causal'] else 'no'} | "
                    f"{cell(r, fj('plain') + '_ms', '{:.3f}')} | {cell(r, fj('plain') + '_tflops')}"
                    f" | {ratio_cell(r, fj('softcap') + '_vs_plain', goal)} | "
                    f"{ratio_cell(r, fj('alibi') + '_vs_plain', goal)} | "
                    f"{ratio_cell(r, fj('sink') + '_vs_plain', goal)} | "
                    f"{cell(r, fx('plain') + '_ms', '{:.3f}')} | "
                    f"{ratio_cell(r, fx('softcap') + '_vs_plain', float('inf'))} | "
                    f"{ratio_cell(r, fx('alibi') + '_vs_plain', float('inf'))} | "
                    + " | ".join(speedup(r, fx(v), fj(v)) for v in FLEX_VARIANTS) + " |")
            worst = {v: max((r[f"flashjit_{v}_{mode}_vs_plain"] for r in overhead_rows
                             if f"flashjit_{v}_{mode}_vs_plain" in r), default=None)
                     for v in VARIANTS[1:]}
            lines += ["", "Worst flashjit ratio: " + ", ".join(
                f"{v} {x:.3f} ({'meets' if x <= goal else 'misses'} <= {goal:.2f})"
                if x is not None else f"{v} -" for v, x in worst.items()), ""]
    errors = failures(window_rows, ("seqlen",)) + failures(overhead_rows,
                                                           ("d", "seqlen", "causal"))
    if errors:
        lines += ["## Failures and skips", ""] + errors + [""]
    return "\n".join(lines) + "\n"


def prebuild(args) -> None:
    """Builds the flashjit specs this run uses into the cache, in parallel (nothing when
    cached); the calls then only load them. A failure here is reported and left to the JIT."""
    from flashjit import prebuild as pb

    lines = []
    if "overhead" in args.parts:
        dims = [str(d) for d in args.head_dims]
        lines.append(["--dtype", "bf16", "--head-dim", *dims, "--causal", "both"])
        for variant in ("softcap", "alibi", "sink"):
            lines.append(["--dtype", "bf16", "--head-dim", *dims, "--causal", "both",
                          f"--{variant}", "yes"])
    if "window" in args.parts:
        lines.append(["--dtype", "bf16", "--head-dim", str(WINDOW_D), "--causal", "yes",
                      "--window", "both"])
    for line in lines:
        argv = ["--kernel", "fwd", "bwd", *line] + (["--jobs", str(args.jobs)] if args.jobs else [])
        try:
            status = pb.main(argv)
        except SystemExit as e:  # argparse: an option this flashjit lacks
            status = e.code
        if status:
            print(f"prebuild {' '.join(argv)}: exit status {status}; the JIT will try on first "
                  "use", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["window", "overhead"],
                   choices=["window", "overhead"])
    p.add_argument("--window-seqlens", nargs="+", type=int,
                   default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--causal-max", type=int, default=65536,
                   help="full causal flashjit up to this seqlen in part window (default 65536)")
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--seqlens", nargs="+", type=int, default=[4096, 16384],
                   help="part overhead's sequence lengths (default 4096 16384)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--no-flex", action="store_true", help="leave FlexAttention out")
    p.add_argument("--flex-window-seqlens", nargs="+", type=int, default=[16384, 131072],
                   help="part window's FlexAttention lengths (default 16384 131072)")
    p.add_argument("--flex-overhead", nargs="+", default=["128:16384"], metavar="D:SEQLEN",
                   help="part overhead's FlexAttention shapes, causal and not (default 128:16384)")
    p.add_argument("--budget-s", type=float, default=210.0,
                   help="FlexAttention rows starting later than this many seconds after the "
                        "start are skipped (default 210)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--long-warmup", type=int, default=2, help=f"for seqlen >= {LONG}")
    p.add_argument("--long-repeats", type=int, default=5, help=f"for seqlen >= {LONG}")
    p.add_argument("--no-prebuild", action="store_true",
                   help="do not build the flashjit specs first (default: build what is missing)")
    p.add_argument("--jobs", type=int, default=None, help="prebuild's --jobs (default: its own)")
    p.add_argument("--out", default=None, help="results base folder (default benchmarks/results)")
    args = p.parse_args()
    for s in args.flex_overhead:
        if len(s.split(":")) != 2 or not all(x.isdigit() for x in s.split(":")):
            p.error(f"--flex-overhead: D:SEQLEN, e.g. 128:16384, got {s!r}")
    if not torch.cuda.is_available():
        sys.exit(f"{Path(__file__).name}: no CUDA device (torch {torch.__version__}, CUDA "
                 f"{torch.version.cuda}): this benchmark runs on an NVIDIA GPU")
    start = time.monotonic()
    deadline = start + args.budget_s
    if not args.no_prebuild:
        prebuild(args)
    torch.manual_seed(0)
    env = environment()
    print(env_header(env), flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out",)}
    settings.update(window=WINDOW, softcap=SOFTCAP, window_heads=WINDOW_HEADS,
                    window_head_dim=WINDOW_D, dtype="bf16")
    out_dir = results_dir(args.out)

    def save(window_rows, overhead_rows):
        write_json(out_dir / "variants.json", {"environment": env, "settings": settings,
                                               "window": window_rows,
                                               "overhead": overhead_rows})
        (out_dir / "variants.md").write_text(markdown(env, settings, window_rows,
                                                      overhead_rows))

    window_rows = window_flashjit(args) if "window" in args.parts else []
    overhead_rows = overhead_flashjit(args) if "overhead" in args.parts else []
    save(window_rows, overhead_rows)  # flashjit's numbers are kept whatever FlexAttention does
    if not args.no_flex:
        try:
            flex = Flex()
        except Exception as e:  # noqa: BLE001 - e.g. a torch without FlexAttention
            flex = None
            print(f"FlexAttention unavailable: {describe(e)}", flush=True)
        if flex is not None:
            overhead_flex(args, flex, overhead_rows, deadline)  # its score_mods first
            window_flex(args, flex, window_rows, deadline)
            save(window_rows, overhead_rows)
    print(markdown(env, settings, window_rows, overhead_rows), flush=True)
    print(f"total {time.monotonic() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
