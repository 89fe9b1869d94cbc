"""Testing helpers: the dropout keep mask that a flashjit call uses, and a reference attention.

Each call with dropout draws its (seed, offset) from torch's CUDA generator with one
`torch.randint` on the device (see interface._rng_state): it follows torch.manual_seed, and under
CUDA-graph capture torch advances the generator on every replay, as for its own random ops. These
helpers peek at that draw without advancing the generator, so a test can compute the mask the
next call will use and compare the call against a reference that applies the same mask:

    mask = flashjit.testing.next_dropout_mask(b, h, sq, sk, p, device)   # bool (b, h, sq, sk)
    out = flashjit.flash_attn_func(q, k, v, dropout_p=p)                  # uses exactly `mask`

attention_reference() is the plain-PyTorch attention, every variant included, to compare a
flashjit call against (run it on float32/float64 copies for the reference, and on the fp16/bf16
inputs themselves for PyTorch's own error in that dtype).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import interface, ops
from ._philox import keep_probability
from .jit import JitSpec, current_arch, load_spec


def next_rng_state(device: torch.device) -> Tensor:
    """The (seed, offset) int64 pair the next dropout call on `device` (a CUDA device) will draw.
    ValueError for a device that is not CUDA or a torch without CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"the dropout helpers of flashjit.testing need a CUDA device, got "
                         f"{str(device)!r}" + ("" if torch.cuda.is_available() else
                                               f" (torch {torch.__version__} sees no CUDA GPU)"))
    with torch.cuda.device(device):
        saved = torch.cuda.get_rng_state(device)
        state = interface._rng_state(device)
        torch.cuda.set_rng_state(saved, device)
    return state


def dropout_mask(rng_state: Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                 dropout_p: float) -> Tensor:
    """Bool (batch, heads, seqlen_q, seqlen_k), True = kept, for fixed-length inputs, computed
    on the GPU by the same device function as the kernels (csrc/common/dropout.cuh), in the
    test-only kernel "dropout_mask" (JitSpec("dropout_mask", arch): compiled on first use like
    any spec; ``python -m flashjit.prebuild --kernel dropout_mask`` builds it ahead)."""
    device = rng_state.device
    mask = torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.uint8, device=device)
    spec = JitSpec("dropout_mask", current_arch(device))
    ops._launch(load_spec(spec).dropout_mask, device, mask, rng_state, batch, heads, seqlen_q,
                seqlen_k, float(dropout_p))
    return mask.bool()


def next_dropout_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                      device) -> Tensor:
    """The keep mask of the next dropout call on `device` with these sizes."""
    return dropout_mask(next_rng_state(device), batch, heads, seqlen_q, seqlen_k, dropout_p)


def visible_keys(seqlen_q: int, seqlen_k: int, causal: bool = False, window_size=(-1, -1),
                 bottom_right: bool = True, device=None) -> Tensor:
    """Bool (seqlen_q, seqlen_k): True where query i sees key j (flash-attn 2.x): with
    off = seqlen_k - seqlen_q (bottom_right) or 0, i + off - left <= j <= i + off + right for
    window_size (left, right), -1 = no bound; causal sets right to 0."""
    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    off = seqlen_k - seqlen_q if bottom_right else 0
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= i + off - left
    if right >= 0:
        visible &= j <= i + off + right
    return visible


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                        window_size=(-1, -1), softcap: float = 0.0,
                        alibi_slopes: Optional[Tensor] = None, sink: Optional[Tensor] = None,
                        softmax_scale: Optional[float] = None,
                        dropout_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                        bottom_right: bool = True) -> Tuple[Tensor, Tensor]:
    """Attention in plain PyTorch ops, with every variant flashjit has; differentiable (in q, k,
    v and sink), with no NaN in values or gradients.

    q (batch, seqlen_q, heads, d); k, v (batch, seqlen_k, heads_k, d), heads % heads_k == 0 (each
    K/V head serves heads / heads_k consecutive query heads, as the kernels). Returns out like q
    and lse (batch, heads, seqlen_q), natural log, in float32 (float64 for float64 inputs).
    Q K^T and P V run in the inputs' dtype, the rest (softcap, ALiBi, softmax, lse) in at least
    float32, P cast to v's dtype: on fp16/bf16 inputs this is PyTorch's own error in that
    dtype, on float32/float64 copies the reference.

    Conventions (flash-attn 2.x; sinks as gpt-oss's): z_ij = softmax_scale * q_i . k_j (default
    scale 1 / sqrt(d)); softcap > 0: z = softcap * tanh(z / softcap); alibi_slopes (heads,) or
    (batch, heads): z -= slope_h * |i + off - j| with off = seqlen_k - seqlen_q (bottom_right) or
    0; visible keys as visible_keys(); sink (heads,): lse = log(sum_visible exp(z_ij) +
    exp(sink_h)), out_i = sum_j exp(z_ij - lse_i) v_j. A row that sees no key: out 0 and lse
    sink_h, or -inf without a sink. dropout_mask: bool (batch, heads, seqlen_q, seqlen_k), True =
    kept; kept weights are scaled by 1 / keep_probability(dropout_p), 1 - dropout_p at the
    kernels' 1/256 resolution (flashjit._philox; lse is before dropout)."""
    batch, seqlen_q, heads, d = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    if heads_k != heads:  # MQA/GQA
        k = k.repeat_interleave(heads // heads_k, dim=2)
        v = v.repeat_interleave(heads // heads_k, dim=2)
    acc = torch.promote_types(q.dtype, torch.float32)
    z = torch.einsum("bqhd,bkhd->bhqk", q, k).to(acc) * scale  # (batch, heads, seqlen_q, seqlen_k)
    if softcap > 0.0:
        z = softcap * torch.tanh(z / softcap)
    off = seqlen_k - seqlen_q if bottom_right else 0
    if alibi_slopes is not None:
        i = torch.arange(seqlen_q, device=q.device)[:, None]
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        slopes = alibi_slopes.to(acc).reshape(-1, heads, 1, 1)  # (1 or batch, heads, 1, 1)
        z = z - slopes * (i + off - j).abs().to(acc)
    visible = visible_keys(seqlen_q, seqlen_k, causal, window_size, bottom_right, q.device)
    z = z.masked_fill(~visible, float("-inf"))
    if sink is not None:  # one more logit per row, with no value
        z = torch.cat((z, sink.to(acc).view(1, heads, 1, 1).expand(batch, heads, seqlen_q, 1)),
                      dim=-1)
    # lse = m + log(sum exp(z - m)), m the row max (detached: lse does not depend on it), 0 for
    # rows that see nothing, whose sum is 0: their lse is -inf and their weights 0, with no NaN.
    if z.shape[-1] == 0:  # no keys and no sink: amax of nothing is undefined, the max is -inf
        m = z.new_full(z.shape[:-1] + (1,), float("-inf"))
    else:
        m = z.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)
    total = e.sum(dim=-1, keepdim=True)
    seen = total > 0
    total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, m + torch.log(total), torch.full_like(total, float("-inf")))[..., 0]
    probs = e[..., :seqlen_k] / total
    if dropout_mask is not None:
        probs = probs * dropout_mask / keep_probability(dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return out.to(q.dtype), lse
