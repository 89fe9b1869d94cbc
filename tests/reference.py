"""Reference attention in plain PyTorch ops, used by the GPU tests and benchmarks.

`attention_ref` computes softmax(scale * Q K^T + mask) V with the (batch, seq, heads, d) layout of
flash_attn_func, in whatever dtype its inputs have: upcast the inputs to float32/float64 for the
reference, keep them in fp16/bf16 to measure PyTorch's own error in that dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from flashjit._philox import keep_probability


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
        probs = probs * dropout_mask / keep_probability(dropout_p)  # 1 - p to 1/256
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


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               interleaved: bool) -> torch.Tensor:
    """Rotary embedding of x (..., seq, heads, d) at int64 positions (..., seq) (broadcastable),
    with tables cos, sin (seqlen_ro, rotary_dim / 2): the first rotary_dim dims rotate in pairs
    (x, y) = (2c, 2c + 1) (interleaved, GPT-J) or (c, c + rotary_dim / 2) (GPT-NeoX) by the
    angle at (position, c): x' = x cos - y sin, y' = x sin + y cos; the other dims pass.
    Computed in at least float32 from the exact products (an fp16/bf16 product is exact in
    float32, so x cos - y sin is rounded once, with or without a fused multiply-add) and rounded
    once to x's dtype: the decode kernel's contract, which makes the appended cache rows exact."""
    acc = torch.promote_types(x.dtype, torch.float32)
    half = cos.shape[-1]
    c = cos.to(acc)[positions][..., None, :]  # (..., seq, 1, half)
    s = sin.to(acc)[positions][..., None, :]
    r = x[..., : 2 * half].to(acc)
    if interleaved:
        a, b = r[..., 0::2], r[..., 1::2]
    else:
        a, b = r[..., :half], r[..., half:]
    a2, b2 = a * c - b * s, a * s + b * c
    rotated = torch.stack((a2, b2), dim=-1).flatten(-2) if interleaved else torch.cat((a2, b2), -1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def kvcache_ref(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                rotary_interleaved=True, alibi_slopes=None, sink=None, upcast=True):
    """flashjit.flash_attn_with_kvcache's contract in plain PyTorch, on CPU or CUDA tensors.

    Returns (out, lse, k_cache_after, v_cache_after): out (batch, seqlen_q, heads, d), lse
    (batch, heads, seqlen_q) natural log, and copies of the caches with k/v appended (the inputs
    are not modified). Rotary (rotary_ref) is applied to q and to the new keys in their dtype,
    as the kernel writes them (the cache gets the rotated keys; the attention uses the rotated q
    rounded to q's dtype). Then, per sequence b (a loop: each has its own key count), the keys
    are logical rows leftpad[b] .. cache_seqlens[b] + seqlen_new - 1 of its cache row
    (cache_batch_idx) or of its pages (block_table), attended with
    flashjit.testing.attention_reference, bottom-right. upcast=True: the attention in float32
    (float64 for float64 inputs), out float32: the reference; upcast=False: in the inputs' dtype,
    PyTorch's own error in that dtype (the tests' yardstick).

    Rotary positions (flashjit's rule, interface.flash_attn_with_kvcache says how it differs from
    flash-attn 2.x's): new key t at cache_seqlens[b] - leftpad[b] + t; query i
    at the same + i when causal or a sliding window is in effect (window_size after the
    normalisation of flashjit._validate.resolve_window against the cache capacity, causal
    dropped at seqlen_q 1), else every query at cache_seqlens[b] - leftpad[b]."""
    from flashjit.testing import attention_reference

    batch, seqlen_q, heads, d = q.shape
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    paged = block_table is not None
    page = k_cache.shape[1]
    capacity = block_table.shape[1] * page if paged else k_cache.shape[1]
    seqlen_new = 0 if k is None else k.shape[1]
    if cache_seqlens is None:
        lengths = [capacity] * batch
    elif isinstance(cache_seqlens, int):
        lengths = [cache_seqlens] * batch
    else:
        lengths = cache_seqlens.tolist()
    leftpad = [0] * batch if cache_leftpad is None else cache_leftpad.tolist()
    rows = list(range(batch)) if cache_batch_idx is None else cache_batch_idx.tolist()
    left, right = window_size
    causal = causal and seqlen_q > 1
    left = -1 if left >= capacity - 1 else left
    right = 0 if causal else (-1 if right >= seqlen_q - 1 else right)
    per_row = causal or (left, right) != (-1, -1)
    if rotary_cos is not None:
        start = torch.tensor([n - p for n, p in zip(lengths, leftpad)],
                             device=q.device)[:, None]  # (batch, 1)
        steps_q = torch.arange(seqlen_q, device=q.device)[None] if per_row else 0
        q = rotary_ref(q, rotary_cos, rotary_sin, start + steps_q, rotary_interleaved)
        k = rotary_ref(k, rotary_cos, rotary_sin,
                       start + torch.arange(seqlen_new, device=q.device)[None],
                       rotary_interleaved)

    def locate(b, r):  # logical rows r (int64) of sequence b -> (cache index, row) tensors
        if not paged:
            return torch.full_like(r, rows[b]), r
        return block_table[b].to(r.device).long()[r // page], r % page

    acc = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    outs, lses = [], []
    for b in range(batch):
        if seqlen_new:
            new_rows = torch.arange(lengths[b], lengths[b] + seqlen_new, device=q.device)
            where = locate(b, new_rows)
            k_cache[where] = k[b]
            v_cache[where] = v[b]
        held = locate(b, torch.arange(leftpad[b], lengths[b] + seqlen_new, device=q.device))
        slopes = alibi_slopes
        if alibi_slopes is not None and alibi_slopes.dim() == 2:
            slopes = alibi_slopes[b]
        out, lse = attention_reference(
            q[b:b + 1].to(acc), k_cache[held][None].to(acc), v_cache[held][None].to(acc),
            causal=causal, window_size=(left, right), softcap=softcap, alibi_slopes=slopes,
            sink=sink, softmax_scale=softmax_scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), k_cache, v_cache
