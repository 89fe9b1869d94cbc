"""Argument checks of the public API (interface.py; flash_attn_with_kvcache's in
_validate_kvcache.py): every one runs before anything compiles and names the caller's own argument
(``qkv``/``kv`` for packed inputs, ``query`` and ``scale`` in the SDPA entry).

Errors: TypeError for a value of the wrong type, and for q/k/v and cu_seqlens of the wrong dtype;
ValueError for wrong shapes, devices and values, and for the dtype of alibi_slopes and sink
(float32 tensors whose dtype is a value to get right, as their shape is: the variants contract);
NotImplementedError, raised outside this module, for what the kernels do not do (dropout and a
backward with paged KV: _paged_varlen.paged_varlen; a decode tile too large for the GPU's shared
memory: ops.check_decode_smem).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import Optional, Tuple

import torch
from torch import Tensor


try:  # numpy's bools count as bools (check_flag); numpy is optional, as it is for torch
    from numpy import bool_ as _numpy_bool
except ImportError:  # pragma: no cover
    _numpy_bool = ()

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _no_cuda_hint() -> str:
    if torch.version.cuda is None:
        return (f"; this torch ({torch.__version__}) has no CUDA support: install a CUDA build of "
                "torch (https://pytorch.org/get-started/locally/)")
    if not torch.cuda.is_available():
        return "; no CUDA GPU is visible to torch"
    return ""


def check_dtype(name: str, t: Tensor) -> None:
    """TypeError naming t unless it is float16 or bfloat16."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16 or bfloat16, got {t.dtype}")


def check_tensor(name: str, t, rank: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"{name} must be a CUDA tensor, got device meta: flashjit's kernels have "
                         "no meta-device implementation (its ops infer shapes from fake CUDA "
                         "tensors, under torch.compile or FakeTensorMode)")
    if t.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got device {t.device}{_no_cuda_hint()}")
    check_dtype(name, t)
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")


def check_qkv(q: Tensor, k: Tensor, v: Tensor, varlen: bool, names=("q", "k", "v"),
              heads_dim: Optional[int] = None) -> None:
    """names: how the caller calls q, k and v (("qkv",) * 3 for a packed qkv, say); heads_dim:
    the dim of the heads as the caller passes them (default 1 varlen, else 2: (batch, seq, heads,
    d); 1 for SDPA's (batch, heads, seq, d)), so that messages show the caller's shapes."""
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
    head_dim = heads_dim if heads_dim is not None else 1 if varlen else 2
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
    if isinstance(x, (bool, _numpy_bool)) or (isinstance(x, int) and x in (0, 1)):
        return bool(x)
    raise TypeError(f"{name} must be a bool, got {x!r}")


def dropout_resolution_reason(dropout_p: float) -> Optional[str]:
    """Why a dropout_p in (0, 1) cannot be applied at dropout's 1/256 resolution (a weight is
    kept with probability round(256 (1 - p)) / 256, _philox.keep_probability), or None: up to
    1/512 it would keep every weight; from 1 - 1/512 on it would keep none, and the kernels
    keep 1/256 instead, more than twice the weights asked for."""
    kept = round((1.0 - dropout_p) * 256.0)  # half to even, as the kernels' nearbyint
    if dropout_p > 0.0 and kept >= 256:
        return (f"dropout_p = {dropout_p} would drop nothing: dropout applies at a resolution "
                "of 1/256 (a weight is kept with probability round(256 (1 - dropout_p)) / "
                "256), so values up to 1/512 = 0.001953125 keep every weight; pass 0.0 for no "
                "dropout, or a value above 1/512 (e.g. 0.002, which drops 1/256 of the weights)")
    if kept <= 0:
        return (f"dropout_p = {dropout_p} would keep less than 1/512 of the weights: dropout "
                "applies at a resolution of 1/256 (a weight is kept with probability "
                "round(256 (1 - dropout_p)) / 256, at least 1/256), so values from 1 - 1/512 = "
                f"{DROPOUT_MAX} on cannot be applied; the largest that can keeps 1/256 "
                "(e.g. 0.998)")
    return None


