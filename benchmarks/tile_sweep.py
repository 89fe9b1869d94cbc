"""Tile sweep: time the forward kernel with other tile shapes, or the backward of other csrc/
trees, without editing csrc/.

    python benchmarks/tile_sweep.py "128,64,4,2" "128,64,8,2" "64,64,4,2" "sm90:64,2,2"
    python benchmarks/tile_sweep.py "bwd:csrc" "bwd:/tmp/other/csrc" "bwd-dropout:csrc"

A forward variant is a spec tile (JitSpec.tile, set through FLASHJIT_FWD_TILE, part of the spec
name and cache key): "kBlockM,kBlockN,warps,min CTAs per SM" for the sm80 family (run with
FLASHJIT_KERNEL_FAMILY=sm80), "sm90:kBlockN,warpgroups,min CTAs per SM" for the sm90 family (both
head dims; before 2026-11-30 the sm90 form was "kBlockN,min CTAs,warpgroups"). A "bwd:DIR"
variant times the backward (default kernel family) built from the csrc tree DIR (relative to the
repo root or absolute): A/B of kernel versions in one run; "bwd-dropout:DIR" does the same with
dropout_p 0.1 (FLASHJIT_KERNEL_FAMILY=sm80 in the environment compares the mma.sync family).
Each variant is timed in its own process, so that no process loads two builds of one spec
name. bf16, d 64 and 128 (SWEEP_HEAD_DIMS="224 256": others), seqlens 1k, 4k, 16k
(SWEEP_SEQLENS), 16k tokens, hidden 2048. Used to pick the tiles; the numbers go to the notes,
not the README.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The child processes: a loop over bf16 configs (16k tokens, hidden 2048), timed with bench_ms.
CHILD_LOOP = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import flashjit
from common import bench_ms, attention_flops
for d in [int(x) for x in os.environ.get("SWEEP_HEAD_DIMS", "64 128").split()]:
    for seqlen in [int(x) for x in os.environ.get("SWEEP_SEQLENS", "1024 4096 16384").split()]:
        for causal in (False, True):
            b, h = 16384 // seqlen, 2048 // d
"""

CHILD = CHILD_LOOP + r"""            q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            ms = bench_ms(lambda: flashjit.flash_attn_func(q, k, v, causal=causal), 5, 20)
            tf = attention_flops(b, h, seqlen, seqlen, d, causal) / ms / 1e9
            # a sanity check, not the tests: max |difference| from torch's SDPA
            ref = torch.nn.functional.scaled_dot_product_attention(
                *(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal).transpose(1, 2)
            err = (flashjit.flash_attn_func(q, k, v, causal=causal) - ref).abs().max().item()
            print(f"d{d} s{seqlen} causal={int(causal)} {tf:.1f} (err {err:.2g})", flush=True)
"""


# Backward only (the forward runs once, outside the timing), bf16; the error is max |dq - SDPA's|
# (not meaningful with dropout: SDPA's reference has none).
CHILD_BWD = CHILD_LOOP + r"""            q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))
            dout = torch.randn_like(q)
            p = float(sys.argv[2])
            out = flashjit.flash_attn_func(q, k, v, causal=causal, dropout_p=p)
            ms = bench_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), 5, 20)
            tf = attention_flops(b, h, seqlen, seqlen, d, causal, "bwd") / ms / 1e9
            (dq,) = torch.autograd.grad(out, q, dout)
            qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
            ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            (dq_ref,) = torch.autograd.grad(ref, qt, dout.transpose(1, 2))
            err = (dq - dq_ref.transpose(1, 2)).abs().max().item()
            print(f"d{d} s{seqlen} causal={int(causal)} {tf:.1f} (err {err:.2g})", flush=True)
            del q, k, v, out, dout
"""


def main():
    for variant in sys.argv[1:]:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ)
            child, child_args = CHILD, []
            if variant.startswith(("bwd:", "bwd-dropout:")):
                kind, tree = variant.split(":", 1)
                csrc = Path(tmp) / "csrc"
                shutil.copytree(ROOT / tree, csrc)
                env["FLASHJIT_CSRC_DIR"] = str(csrc)
                child, child_args = CHILD_BWD, ["0.1" if kind == "bwd-dropout" else "0.0"]
                dims = os.environ.get("SWEEP_HEAD_DIMS", "64 128").split()
                subprocess.run([sys.executable, "-m", "flashjit.prebuild", "--kernel", "fwd", "bwd",
                                "--dtype", "bf16", "--head-dim", *dims, "--causal", "both",
                                "--dropout", "yes" if kind == "bwd-dropout" else "no",
                                "--jobs", "16"], env=env, capture_output=True)
            elif variant.startswith("sm90:"):
                env["FLASHJIT_FWD_TILE"] = variant[5:]
            else:
                env["FLASHJIT_FWD_TILE"] = variant
                env["FLASHJIT_KERNEL_FAMILY"] = "sm80"
            out = subprocess.run([sys.executable, "-c", child, str(ROOT)] + child_args, env=env,
                                 capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("d")]
            print(f"variant {variant}: " + ("  ".join(lines) if lines else out.stderr[-1500:]),
                  flush=True)


if __name__ == "__main__":
    main()
