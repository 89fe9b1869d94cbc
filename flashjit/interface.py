"""Public API of flashjit: autograd and the flash_attn_* / SDPA entry points.

Every argument is checked (_validate.py) before anything is compiled: TypeError, ValueError
or NotImplementedError, naming the caller's own argument.

Conventions (flash-attn 2.x for causal, window_size, softcap and alibi_slopes; gpt-oss for sink):
  * Causal alignment when seqlen_q != seqlen_k: bottom-right in the flash_attn_* functions (as
    flash-attn >= 2.1): query i sees key j iff j <= i + seqlen_k - seqlen_q; top-left in
    scaled_dot_product_attention (as torch): j <= i. Windows and ALiBi distances use the same
    offset seqlen_k - seqlen_q (per sequence in varlen calls).
  * Scores, in natural-log units: z_ij = softmax_scale * q_i . k_j, then softcap * tanh(z /
    softcap) (softcap > 0), then - slope_h * |i + seqlen_k - seqlen_q - j| (alibi_slopes).
  * softmax_lse = log(sum over visible j of exp(z_ij) + exp(sink_h)) (no sink term without one).
  * A query row that sees no key gets output 0 and lse -inf, or lse sink_h with a sink (never NaN).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import ops
from ._paged_varlen import paged_varlen as _paged_varlen
from ._validate import (check_cu_seqlens, check_dtype, check_flag, check_int, check_options,
                        check_qkv, check_scalars, check_variant_tensors, key_padding_lengths,
                        resolve_window)
from ._validate_kvcache import check_kvcache

_LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------
# Kernel layout
# ------------------------------------------------------------------------------------------------
def _strides_aligned(t: Tensor) -> bool:
    """The strides the kernels' 16-byte loads need: a contiguous last dim and every other stride a
    multiple of 8 elements (16 bytes in fp16/bf16), and no zero stride in a dim of more than one
    element (an expanded view, e.g. MQA's k expanded to every query head: the Hopper forward's
    TMA tensor maps take no zero stride). The data pointer's alignment is fixed where it is
    known, in the op itself (ops._aligned): torch.compile traces this function without one."""
    strides = t.stride()
    if strides[-1] != 1:
        return False
    for s, n in zip(strides[:-1], t.shape[:-1]):  # a loop, not all(): host cost per call
        if s % 8 != 0 or (s == 0 and n != 1):
            return False
    return True


def _kernel_layout(t: Tensor, head_dim: int) -> Tensor:
    """t as the kernels read it: the last dim zero-padded to head_dim (a multiple of 8), aligned
    strides (_strides_aligned) and, for a plain tensor, a 16-byte aligned data pointer. A copy,
    once per call, only where t is not so already; autograd slices the padding off the gradient,
    and the saved copy serves the backward too. (A traced tensor has no pointer yet: ops._aligned
    copies it at run time if need be.)"""
    if t.shape[-1] != head_dim:
        t = torch.nn.functional.pad(t, (0, head_dim - t.shape[-1]))
    eager = not torch.compiler.is_compiling() and type(t) is Tensor
    if not _strides_aligned(t) or (eager and t.data_ptr() % 16 != 0):
        t = t.clone(memory_format=torch.contiguous_format)
    return t


# ------------------------------------------------------------------------------------------------
# Dropout randomness
# ------------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> Tensor:
    """(seed, offset) int64 on the device for one dropout call, drawn from torch's CUDA generator
    by one randint: reproducible under torch.manual_seed, and safe under CUDA-graph capture (the
    kernels read the pair from device memory; torch advances its generator on each replay, as for
    its own random ops). Different calls get independent Philox streams
    (csrc/common/dropout.cuh)."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------
def sink_grad(dout: Tensor, out: Tensor, out_residual: Optional[Tensor], lse_log2: Tensor,
              sink: Tensor, cu_seqlens_q: Optional[Tensor] = None) -> Tensor:
    """The sink's gradient, float32 (heads,): dsink_h = -sum over rows of exp(sink_h - lse) * D,
    D = rowsum(dO * O) in float32 with O = out + out_residual (as the kernels' D).

    Why: lse = log(sum_j exp(z_j) + exp(sink)), so d lse / d sink = exp(sink - lse) =: p_sink and
    each out row, sum_j exp(z_j - lse) v_j (dropout included), scales by -p_sink: dL/dsink =
    dO . (-p_sink O). A row that sees no key has O = 0 and adds nothing.
    Layouts: dout, out, out_residual fixed (batch, seqlen_q, heads, d) with lse_log2 (batch,
    heads, seqlen_q), or varlen (total_q, heads, d) with lse_log2 (heads, total_q) and
    cu_seqlens_q: rows from cu_seqlens_q[-1] on belong to no sequence and are left out (their lse
    is never written). lse_log2 is the kernels' (log2 units); heads are query heads (GQA too)."""
    o = out.float() if out_residual is None else out.float() + out_residual.float()
    d = (dout.float() * o).sum(-1)  # fixed (batch, seqlen_q, heads); varlen (total_q, heads)
    d = d.t() if cu_seqlens_q is not None else d.transpose(1, 2)  # lse's layout
    return sink_grad_from_d(d, lse_log2, sink, cu_seqlens_q)


