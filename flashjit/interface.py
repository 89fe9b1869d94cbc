"""Public API of flashjit: validation, autograd, and the flash_attn_* / SDPA entry points.

Every check here runs before anything is compiled, and raises TypeError (wrong types/dtypes),
ValueError (wrong shapes, devices, values) or NotImplementedError (variants not built yet), naming
the caller's own argument.

Causal alignment when seqlen_q != seqlen_k:
  * flash_attn_* functions: bottom-right (as flash-attn >= 2.1): query i sees key j iff
    j <= i + seqlen_k - seqlen_q.
  * scaled_dot_product_attention: top-left (as torch): query i sees key j iff j <= i.
A query row that sees no key gets output 0 and lse -inf (never NaN).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import torch
from torch import Tensor

from . import ops

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_LN2 = math.log(2.0)
MAX_HEAD_DIM = 256


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------
def _no_cuda_hint() -> str:
    if torch.version.cuda is None:
        return (f"; this torch ({torch.__version__}) has no CUDA support: install a CUDA build of "
                "torch (https://pytorch.org/get-started/locally/)")
    if not torch.cuda.is_available():
        return "; no CUDA GPU is visible to torch"
    return ""


def _check_tensor(name: str, t, rank: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}{_no_cuda_hint()}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")


def _strides_aligned(t: Tensor) -> bool:
    """The strides the kernels' 16-byte loads need: a contiguous last dim and every other stride a
    multiple of 8 elements (16 bytes in fp16/bf16). The data pointer's alignment is fixed where
    it is known, in the op itself (ops._aligned): torch.compile traces this function without one."""
    return t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1])


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


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, varlen: bool, names=("q", "k", "v")) -> None:
    """names: how the caller calls q, k and v (("qkv",) * 3 for a packed qkv, say)."""
    rank = 3 if varlen else 4
    for name, t in zip(names, (q, k, v)):
        _check_tensor(name, t, rank)
    nq, nk, nv = names
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"{nq}, {nk}, {nv} must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{nq}, {nk}, {nv} must have one dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"{nq}, {nk}, {nv} must have the same head_dim, got {q.shape[-1]}, "
                         f"{k.shape[-1]}, {v.shape[-1]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} of {nq} is not supported: it must be between 1 and "
                         f"{MAX_HEAD_DIM}")
    if k.shape != v.shape:
        raise ValueError(f"{nk} and {nv} must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    head_dim = 1 if varlen else 2
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"{nq} and {nk} must have the same batch size, got {q.shape[0]} and "
                         f"{k.shape[0]}")
    heads, heads_k = q.shape[head_dim], k.shape[head_dim]
    if heads_k == 0 or heads % heads_k != 0:
        raise ValueError(f"the number of query heads of {nq} ({heads}) must be a multiple of the "
                         f"number of key/value heads of {nk} ({heads_k})")


def _check_real(name: str, x) -> float:
    """x as a float: TypeError naming it unless x is a real number (bools and strings are not)."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a number, got {x!r}")
    return x


def _check_int(name: str, x, upper: int = 2**31 - 1) -> int:
    """x as an int in [0, upper]: TypeError/ValueError naming it otherwise."""
    if isinstance(x, torch.SymInt):  # a traced size under torch.compile(dynamic=True)
        return x
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got {x!r}")
    try:
        value = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {x!r}") from None
    if not 0 <= value <= upper:
        raise ValueError(f"{name} must be between 0 and {upper}, got {value}")
    return value


def _check_flag(name: str, x) -> bool:
    """x as a bool: True/False (numpy's too) or the ints 0/1; TypeError naming it otherwise (a
    string such as 'False' would otherwise mean True)."""
    if isinstance(x, bool) or type(x).__name__ == "bool_" or (
            isinstance(x, int) and x in (0, 1)):
        return bool(x)
    raise TypeError(f"{name} must be a bool, got {x!r}")


def _check_scalars(dropout_p: float, softmax_scale: Optional[float], d: int) -> float:
    """softmax_scale as a float (default 1 / sqrt(d)), after checking dropout_p too."""
    dropout_p = _check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(_check_real("softmax_scale", softmax_scale))
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return scale


