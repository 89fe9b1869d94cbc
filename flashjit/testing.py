"""Testing helpers: the dropout keep mask that a flashjit call uses.

Each call with dropout draws its (seed, offset) from torch's CUDA generator with one
`torch.randint` on the device (see interface._rng_state): it follows torch.manual_seed, and under
CUDA-graph capture torch advances the generator on every replay, as for its own random ops. These
helpers peek at that draw without advancing the generator, so a test can compute the mask the
next call will use and compare the call against a reference that applies the same mask:

    mask = flashjit.testing.next_dropout_mask(b, h, sq, sk, p, device)   # bool (b, h, sq, sk)
    out = flashjit.flash_attn_func(q, k, v, dropout_p=p)                  # uses exactly `mask`
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import interface, ops
from .jit import JitSpec, current_arch, load_spec


def next_rng_state(device: torch.device) -> Tensor:
    """The (seed, offset) int64 pair the next dropout call on `device` will draw."""
    device = torch.device(device)
    with torch.cuda.device(device):
        saved = torch.cuda.get_rng_state(device)
        state = interface._rng_state(device)
        torch.cuda.set_rng_state(saved, device)
    return state


def dropout_mask(rng_state: Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                 dropout_p: float) -> Tensor:
    """Bool (batch, heads, seqlen_q, seqlen_k), True = kept, for fixed-length inputs, computed
    on the GPU by the same device function as the kernels (csrc/dropout.cuh)."""
    device = rng_state.device
    mask = torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.uint8, device=device)
    # The mask kernel ships in the backward specs; any of them will do.
    spec = JitSpec(kernel="bwd", arch=current_arch(device), dtype="fp16", head_dim=64,
                   causal=False, dropout=True)
    ops._launch(load_spec(spec).dropout_mask, device, mask, rng_state, batch, heads, seqlen_q,
                seqlen_k, float(dropout_p))
    return mask.bool()


def next_dropout_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                      device) -> Tensor:
    """The keep mask of the next dropout call on `device` with these sizes."""
    return dropout_mask(next_rng_state(device), batch, heads, seqlen_q, seqlen_k, dropout_p)
