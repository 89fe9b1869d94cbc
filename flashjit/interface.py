"""Public API of flashjit: validation, autograd, and the flash_attn_* / SDPA entry points.

Every check here runs before anything is compiled, and raises TypeError (wrong types/dtypes) or
ValueError (wrong shapes, devices, values) naming the argument.

Causal alignment when seqlen_q != seqlen_k:
  * flash_attn_* functions: bottom-right (as flash-attn >= 2.1): query i sees key j iff
    j <= i + seqlen_k - seqlen_q.
  * scaled_dot_product_attention: top-left (as torch): query i sees key j iff j <= i.
A query row that sees no key gets output 0 and lse -inf (never NaN).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import ops

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, rank: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}: the last dimension (head_dim) must be contiguous (stride 1)")


def _is_aligned(t: Tensor) -> bool:
    """What the kernels' 16-byte loads need: a contiguous last dim, every other stride a multiple
    of 8 elements (16 bytes in fp16/bf16) and a 16-byte aligned data pointer."""
    if t.stride(-1) != 1 or any(s % 8 != 0 for s in t.stride()[:-1]):
        return False
    # (while tracing there is no data pointer: the binding checks it again at run time)
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0


def _check_alignment(name: str, t: Tensor) -> None:
    if not _is_aligned(t):
        raise ValueError(
            f"{name}: data pointer and strides must be multiples of 16 bytes (8 elements); "
            "call .contiguous() on it (.clone() if it is contiguous already)"
        )


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, varlen: bool) -> None:
    rank = 3 if varlen else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, rank)
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"q, k, v must have the same head_dim, got {q.shape[-1]}, "
                         f"{k.shape[-1]}, {v.shape[-1]}")
    if d % 8 != 0 or d > MAX_HEAD_DIM or d == 0:
        raise ValueError(f"head_dim {d} is not supported: it must be a multiple of 8 and <= "
                         f"{MAX_HEAD_DIM}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    head_dim = 1 if varlen else 2
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and "
                         f"{k.shape[0]}")
    heads, heads_k = q.shape[head_dim], k.shape[head_dim]
    if heads_k == 0 or heads % heads_k != 0:
        raise ValueError(f"the number of query heads ({heads}) must be a multiple of the number "
                         f"of key/value heads ({heads_k})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_alignment(name, t)


def _check_scalars(dropout_p: float, softmax_scale: Optional[float], d: int) -> float:
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return scale


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_cu_seqlens(name: str, cu: Tensor, device: torch.device, total: int,
                      max_seqlen: int) -> None:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries, got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on {device}, got {cu.device}")
    if not cu.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if _capturing() or torch.compiler.is_compiling():
        return  # values live on the device; checking them would synchronise
    host = cu.tolist()
    lengths = [b - a for a, b in zip(host[:-1], host[1:])]
    if host[0] != 0 or any(n < 0 for n in lengths):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {host[:8]}...")
    if host[-1] > total:
        raise ValueError(f"{name}[-1] = {host[-1]} exceeds the {total} packed rows")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen for {name} is {max_seqlen} but a sequence has "
                         f"{max(lengths)} rows")


# ------------------------------------------------------------------------------------------------
# Dropout randomness
# ------------------------------------------------------------------------------------------------
def _rng_state(device: torch.device) -> Tensor:
    """(seed, offset) int64 on the device for one dropout call, drawn from torch's CUDA generator
    by one randint: reproducible under torch.manual_seed, and safe under CUDA-graph capture (the
    kernels read the pair from device memory; torch advances its generator on each replay, as for
    its own random ops). Different calls get independent Philox streams (csrc/dropout.cuh)."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------