def sink_grad_from_d(d: Tensor, lse_log2: Tensor, sink: Tensor,
                     cu_seqlens_q: Optional[Tensor] = None) -> Tensor:
    """sink_grad from D = rowsum(dO * O) float32 in lse_log2's layout (the backward kernels'
    D, which flashjit::bwd returns when there is a sink): float32 (heads,)."""
    lse = lse_log2 * _LN2
    # p_sink = exp(sink - lse), 0 where lse = -inf (a row with no key and a -inf sink: nothing to
    # differentiate; exp(-inf - -inf) would be NaN).
    if cu_seqlens_q is None:
        p_sink = torch.exp(sink[None, :, None] - lse)
        terms = torch.where(torch.isneginf(lse), 0.0, p_sink) * d  # (b, h, rows)
        return -terms.sum(dim=(0, 2))
    p_sink = torch.exp(sink[:, None] - lse)
    terms = torch.where(torch.isneginf(lse), 0.0, p_sink) * d  # (heads, total_q)
    rows = torch.arange(lse.shape[1], device=lse.device) < cu_seqlens_q[-1]  # no host read
    return -torch.where(rows[None, :], terms, 0.0).sum(dim=1)


class _FlashAttnFunction(torch.autograd.Function):
    # 18 inputs of forward after ctx; sink (index 3) is the one beside q, k, v with a gradient

    @staticmethod
    def forward(ctx, q, k, v, sink, alibi_slopes, cu_seqlens_q, cu_seqlens_k, seqused_k,
                max_seqlen_q, max_seqlen_k, softmax_scale, causal, causal_bottom_right,
                window_left, window_right, softcap, dropout_p, deterministic):
        rng_state = None
        if dropout_p > 0.0:
            rng_state = _rng_state(q.device)
        # With a backward ahead, the forward also writes O's rounding residual (one more tensor
        # like out), so that the backward's D = rowsum(dO * O) uses O at fp32 precision: D from
        # the rounded O alone is wrong by dO . (O - round(O)), all of dS in one-hot softmax rows.
        # The sink's gradient is made of D too.
        residual = any(ctx.needs_input_grad[:4])
        out, lse, out_residual = ops.call_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, None, max_seqlen_q, max_seqlen_k,
            softmax_scale, causal, causal_bottom_right, window_left, window_right, softcap,
            alibi_slopes, sink, dropout_p, rng_state, residual)
        ctx.save_for_backward(q, k, v, sink, alibi_slopes, out, out_residual, lse, cu_seqlens_q,
                              cu_seqlens_k, seqused_k, rng_state)
        ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, causal_bottom_right,
                    window_left, window_right, softcap, dropout_p, deterministic, residual)
        ctx.mark_non_differentiable(lse)
        # No zero-filled gradient for lse (it has none) or for an unused out: one allocation and
        # one fill kernel less per backward.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        # (Literal tuples, not a list sized by a class attribute: dynamo traces this function.)
        if dout is None:  # only lse was used, and it has no gradient
            return (None,) * 18
        (q, k, v, sink, alibi_slopes, out, out_residual, lse, cu_q, cu_k, seqused_k,
         rng_state) = ctx.saved_tensors
        (max_q, max_k, scale, causal, bottom_right, window_left, window_right, softcap, dropout_p,
         deterministic, residual) = ctx.args
        out_residual = out_residual if residual else None
        if not _strides_aligned(dout):
            dout = dout.clone(memory_format=torch.contiguous_format)
        dq = dk = dv = dsink = None
        if any(ctx.needs_input_grad[:3]):
            # with a sink the op also returns the kernels' D (lse's layout), the sink's gradient
            # is made of: no second pass over dO and O here
            dq, dk, dv, d = ops.call_bwd(
                dout, q, k, v, out, out_residual, lse, cu_q, cu_k, seqused_k, max_q, max_k,
                scale, causal, bottom_right, window_left, window_right, softcap, alibi_slopes,
                sink, dropout_p, rng_state, deterministic)
            if ctx.needs_input_grad[3]:
                dsink = sink_grad_from_d(d, lse, sink, cu_q)
        elif ctx.needs_input_grad[3]:
            dsink = sink_grad(dout, out, out_residual, lse, sink, cu_q)
        return (dq, dk, dv, dsink) + (None,) * 14


