"""flash_attn_with_kvcache's argument checks: check_kvcache (shapes, dtypes, devices, layouts:
always) and check_kvcache_values (the values of the index tensors: outside capture). Split from
_validate.py, whose conventions they follow."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _validate
from ._validate import (MAX_HEAD_DIM, check_cache_layout, check_flag, check_int, check_scalars,
                        check_softcap, check_tensor, check_variant_tensors, first_bad_pages,
                        resolve_window)


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


def _check_index(name: str, t, device: torch.device, shape: Tuple[int, ...],
                 layout: str) -> Optional[Tensor]:
    """An optional int32 index tensor of `shape` (described by `layout`) on `device`, as the
    kernels read it: its last dim of stride 1 (a copy where it is not, also for a last dim of one
    element, e.g. a batch-1 expand() of stride 0, which the bindings' stride check refuses and
    .contiguous() would return unchanged)."""
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
    if t.dim() and t.stride(-1) != 1:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                  cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                  window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
                  return_softmax_lse, sink, max_num_splits: int) -> KvCacheArgs:
    """Every argument of flash_attn_with_kvcache (its docstring gives the contract), checked
    before anything compiles: TypeError/ValueError naming the argument.

    Shapes, dtypes and devices are always checked, and so is an append (k, v) longer than the
    cache's capacity. The values of the index tensors (lengths past the capacity, leftpad past
    cache_seqlens, block_table entries outside [0, num_blocks) for the pages in use,
    cache_batch_idx outside [0, batch_cache) or repeated while appending, rotary tables shorter
    than the largest position used) need a device-to-host copy: they are checked
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
    if heads == 0:  # an append would otherwise be skipped with the attention
        raise ValueError("q has no heads (shape (batch, seqlen_q, 0, d)): give it at least one")
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
        if seqlen_new > capacity:  # a shape fact: checked under capture too (the append
            # kernel would drop the rows past the capacity)
            held = (f"block_table's max_blocks ({block_table.shape[1]}) x k_cache's page size "
                    f"({rows})" if block_table is not None else "k_cache's seqlen_cache (dim 1)")
            raise ValueError(f"k and v have {seqlen_new} new keys (seqlen_new, dim 1) but the "
                             f"cache holds {capacity} rows per sequence ({held}): the append "
                             "cannot fit")
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
    if not _validate.capturing():  # looked up there: tests may stand in for it
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
                if cache_seqlens is None:
                    uses = (f"cache_seqlens=None: every sequence holds the table's {lengths[b]} "
                            f"rows of {page_size}")
                else:
                    uses = (f"cache_seqlens[{b}] + {seqlen_new} new keys = "
                            f"{lengths[b] + seqlen_new} rows of {page_size}")
                raise ValueError(
                    f"block_table[{b}, {column}] = {values['bad_page_value'][b]} is not a page "
                    f"of k_cache (num_blocks {num_slots}), and sequence {b} uses that page "
                    f"({uses})")
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
