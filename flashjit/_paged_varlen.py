"""flash_attn_varlen_func(..., block_table=...): paged K/V for packed variable-length queries
(flash-attn 2.x's paged varlen forward), served through flash_attn_with_kvcache. Split from
interface.py, which imports it as _paged_varlen."""

from __future__ import annotations

import torch
from torch import Tensor

from ._validate import (MAX_HEAD_DIM, check_cache_layout, check_cu_seqlens, check_int,
                        check_options, check_tensor, check_variant_tensors, first_bad_pages)
from ._validate_kvcache import _check_index


def paged_varlen(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                  deterministic, return_attn_probs, block_table, sink, names):
    """flash_attn_varlen_func with block_table (flash-attn 2.x's paged varlen forward): k, v are
    paged caches (num_blocks, page_size, heads_k, d), sequence b's keys are its first
    cu_seqlens_k[b + 1] - cu_seqlens_k[b] logical rows (pages block_table[b]), its queries rows
    cu_seqlens_q[b] .. of q (total_q, heads, d). Served through flash_attn_with_kvcache (its
    decode kernel, or the paged forward from ops.paged_prefill_min_queries() queries): the
    queries are placed at the END of a (batch, tile) left-padded tile, so its bottom-right
    alignment puts query i of a sequence of
    n_q queries and n_k keys at position n_k - n_q + i, as here; the padding rows are dropped.
    tile: the longest query sequence (eager: as the cu_seqlens checks read it), or
    max_seqlen_q under CUDA-graph capture and torch.compile. The arguments are checked here under
    the caller's names (`names`) before anything is allocated; flash_attn_with_kvcache's own
    checks follow. Forward only (inference): no dropout, no gradient."""
    nq, nk, nv, ncu_q, ncu_k, nmax_q, nmax_k = names
    if not isinstance(q, Tensor):
        raise TypeError(f"{nq} must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 3:
        raise ValueError(f"{nq} must be a (total_q, heads, d) tensor with block_table (paged KV), "
                         f"got shape {tuple(q.shape)}")
    total, heads, d = q.shape
    _, softcap, _, return_attn_probs = check_options(dropout_p, softmax_scale, softcap,
                                                     deterministic, return_attn_probs, max(d, 1))
    if float(dropout_p) != 0.0:
        raise NotImplementedError(f"dropout_p must be 0 with block_table: paged KV is "
                                  f"forward-only (inference), got {dropout_p}")
    for name, t in ((nk, k_cache), (nv, v_cache)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device and t.device.type == "cuda":  # q is the one off the GPU
            check_tensor(nq, q, 3)
        if t.dim() != 4:
            raise ValueError(f"{name} must be a paged cache (num_blocks, page_size, heads_k, d) "
                             f"with block_table, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have {nq}'s dtype ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {nq}'s device ({q.device}), got {t.device}")
        if t.shape[3] != d:
            raise ValueError(f"the head dim of {name} ({t.shape[3]}) must be {nq}'s ({d})")
        if t.shape[2] == 0 or heads % t.shape[2] != 0:
            raise ValueError(f"the query heads of {nq} ({heads}) must be a multiple of the "
                             f"key/value heads of {name} ({t.shape[2]})")
    if d % 8 != 0 or not 8 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} of {nq}: with block_table it must be a multiple of 8 from "
                         f"8 to {MAX_HEAD_DIM} (the paged cache cannot be zero-padded as the "
                         "unpaged call pads its inputs)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{nk} and {nv} must have the same shape with block_table, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    num_blocks, page_size = k_cache.shape[0], k_cache.shape[1]
    if page_size == 0 or page_size % 16 != 0:
        raise ValueError(f"the page size of {nk} (its dim 1, with block_table) must be a positive "
                         f"multiple of 16, got {page_size}")
    check_cache_layout(nk, k_cache, written=False)
    check_cache_layout(nv, v_cache, written=False)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                       for t in (q, k_cache, v_cache, sink, alibi_slopes)):
        raise NotImplementedError("block_table (paged KV) has no backward: call it under "
                                  "torch.no_grad() or pass tensors (sink included) that do not "
                                  "require grad")
    max_seqlen_q = check_int(nmax_q, max_seqlen_q)
    max_seqlen_k = check_int(nmax_k, max_seqlen_k)
    lengths_q = check_cu_seqlens(ncu_q, cu_seqlens_q, q.device, total, max_seqlen_q, nmax_q)
    lengths_k = check_cu_seqlens(ncu_k, cu_seqlens_k, q.device, 2**62, max_seqlen_k, nmax_k)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"{ncu_k} must have as many entries as {ncu_q} "
                         f"({cu_seqlens_q.numel()}), got {cu_seqlens_k.numel()}")
    batch = cu_seqlens_q.numel() - 1
    # block_table and the variant tensors too before q_tile is allocated (flash_attn_with_kvcache
    # checks them again, under the same names)
    _check_index("block_table", block_table, q.device, (batch, None), "(batch, max_blocks)")
    check_variant_tensors(alibi_slopes, sink, q.device, batch, heads, nq)
    tile_q = max(max_seqlen_q, 1)
    if lengths_q is not None:  # eager: the lengths the checks read size the tile
        tile_q = max(max(lengths_q), 1)
        capacity = (block_table.shape[1] * k_cache.shape[1]
                    if isinstance(block_table, Tensor) and block_table.dim() == 2 else 2**31 - 1)
        if max(lengths_k) > capacity:
            raise ValueError(f"a sequence of {ncu_k} has {max(lengths_k)} keys, more than "
                             f"block_table holds ({capacity} rows: max_blocks x page_size)")
        if isinstance(block_table, Tensor) and block_table.dim() == 2:
            _check_pages(block_table, lengths_k, num_blocks, page_size, nk, ncu_k)
    # query row r: sequence b (past the last sequence: a spare row `batch`), dense row t
    rows = torch.arange(total, device=q.device, dtype=torch.int64)
    starts, ends = cu_seqlens_q[:-1].long(), cu_seqlens_q[1:].long()
    b = torch.searchsorted(ends, rows, right=True)
    live = b < batch
    bc = b.clamp(max=max(batch - 1, 0))
    t = (tile_q - (ends - starts)[bc] + rows - starts[bc]).clamp(0, tile_q - 1)
    b = torch.where(live, bc, torch.full_like(bc, batch))
    q_tile = q.new_zeros(batch + 1, tile_q, heads, d)
    q_tile[b, t] = q
    from .interface import flash_attn_with_kvcache  # (a cycle at import time)

    out_tile, lse_tile = flash_attn_with_kvcache(
        q_tile[:batch], k_cache, v_cache, cache_seqlens=(cu_seqlens_k[1:] - cu_seqlens_k[:-1]),
        block_table=block_table, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
        return_softmax_lse=True, sink=sink)
    out = torch.where(live[:, None, None], out_tile[bc, t], torch.zeros_like(q))
    lse = torch.where(live[None, :], lse_tile[bc, :, t].transpose(0, 1),
                      torch.full((heads, total), float("-inf"), device=q.device))
    return (out, lse, None) if return_attn_probs else out