def _attention(q, k, v, cu_q, cu_k, seqused_k, max_q, max_k, scale, causal, bottom_right,
               dropout_p, deterministic, window=(-1, -1), softcap=0.0, alibi_slopes=None,
               sink=None):
    """(out, lse in log2 units) for validated inputs; window (left, right) as resolve_window
    gives it. Head dims that are not a multiple of 8 are zero-padded (scores and softmax are
    unchanged: the padded columns add 0 to every dot product) and the output is sliced back;
    unaligned inputs are copied (_kernel_layout)."""
    d = q.shape[-1]
    padded = -(-d // 8) * 8
    q, k, v = (_kernel_layout(t, padded) for t in (q, k, v))
    if _records_grad(q, k, v, sink):
        out, lse = _FlashAttnFunction.apply(q, k, v, sink, alibi_slopes, cu_q, cu_k, seqused_k,
                                            max_q, max_k, scale, causal, bottom_right, window[0],
                                            window[1], float(softcap), float(dropout_p),
                                            bool(deterministic))
    else:
        # Nothing to differentiate (inference, torch.no_grad): the op itself, as
        # _FlashAttnFunction.forward would call it (the same dropout draw, no rounding residual),
        # without autograd.Function's host cost per call.
        rng_state = _rng_state(q.device) if dropout_p > 0.0 else None
        out, lse, _ = ops.call_fwd(
            q, k, v, cu_q, cu_k, seqused_k, None, max_q, max_k, scale, causal, bottom_right,
            window[0], window[1], float(softcap), alibi_slopes, sink, float(dropout_p),
            rng_state, False)
    return (out if padded == d else out[..., :d]), lse


def _records_grad(q: Tensor, k: Tensor, v: Tensor, sink: Optional[Tensor]) -> bool:
    """Whether autograd records this call: grad mode on and an input that requires grad
    (alibi_slopes never does: check_variant_tensors)."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (sink is not None and sink.requires_grad))


def _varlen_lse(lse_log2: Tensor, cu_seqlens_q: Tensor) -> Tensor:
    """Varlen lse_log2 (heads, total_q) as the kernels leave it, with the rows from
    cu_seqlens_q[-1] on (which belong to no sequence, and which no kernel writes) set to -inf, as
    a row that sees no key (and as the paged varlen path's): on the device, no synchronisation."""
    rows = torch.arange(lse_log2.shape[-1], device=lse_log2.device, dtype=cu_seqlens_q.dtype)
    end = cu_seqlens_q.narrow(0, cu_seqlens_q.numel() - 1, 1)  # (1,): traceable, as a view
    return torch.where(rows < end, lse_log2, float("-inf"))


def _result(out: Tensor, lse_log2: Tensor, return_attn_probs: bool):
    """flash-attn's return convention: out, or (out, softmax_lse, S_dmask) with
    return_attn_probs; softmax_lse in natural-log units (the kernels keep it in log2 units).
    S_dmask (the dropout-masked attention probabilities, which flash-attn returns for tests only)
    is always None: flashjit never materialises P."""
    return (out, lse_log2 * _LN2, None) if return_attn_probs else out


# ------------------------------------------------------------------------------------------------
# Public functions (flash-attn 2.x names, argument order, defaults and return conventions)
# ------------------------------------------------------------------------------------------------
_COMMON_DOC = """
    dropout_p: probability of dropping an attention weight (float in [0, 1)); use 0.0 in eval.
        Applied at a resolution of 1/256: a weight is kept with probability
        round(256 (1 - dropout_p)) / 256 (at least 1/256; 0.1 keeps 230/256 = 0.898) and kept
        weights are scaled by its inverse, so the output stays unbiased
        (flashjit._philox.keep_probability; the mask: csrc/common/dropout.cuh). A dropout_p > 0
        that drops nothing at that resolution (up to 1/512), or that would keep less than 1/512
        of the weights (from 1 - 1/512 = 0.998046875 on), raises ValueError.
    softmax_scale: scale of Q K^T before the softmax (default 1 / sqrt(head_dim)).
    causal: causal mask aligned bottom-right: query i sees key j iff j <= i + seqlen_k - seqlen_q
        (flash-attn >= 2.1).
    window_size: (left, right), ints >= -1: sliding-window (local) attention as flash-attn 2.x:
        query i sees key j iff i + off - left <= j <= i + off + right, off = seqlen_k -
        seqlen_q (bottom-right, as causal); -1: no bound. (-1, 0) is causal; a bound at least
        as wide as the sequences is no bound; with causal=True the right bound is 0 whatever is
        given (as flash-attn: the band ends at the diagonal).
    softcap: float >= 0, 0.0 = off: each score z = softmax_scale * q.k becomes
        softcap * tanh(z / softcap) before the softmax (flash-attn 2.x; Gemma 2).
    alibi_slopes: None or float32 (heads,) or (batch, heads) on q's device (heads: query heads):
        adds -slope * |i + off - j| to the score of query i and key j, after softcap (flash-attn
        2.x). It gets no gradient, so it may not require grad while grad is enabled.
    deterministic: bitwise reproducible gradients (a separate dQ pass instead of float atomics).
    return_attn_probs: also return softmax_lse (float32, natural log) and S_dmask, which is
        always None (flashjit never materialises the attention matrix).
    sink (keyword-only): None or float32 (heads,) on q's device: attention sinks as gpt-oss's,
        one logit per query head (natural-log units, like the scaled scores) in every row's
        softmax denominator, with no value: out_i = sum_j exp(z_ij - lse_i) v_j with lse_i =
        log(sum_j exp(z_ij) + exp(sink_h)), so a row's weights sum to less than 1. softmax_lse
        includes it; a row that sees no key gets out 0 and lse sink_h. It may require grad: its
        gradient (float32, (heads,)) is computed from the kernels' lse and out.
    The variants combine freely, with each other and with dropout, GQA and varlen inputs (each
    has its meaning in every combination, and every kernel family serves every one).
    Head dims 1-256: a head dim that is not a multiple of 8 is zero-padded inside the call (a
    copy) and the output sliced back. Inputs whose data pointer or strides are not 16-byte
    aligned (or whose last dim is not contiguous) are copied once to an aligned buffer.
    Errors, before anything compiles, naming the argument: TypeError for a wrong type (and a q,
    k, v dtype other than fp16/bf16, a window_size not a pair of ints, a softcap not a real);
    ValueError for wrong shapes, devices and values (dropout_p outside [0, 1), in (0, 1/512]
    (it would drop nothing) or in [1 - 1/512, 1) (keep less than 1/512); softmax_scale not in [1e-30, 1e30]; window bounds < -1; softcap
    neither 0 nor in [1e-6, 1e4]; alibi_slopes/sink not float32 or of another shape or
    device)."""


def _flash_attn(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                deterministic, return_attn_probs, sink, names=("q", "k", "v")):
    """flash_attn_func, with `names`: how the caller calls q, k, v in error messages."""
    check_qkv(q, k, v, varlen=False, names=names)
    causal, *window = resolve_window(window_size, check_flag("causal", causal), q.shape[1],
                                     k.shape[1])
    scale, softcap, deterministic, return_attn_probs = check_options(
        dropout_p, softmax_scale, softcap, deterministic, return_attn_probs, q.shape[-1])
    alibi_slopes, sink = check_variant_tensors(alibi_slopes, sink, q.device, q.shape[0],
                                               q.shape[2], names[0])
    out, lse = _attention(q, k, v, None, None, None, q.shape[1], k.shape[1], scale, causal, True,
                          dropout_p, deterministic, window, softcap, alibi_slopes, sink)
    return _result(out, lse, return_attn_probs)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                    deterministic: bool = False, return_attn_probs: bool = False, *,
                    sink: Optional[Tensor] = None):
    return _flash_attn(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                       alibi_slopes, deterministic, return_attn_probs, sink)


flash_attn_func.__doc__ = """Exact attention, as flash_attn.flash_attn_func (2.x).

    q (batch, seqlen_q, heads, d); k, v (batch, seqlen_k, heads_k, d), heads % heads_k == 0
    (MQA/GQA); fp16 or bf16 on one CUDA device. Returns out (batch, seqlen_q, heads, d), and with
    return_attn_probs (out, softmax_lse (batch, heads, seqlen_q), None).""" + _COMMON_DOC


def _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                       deterministic, return_attn_probs, block_table, sink,
                       names=("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                              "max_seqlen_k")):
    """flash_attn_varlen_func, with `names`: how the caller calls its tensors and lengths in
    error messages."""
    nq, nk, nv, ncu_q, ncu_k, nmax_q, nmax_k = names
    if block_table is not None:
        # q's dtype before _paged_varlen compares the caches' with it (their messages name q's
        # as the one to have); not inside it, whose CPU tests run it on float64
        if isinstance(q, Tensor):
            check_dtype(nq, q)
        return _paged_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             dropout_p, softmax_scale, causal, window_size, softcap,
                             alibi_slopes, deterministic, return_attn_probs, block_table, sink,
                             names)
    check_qkv(q, k, v, varlen=True, names=(nq, nk, nv))
    max_seqlen_q, max_seqlen_k = check_int(nmax_q, max_seqlen_q), check_int(nmax_k, max_seqlen_k)
    causal, *window = resolve_window(window_size, check_flag("causal", causal), max_seqlen_q,
                                     max_seqlen_k)
    scale, softcap, deterministic, return_attn_probs = check_options(
        dropout_p, softmax_scale, softcap, deterministic, return_attn_probs, q.shape[-1])
    check_cu_seqlens(ncu_q, cu_seqlens_q, q.device, q.shape[0], max_seqlen_q, nmax_q)
    check_cu_seqlens(ncu_k, cu_seqlens_k, q.device, k.shape[0], max_seqlen_k, nmax_k)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{ncu_q} and {ncu_k} must have the same length, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    alibi_slopes, sink = check_variant_tensors(alibi_slopes, sink, q.device,
                                               cu_seqlens_q.numel() - 1, q.shape[1], nq)
    out, lse = _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q, max_seqlen_k,
                          scale, causal, True, dropout_p, deterministic, window, softcap,
                          alibi_slopes, sink)
    if return_attn_probs and q.shape[0] > 0:
        lse = _varlen_lse(lse, cu_seqlens_q)
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                           causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                           alibi_slopes=None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table=None, *,
                           sink: Optional[Tensor] = None):
    return _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              dropout_p, softmax_scale, causal, window_size, softcap,
                              alibi_slopes, deterministic, return_attn_probs, block_table, sink)


