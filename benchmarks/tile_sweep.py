"""Forward tile sweep: time the forward kernel with other tile shapes, without editing csrc/.

    python benchmarks/tile_sweep.py "128,64,4,2" "128,64,8,2" "64,64,4,2"

Each variant (kBlockM, kBlockN, warps, min CTAs per SM) replaces the d <= 128 tile choice in a
copy of csrc/ (FLASHJIT_CSRC_DIR) and is timed in its own process (each variant is its own build,
and two builds of one spec cannot share a process). bf16, d 64 and 128, 16k tokens, hidden 2048.
Used to pick the tiles in csrc/flash_fwd_launch.cuh; the numbers go to the notes, not the README.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1] + "/benchmarks")
import flashjit
from common import bench_ms, attention_flops
for d in (64, 128):
    for seqlen in (1024, 4096, 16384):
        for causal in (False, True):
            b, h = 16384 // seqlen, 2048 // d
            q, k, v = (torch.randn(b, seqlen, h, d, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            ms = bench_ms(lambda: flashjit.flash_attn_func(q, k, v, causal=causal), 5, 20)
            tf = attention_flops(b, h, seqlen, seqlen, d, causal) / ms / 1e9
            print(f"d{d} s{seqlen} causal={int(causal)} {tf:.1f}", flush=True)
"""


def main():
    for variant in sys.argv[1:]:
        m, n, w, mb = (int(x) for x in variant.split(","))
        with tempfile.TemporaryDirectory() as tmp:
            csrc = Path(tmp) / "csrc"
            shutil.copytree(ROOT / "csrc", csrc)
            launch = csrc / "flash_fwd_launch.cuh"
            text = launch.read_text()
            text, count = re.subn(r"using Big = FwdTraits<Element, kHeadDim, 128, 64, 4, 2>;",
                                  f"using Big = FwdTraits<Element, kHeadDim, {m}, {n}, {w}, {mb}>;",
                                  text)
            assert count == 1, "tile choice not found in flash_fwd_launch.cuh"
            launch.write_text(text)
            env = dict(os.environ, FLASHJIT_CSRC_DIR=str(csrc))
            out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT)], env=env,
                                 capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("d")]
            print(f"variant {variant}: " + ("  ".join(lines) if lines else out.stderr[-1500:]),
                  flush=True)


if __name__ == "__main__":
    main()