def _resolve_window(window_size, causal, seqlen_q: int, seqlen_k: int) -> bool:
    """flash-attn 2.x's window_size: query i sees keys i + seqlen_k - seqlen_q - left ..
    i + seqlen_k - seqlen_q + right (-1: unbounded); causal sets right to 0. Bounds that exclude
    no key (left >= seqlen_k - 1, right >= seqlen_q - 1: any window at least as wide as the
    sequences) are unbounded. Returns whether the attention is causal: the windows that remain
    are plain (-1, -1) or causal (-1, 0); any other raises NotImplementedError (the variants
    issue adds them). seqlen_q/k: the (maximum) sequence lengths."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window_size)):
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    if left >= seqlen_k - 1:
        left = -1
    if right >= seqlen_q - 1:
        right = -1
    if causal:
        right = 0
    if left == -1 and right in (-1, 0):
        return right == 0
    raise NotImplementedError(f"window_size={tuple(window_size)}: sliding-window attention is "
                              "not implemented in flashjit yet; only windows that exclude no key "
                              "((-1, -1), or (-1, 0) = causal) are supported")


def _check_variants(softcap, alibi_slopes) -> None:
    """flash-attn 2.x's softcap and alibi_slopes: checked, and refused (NotImplementedError
    naming the argument) unless they ask for plain attention."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got {softcap}")
    if softcap > 0.0:
        raise NotImplementedError(f"softcap={softcap}: logit softcapping is not implemented in "
                                  "flashjit yet; only softcap=0.0 is supported")
    _refuse_tensor_argument("alibi_slopes", alibi_slopes, "a float32 tensor", "ALiBi")


def _refuse_tensor_argument(name: str, value, kind: str, feature: str) -> None:
    """An optional tensor argument of a feature flashjit lacks yet: None passes; a tensor raises
    NotImplementedError naming it, anything else TypeError."""
    if value is None:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be None or {kind}, got {type(value).__name__}")
    raise NotImplementedError(f"{name}: {feature} is not implemented in flashjit yet; pass "
                              f"{name}=None")


def _check_options(dropout_p, softmax_scale, softcap, alibi_slopes, deterministic,
                   return_attn_probs, d: int):
    """The scalar and variant arguments every flash_attn_* entry point shares: (softmax_scale as
    a float, deterministic, return_attn_probs as bools)."""
    _check_variants(softcap, alibi_slopes)
    scale = _check_scalars(dropout_p, softmax_scale, d)
    return (scale, _check_flag("deterministic", deterministic),
            _check_flag("return_attn_probs", return_attn_probs))