flash_attn_varlen_func.__doc__ = """Packed variable-length sequences, as
    flash_attn.flash_attn_varlen_func (2.x).

    q (total_q, heads, d), k, v (total_k, heads_k, d); sequence b is rows cu_seqlens[b] ..
    cu_seqlens[b + 1] - 1 (int32, batch + 1 entries, on q's device); max_seqlen_q/k bound the
    sequence lengths. Rows past cu_seqlens[-1] get output (and gradient) 0. softmax_lse is
    (heads, total_q), -inf in the rows past cu_seqlens_q[-1]. Key padding is done this way:
    pack the real tokens of each sequence. Windows, causal and ALiBi align each sequence on its own lengths; alibi_slopes may be
    (batch, heads) with batch = cu_seqlens_q.numel() - 1. block_table (batch, max_blocks)
    int32: paged KV, forward only (inference), as flash-attn 2.x: k, v are then paged caches
    (num_blocks, page_size, heads_k, d) and sequence b's keys its first cu_seqlens_k[b + 1] -
    cu_seqlens_k[b] rows through block_table[b] (served by flash_attn_with_kvcache, whose checks
    apply: its decode kernel, or its paged forward from ops.paged_prefill_min_queries() queries,
    64 on sm90a, else 256, counted over the longest query sequence, max_seqlen_q under CUDA-graph
    capture and torch.compile; _paged_varlen).
    In eager mode the cu_seqlens values are checked on the host (one synchronisation); under
    CUDA-graph capture and torch.compile they are not.""" + _COMMON_DOC


