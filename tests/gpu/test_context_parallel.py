"""flashjit under torch's context parallelism on two GPUs (tests/gpu/cp_worker.py, run with
torchrun, NCCL, NVLink multicast off). Skipped with fewer than two GPUs.

Specs the worker needs (prebuild them first, else both ranks compile while NCCL waits):
    python -m flashjit.prebuild --kernel fwd bwd --dtype fp16 bf16 --head-dim 64 128 --causal both
(benchmarks/device_run.sh's cp step does).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.ranks import run_ranks

WORKER = Path(__file__).with_name("cp_worker.py")
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="context parallelism needs two GPUs (the device's nvidia-h200-x2)")
def test_context_parallel_matches_one_gpu_and_reference():
    status, out = run_ranks(WORKER, 2, timeout=420, extra_env=MULTICAST_OFF)
    print(out)
    lines = [line for line in out.splitlines() if line.startswith("rank ")]
    assert status == 0, out[-6000:]
    assert len(lines) == 6 and all(" ok: " in line for line in lines), out
    assert os.environ.get("NCCL_NVLS_ENABLE", "0") == "0"  # nor did this process turn it on
