"""Argument checks of the public API (interface.py): every one runs before anything compiles and
names the caller's own argument (``qkv``/``kv`` for packed inputs, ``query`` in the SDPA entry).

Errors: TypeError for a value of the wrong type, and for q/k/v and cu_seqlens of the wrong dtype;
ValueError for wrong shapes, devices and values, and for the dtype of alibi_slopes and sink
(float32 tensors whose dtype is a value to get right, as their shape is: the variants contract);
NotImplementedError, raised outside this module, for what the kernels do not do (dropout and a
backward with paged KV: _paged_varlen.paged_varlen; a decode tile too large for the GPU's shared
memory: ops.check_decode_smem).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _no_cuda_hint() -> str:
    if torch.version.cuda is None:
        return (f"; this torch ({torch.__version__}) has no CUDA support: install a CUDA build of "
                "torch (https://pytorch.org/get-started/locally/)")
    if not torch.cuda.is_available():
        return "; no CUDA GPU is visible to torch"
    return ""


def check_tensor(name: str, t, rank: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}{_no_cuda_hint()}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor, varlen: bool, names=("q", "k", "v")) -> None:
    """names: how the caller calls q, k and v (("qkv",) * 3 for a packed qkv, say)."""
    rank = 3 if varlen else 4
    for name, t in zip(names, (q, k, v)):
        check_tensor(name, t, rank)
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


def check_real(name: str, x) -> float:
    """x as a float: TypeError naming it unless x is a real number (bools and strings are not)."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{name} must be a number, got {x!r}")
    return x


def check_int(name: str, x, upper: int = 2**31 - 1) -> int:
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


def check_flag(name: str, x) -> bool:
    """x as a bool: True/False (numpy's too) or the ints 0/1; TypeError naming it otherwise (a
    string such as 'False' would otherwise mean True)."""
    if isinstance(x, bool) or type(x).__name__ == "bool_" or (
            isinstance(x, int) and x in (0, 1)):
        return bool(x)
    raise TypeError(f"{name} must be a bool, got {x!r}")


def check_scalars(dropout_p: float, softmax_scale: Optional[float], d: int) -> float:
    """softmax_scale as a float (default 1 / sqrt(d)), after checking dropout_p too."""
    dropout_p = check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(check_real("softmax_scale", softmax_scale))
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    if not SCALE_MIN <= scale <= SCALE_MAX:
        raise ValueError(f"softmax_scale must be between {SCALE_MIN:g} and {SCALE_MAX:g} (the "
                         f"kernels compute in float32), got {softmax_scale}")
    return scale


def resolve_window(window_size, causal: bool, seqlen_q: int,
                   seqlen_k: int) -> Tuple[bool, int, int]:
    """flash-attn 2.x's window_size, as (causal, left, right) for the kernels.

    Query i sees keys i + seqlen_k - seqlen_q - left .. i + seqlen_k - seqlen_q + right (-1: no
    bound). Bounds that exclude no key (left >= seqlen_k - 1, right >= seqlen_q - 1: at least as
    wide as the sequences) become -1; causal sets right to 0 (flash-attn: causal with a window is
    the band ending at the diagonal); (-1, 0) is causal. So plain attention is (False, -1, -1),
    causal (True, -1, 0), and any other result a sliding window (ops.variant_flags).
    seqlen_q/k: the (maximum) sequence lengths. TypeError unless window_size is a pair of ints,
    ValueError for a bound < -1."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, numbers.Integral)
                   for w in window_size)):
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    if left >= seqlen_k - 1:
        left = -1
    if right >= seqlen_q - 1:
        right = -1
    if causal:
        right = 0
    return causal or (left, right) == (-1, 0), left, right


# softcap > 0 must lie in [SOFTCAP_MIN, SOFTCAP_MAX]: the kernels evaluate c tanh(z / c) in float32
# as c (1 - 2 / (exp(2 z / c) + 1)), whose absolute error (~1e-7 of tanh) the cap c multiplies:
# about 1e-3 in the logit at c = 1e4. Gemma 2 uses 30 and 50.
SOFTCAP_MIN, SOFTCAP_MAX = 1e-6, 1e4
# softmax_scale must lie in [SCALE_MIN, SCALE_MAX]: the kernels use it (and scale * log2(e), and
# ALiBi's slope / scale) in float32.
SCALE_MIN, SCALE_MAX = 1e-30, 1e30


def check_softcap(softcap) -> float:
    """flash-attn 2.x's softcap as a float: 0 (off) or a real in [SOFTCAP_MIN, SOFTCAP_MAX]."""
    if isinstance(softcap, bool) or not isinstance(softcap, (numbers.Real, torch.SymFloat)):
        raise TypeError(f"softcap must be a float (a real number), got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got {softcap}")
    if softcap != 0.0 and not SOFTCAP_MIN <= softcap <= SOFTCAP_MAX:
        raise ValueError(f"softcap must be 0 (off) or between {SOFTCAP_MIN:g} and {SOFTCAP_MAX:g}, "
                         f"got {softcap} (the kernels' float32 tanh is accurate in that range)")
    return float(softcap)