def _unpack(packed, name: str, parts: int, varlen: bool):
    """The q/k/v views of a packed qkv ((.., 3, heads, d)) or kv ((.., 2, heads_k, d))."""
    rank = 4 if varlen else 5
    layout = ("(total, " if varlen else "(batch, seqlen, ") + \
        ("3, heads, d)" if parts == 3 else "2, heads_k, d)")
    if not isinstance(packed, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != rank or packed.shape[-3] != parts:
        raise ValueError(f"{name} must be a tensor of shape {layout}, got "
                         f"{getattr(packed, 'shape', type(packed).__name__)}")
    return packed.unbind(-3)


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0,
                              softmax_scale: Optional[float] = None, causal: bool = False,
                              window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                              deterministic: bool = False, return_attn_probs: bool = False, *,
                              sink: Optional[Tensor] = None):
    """qkv (batch, seqlen, 3, heads, d): q, k, v are views into it (no copies; the gradient is
    one tensor like qkv). Returns out (batch, seqlen, heads, d) in qkv's dtype, or (out,
    softmax_lse (batch, heads, seqlen) float32, None) with return_attn_probs. Errors name qkv.
    Otherwise as flash_attn_func (arguments, variants, errors raised)."""
    q, k, v = _unpack(qkv, "qkv", 3, varlen=False)
    return _flash_attn(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                       alibi_slopes, deterministic, return_attn_probs, sink, names=("qkv",) * 3)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False,
                             window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                             deterministic: bool = False, return_attn_probs: bool = False, *,
                             sink: Optional[Tensor] = None):
    """q (batch, seqlen_q, heads, d); kv (batch, seqlen_k, 2, heads_k, d), k and v views into it
    (its gradient one tensor like kv). Returns out like q, or (out, softmax_lse (batch, heads,
    seqlen_q) float32, None) with return_attn_probs. Errors name q and kv. Otherwise as
    flash_attn_func (arguments, variants, errors raised)."""
    k, v = _unpack(kv, "kv", 2, varlen=False)
    return _flash_attn(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                       alibi_slopes, deterministic, return_attn_probs, sink,
                       names=("q", "kv", "kv"))


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0,
                                     softmax_scale: Optional[float] = None, causal: bool = False,
                                     window_size=(-1, -1), softcap: float = 0.0,
                                     alibi_slopes=None, deterministic: bool = False,
                                     return_attn_probs: bool = False, *,
                                     sink: Optional[Tensor] = None):
    """qkv (total, 3, heads, d) with int32 cu_seqlens (batch + 1) for queries and keys alike.
    Returns out (total, heads, d), or (out, softmax_lse (heads, total) float32, None) with
    return_attn_probs. Errors name qkv, cu_seqlens and max_seqlen. Otherwise as
    flash_attn_varlen_func (arguments, variants, errors raised)."""
    q, k, v = _unpack(qkv, "qkv", 3, varlen=True)
    return _flash_attn_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                              softmax_scale, causal, window_size, softcap, alibi_slopes,
                              deterministic, return_attn_probs, None, sink,
                              names=("qkv",) * 3 + ("cu_seqlens",) * 2 + ("max_seqlen",) * 2)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor,
                                    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0,
                                    softmax_scale: Optional[float] = None, causal: bool = False,
                                    window_size=(-1, -1), softcap: float = 0.0,
                                    alibi_slopes=None, deterministic: bool = False,
                                    return_attn_probs: bool = False, *,
                                    sink: Optional[Tensor] = None):
    """q (total_q, heads, d); kv (total_k, 2, heads_k, d). Returns out like q, or (out,
    softmax_lse (heads, total_q) float32, None) with return_attn_probs. Errors name q and kv.
    Otherwise as flash_attn_varlen_func (arguments, variants, errors raised)."""
    k, v = _unpack(kv, "kv", 2, varlen=True)
    return _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              dropout_p, softmax_scale, causal, window_size, softcap,
                              alibi_slopes, deterministic, return_attn_probs, None, sink,
                              names=("q", "kv", "kv", "cu_seqlens_q", "cu_seqlens_k",
                                     "max_seqlen_q", "max_seqlen_k"))


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention's signature and (batch, heads, seq, d)
    layout: query (batch, heads, seqlen_q, d); key, value (batch, heads_k, seqlen_k, d), heads_k
    == heads unless enable_gqa (then heads % heads_k == 0); fp16 or bf16 on one CUDA device.
    attn_mask: only a boolean right-padding key mask broadcastable to (batch, 1, 1, seqlen_k).
    Causal masking is aligned top-left, as in torch. dropout_p and scale as flash_attn_func's
    dropout_p and softmax_scale. No window, softcap, ALiBi or sink here: flash_attn_func has
    them. Anything else raises rather than falling back to a slower path.

    Returns out (batch, heads, seqlen_q, d) in query's dtype.

    Errors, before anything compiles, naming the argument (query, key, value, attn_mask,
    dropout_p, is_causal, scale, enable_gqa), with shapes as passed: TypeError for a wrong type
    (and a query/key/value dtype other than fp16/bf16, an attn_mask not bool); ValueError for
    wrong shapes, devices and values (heads that differ without enable_gqa, attn_mask with
    is_causal or not a right-padding mask, dropout_p outside [0, 1), in (0, 1/512] (it would
    drop nothing) or in [1 - 1/512, 1) (keep less than 1/512), scale not in [1e-30, 1e30])."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq, d), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    is_causal = check_flag("is_causal", is_causal)
    enable_gqa = check_flag("enable_gqa", enable_gqa)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"query has {query.shape[1]} heads and key {key.shape[1]}: pass "
                         "enable_gqa=True for grouped-query attention")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal cannot both be set (as in torch)")
    # checked as passed (heads in dim 1), so that messages show the caller's shapes
    check_qkv(query, key, value, varlen=False, names=("query", "key", "value"), heads_dim=1)
    softmax_scale = check_scalars(dropout_p, scale, query.shape[-1], scale_name="scale")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # views: (batch, seq, heads, d)
    seqused_k = None
    if attn_mask is not None:
        seqused_k = key_padding_lengths(attn_mask, q.shape[0], k.shape[1], q.device)
    out, _ = _attention(q, k, v, None, None, seqused_k, q.shape[1], k.shape[1], softmax_scale,
                        is_causal, False, dropout_p, False)
    return out.transpose(1, 2)



