"""Where the Hopper kernels (the sm90ws forward, the sm90 backward) spend their time, for ncu.

Run mode (under ncu): a few forward calls of one shape, bf16, 16k tokens x hidden 2048, or with
--backward a few backward calls (the dK/dV kernel is the one to profile: -k regex:dk_dv):
    python benchmarks/profile_ws.py run --head-dim 128 --seqlen 8192 [--causal] [--backward]
Summary mode: the hottest SASS instructions of an ncu source page exported as CSV
(``ncu -i rep --page source --csv --print-source sass``), by warp-stall samples, with the
stall reasons that dominate each, and the reasons over the whole kernel:
    python benchmarks/profile_ws.py summary src.csv [--top 40]
device_run.sh's `wsprof` step does both.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from pathlib import Path


def run(args: argparse.Namespace) -> None:
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import flashjit
    b, h = 16384 // args.seqlen, 2048 // args.head_dim
    q, k, v = (torch.randn(b, args.seqlen, h, args.head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=args.backward) for _ in range(3))
    out = flashjit.flash_attn_func(q, k, v, causal=args.causal)
    for _ in range(4):
        if args.backward:
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out), retain_graph=True)
        else:
            flashjit.flash_attn_func(q, k, v, causal=args.causal)
    torch.cuda.synchronize()


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def summary(args: argparse.Namespace) -> None:
    with open(args.csv, newline="") as f:
        rows = list(csv.reader(f))
    # the header is the first row that names the SASS source column
    start = next(i for i, r in enumerate(rows) if any(c.strip() == "Source" for c in r))
    header, body = rows[start], rows[start + 1:]
    col = {name.strip(): i for i, name in enumerate(header)}
    total_col = next((i for n, i in col.items() if n.startswith("Warp Stall Sampling (All")), None)
    if total_col is None:
        print("columns:", list(col))
        return
    reasons = [(n, i) for n, i in col.items() if n.startswith("stall_") or n.startswith("Stall ")]
    body = [r for r in body if len(r) == len(header)]
    total = sum(_number(r[total_col]) for r in body) or 1.0
    overall = Counter()
    for r in body:
        for n, i in reasons:
            overall[n] += _number(r[i])
    print(f"samples {total:.0f}; by reason: " + ", ".join(
        f"{n} {100 * v / total:.1f}%" for n, v in overall.most_common(10) if v))
    hot = sorted(enumerate(body), key=lambda e: -_number(e[1][total_col]))[:args.top]
    for idx, r in sorted(hot):
        top = sorted(((_number(r[i]), n) for n, i in reasons), reverse=True)[:2]
        why = ", ".join(f"{n} {v:.0f}" for v, n in top if v)
        print(f"{idx:5d} {100 * _number(r[total_col]) / total:5.1f}%  {r[col['Source']].strip()[:70]:70s} {why}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("run")
    r.add_argument("--head-dim", type=int, default=128)
    r.add_argument("--seqlen", type=int, default=8192)
    r.add_argument("--causal", action="store_true")
    r.add_argument("--backward", action="store_true", help="time backward calls instead")
    s = sub.add_parser("summary")
    s.add_argument("csv")
    s.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    run(args) if args.mode == "run" else summary(args)


if __name__ == "__main__":
    main()