def check_dropout(dropout_p) -> float:
    """dropout_p, a real in [0, 1) that dropout can apply at its 1/256 resolution: ValueError
    for a p up to 1/512 (it would silently keep every weight) or from 1 - 1/512 on (it would
    keep 1/256, not 1 - p): dropout_resolution_reason."""
    dropout_p = check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    reason = dropout_resolution_reason(dropout_p)
    if reason is not None:
        raise ValueError(reason)
    return dropout_p


def check_scalars(dropout_p: float, softmax_scale: Optional[float], d: int,
                  scale_name: str = "softmax_scale") -> float:
    """softmax_scale as a float (default 1 / sqrt(d)), after checking dropout_p too
    (check_dropout). scale_name: how the caller calls softmax_scale (SDPA: scale)."""
    check_dropout(dropout_p)
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(check_real(scale_name, softmax_scale))
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"{scale_name} must be a positive finite number, got {softmax_scale}")
    if not SCALE_MIN <= scale <= SCALE_MAX:
        raise ValueError(f"{scale_name} must be between {SCALE_MIN:g} and {SCALE_MAX:g} (the "
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
# The smallest dropout_p that drops anything (the float just above 1/512 whose keep_threshold is
# 254, dropping 1/256; below it round(256 (1 - p)) is 256, no drop).
DROPOUT_MIN = 0.001953125000000056
# The smallest dropout_p that keeps less than 1/512 of the weights (round(256 (1 - p)) is 0):
# 1 - 1/512, exact in binary; dropout_p must stay below it.
DROPOUT_MAX = 0.998046875


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
        keeps = ", which keeps its gradient" if name == "sink" else ""
        raise ValueError(f"{name} must be float32, got {t.dtype} (convert it with "
                         f"{name}.float(){keeps})")
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


_FAKE_MODE_KEY = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)


def capturing() -> bool:
    """True inside CUDA-graph capture, torch.compile tracing or an active FakeTensorMode: device
    values must not (or cannot) be read, so checks of values (cu_seqlens, cache lengths, masks)
    are skipped there. is_compiling() comes first: dynamo cannot trace the others."""
    if torch.compiler.is_compiling():
        return True
    if _FAKE_MODE_KEY is not None and torch._C._get_dispatch_mode(_FAKE_MODE_KEY) is not None:
        return True  # fake tensors hold no values (reading one raises DataDependentOutputException)
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
# Paged KV caches: layout and page checks (flash_attn_with_kvcache, paged varlen)
# ------------------------------------------------------------------------------------------------
def _may_overlap(t: Tensor) -> bool:
    """Whether two elements of t may share memory: False where, its dims of more than one element
    taken by increasing stride, each stride steps past everything the dims before it span (the
    layouts of allocated, permuted and sliced tensors); True otherwise (an as_strided view whose
    rows alias; also the rare interleaved layouts that do not overlap, which this test does not
    tell apart). Cached per layout: a decode step checks its caches on every call."""
    return _layout_may_overlap(tuple(t.shape), t.stride())


@functools.lru_cache(maxsize=64)
def _layout_may_overlap(shape: Tuple[int, ...], strides: Tuple[int, ...]) -> bool:
    span = 1  # elements spanned by the dims so far, plus one
    for stride, size in sorted((s, n) for s, n in zip(strides, shape) if n > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


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
    if written and _may_overlap(t):
        raise ValueError(f"{name}'s elements overlap (shape {tuple(t.shape)}, strides "
                         f"{tuple(t.stride())}): it is written in place, so an appended key "
                         "would also land in another row; allocate it with rows of its own")
    if t.stride(-1) != 1 or any(s % 8 != 0 for s, n in zip(t.stride()[:-1], t.shape) if n > 1):
        raise ValueError(f"{name} must have a contiguous last dim and its other strides "
                         f"multiples of 8 elements (16 bytes), got strides {tuple(t.stride())}; "
                         f"it is {how}, so flashjit does not copy it")
    if not torch.compiler.is_compiling() and type(t) is Tensor and t.data_ptr() % 16 != 0:
        raise ValueError(f"{name}'s data pointer is not 16-byte aligned; it is {how}, so "
                         "flashjit does not copy it: allocate it aligned")



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