# ------------------------------------------------------------------------------------------------
# Inference: KV cache, paged KV, split-KV decoding, fused rotary
# ------------------------------------------------------------------------------------------------
def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens=None,
                            cache_batch_idx: Optional[Tensor] = None,
                            cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None,
                            softmax_scale: Optional[float] = None, causal: bool = False,
                            window_size=(-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes=None,
                            num_splits: int = 0, return_softmax_lse: bool = False, *,
                            sink: Optional[Tensor] = None):
    """Attention over a KV cache for inference (decoding, speculative decoding, chunked prefill),
    as flash_attn.flash_attn_with_kvcache (2.x; flash-attn's signature, argument order, defaults
    and return convention, plus flashjit's keyword-only sink). If k and v are given they are
    first appended to the cache IN PLACE (rotated, with rotary_cos/rotary_sin), and the
    attention covers the old keys and the new ones, in one call.

    Inference only, no backward: with gradients enabled, an input that requires grad raises
    NotImplementedError (call it under torch.no_grad() or torch.inference_mode()).

    q: (batch, seqlen_q, heads, d), fp16 or bf16, on a CUDA device; d a multiple of 8 from 8 to
        256 (other head dims raise: the cache is written in place, so it cannot be zero-padded
        as flash_attn_func pads). Copied once if its last dim or alignment is not the kernels'.
        Where the decode kernel serves (below ops.PREFILL_MIN_QUERIES queries on a contiguous
        cache, ops.paged_prefill_min_queries() on a paged one, or with cache_batch_idx /
        cache_leftpad) on a GPU with 99 KB of shared memory per block (sm86,
        sm89), d is at most 160, and above 128 seqlen_q x heads / heads_k at most 16: else
        NotImplementedError, before any compile (ops.check_decode_smem).
    k_cache, v_cache: q's dtype and device, same shape, heads % heads_k == 0 (MQA/GQA).
        Contiguous cache (batch_cache, seqlen_cache, heads_k, d), or paged with block_table:
        (num_blocks, page_size, heads_k, d), page_size a multiple of 16. Used in place, never
        copied: the last dim must be contiguous, the other strides multiples of 8 elements
        (16 bytes; any order, e.g. views into a larger buffer) and the data pointer 16-byte
        aligned, with no zero stride (not an expanded view): ValueError otherwise.
    k, v: None, or both (batch, seqlen_new, heads_k, d): the new keys/values, written to cache rows
        cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 (of cache row cache_batch_idx[b]
        when given, through block_table when paged); they need cache_seqlens.
    rotary_cos, rotary_sin: None, or both (seqlen_ro, rotary_dim / 2) in q's dtype (rotary_dim
        even, <= d); only with k and v (as flash-attn 2.x). The first rotary_dim dims of q and of
        the new keys are rotated before use (the cache receives the rotated keys; v is not
        rotated): pairs (x, y) = dims (2c, 2c + 1) with rotary_interleaved=True (GPT-J), or
        (c, c + rotary_dim / 2) with False (GPT-NeoX), by angle row p, column c of the tables:
        x' = x cos - y sin, y' = x sin + y cos. Positions p (leftpad: cache_leftpad[b], else 0):
        new key t of sequence b at cache_seqlens[b] - leftpad + t; query i at
        cache_seqlens[b] - leftpad + i with causal or a sliding window, else every query at
        cache_seqlens[b] - leftpad (flash-attn 2.x's rule, with two differences: flashjit counts
        positions from the sequence's first key, where flash-attn uses the cache row,
        cache_seqlens[b] + t, so with cache_leftpad they differ by leftpad; and a window wide
        enough to exclude no key is no window here (resolve_window), so its queries share one
        position, where flash-attn rotates them row by row). seqlen_ro must exceed the largest
        position used.
    cache_seqlens: int32 (batch,) on q's device, an int (used for every sequence, as flash-attn
        allows), or None = every cache full (seqlen_cache rows, or max_blocks * page_size
        paged): the cache rows that hold keys before this call, leftpad rows included.
    cache_batch_idx: int32 (batch,): sequence b uses cache row cache_batch_idx[b] (default b; a
        cache may hold more sequences than the batch). Contiguous cache only.
    cache_leftpad: int32 (batch,): sequence b's keys start at cache row cache_leftpad[b] (rows
        before it are not attended; <= cache_seqlens[b]). Contiguous cache only.
    block_table: int32 (batch, max_blocks): logical row r of sequence b is row r % page_size of
        page block_table[b, r // page_size] (paged KV, as vLLM's); only the entries of pages in
        use are read.
    softmax_scale, causal, window_size, softcap, alibi_slopes, sink: as flash_attn_func, over the
        L_b = cache_seqlens[b] + seqlen_new - leftpad keys of sequence b, with the queries aligned
        bottom-right (query i at position L_b - seqlen_q + i: causal hides the keys after it, a
        window and ALiBi distances count from it). With seqlen_q = 1 causal hides nothing and is
        dropped (as flash-attn does); window bounds that exclude no key of a cache of this
        capacity are none (resolve_window). A query row that sees no key gets out 0 and lse -inf
        (sink_h with a sink).
    num_splits: int from 0 to 128: split-KV, how many parts of the keys are attended in parallel
        (then combined by lse; ignored where the forward kernel attends after the append:
        without cache_batch_idx and cache_leftpad, seqlen_q >= 64 on a contiguous cache, on a
        paged one too where the paged forward is the warp-specialised family (sm90a), else
        >= 256, ops._by_forward): 1 = none, 0 = chosen from the sizes and the SM count
        (ops.num_splits_heuristic; the cache capacity stands for the lengths, which live on the
        device, so the choice is the same under CUDA-graph replay).
    return_softmax_lse: also return lse.

    Returns out (batch, seqlen_q, heads, d) in q's dtype, or with return_softmax_lse
    (out, softmax_lse) with softmax_lse float32 (batch, heads, seqlen_q), natural log.

    Errors, before anything compiles, naming the argument: TypeError for wrong types and dtypes
    (q, caches, k, v and the rotary tables not of q's dtype, index tensors not int32);
    ValueError for wrong shapes (k and v longer than the cache's capacity too, checked always),
    devices, layouts and values (softmax_scale not in [1e-30, 1e30], softcap neither 0 nor in
    [1e-6, 1e4]). The values in the index tensors (lengths past the capacity, cache_leftpad >
    cache_seqlens, block_table entries outside [0, num_blocks) among the pages in use,
    cache_batch_idx outside [0, batch_cache) or repeated while appending, rotary tables too
    short) are checked with one device-to-host copy, only when no CUDA graph is being captured
    (torch.cuda.is_current_stream_capturing()) and torch.compile is not tracing; under capture
    they are the caller's to get right. That copy synchronises each eager call that passes index
    tensors; decoding loops that care capture the step in a CUDA graph (static tensors,
    cache_seqlens a tensor) and replay it after copying the new inputs in."""
    a = check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                      cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                      window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
                      return_softmax_lse, sink, ops.MAX_NUM_SPLITS)
    d = q.shape[-1]
    q = _kernel_layout(q, d)
    k_new = None if a.k is None else _kernel_layout(a.k, d)
    v_new = None if a.v is None else _kernel_layout(a.v, d)
    out, lse = ops.call_decode(q, k_cache, v_cache, k_new, v_new, a.rotary_cos, a.rotary_sin,
                               a.rotary_interleaved, a.cache_seqlens, a.cache_batch_idx,
                               a.cache_leftpad, a.block_table, a.softmax_scale, a.causal,
                               a.window_left, a.window_right, a.softcap, a.alibi_slopes, a.sink,
                               a.num_splits)
    return (out, lse * _LN2) if a.return_softmax_lse else out