def check_float32_vector(name: str, t, shapes: dict, device: torch.device,
                         q_name: str) -> Optional[Tensor]:
    """An optional float32 tensor argument (alibi_slopes, sink) as the kernels read it
    (contiguous: a copy where it is not). shapes: the accepted shapes by how the message names
    them, e.g. {"(heads,)": (8,)}. TypeError for a non-tensor, ValueError for its dtype, device
    (q_name's) or shape."""
    if t is None:
        return None
    wanted = " or ".join(shapes)
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be None or a float32 tensor of shape {wanted}, got "
                        f"{type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {t.dtype} (convert it with "
                         f"{name}.float(), which keeps its gradient)")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of {q_name} ({device}), got {t.device}")
    if tuple(t.shape) not in [tuple(s) for s in shapes.values()]:
        got = " or ".join(f"{k} = {tuple(s)}" for k, s in shapes.items())
        raise ValueError(f"{name} must have shape {got}, got {tuple(t.shape)}")
    return t.contiguous()


def check_variant_tensors(alibi_slopes, sink, device: torch.device, batch: int, heads: int,
                          q_name: str) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """alibi_slopes ((heads,) or (batch, heads)) and sink ((heads,)), float32 on q's device;
    heads: of the queries, batch: the number of sequences. alibi_slopes must not require grad:
    no gradient flows to it (flash-attn 2.x computes none either, silently)."""
    alibi_slopes = check_float32_vector("alibi_slopes", alibi_slopes,
                                        {"(heads,)": (heads,), "(batch, heads)": (batch, heads)},
                                        device, q_name)
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes requires grad, but flashjit computes no gradient for it: "
                         "pass alibi_slopes.detach()")
    sink = check_float32_vector("sink", sink, {"(heads,)": (heads,)}, device, q_name)
    return alibi_slopes, sink


def check_options(dropout_p, softmax_scale, softcap, deterministic, return_attn_probs, d: int):
    """The scalar arguments every flash_attn_* entry point shares: (softmax_scale, softcap as
    floats, deterministic, return_attn_probs as bools)."""
    softcap = check_softcap(softcap)
    scale = check_scalars(dropout_p, softmax_scale, d)
    return (scale, softcap, check_flag("deterministic", deterministic),
            check_flag("return_attn_probs", return_attn_probs))


