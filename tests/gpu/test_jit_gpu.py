"""The CUDA ops built from a cold cache, in a fresh process, exactly as a new user gets them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import torch, flashjit
from tests.reference import attention_ref, max_error
q, k, v = (torch.randn(2, 200, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
           for _ in range(3))
out = flashjit.flash_attn_func(q, k, v, causal=True)
out.sum().backward()
ref, _ = attention_ref(q.float(), k.float(), v.float(), causal=True)
pt, _ = attention_ref(q, k, v, causal=True)
assert max_error(out, ref) <= 2 * max_error(pt, ref) + 1e-5
assert q.grad is not None and torch.isfinite(q.grad).all()
print("COLD_CACHE_OK")
"""


def test_ops_build_and_run_from_a_cold_cache(tmp_path):
    env = dict(os.environ, FLASHJIT_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "COLD_CACHE_OK" in proc.stdout
    # one announcement and one timing line per spec built (fwd and bwd)
    assert proc.stderr.count("a one-time cost") == 2, proc.stderr
    assert proc.stderr.count("built ") == 2, proc.stderr
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 2
