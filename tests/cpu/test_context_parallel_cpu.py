"""torch's context parallelism with flashjit's SDPA provider ops, CPU processes over gloo.

The sharding (and torch's head-tail load balancing for causal), the K/V ring (all-gather and
all-to-all rotation, one hop with 2 ranks, several with 4), the lse merge of the partial outputs
and the backward's ring run as on GPUs; flashjit's op implementations run with their kernels
replaced by a float32 reference of the kernels' contract (tests/cpu/cp_gloo_worker.py says what
exactly). The GPU version with the real kernels and NCCL is tests/gpu/test_context_parallel.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.ranks import run_ranks

WORKER = Path(__file__).with_name("cp_gloo_worker.py")
CASES = 5  # cp_gloo_worker.py's cases

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="this torch build has no torch.distributed")


def case_lines(out: str) -> list:
    return [line for line in out.splitlines() if line.startswith("rank ")]


@pytest.mark.parametrize("nproc", [2, 4])
def test_ring_over_flashjit_ops_matches_whole_sequence(nproc):
    status, out = run_ranks(WORKER, nproc, timeout=240)
    assert status == 0, out[-6000:]
    lines = case_lines(out)
    assert len(lines) == CASES and all(": ok " in line for line in lines), out


def test_ring_check_fails_when_the_backward_ignores_the_given_lse():
    # the flash backward must take the global lse (and out) it is given; one that recomputes
    # its block's own lse gives each shard wrong gradients, and the check must say so there:
    # forward (out, lse) still right, the gradients wrong
    status, out = run_ranks(WORKER, 2, timeout=240, extra_env={"FLASHJIT_CP_BREAK": "local-lse"})
    assert status != 0, out[-4000:]
    rank0 = [line for line in case_lines(out) if line.startswith("rank 0 ")]
    assert len(rank0) == CASES, out
    for line in rank0:
        flags = dict(re.findall(r"(out|lse|dq|dk|dv) \S+( FAILED)?", line))
        assert flags["out"] == "" and flags["lse"] == "", line
        assert " FAILED" in (flags["dq"], flags["dk"], flags["dv"]), line