def capturing() -> bool:
    """True inside CUDA-graph capture or torch.compile tracing: device values must not be read.
    is_compiling() comes first: dynamo cannot trace is_current_stream_capturing()."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_cu_seqlens(name: str, cu: Tensor, device: torch.device, total: int,
                     max_seqlen: int, max_name: str) -> Optional[list]:
    """Checks a cu_seqlens tensor (TypeError/ValueError naming it); outside CUDA-graph capture and
    torch.compile also its values, read with one device-to-host copy, and returns the sequence
    lengths it read (None where it read none)."""
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
    if capturing():
        return None  # values live on the device; checking them would synchronise
    host = cu.tolist()
    lengths = [b - a for a, b in zip(host[:-1], host[1:])]
    if host[0] != 0 or any(n < 0 for n in lengths):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {host[:8]}...")
    if host[-1] > total:
        raise ValueError(f"{name}[-1] = {host[-1]} exceeds the {total} packed rows")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} is {max_seqlen} but a sequence of {name} has "
                         f"{max(lengths)} rows")
    return lengths


def key_padding_lengths(attn_mask, batch: int, seqlen_k: int, device) -> Tensor:
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
    if not capturing():
        prefix = torch.arange(seqlen_k, device=device)[None, :] < lengths[:, None]
        if not torch.equal(prefix, mask):
            raise ValueError("attn_mask must be a right-padding mask (True for the first n keys "
                             "of each sequence, then False); for other patterns pack the "
                             "sequences and use flash_attn_varlen_func")
    return lengths.contiguous()


# ------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# ------------------------------------------------------------------------------------------------
class KvCacheArgs(NamedTuple):
    """flash_attn_with_kvcache's arguments as the decode op takes them (check_kvcache)."""
    k: Optional[Tensor]
    v: Optional[Tensor]
    rotary_cos: Optional[Tensor]
    rotary_sin: Optional[Tensor]
    rotary_interleaved: bool
    cache_seqlens: Optional[Tensor]  # int32 (batch,), or None: every sequence at full capacity
    cache_batch_idx: Optional[Tensor]
    cache_leftpad: Optional[Tensor]
    block_table: Optional[Tensor]
    softmax_scale: float
    causal: bool
    window_left: int
    window_right: int
    softcap: float
    alibi_slopes: Optional[Tensor]
    sink: Optional[Tensor]
    num_splits: int
    return_softmax_lse: bool


def _check_like_q(name: str, t, q: Tensor, rank: int) -> None:
    """A tensor argument with q's device and dtype (TypeError for the dtype, as check_qkv)."""
    if isinstance(t, Tensor) and t.device.type == "cuda" and t.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
    check_tensor(name, t, rank)
    if t.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")


def check_cache_layout(name: str, t: Tensor, written: bool = True) -> None:
    """A cache is used in place (written when appending; a copy of a whole cache to the layout
    the kernels' 16-byte accesses need would cost more than the call): a contiguous last dim, the
    other strides multiples of 8 elements (dims of size 1 are never stepped along) and a 16-byte
    aligned data pointer (checked here when eager, else in the op), and no zero stride (rows
    that alias would take each other's appended keys; the forward's TMA tensor maps, which read a
    cache in chunked prefill, take no zero stride either)."""
    how = "written in place" if written else "read in place"
    if any(s == 0 for s, n in zip(t.stride(), t.shape) if n > 1):
        reason = ("it is written in place, so its rows must not alias; allocate it" if written
                  else "the kernels read each row from memory of its own; materialize it "
                       "(.contiguous())")
        raise ValueError(f"{name} has a zero stride (an expanded view, strides "
                         f"{tuple(t.stride())}): {reason}")
    if t.stride(-1) != 1 or any(s % 8 != 0 for s, n in zip(t.stride()[:-1], t.shape) if n > 1):
        raise ValueError(f"{name} must have a contiguous last dim and its other strides "
                         f"multiples of 8 elements (16 bytes), got strides {tuple(t.stride())}; "
                         f"it is {how}, so flashjit does not copy it")
    if not torch.compiler.is_compiling() and type(t) is Tensor and t.data_ptr() % 16 != 0:
        raise ValueError(f"{name}'s data pointer is not 16-byte aligned; it is {how}, so "
                         "flashjit does not copy it: allocate it aligned")


