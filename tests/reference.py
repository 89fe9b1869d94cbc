"""Reference attention in plain PyTorch ops, used by the GPU tests and benchmarks.

`attention_ref` computes softmax(scale * Q K^T + mask) V with the (batch, seq, heads, d) layout of
flash_attn_func, in whatever dtype its inputs have: upcast the inputs to float32/float64 for the
reference, keep them in fp16/bf16 to measure PyTorch's own error in that dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def leaf(*shape, dtype: torch.dtype, scale: float = 1.0, device="cuda") -> torch.Tensor:
    """A standard normal tensor times scale (drawn in float32, then cast to dtype), requiring
    grad: a test input."""
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()


def cu_seqlens(lengths, device="cuda") -> torch.Tensor:
    """int32 offsets [0, l0, l0 + l1, ...] (len(lengths) + 1) of sequences of these lengths."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, device=device, dtype=torch.int32)


def visible_mask(seqlen_q: int, seqlen_k: int, causal: bool, bottom_right: bool = True,
                 key_lengths: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Boolean (batch or 1, 1, seqlen_q, seqlen_k): True where query i may attend key j."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    mask = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal:
        mask = j <= i + (seqlen_k - seqlen_q if bottom_right else 0)
    mask = mask[None, None]
    if key_lengths is not None:
        keep = j[None] < key_lengths.to(device)[:, None, None]  # (batch, 1, seqlen_k)
        mask = mask & keep[:, None]
    return mask


def attention_ref(q, k, v, causal=False, softmax_scale=None, bottom_right=True,
                  key_lengths=None, dropout_mask=None, dropout_p=0.0):
    """q (b, sq, h, d), k/v (b, sk, hk, d). Returns (out like q, lse float32 (b, h, sq)).
    Rows that see no key give out 0 and lse -inf. dropout_mask: bool (b, h, sq, sk), True = keep."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    if hk != h:  # MQA/GQA: each K/V head serves h / hk query heads
        k = k.repeat_interleave(h // hk, dim=2)
        v = v.repeat_interleave(h // hk, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale  # fp32 or fp64
    mask = visible_mask(sq, sk, causal, bottom_right, key_lengths, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (b, h, sq); -inf for empty rows
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    probs = probs.masked_fill(~mask, 0.0)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(v.dtype), v)
    return out.to(q.dtype), lse


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| over finite reference entries; inf where x is NaN or the infinities differ."""
    x, ref = x.detach().double(), ref.detach().double()
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    if torch.isnan(x).any():
        return float("inf")
    diff = (x - ref).abs().masked_fill(both_inf, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def attention_grads_ref(dout, q, k, v, out, lse, causal=False, softmax_scale=None,
                        bottom_right=True):
    """The flash backward's contract in float32: (dq, dk, dv) from the given out and lse, not
    from a recomputed forward, as the kernels do (so a ring passing the global out and lse of a
    sharded forward gets each shard's share of the gradient). Layout (b, s, h, d) as
    attention_ref; lse float32 natural log (b, h, sq).
        P = exp(scale Q K^T - lse),  dV = P^T dO,  dP = dO V^T,
        D = rowsum(dO o O),  dS = P o (dP - D),  dQ = scale dS K,  dK = scale dS^T Q
    (Dao, FlashAttention-2, Algorithm 2). GQA: dK/dV summed over each group's query heads."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    f = torch.float32
    q32, k32, v32, do32, o32 = (t.to(f) for t in (q, k, v, dout, out))
    if hk != h:
        k32 = k32.repeat_interleave(h // hk, dim=2)
        v32 = v32.repeat_interleave(h // hk, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q32, k32) * scale
    mask = visible_mask(sq, sk, causal, bottom_right, None, q.device)
    lse = lse.to(f).masked_fill(torch.isinf(lse), float("inf"))  # rows with no key: P = 0
    p = torch.exp(scores - lse[..., None]).masked_fill(~mask, 0.0)      # (b, h, sq, sk)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do32)
    dp = torch.einsum("bqhd,bkhd->bhqk", do32, v32)
    delta = (do32 * o32).sum(-1).transpose(1, 2)                        # (b, h, sq)
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k32) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q32) * scale
    if hk != h:
        dk = dk.view(b, sk, hk, h // hk, d).sum(3)
        dv = dv.view(b, sk, hk, h // hk, d).sum(3)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