class _FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal, causal_bottom_right, dropout_p, deterministic):
        rng_state = None
        if dropout_p > 0.0:
            rng_state = _rng_state(q.device)
        out, lse = ops.call_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                max_seqlen_k, softmax_scale, causal, causal_bottom_right,
                                dropout_p, rng_state)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, rng_state)
        ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, causal_bottom_right,
                    dropout_p, deterministic)
        ctx.mark_non_differentiable(lse)
        # No zero-filled gradient for lse (it has none) or for an unused out: one allocation and
        # one fill kernel less per backward.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        if dout is None:  # only lse was used, and it has no gradient
            return (None,) * 13
        q, k, v, out, lse, cu_q, cu_k, seqused_k, rng_state = ctx.saved_tensors
        (max_q, max_k, scale, causal, bottom_right, dropout_p, deterministic) = ctx.args
        if not _is_aligned(dout):
            # a fresh, aligned allocation (.contiguous() would keep a contiguous misaligned view)
            dout = dout.clone(memory_format=torch.contiguous_format)
        dq, dk, dv = ops.call_bwd(dout, q, k, v, out, lse, cu_q, cu_k, seqused_k, max_q, max_k,
                                  scale, causal, bottom_right, dropout_p, rng_state,
                                  deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def _attention(q, k, v, cu_q, cu_k, seqused_k, max_q, max_k, scale, causal, bottom_right,
               dropout_p, deterministic, return_lse):
    out, lse = _FlashAttnFunction.apply(q, k, v, cu_q, cu_k, seqused_k, max_q, max_k, scale,
                                        causal, bottom_right, float(dropout_p), deterministic)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------
def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    return_lse: bool = False, deterministic: bool = False):
    """Exact attention. q (batch, seqlen_q, heads, d); k, v (batch, seqlen_k, heads_k, d) with
    heads % heads_k == 0 (MQA/GQA). Returns out like q, and lse float32 (batch, heads, seqlen_q)
    when return_lse. Causal masking is aligned bottom-right."""
    _check_qkv(q, k, v, varlen=False)
    scale = _check_scalars(dropout_p, softmax_scale, q.shape[-1])
    return _attention(q, k, v, None, None, None, q.shape[1], k.shape[1], scale, bool(causal),
                      True, dropout_p, bool(deterministic), return_lse)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                           causal: bool = False, return_lse: bool = False,
                           deterministic: bool = False):
    """Packed sequences: q (total_q, heads, d), k, v (total_k, heads_k, d); sequence b is rows
    cu_seqlens[b] .. cu_seqlens[b + 1] - 1 (int32, batch + 1 entries). lse is (heads, total_q).
    This is how key padding is done: pack the real tokens of each sequence."""
    _check_qkv(q, k, v, varlen=True)
    scale = _check_scalars(dropout_p, softmax_scale, q.shape[-1])
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0], int(max_seqlen_q))
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, k.shape[0], int(max_seqlen_k))
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, None, int(max_seqlen_q),
                      int(max_seqlen_k), scale, bool(causal), True, dropout_p,
                      bool(deterministic), return_lse)


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0,
                              softmax_scale: Optional[float] = None, causal: bool = False,
                              return_lse: bool = False, deterministic: bool = False):
    """qkv (batch, seqlen, 3, heads, d): views into it are used, no copies."""
    if not isinstance(qkv, Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be a tensor of shape (batch, seqlen, 3, heads, d), got "
                         f"{getattr(qkv, 'shape', type(qkv).__name__)}")
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, return_lse, deterministic)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False,
                             return_lse: bool = False, deterministic: bool = False):
    """q (batch, seqlen_q, heads, d); kv (batch, seqlen_k, 2, heads_k, d)."""
    if not isinstance(kv, Tensor) or kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must be a tensor of shape (batch, seqlen_k, 2, heads_k, d), got "
                         f"{getattr(kv, 'shape', type(kv).__name__)}")
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, return_lse, deterministic)


def _key_padding_lengths(attn_mask, batch: int, seqlen_k: int, device) -> Tensor:
    """A boolean key-padding mask (True = attend), broadcastable to (batch, 1, 1, seqlen_k) and
    right-padded (each row a run of True then False), as int32 key counts per batch."""
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool:
        raise TypeError("attn_mask: only boolean key-padding masks are supported (True = attend);"
                        f" got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask must be on {device}, got {attn_mask.device}")
    try:
        mask = torch.broadcast_to(attn_mask, (batch, 1, 1, seqlen_k)) if attn_mask.dim() <= 4 \
            else None
    except RuntimeError:
        mask = None
    if mask is None:
        raise ValueError("attn_mask must be a key-padding mask broadcastable to (batch, 1, 1, "
                         f"seqlen_k) = ({batch}, 1, 1, {seqlen_k}); got {tuple(attn_mask.shape)}")
    mask = mask.reshape(batch, seqlen_k)
    lengths = mask.sum(dim=1, dtype=torch.int32)
    if not (_capturing() or torch.compiler.is_compiling()):
        prefix = torch.arange(seqlen_k, device=device)[None, :] < lengths[:, None]
        if not torch.equal(prefix, mask):
            raise ValueError("attn_mask must be a right-padding mask (True for the first n keys "
                             "of each sequence, then False); for other patterns pack the "
                             "sequences and use flash_attn_varlen_func")
    return lengths.contiguous()


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention's signature and (batch, heads, seq, d)
    layout. attn_mask: only a boolean right-padding key mask broadcastable to
    (batch, 1, 1, seqlen_k). Causal masking is aligned top-left, as in torch. Anything else raises
    rather than falling back to a slower path."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq, d), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"query has {query.shape[1]} heads and key {key.shape[1]}: pass "
                         "enable_gqa=True for grouped-query attention")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal cannot both be set (as in torch)")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # views: (batch, seq, heads, d)
    _check_qkv(q, k, v, varlen=False)
    softmax_scale = _check_scalars(dropout_p, scale, q.shape[-1])
    seqused_k = None
    if attn_mask is not None:
        seqused_k = _key_padding_lengths(attn_mask, q.shape[0], k.shape[1], q.device)
    out = _attention(q, k, v, None, None, seqused_k, q.shape[1], k.shape[1], softmax_scale,
                     bool(is_causal), False, dropout_p, False, False)
    return out.transpose(1, 2)