def _check_pages(block_table, lengths_k, num_blocks, page_size, nk, ncu_k) -> None:
    """Eager only: the pages that sequence b's keys use, block_table[b, :ceil(n_k /
    page_size)], are pages of the cache, in [0, num_blocks) (_validate.first_bad_pages, on the
    device; one copy of two ints per sequence)."""
    batch = len(lengths_k)
    if (block_table.dtype != torch.int32 or block_table.shape[0] < batch
            or block_table.shape[1] == 0):
        return  # flash_attn_with_kvcache reports a wrong dtype or shape under block_table's name
    ends = torch.tensor(lengths_k, dtype=torch.int64, device=block_table.device)
    first, value = (x.tolist() for x in torch.stack(
        first_bad_pages(block_table[:batch], ends, page_size, num_blocks)).cpu())
    for b, (j, page) in enumerate(zip(first, value)):
        if j < block_table.shape[1]:
            used = -(-lengths_k[b] // page_size)  # pages of sequence b
            raise ValueError(f"block_table[{b}, {j}] = {page} is not a page of {nk} "
                             f"(num_blocks {num_blocks}): sequence {b} has {lengths_k[b]} keys "
                             f"in {ncu_k}, so it uses block_table[{b}, :{used}] with pages of "
                             f"{page_size} rows")