def _check_index(name: str, t, device: torch.device, shape: Tuple[int, ...],
                 layout: str) -> Optional[Tensor]:
    """An optional int32 index tensor of `shape` (described by `layout`) on `device`, as the
    kernels read it: its last dim contiguous (a copy where it is not)."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be None or an int32 tensor {layout}, got "
                        f"{type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {t.device}")
    if t.dim() != len(shape) or any(n is not None and t.shape[i] != n
                                    for i, n in enumerate(shape)):
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                  cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                  window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
                  return_softmax_lse, sink, max_num_splits: int) -> KvCacheArgs:
    """Every argument of flash_attn_with_kvcache (its docstring gives the contract), checked
    before anything compiles: TypeError/ValueError naming the argument.

    Shapes, dtypes and devices are always checked. The values of the index tensors (lengths past
    the capacity, leftpad past cache_seqlens, block_table entries outside [0, num_blocks) for the
    pages in use, cache_batch_idx outside [0, batch_cache) or repeated while appending, rotary
    tables shorter than the largest position used) need a device-to-host copy: they are checked
    (check_kvcache_values, one transfer) only when no CUDA graph is being captured and nothing
    is being traced by torch.compile (capturing())."""
    check_tensor("q", q, 4)
    _check_like_q("k_cache", k_cache, q, 4)
    _check_like_q("v_cache", v_cache, q, 4)
    batch, seqlen_q, heads, d = q.shape
    if k_cache.shape[-1] != d or v_cache.shape[-1] != d:
        raise ValueError(f"q, k_cache, v_cache must have the same head_dim, got {d}, "
                         f"{k_cache.shape[-1]}, {v_cache.shape[-1]}")
    if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {d} of q is not supported by flash_attn_with_kvcache: it must "
                         f"be a multiple of 8 from 8 to {MAX_HEAD_DIM} (the cache is written in "
                         "place, so it cannot be zero-padded as flash_attn_func pads its inputs)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    heads_k = k_cache.shape[2]
    if heads_k == 0 or heads % heads_k != 0:
        raise ValueError(f"the number of query heads of q ({heads}) must be a multiple of the "
                         f"number of key/value heads of k_cache ({heads_k})")
    check_cache_layout("k_cache", k_cache, written=k is not None)
    check_cache_layout("v_cache", v_cache, written=k is not None)
    eager = not torch.compiler.is_compiling() and type(k_cache) is Tensor
    if k is not None and (k_cache is v_cache or (eager and _caches_overlap(k_cache, v_cache))):
        raise ValueError("k_cache and v_cache are the same memory, or overlap: appending k and v "
                         "would write both into it; pass two caches that share no element")
    slots, rows = k_cache.shape[0], k_cache.shape[1]  # sequences or pages; rows of each
    if block_table is not None:
        block_table = _check_index("block_table", block_table, q.device, (batch, None),
                                   f"(batch, max_blocks) = ({batch}, max_blocks)")
        if rows == 0 or rows % 16 != 0:
            raise ValueError(f"k_cache's page size (its dim 1, with a block_table) must be a "
                             f"positive multiple of 16, got {rows}")
        for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if t is not None:
                raise ValueError(f"{name} is only supported with a contiguous cache, not with a "
                                 "block_table (paged KV): pass block_table rows per sequence")
        capacity = block_table.shape[1] * rows
        if capacity >= 2**31:
            raise ValueError(f"block_table's max_blocks x the page size is {capacity} rows per "
                             "sequence: flashjit's kernels index rows with 32-bit ints (< 2^31)")
    else:
        capacity = rows
        cache_batch_idx = _check_index("cache_batch_idx", cache_batch_idx, q.device, (batch,),
                                       f"(batch,) = ({batch},)")
        cache_leftpad = _check_index("cache_leftpad", cache_leftpad, q.device, (batch,),
                                     f"(batch,) = ({batch},)")
        if cache_batch_idx is None and slots < batch:
            raise ValueError(f"k_cache holds {slots} sequences but q has batch {batch}: pass "
                             "cache_batch_idx to say which cache row each sequence uses (a "
                             "cache with more rows than the batch uses rows 0 .. batch - 1, "
                             "as flash-attn does)")
    if (k is None) != (v is None):
        raise ValueError("k and v (the new keys and values to append) must be given together, "
                         f"got k={'None' if k is None else 'a tensor'} and "
                         f"v={'None' if v is None else 'a tensor'}")
    seqlen_new = 0
    if k is not None:
        _check_like_q("k", k, q, 4)
        _check_like_q("v", v, q, 4)
        seqlen_new = k.shape[1]
        want = (batch, seqlen_new, heads_k, d)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape (batch, seqlen_new, heads_k, d) = "
                                 f"{want}, got {tuple(t.shape)}")
        if seqlen_q == 0 and seqlen_new > 0:
            raise ValueError("q has no query rows (seqlen_q 0) but k and v have new keys to "
                             "append: pass at least one query")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    seqlen_ro = None
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need k and v: rotary embedding is applied to "
                             "q and to the new keys as they are appended (as in flash-attn 2.x); "
                             "rotate q and the cache yourself to use it without appending")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            _check_like_q(name, t, q, 2)
        if rotary_cos.shape != rotary_sin.shape:
            raise ValueError(f"rotary_cos and rotary_sin must have the same shape, got "
                             f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        seqlen_ro, half = rotary_cos.shape
        if not 1 <= half <= d // 2:
            raise ValueError(f"rotary_cos must have shape (seqlen_ro, rotary_dim / 2) with "
                             f"2 <= rotary_dim <= head_dim ({d}), got {tuple(rotary_cos.shape)}")
        rotary_cos, rotary_sin = rotary_cos.contiguous(), rotary_sin.contiguous()
    if cache_seqlens is None or isinstance(cache_seqlens, Tensor):
        cache_seqlens = _check_index("cache_seqlens", cache_seqlens, q.device, (batch,),
                                     f"(batch,) = ({batch},)")
    else:
        try:
            n = check_int("cache_seqlens", cache_seqlens, capacity)
        except TypeError:
            raise TypeError("cache_seqlens must be None, an int or an int32 tensor (batch,), got "
                            f"{type(cache_seqlens).__name__}") from None
        if n + seqlen_new > capacity:
            raise ValueError(f"cache_seqlens ({n}) + the {seqlen_new} new keys of k exceed the "
                             f"cache's capacity ({capacity} rows)")
        cache_seqlens = n
    if cache_seqlens is None and seqlen_new > 0:
        raise ValueError("k and v need cache_seqlens (where to append them): cache_seqlens=None "
                         "means every cache is full")
    # seqlen_q == 1: the causal mask hides nothing (the one query is the last position), so the
    # plain spec serves it, as flash-attn 2.x does; rotary positions are the same either way.
    causal, window_left, window_right = resolve_window(
        window_size, check_flag("causal", causal) and seqlen_q > 1, seqlen_q, capacity)
    scale = check_scalars(0.0, softmax_scale, d)
    softcap = check_softcap(softcap)
    rotary_interleaved = check_flag("rotary_interleaved", rotary_interleaved)
    return_softmax_lse = check_flag("return_softmax_lse", return_softmax_lse)
    num_splits = check_int("num_splits", num_splits, max_num_splits)
    if torch.is_grad_enabled():  # no backward: a gradient asked for would silently be missing
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
                        ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin),
                        ("alibi_slopes", alibi_slopes), ("sink", sink)):
            if isinstance(t, Tensor) and t.requires_grad:
                raise NotImplementedError(
                    f"flash_attn_with_kvcache has no backward (inference only), but {name} "
                    "requires grad: call it under torch.no_grad() or torch.inference_mode(), or "
                    "pass tensors that do not require grad")
    alibi_slopes, sink = check_variant_tensors(alibi_slopes, sink, q.device, batch, heads, "q")
    if not capturing():
        per_row = causal or (window_left, window_right) != (-1, -1)
        check_kvcache_values(cache_seqlens, cache_leftpad, cache_batch_idx, block_table,
                             batch=batch, seqlen_q=seqlen_q, seqlen_new=seqlen_new,
                             capacity=capacity, page_size=rows, num_slots=slots,
                             seqlen_ro=seqlen_ro, rotary_per_row=per_row)
    if isinstance(cache_seqlens, int):  # flash-attn broadcasts an int to every sequence
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    return KvCacheArgs(k, v, rotary_cos, rotary_sin, rotary_interleaved, cache_seqlens,
                       cache_batch_idx, cache_leftpad, block_table, scale, causal, window_left,
                       window_right, softcap, alibi_slopes, sink, num_splits, return_softmax_lse)


def _caches_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two caches (head dim contiguous, checked before) share an element. Views of one
    allocation with the same strides (slices of one buffer, or k and v split from a packed
    (.., 2, heads_k, d) one) are decided exactly: their offset difference is walked down the
    dims from the largest stride (each a nested, non-overlapping layout); other pairs of one
    allocation count as overlapping when their spans of memory meet."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.stride() == b.stride() and a.shape == b.shape and a.dtype == b.dtype:
        r = b.storage_offset() - a.storage_offset()
        for size, stride in sorted(zip(a.shape[:-1], a.stride()[:-1]), key=lambda x: -x[1]):
            if stride > 0:
                m = max(-(size - 1), min(size - 1, round(r / stride)))
                r -= m * stride
        return abs(r) < a.shape[-1]

    def span(t: Tensor) -> tuple:
        start = t.data_ptr()
        return start, start + t.element_size() * (
            1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def first_bad_pages(block_table: Tensor, ends: Tensor, page_size: int,
                    num_slots: int) -> Tuple[Tensor, Tensor]:
    """Per sequence b, among the pages its first ends[b] rows use (block_table[b, :ceil(ends[b] /
    page_size)]), the first column whose entry is not a page of the cache (outside [0,
    num_slots)), or block_table.shape[1] where there is none, and that entry: two int64 (batch,)
    tensors on block_table's device (computed there, no copy). block_table has >= 1 column."""
    max_blocks = block_table.shape[1]
    pages = torch.clamp((ends + page_size - 1) // page_size, 0, max_blocks)
    column = torch.arange(max_blocks, device=block_table.device)
    bad = (column[None, :] < pages[:, None]) & ((block_table < 0) | (block_table >= num_slots))
    first = torch.where(bad, column[None, :], max_blocks).amin(dim=1)  # max_blocks: none
    value = block_table.gather(1, first.clamp(max=max_blocks - 1)[:, None])[:, 0]
    return first, value.to(torch.int64)


def check_kvcache_values(cache_seqlens, cache_leftpad: Optional[Tensor],
                         cache_batch_idx: Optional[Tensor], block_table: Optional[Tensor], *,
                         batch: int, seqlen_q: int, seqlen_new: int, capacity: int,
                         page_size: int, num_slots: int, seqlen_ro: Optional[int],
                         rotary_per_row: bool) -> None:
    """The value checks of check_kvcache (ValueError naming the argument and the sequence), from
    one device-to-host copy: the index tensors and, for a block_table, the first bad page entry
    of each sequence among the pages it uses (found on the device), joined into one int64
    tensor; nothing is copied when no tensor is given. Works on tensors of any device.

    cache_seqlens: int32 (batch,), an int or None (every sequence at full capacity). num_slots:
    k_cache.shape[0] (cache rows, or pages with a block_table); page_size: k_cache.shape[1].
    seqlen_ro: rows of the rotary tables (None: no rotary); rotary_per_row: query i at position
    cache_seqlens - leftpad + i (causal or a window) rather than all queries at the first."""
    parts, names = [], []

    def add(name: str, t: Tensor) -> None:
        parts.append(t.reshape(-1).to(torch.int64))
        names.append(name)

    for name, t in (("cache_seqlens", cache_seqlens), ("cache_leftpad", cache_leftpad),
                    ("cache_batch_idx", cache_batch_idx)):
        if isinstance(t, Tensor):
            add(name, t)
    if block_table is not None and block_table.shape[1] > 0 and batch > 0:
        max_blocks = block_table.shape[1]
        if isinstance(cache_seqlens, Tensor):
            ends = cache_seqlens.to(torch.int64) + seqlen_new
        else:
            n = capacity if cache_seqlens is None else cache_seqlens + seqlen_new
            ends = torch.full((batch,), n, dtype=torch.int64, device=block_table.device)
        first, value = first_bad_pages(block_table, ends, page_size, num_slots)
        add("bad_page", first)
        add("bad_page_value", value)
        if seqlen_new > 0:
            # the (page, row) of every appended key: two sequences must not write the same one
            pos = (ends - seqlen_new)[:, None] + torch.arange(seqlen_new, device=ends.device)
            col = (pos // page_size).clamp(0, max_blocks - 1)
            row = block_table.to(torch.int64).gather(1, col) * page_size + pos % page_size
            row = row.reshape(-1).sort().values
            shared = (row[1:] == row[:-1]).any() if row.numel() > 1 else row.new_zeros(())
            add("shared_rows", shared.to(torch.int64).expand(batch))
    values = {}
    if parts:
        host = torch.cat(parts).cpu().tolist()  # the one device-to-host copy
        values = {name: host[i * batch:(i + 1) * batch] for i, name in enumerate(names)}
    if cache_seqlens is None or isinstance(cache_seqlens, int):
        values["cache_seqlens"] = [capacity if cache_seqlens is None else cache_seqlens] * batch
    lengths = values["cache_seqlens"]
    leftpad = values.get("cache_leftpad", [0] * batch)
    for b, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"cache_seqlens[{b}] = {n} is negative")
        if n + seqlen_new > capacity:
            added = f" plus the {seqlen_new} new keys of k" if seqlen_new else ""
            raise ValueError(f"cache_seqlens[{b}] = {n}{added} exceeds the cache's capacity "
                             f"({capacity} rows"
                             + (": max_blocks x page_size)" if block_table is not None else
                                "; for a paged cache pass its block_table)"))
        if not 0 <= leftpad[b] <= n:
            raise ValueError(f"cache_leftpad[{b}] = {leftpad[b]} must be between 0 and "
                             f"cache_seqlens[{b}] = {n}")
    if "cache_batch_idx" in values:
        index = values["cache_batch_idx"]
        for b, row in enumerate(index):
            if not 0 <= row < num_slots:
                raise ValueError(f"cache_batch_idx[{b}] = {row} is not a row of k_cache "
                                 f"(batch_cache {num_slots})")
        if seqlen_new > 0 and len(set(index)) != len(index):
            raise ValueError("cache_batch_idx repeats a cache row while k and v are appended: "
                             "two sequences would write the same cache rows")
    if "bad_page" in values:
        for b, column in enumerate(values["bad_page"]):
            if column < block_table.shape[1]:
                raise ValueError(
                    f"block_table[{b}, {column}] = {values['bad_page_value'][b]} is not a page "
                    f"of k_cache (num_blocks {num_slots}), and sequence {b} uses that page "
                    f"(cache_seqlens[{b}] + {seqlen_new} new keys = {lengths[b] + seqlen_new} "
                    f"rows of {page_size})")
    if values.get("shared_rows", [0])[0]:
        raise ValueError("block_table: two sequences append k and v into the same cache rows "
                         "(their tables share a page at the rows being written), so the writes "
                         "would race; give each sequence its own pages for the rows it appends")
    if seqlen_ro is not None:
        extent = max(seqlen_new - 1, seqlen_q - 1 if rotary_per_row else 0)
        for b, n in enumerate(lengths):
            last = n - leftpad[b] + extent
            if last >= seqlen_ro:
                raise ValueError(
                    f"rotary_cos/rotary_sin have {seqlen_ro} rows (positions), but sequence {b} "
                    f"uses position {last} (cache_seqlens[{b}] - cache_leftpad[{b}] + {extent}): "
                    f"they need at least {last + 1} rows")
