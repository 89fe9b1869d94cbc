"""torch's context parallelism with flashjit's SDPA provider ops, two CPU processes over gloo.

The sharding (and torch's head-tail load balancing for causal), the K/V ring (all-gather and
all-to-all rotation), the lse merge of the partial outputs and the backward's ring run as on GPUs;
flashjit's op implementations run with their kernel calls replaced by a float32 reference of the
kernels' contract (tests/cpu/cp_gloo_worker.py says what exactly). The GPU version with the real
kernels and NCCL is tests/gpu/test_context_parallel.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("cp_gloo_worker.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed")


def _run(extra_env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(WORKER)],
                          capture_output=True, text=True, timeout=240, env=env)


def test_ring_over_flashjit_ops_matches_whole_sequence():
    result = _run()
    lines = [l for l in result.stdout.splitlines() if l.startswith("rank ")]
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert len(lines) == 4 and all(": ok " in l for l in lines), result.stdout


def test_ring_check_fails_when_the_backward_ignores_the_given_lse():
    # the flash backward must take the global lse (and out) it is given; one that recomputes
    # its block's own lse gives each shard wrong gradients, and the check above must say so
    result = _run({"FLASHJIT_CP_BREAK": "local-lse"})
    assert result.returncode != 0
    assert "FAILED" in result.stdout and "dq" in result.stdout, \
        result.stdout + result.stderr[-2000:]