def _capturing() -> bool:
    """True inside CUDA-graph capture or torch.compile tracing: device values must not be read.
    is_compiling() comes first: dynamo cannot trace is_current_stream_capturing()."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_cu_seqlens(name: str, cu: Tensor, device: torch.device, total: int,
                      max_seqlen: int, max_name: str) -> None:
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
    if _capturing():
        return  # values live on the device; checking them would synchronise
    host = cu.tolist()
    lengths = [b - a for a, b in zip(host[:-1], host[1:])]
    if host[0] != 0 or any(n < 0 for n in lengths):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {host[:8]}...")
    if host[-1] > total:
        raise ValueError(f"{name}[-1] = {host[-1]} exceeds the {total} packed rows")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} is {max_seqlen} but a sequence of {name} has "
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
        # With a backward ahead, the forward also writes O's rounding residual (one more tensor
        # like out), so that the backward's D = rowsum(dO * O) uses O at fp32 precision: D from
        # the rounded O alone is wrong by dO . (O - round(O)), all of dS in one-hot softmax rows.
        residual = any(ctx.needs_input_grad[:3])
        out, lse, out_residual = ops.call_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
            softmax_scale, causal, causal_bottom_right, dropout_p, rng_state, residual)
        ctx.save_for_backward(q, k, v, out, out_residual, lse, cu_seqlens_q, cu_seqlens_k,
                              seqused_k, rng_state)
        ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, causal_bottom_right,
                    dropout_p, deterministic, residual)
        ctx.mark_non_differentiable(lse)
        # No zero-filled gradient for lse (it has none) or for an unused out: one allocation and
        # one fill kernel less per backward.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        if dout is None:  # only lse was used, and it has no gradient
            return (None,) * 13
        q, k, v, out, out_residual, lse, cu_q, cu_k, seqused_k, rng_state = ctx.saved_tensors
        (max_q, max_k, scale, causal, bottom_right, dropout_p, deterministic, residual) = ctx.args
        if not _strides_aligned(dout):
            dout = dout.clone(memory_format=torch.contiguous_format)
        dq, dk, dv = ops.call_bwd(dout, q, k, v, out, out_residual if residual else None, lse,
                                  cu_q, cu_k, seqused_k, max_q, max_k, scale, causal,
                                  bottom_right, dropout_p, rng_state, deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def _attention(q, k, v, cu_q, cu_k, seqused_k, max_q, max_k, scale, causal, bottom_right,
               dropout_p, deterministic):
    """(out, lse in log2 units) for validated inputs. Head dims that are not a multiple of 8 are
    zero-padded (scores and softmax are unchanged: the padded columns add 0 to every dot product)
    and the output is sliced back; unaligned inputs are copied (_kernel_layout)."""
    d = q.shape[-1]
    padded = -(-d // 8) * 8
    q, k, v = (_kernel_layout(t, padded) for t in (q, k, v))
    out, lse = _FlashAttnFunction.apply(q, k, v, cu_q, cu_k, seqused_k, max_q, max_k, scale,
                                        causal, bottom_right, float(dropout_p),
                                        bool(deterministic))
    return (out if padded == d else out[..., :d]), lse


def _result(out: Tensor, lse_log2: Tensor, return_attn_probs: bool):
    """flash-attn's return convention: out, or (out, softmax_lse, S_dmask) with
    return_attn_probs; softmax_lse in natural-log units (the kernels keep it in log2 units,
    csrc/attention_common.cuh: finish_row). S_dmask (the dropout-masked attention probabilities,
    which flash-attn returns for tests only) is always None: flashjit never materialises P."""
    return (out, lse_log2 * _LN2, None) if return_attn_probs else out


# ------------------------------------------------------------------------------------------------
# Public functions (flash-attn 2.x names, argument order, defaults and return conventions)
# ------------------------------------------------------------------------------------------------
_COMMON_DOC = """
    dropout_p: probability of dropping an attention weight (float in [0, 1)); use 0.0 in eval.
    softmax_scale: scale of Q K^T before the softmax (default 1 / sqrt(head_dim)).
    causal: causal mask aligned bottom-right: query i sees key j iff j <= i + seqlen_k - seqlen_q
        (flash-attn >= 2.1).
    window_size, softcap, alibi_slopes: flash-attn 2.x's variant arguments. Supported yet:
        windows that exclude no key ((-1, -1), (-1, 0) = causal, or at least as wide as the
        sequences), softcap 0.0, alibi_slopes None; anything else raises NotImplementedError
        naming the argument (after TypeError/ValueError for malformed values).
    deterministic: bitwise reproducible gradients (a separate dQ pass instead of float atomics).
    return_attn_probs: also return softmax_lse (float32, natural log) and S_dmask, which is
        always None (flashjit never materialises the attention matrix).
    Head dims 1-256: a head dim that is not a multiple of 8 is zero-padded inside the call (a
    copy) and the output sliced back. Inputs whose data pointer or strides are not 16-byte
    aligned (or whose last dim is not contiguous) are copied once to an aligned buffer.
    Raises TypeError/ValueError (NotImplementedError for variants not built yet) naming the
    argument for bad input, before anything compiles."""


def _flash_attn(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                deterministic, return_attn_probs, names=("q", "k", "v")):
    """flash_attn_func, with `names`: how the caller calls q, k, v in error messages."""
    _check_qkv(q, k, v, varlen=False, names=names)
    causal = _resolve_window(window_size, _check_flag("causal", causal), q.shape[1], k.shape[1])
    scale, deterministic, return_attn_probs = _check_options(
        dropout_p, softmax_scale, softcap, alibi_slopes, deterministic, return_attn_probs,
        q.shape[-1])
    out, lse = _attention(q, k, v, None, None, None, q.shape[1], k.shape[1], scale, causal, True,
                          dropout_p, deterministic)
    return _result(out, lse, return_attn_probs)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                    deterministic: bool = False, return_attn_probs: bool = False):
    return _flash_attn(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                       alibi_slopes, deterministic, return_attn_probs)


flash_attn_func.__doc__ = """Exact attention, as flash_attn.flash_attn_func (2.x).

    q (batch, seqlen_q, heads, d); k, v (batch, seqlen_k, heads_k, d), heads % heads_k == 0
    (MQA/GQA); fp16 or bf16 on one CUDA device. Returns out (batch, seqlen_q, heads, d), and with
    return_attn_probs (out, softmax_lse (batch, heads, seqlen_q), None).""" + _COMMON_DOC


def _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                       deterministic, return_attn_probs, block_table=None,
                       names=("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                              "max_seqlen_k")):
    """flash_attn_varlen_func, with `names`: how the caller calls its tensors and lengths in
    error messages."""
    nq, nk, nv, ncu_q, ncu_k, nmax_q, nmax_k = names
    _check_qkv(q, k, v, varlen=True, names=(nq, nk, nv))
    max_seqlen_q, max_seqlen_k = _check_int(nmax_q, max_seqlen_q), _check_int(nmax_k, max_seqlen_k)
    causal = _resolve_window(window_size, _check_flag("causal", causal), max_seqlen_q,
                             max_seqlen_k)
    scale, deterministic, return_attn_probs = _check_options(
        dropout_p, softmax_scale, softcap, alibi_slopes, deterministic, return_attn_probs,
        q.shape[-1])
    _refuse_tensor_argument("block_table", block_table, "an int32 tensor", "paged KV")
    _check_cu_seqlens(ncu_q, cu_seqlens_q, q.device, q.shape[0], max_seqlen_q, nmax_q)
    _check_cu_seqlens(ncu_k, cu_seqlens_k, q.device, k.shape[0], max_seqlen_k, nmax_k)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{ncu_q} and {ncu_k} must have the same length, got "
                         f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    out, lse = _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q, max_seqlen_k,
                          scale, causal, True, dropout_p, deterministic)
    return _result(out, lse, return_attn_probs)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                           cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                           causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                           alibi_slopes=None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table=None):
    return _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              dropout_p, softmax_scale, causal, window_size, softcap,
                              alibi_slopes, deterministic, return_attn_probs, block_table)


flash_attn_varlen_func.__doc__ = """Packed variable-length sequences, as
    flash_attn.flash_attn_varlen_func (2.x).

    q (total_q, heads, d), k, v (total_k, heads_k, d); sequence b is rows cu_seqlens[b] ..
    cu_seqlens[b + 1] - 1 (int32, batch + 1 entries, on q's device); max_seqlen_q/k bound the
    sequence lengths. Rows past cu_seqlens[-1] get output (and gradient) 0. softmax_lse is
    (heads, total_q). Key padding is done this way: pack the real tokens of each sequence.
    block_table (paged KV) must be None. In eager mode the cu_seqlens values are checked on the
    host (one synchronisation); under CUDA-graph capture and torch.compile they are not.""" + \
    _COMMON_DOC


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
                              deterministic: bool = False, return_attn_probs: bool = False):
    """qkv (batch, seqlen, 3, heads, d): q, k, v are views into it (no copies; the gradient is
    one tensor like qkv). Otherwise as flash_attn_func."""
    q, k, v = _unpack(qkv, "qkv", 3, varlen=False)
    return _flash_attn(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                       alibi_slopes, deterministic, return_attn_probs, names=("qkv",) * 3)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False,
                             window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
                             deterministic: bool = False, return_attn_probs: bool = False):
    """q (batch, seqlen_q, heads, d); kv (batch, seqlen_k, 2, heads_k, d). Otherwise as
    flash_attn_func."""
    k, v = _unpack(kv, "kv", 2, varlen=False)
    return _flash_attn(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                       alibi_slopes, deterministic, return_attn_probs, names=("q", "kv", "kv"))


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0,
                                     softmax_scale: Optional[float] = None, causal: bool = False,
                                     window_size=(-1, -1), softcap: float = 0.0,
                                     alibi_slopes=None, deterministic: bool = False,
                                     return_attn_probs: bool = False):
    """qkv (total, 3, heads, d) with int32 cu_seqlens (batch + 1) for queries and keys alike.
    Otherwise as flash_attn_varlen_func."""
    q, k, v = _unpack(qkv, "qkv", 3, varlen=True)
    return _flash_attn_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                              softmax_scale, causal, window_size, softcap, alibi_slopes,
                              deterministic, return_attn_probs,
                              names=("qkv",) * 3 + ("cu_seqlens",) * 2 + ("max_seqlen",) * 2)


def flash_attn_varlen_kvpacked_func(q: Tensor, kv: Tensor, cu_seqlens_q: Tensor,
                                    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0,
                                    softmax_scale: Optional[float] = None, causal: bool = False,
                                    window_size=(-1, -1), softcap: float = 0.0,
                                    alibi_slopes=None, deterministic: bool = False,
                                    return_attn_probs: bool = False):
    """q (total_q, heads, d); kv (total_k, 2, heads_k, d). Otherwise as
    flash_attn_varlen_func."""
    k, v = _unpack(kv, "kv", 2, varlen=True)
    return _flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              dropout_p, softmax_scale, causal, window_size, softcap,
                              alibi_slopes, deterministic, return_attn_probs,
                              names=("q", "kv", "kv", "cu_seqlens_q", "cu_seqlens_k",
                                     "max_seqlen_q", "max_seqlen_k"))


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
    target = (batch, 1, 1, seqlen_k)
    shape = tuple(attn_mask.shape)
    # broadcastable to target: at most 4 dims, each 1 or target's (checked without try/except, so
    # torch.compile traces it)
    if len(shape) > 4 or any(n not in (1, t) for n, t in zip(reversed(shape), reversed(target))):
        raise ValueError("attn_mask must be a key-padding mask broadcastable to (batch, 1, 1, "
                         f"seqlen_k) = {target}; got {shape}")
    mask = attn_mask.expand(target)
    mask = mask.reshape(batch, seqlen_k)
    lengths = mask.sum(dim=1, dtype=torch.int32)
    if not _capturing():
        prefix = torch.arange(seqlen_k, device=device)[None, :] < lengths[:, None]
        if not torch.equal(prefix, mask):
            raise ValueError("attn_mask must be a right-padding mask (True for the first n keys "
                             "of each sequence, then False); for other patterns pack the "
                             "sequences and use flash_attn_varlen_func")
    return lengths.contiguous()


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention's signature and (batch, heads, seq, d)
    layout. attn_mask: only a boolean right-padding key mask broadcastable to
    (batch, 1, 1, seqlen_k). Causal masking is aligned top-left, as in torch. Anything else raises
    rather than falling back to a slower path."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq, d), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    is_causal, enable_gqa = _check_flag("is_causal", is_causal), _check_flag("enable_gqa",
                                                                             enable_gqa)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"query has {query.shape[1]} heads and key {key.shape[1]}: pass "
                         "enable_gqa=True for grouped-query attention")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal cannot both be set (as in torch)")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # views: (batch, seq, heads, d)
    _check_qkv(q, k, v, varlen=False, names=("query", "key", "value"))
    softmax_scale = _check_scalars(dropout_p, scale, q.shape[-1])
    seqused_k = None
    if attn_mask is not None:
        seqused_k = _key_padding_lengths(attn_mask, q.shape[0], k.shape[1], q.device)
    out, _ = _attention(q, k, v, None, None, seqused_k, q.shape[1], k.shape[1], softmax_scale,
                        is_causal, False, dropout_p, False)
    return out.transpose(1, 2)
