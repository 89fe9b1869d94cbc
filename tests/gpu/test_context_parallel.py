"""flashjit under torch's context parallelism on two GPUs (tests/gpu/cp_worker.py, run with
torchrun, NCCL, NVLink multicast off). Skipped with fewer than two GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("cp_worker.py")
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="context parallelism needs two GPUs (the device's nvidia-h200-x2)")
def test_context_parallel_matches_one_gpu_and_reference():
    env = {**os.environ, **MULTICAST_OFF}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", str(WORKER)],
                            capture_output=True, text=True, timeout=500, env=env)
    print(result.stdout)
    lines = [l for l in result.stdout.splitlines() if l.startswith("rank ")]
    assert result.returncode == 0, result.stdout + result.stderr[-6000:]
    assert len(lines) == 6 and all(" ok: " in l for l in lines), result.stdout
