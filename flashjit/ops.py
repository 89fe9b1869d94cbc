"""torch.library custom ops of flashjit, with fake (meta) implementations.

The public API (flashjit/interface.py) validates inputs and then calls these ops. Each op's CUDA
implementation maps its inputs to a JIT spec (arch, dtype, head-dim bucket, variant), loads the
compiled spec (building it on first use) and calls the spec's own op. Fake implementations only
compute output shapes: they never compile anything, so torch.compile can trace through.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .jit import JitSpec, current_arch, head_dim_bucket, load_spec, registry
from .jit.env import kernel_family_preference
from .jit.spec import with_tile_override

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}

# Rows of the backward's fp32 scratch buffers are padded per sequence to this multiple.
BWD_ROW_PAD = 128


def attention_spec(kernel: str, q: Tensor, causal: bool, dropout: bool, window: bool = False,
                   softcap: bool = False, alibi: bool = False, sink: bool = False,
                   paged: bool = False) -> JitSpec:
    """The JIT spec that serves an attention call on q's device, dtype and head dim, with the
    variant flags given (variant_flags() derives them from an op's arguments) and paged (the
    forward reading K/V through a block table). Its kernel family follows from these
    (spec.default_family: kernel, arch, head dim and paged) and FLASHJIT_KERNEL_FAMILY, its tile
    from FLASHJIT_FWD_TILE / FLASHJIT_BWD_TILE (tuning sweeps); bad values of either raise
    ValueError naming them. A paged spec takes that tile only where its family is the non-paged
    spec's (a family's tile parameters differ from another's; on sm90a both are sm90ws, unless
    FLASHJIT_KERNEL_FAMILY=sm90 picks the wgmma forward, whose paged spec is then its own)."""
    fields = dict(kernel=kernel, arch=current_arch(q.device), dtype=_DTYPE_NAMES[q.dtype],
                  head_dim=head_dim_bucket(q.shape[-1]), causal=causal, window=window,
                  softcap=softcap, alibi=alibi, sink=sink, dropout=dropout)
    return with_tile_override(JitSpec(**fields, paged=paged))


def variant_flags(causal: bool, window_left: int, window_right: int, softcap: float,
                  alibi_slopes: Optional[Tensor], sink: Optional[Tensor],
                  dropout_p: float) -> Tuple[bool, ...]:
    """The spec flags (causal, window, softcap, alibi, sink, dropout) of an op call.

    With causal the right bound is the causal mask's own (0, see window_bounds), so only a left
    bound makes a window: causal alone, (-1, 0), keeps the plain causal spec. The windows that
    exclude no key are already (-1, -1) here (_validate.resolve_window)."""
    window = window_left != -1 if causal else (window_left, window_right) != (-1, -1)
    return (causal, window, softcap > 0.0, alibi_slopes is not None, sink is not None,
            dropout_p > 0.0)


def window_bounds(causal: bool, window_left: int, window_right: int) -> Tuple[int, int]:
    """(left, right) as the kernels take them: with causal, right = 0 (flash-attn 2.x: causal
    with a window is the band whose right edge is at the diagonal)."""
    return (window_left, 0) if causal else (window_left, window_right)


# (kernel, device index, dtype, head dim, causal, window, softcap, alibi, sink, dropout, paged)
# -> the spec's op. Resolved once per process (environment overrides included: arch list,
# FLASHJIT_KERNEL_FAMILY), so a call costs one dict lookup, not a spec build. The key determines
# the spec: the arch follows from the device and the family from kernel, arch, head dim and the
# environment.
_resolved: dict = {}


def _spec_and_op(kernel: str, q: Tensor, flags: Tuple[bool, ...], paged: bool = False):
    """(spec, op) of the spec serving `kernel` for q and the variant_flags() `flags`; paged: the
    forward's spec that reads K/V through a block table."""
    key = (kernel, q.device.index, q.dtype, q.shape[-1], *flags, paged)
    resolved = _resolved.get(key)
    if resolved is None:
        causal, window, softcap, alibi, sink, dropout = flags
        spec = attention_spec(kernel, q, causal, dropout, window, softcap, alibi, sink, paged)
        resolved = _resolved[key] = (spec, getattr(load_spec(spec), kernel).default)
    return resolved


def _spec_op(kernel: str, q: Tensor, flags: Tuple[bool, ...], paged: bool = False):
    """The op of _spec_and_op."""
    return _spec_and_op(kernel, q, flags, paged)[1]


def _launch(op, device: torch.device, *args) -> None:
    """Runs a spec op on `device`'s current stream (switching device only when needed)."""
    index = device.index
    if index == torch.cuda.current_device():
        op(*args, _stream(index))
    else:
        with torch.cuda.device(index):
            op(*args, _stream(index))


# Tests set this: outputs are then allocated filled with NaN, so unwritten elements show.
POISON_OUTPUTS = False


def _empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # absent in CPU builds


def _stream(device) -> int:
    """The raw cudaStream_t of `device`'s current stream (torch's own accessor, as used by
    inductor-generated code; the public torch.cuda.current_stream builds a Python object)."""
    index = device if isinstance(device, int) else device.index
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def _aligned(t: Optional[Tensor]) -> Optional[Tensor]:
    """t, or a fresh copy where its data pointer is not 16-byte aligned (a view at an odd storage
    offset), as the kernels' 16-byte loads need. interface._kernel_layout fixes strides, and the
    pointer of eager inputs, before autograd saves them; this catches what was traced under
    torch.compile, whose pointer is known only here, at run time. The copy is a fresh allocation:
    .contiguous() would return a contiguous misaligned view as it is."""
    if t is None or t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _lse_shape(q: Tensor, varlen: bool) -> Tuple[int, ...]:
    # fixed (batch, heads, seqlen_q); varlen (heads, total_q)
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _fwd_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    seqused_k: Optional[Tensor],
    block_table: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    causal_bottom_right: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor],
    sink: Optional[Tensor],
    dropout_p: float,
    rng_state: Optional[Tensor],
    with_residual: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward attention: returns (out like q, lse float32 in log2 units (the natural-log lse /
    ln 2), out_residual). out_residual is like out, O - round(O) (for the
    backward's D), with with_residual; else an empty tensor. The variant arguments are validated
    ones (interface.py documents them): window bounds >= -1 (-1: none), softcap >= 0 (0: off),
    alibi_slopes float32 (heads,) or (batch, heads), sink float32 (heads,), both contiguous. The
    lse includes the sink. block_table (batch, max_blocks) int32 (fixed-length q only): paged
    K/V, k and v (num_blocks, page_size, heads_k, d) with page_size a multiple of 16, key j of
    sequence b at row j % page_size of page block_table[b, j // page_size], max_seqlen_k <=
    max_blocks * page_size (seqused_k gives each sequence's keys); served by the paged spec."""
    varlen = cu_seqlens_q is not None
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty(_lse_shape(q, varlen), torch.float32, q.device)
    residual = _empty(q.shape if with_residual else (0,), q.dtype, q.device)
    flags = variant_flags(causal, window_left, window_right, softcap, alibi_slopes, sink,
                          dropout_p)
    window_left, window_right = window_bounds(causal, window_left, window_right)
    _launch(_spec_op("fwd", q, flags, block_table is not None), q.device,
            q, k, v, out, lse, residual if with_residual else None, cu_seqlens_q, cu_seqlens_k,
            seqused_k, block_table, max_seqlen_q, max_seqlen_k, softmax_scale,
            causal_bottom_right, window_left, window_right, softcap, alibi_slopes, sink,
            rng_state, dropout_p)
    return out, lse, residual


fwd = torch.library.custom_op("flashjit::fwd", _fwd_impl, mutates_args=(), device_types="cuda")


@fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, max_seqlen_q,
              max_seqlen_k, softmax_scale, causal, causal_bottom_right, window_left, window_right,
              softcap, alibi_slopes, sink, dropout_p, rng_state, with_residual):
    varlen = cu_seqlens_q is not None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty(_lse_shape(q, varlen), dtype=torch.float32)
    residual = q.new_empty(q.shape if with_residual else (0,))
    return out, lse, residual


def _bwd_scratch(q: Tensor, varlen: bool, batch: int, max_seqlen_q: int, width: int):
    """fp32 scratch of the backward: dq_accum (rows of `width` floats: the kernels' padded head
    dim, JitSpec.padded_head_dim) and dsum (D = rowsum(dO * O)), rows padded."""
    if varlen:
        rows = q.shape[0] + BWD_ROW_PAD * batch
        heads = q.shape[1]
        dq_accum = torch.empty((heads, rows, width), dtype=torch.float32, device=q.device)
        dsum = torch.empty((heads, rows), dtype=torch.float32, device=q.device)
    else:
        rows = -(-max_seqlen_q // BWD_ROW_PAD) * BWD_ROW_PAD
        b, _, heads, _ = q.shape
        dq_accum = torch.empty((b, heads, rows, width), dtype=torch.float32, device=q.device)
        dsum = torch.empty((b, heads, rows), dtype=torch.float32, device=q.device)
    return dq_accum, dsum


def _expanded_kv_shape(q: Tensor, k: Tensor, varlen: bool) -> Tuple[int, ...]:
    # dk/dv as computed per query head:
    #   fixed (batch, seqlen_k, heads, d); varlen (total_k, heads, d)
    if varlen:
        return (k.shape[0], q.shape[1], k.shape[2])
    return (k.shape[0], k.shape[1], q.shape[2], k.shape[3])


def _reduce_groups(dx: Tensor, heads_k: int, varlen: bool) -> Tensor:
    """Sum per-query-head gradients over each MQA/GQA group of query heads."""
    head_dim = 1 if varlen else 2
    heads = dx.shape[head_dim]
    if heads == heads_k:
        return dx
    shape = list(dx.shape)
    shape[head_dim : head_dim + 1] = [heads_k, heads // heads_k]
    return dx.view(shape).sum(dim=head_dim + 1, dtype=torch.float32).to(dx.dtype)


def _bwd_impl(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    out_residual: Optional[Tensor],
    lse: Tensor,
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    seqused_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    causal_bottom_right: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor],
    sink: Optional[Tensor],
    dropout_p: float,
    rng_state: Optional[Tensor],
    deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward attention: returns (dq, dk, dv, d): dq, dk, dv shaped like (q, k, v); d, with a
    sink, the kernels' D = rowsum(dO * O) float32 in lse's layout (interface.sink_grad_from_d
    makes the sink's gradient of it), else an empty (0,) tensor. The variant arguments as the
    forward's. out_residual: the forward's, or None (D from out alone)."""
    varlen = cu_seqlens_q is not None
    dout, q, k, v = _aligned(dout), _aligned(q), _aligned(k), _aligned(v)
    batch = cu_seqlens_q.shape[0] - 1 if varlen else q.shape[0]
    flags = variant_flags(causal, window_left, window_right, softcap, alibi_slopes, sink,
                          dropout_p)
    spec, op = _spec_and_op("bwd", q, flags)
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(_expanded_kv_shape(q, k, varlen), k.dtype, k.device)
    dv = _empty(_expanded_kv_shape(q, v, varlen), v.dtype, v.device)
    dq_accum, dsum = _bwd_scratch(q, varlen, batch, max_seqlen_q, spec.padded_head_dim)
    window_left, window_right = window_bounds(causal, window_left, window_right)
    _launch(op, q.device,
            dout, q, k, v, out, out_residual, lse, dq, dk, dv, dq_accum, dsum, cu_seqlens_q,
            cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale,
            causal_bottom_right, window_left, window_right, softcap, alibi_slopes, sink,
            rng_state, dropout_p, deterministic)
    heads_k = k.shape[1 if varlen else 2]
    d = _softmax_d(dsum, lse, cu_seqlens_q) if sink is not None else lse.new_empty((0,))
    return dq, _reduce_groups(dk, heads_k, varlen), _reduce_groups(dv, heads_k, varlen), d


def _softmax_d(dsum: Tensor, lse: Tensor, cu_seqlens_q: Optional[Tensor]) -> Tensor:
    """The backward's D = rowsum(dO * O) (float32) out of its padded scratch rows, in lse's
    layout: fixed (batch, heads, seqlen_q) from (batch, heads, rows >= seqlen_q); varlen
    (heads, total_q) from (heads, total_q + BWD_ROW_PAD * batch), where sequence b's rows start
    at cu_seqlens_q[b] + BWD_ROW_PAD * b (csrc/common/problem.cuh, accum_row0). Rows past
    cu_seqlens_q[-1] hold no D (callers mask them). No host synchronisation."""
    if cu_seqlens_q is None:
        return dsum[..., : lse.shape[-1]].contiguous()
    rows = torch.arange(lse.shape[1], device=lse.device, dtype=torch.int64)
    seq = torch.searchsorted(cu_seqlens_q, rows.to(cu_seqlens_q.dtype), right=True) - 1
    seq = seq.clamp_(0, cu_seqlens_q.numel() - 2)  # rows past the end: any sequence's padding
    return dsum.index_select(1, rows + BWD_ROW_PAD * seq)


bwd = torch.library.custom_op("flashjit::bwd", _bwd_impl, mutates_args=(), device_types="cuda")


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, out_residual, lse, cu_seqlens_q, cu_seqlens_k, seqused_k,
              max_seqlen_q, max_seqlen_k, softmax_scale, causal, causal_bottom_right, window_left,
              window_right, softcap, alibi_slopes, sink, dropout_p, rng_state, deterministic):
    new = lambda t: torch.empty(t.shape, dtype=t.dtype, device=t.device)  # noqa: E731
    return new(q), new(k), new(v), new(lse) if sink is not None else lse.new_empty((0,))


# Argument types of a plain eager call, looked up before the isinstance test (the loop below runs
# per call: host cost).
_PLAIN_TYPES = frozenset((int, float, bool, type(None), Tensor))


def _eager(args) -> bool:
    """True for a plain eager call with these op arguments: no torch.compile/export tracing, no
    tensor subclass (fake, functional). Such calls skip the custom-op dispatcher and run the
    implementation directly: the dispatcher path costs nothing later, but its first call
    imports much of torch's tracing machinery (seconds in a fresh process)."""
    if torch.compiler.is_compiling():
        return False
    for a in args:
        if type(a) not in _PLAIN_TYPES and isinstance(a, Tensor):
            return False
    return True


def call_fwd(*args):
    """flashjit::fwd, straight to its implementation when eager (see _eager)."""
    return (_fwd_impl if _eager(args) else fwd)(*args)


def call_bwd(*args):
    """flashjit::bwd, straight to its implementation when eager (see _eager)."""
    return (_bwd_impl if _eager(args) else bwd)(*args)


# ------------------------------------------------------------------------------------------------
# Decoding with a KV cache (interface.flash_attn_with_kvcache): the "decode" kernel
# ------------------------------------------------------------------------------------------------
# Split-KV: the most splits one call makes, the fewest keys a split gets from the heuristic, and
# the decode kernel's packed query rows per CTA (seqlen_q x heads per K/V head, GQA packed): one
# 16-row tile up to 16 rows, else tiles of 64 (csrc/splitkv/launch.cuh).
MAX_NUM_SPLITS = 128
MIN_KEYS_PER_SPLIT = 256
KEYS_PER_BLOCK = 64  # the decode kernel's keys per block (DecodeTraits::kBlockN)
WAVE_EFFICIENCY_SHARE = 0.85
# From this many queries per sequence on, a contiguous cache without cache_batch_idx or
# cache_leftpad is attended by the forward (prefill) kernel, the decode op appending only:
# measured on the H200 (benchmarks/results/h200/decode.md), the forward kernel is 1.5-3x faster
# than the decode kernel's 64-row tiles at 128-512 queries. A paged cache goes to the forward's
# paged spec (K/V through the block table) from paged_prefill_min_queries() on: as early where
# that spec is the warp-specialised family (TMA boxes inside pages: 1.00-1.02x its contiguous
# time at 128 queries, 0.68-0.71x the decode kernel's; results/h200/decode_chunks.md), from
# PAGED_PREFILL_MIN_QUERIES where it reads K/V row by row (the sm90 and sm80 families: 1.5x their
# contiguous time, so the decode kernel, split-KV in 64-row tiles, was faster at 128 queries,
# 0.088 against 0.120 ms at 4k keys, and 2.4x slower at 512); below that the forward serves only
# where the decode kernel's shared memory does not fit (_by_forward).
PREFILL_MIN_QUERIES = 64
PAGED_PREFILL_MIN_QUERIES = 256
PAGED_PREFILL_TMA_FAMILIES = ("sm90ws",)  # paged forwards as fast as their contiguous ones


def paged_prefill_min_queries(device: torch.device, head_dim: int) -> int:
    """Queries per sequence from which flash_attn_with_kvcache attends a paged cache with the
    forward kernel (without cache_batch_idx and cache_leftpad): PREFILL_MIN_QUERIES where the
    paged forward spec on this device and head dim (FLASHJIT_KERNEL_FAMILY included) is in
    PAGED_PREFILL_TMA_FAMILIES, else PAGED_PREFILL_MIN_QUERIES. Asked only by chunked-prefill
    calls on a paged cache (not per decoded token): not cached, so it follows the environment."""
    arch, bucket = current_arch(device), head_dim_bucket(head_dim)
    preference = kernel_family_preference()
    family = (registry.default_family("fwd", arch, bucket, paged=True) if preference is None
              else registry.preferred_family("fwd", arch, bucket, preference, paged=True))
    return PREFILL_MIN_QUERIES if family in PAGED_PREFILL_TMA_FAMILIES else PAGED_PREFILL_MIN_QUERIES


def decode_ctas(batch: int, heads_k: int, rows_per_kv_head: int) -> int:
    """CTAs of one decode kernel launch without splits (csrc/splitkv/launch.cuh's grid)."""
    tiles = 1 if rows_per_kv_head <= 16 else -(-rows_per_kv_head // 64)
    return batch * heads_k * tiles if rows_per_kv_head > 0 else 0


def wave_efficiency(ctas: int, slots: int) -> float:
    """The share of the SM slots the waves of `ctas` equal CTAs keep busy: ctas / (slots x
    waves), waves = ceil(ctas / slots)."""
    return ctas / (slots * -(-ctas // slots))


def num_splits_heuristic(batch: int, heads_k: int, rows_per_kv_head: int, max_seqlen_k: int,
                         num_sms: int, ctas_per_sm: int = 2) -> int:
    """How many splits of the keys (split-KV) a decode call uses when num_splits=0 asks for one.

    s splits make s times decode_ctas() CTAs, each over max_seqlen_k / s keys, plus a combine
    pass; slots = ctas_per_sm x num_sms places (2 per SM at head dims up to 128, 1 above, from
    the kernel's shared memory). Two regimes, measured on the H200
    (benchmarks/results/h200/logs/sweep_splits.log):
      * fewer CTAs than half the slots (small batches): the call is latency-bound, and the best
        count fills the slots once: s = slots // ctas, down to one split per 64-key block
        (KEYS_PER_BLOCK), at most MAX_NUM_SPLITS = 128;
      * else bandwidth-bound, where what counts is how well the waves of equal CTAs fill the
        slots: the fewest splits whose wave_efficiency is within WAVE_EFFICIENCY_SHARE (85%) of
        the best over 1 .. the most allowed (every split keeps >= MIN_KEYS_PER_SPLIT = 256 keys,
        at most 128); 1 where even two splits would not keep 256 keys each.
    Non-decreasing in max_seqlen_k. Pure: from sizes alone (the caller passes the cache capacity
    as max_seqlen_k, since the lengths live on the device), so a CUDA graph replays the choice
    it captured."""
    ctas = decode_ctas(batch, heads_k, rows_per_kv_head)
    slots = max(1, ctas_per_sm * num_sms)
    if ctas <= 0:
        return 1
    if 2 * ctas <= slots:
        blocks = -(-max_seqlen_k // KEYS_PER_BLOCK)
        return max(1, min(MAX_NUM_SPLITS, slots // ctas, blocks))
    most = min(MAX_NUM_SPLITS, max_seqlen_k // MIN_KEYS_PER_SPLIT)
    if most < 2:
        return 1
    efficiency = [wave_efficiency(ctas * s, slots) for s in range(1, most + 1)]
    good = WAVE_EFFICIENCY_SHARE * max(efficiency)
    return next(s for s, e in enumerate(efficiency, 1) if e >= good)


# device index -> (SM count, shared memory per block with opt-in, per SM): one property query each
_device_limits: dict = {}


def _limits(device: torch.device) -> tuple:
    """(SM count, shared memory per block with opt-in, per SM; bytes, None where torch does not
    report them) of a CUDA device, cached per device index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_limits:
        props = torch.cuda.get_device_properties(index)
        _device_limits[index] = (props.multi_processor_count,
                                 getattr(props, "shared_memory_per_block_optin", None),
                                 getattr(props, "shared_memory_per_multiprocessor", None))
    return _device_limits[index]


def decode_smem_bytes(head_dim_bucket: int, rows_per_kv_head: int, stages: int) -> int:
    """Shared memory of one decode-kernel CTA, bytes (csrc/splitkv/decode_kernel.cuh's
    DecodeTraits, which this mirrors: a Q tile of 16 packed rows, or 64 above 16, and `stages`
    K and V buffers of 64 keys; rows of head_dim_bucket + 8 16-bit elements)."""
    block_m = 16 if rows_per_kv_head <= 16 else 64
    return (block_m + 2 * stages * 64) * (head_dim_bucket + 8) * 2


def decode_smem_fits(device: torch.device, head_dim: int, rows_per_kv_head: int) -> bool:
    """Whether the decode kernel's two-buffer configuration fits the GPU's shared memory per
    block (sm86/sm89: 99 KB, so not d > 160, nor d > 128 with more than 16 packed rows; A100:
    163 KB, so not d 256 with more than 16 rows); the launch code takes three buffers where they
    fit (csrc/splitkv/launch.cuh). True for what is not a CUDA device (the CPU tests' stand-ins)
    or reports no limit."""
    if device.type != "cuda":
        return True
    limit = _limits(device)[1]
    return limit is None or decode_smem_bytes(head_dim_bucket(head_dim), rows_per_kv_head,
                                              2) <= limit


def check_decode_smem(device: torch.device, head_dim: int, rows_per_kv_head: int) -> None:
    """NotImplementedError, before any compile, where the decode kernel does not fit the GPU's
    shared memory per block (decode_smem_fits)."""
    if not decode_smem_fits(device, head_dim, rows_per_kv_head):
        limit = _limits(device)[1]
        need = decode_smem_bytes(head_dim_bucket(head_dim), rows_per_kv_head, 2)
        raise NotImplementedError(
            f"flash_attn_with_kvcache: head dim {head_dim} with {rows_per_kv_head} query rows per "
            f"K/V head (seqlen_q x heads / heads_k) needs {need // 1024} KB of shared memory per "
            f"block in the decode kernel; this GPU allows {limit // 1024} KB. Fewer rows (16 or "
            "less) or a smaller head dim fit; a cache without cache_batch_idx or cache_leftpad "
            f"with seqlen_q >= {PREFILL_MIN_QUERIES} runs the forward kernel instead.")


def decode_ctas_per_sm(device: torch.device, head_dim: int, rows_per_kv_head: int) -> int:
    """Decode CTAs one SM holds at once (1 or 2; the kernel asks for 2 at d <= 128), from its
    shared memory: three K/V buffers where a block may take them, else two (launch.cuh). 2 where
    the device reports no sizes (or is not CUDA: the CPU tests' stand-ins)."""
    if device.type != "cuda":
        return 2
    _, per_block, per_sm = _limits(device)
    if per_block is None or per_sm is None:
        return 2
    bucket = head_dim_bucket(head_dim)
    three = bucket <= 128 and decode_smem_bytes(bucket, rows_per_kv_head, 3) <= per_block
    need = decode_smem_bytes(bucket, rows_per_kv_head, 3 if three else 2) + 1024  # + reserved
    return max(1, min(2 if bucket <= 128 else 1, per_sm // need))


def _by_forward(q: Tensor, k_cache: Tensor, block_table: Optional[Tensor],
                cache_batch_idx: Optional[Tensor], cache_leftpad: Optional[Tensor]) -> bool:
    """Whether a flash_attn_with_kvcache call is attended by the forward kernel (after the decode
    op's append) rather than the decode kernel: no cache_batch_idx or cache_leftpad, and from
    PREFILL_MIN_QUERIES queries on (contiguous), paged_prefill_min_queries() (paged), or from
    PREFILL_MIN_QUERIES on where the decode kernel's shared memory does not fit."""
    batch, seqlen_q, heads, d = q.shape
    if seqlen_q < PREFILL_MIN_QUERIES or cache_batch_idx is not None or cache_leftpad is not None:
        return False
    if block_table is None or seqlen_q >= paged_prefill_min_queries(q.device, d):
        return True
    return not decode_smem_fits(q.device, d, seqlen_q * (heads // k_cache.shape[2]))


def _decode_impl(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k_new: Optional[Tensor],
    v_new: Optional[Tensor],
    rotary_cos: Optional[Tensor],
    rotary_sin: Optional[Tensor],
    rotary_interleaved: bool,
    cache_seqlens: Optional[Tensor],
    cache_batch_idx: Optional[Tensor],
    cache_leftpad: Optional[Tensor],
    block_table: Optional[Tensor],
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor],
    sink: Optional[Tensor],
    num_splits: int,
) -> Tuple[Tensor, Tensor]:
    """Attention of q over a KV cache, appending k_new/v_new to the cache in place first (the
    decode kernel's contract: interface.flash_attn_with_kvcache documents every argument, which
    arrive validated). Returns (out like q, lse float32 (batch, heads, seqlen_q) in log2 units).

    Allocates the kernel's buffers (ops._empty: NaN-poisoned in tests): out, lse, q_rot (like q,
    contiguous: the rotated q, only with rotary_cos) and, with more than one split, the split-KV
    scratch o_partial float32 (num_splits, batch, heads, seqlen_q, d) and lse_partial float32
    (num_splits, batch, heads, seqlen_q); num_splits 0 picks the count (num_splits_heuristic,
    from the cache's capacity). The caches cannot be copied (they are written in place), so a
    data pointer that is not 16-byte aligned raises ValueError here."""
    q, k_new, v_new = _aligned(q), _aligned(k_new), _aligned(v_new)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.data_ptr() % 16 != 0:
            raise ValueError(f"{name}'s data pointer is not 16-byte aligned; it is written in "
                             "place, so flashjit cannot copy it: allocate it aligned")
    batch, seqlen_q, heads, d = q.shape
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty((batch, heads, seqlen_q), torch.float32, q.device)
    seqlen_new = 0 if k_new is None else k_new.shape[1]
    if batch == 0 or heads == 0 or (seqlen_q == 0 and seqlen_new == 0):
        return out, lse  # nothing to attend and nothing to append
    q_rot = _empty(q.shape, q.dtype, q.device) if rotary_cos is not None else None
    flags = variant_flags(causal, window_left, window_right, softcap, alibi_slopes, sink, 0.0)
    window_left, window_right = window_bounds(causal, window_left, window_right)
    capacity = (k_cache.shape[1] if block_table is None  # rows a sequence can hold
                else block_table.shape[1] * k_cache.shape[1])
    if _by_forward(q, k_cache, block_table, cache_batch_idx, cache_leftpad):
        # Chunked prefill, contiguous or paged cache: the decode op appends (and rotates) only (0
        # splits; through the block table when paged), then the forward kernel attends (its
        # paged spec reads K/V through the block table), the keys each sequence holds given as
        # seqused_k (its bottom-right causal alignment and windows follow the used length).
        no_splits = _empty((0, batch, heads, seqlen_q, d), torch.float32, q.device)
        _launch(_spec_op("decode", q, flags), q.device,
                q, k_cache, v_cache, out, lse, k_new, v_new, q_rot, rotary_cos, rotary_sin,
                rotary_interleaved, cache_seqlens, None, None, block_table, no_splits,
                no_splits[..., 0], softmax_scale, window_left, window_right, softcap,
                alibi_slopes, sink)
        used = None
        if cache_seqlens is not None or seqlen_new:
            filled = (cache_seqlens if cache_seqlens is not None
                      else torch.full((batch,), capacity, dtype=torch.int32, device=q.device))
            used = (filled + seqlen_new).to(torch.int32)
        _launch(_spec_op("fwd", q, flags, block_table is not None), q.device,
                q if q_rot is None else q_rot, k_cache, v_cache, out, lse, None, None, None, used,
                block_table, seqlen_q, capacity, softmax_scale, True, window_left, window_right,
                softcap, alibi_slopes, sink, None, 0.0)
        return out, lse
    heads_k = k_cache.shape[2]
    rows = seqlen_q * (heads // heads_k)  # packed query rows per K/V head
    check_decode_smem(q.device, d, rows)
    if num_splits == 0:
        num_splits = num_splits_heuristic(batch, heads_k, rows, capacity, _limits(q.device)[0],
                                          decode_ctas_per_sm(q.device, d, rows))
    o_partial = lse_partial = None
    if num_splits > 1:
        o_partial = _empty((num_splits, batch, heads, seqlen_q, d), torch.float32, q.device)
        lse_partial = _empty((num_splits, batch, heads, seqlen_q), torch.float32, q.device)
    _launch(_spec_op("decode", q, flags), q.device,
            q, k_cache, v_cache, out, lse, k_new, v_new, q_rot, rotary_cos, rotary_sin,
            rotary_interleaved, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
            o_partial, lse_partial, softmax_scale, window_left, window_right, softcap,
            alibi_slopes, sink)
    return out, lse


decode = torch.library.custom_op("flashjit::decode", _decode_impl,
                                 mutates_args=("k_cache", "v_cache"), device_types="cuda")


@decode.register_fake
def _decode_fake(q, k_cache, v_cache, k_new, v_new, rotary_cos, rotary_sin, rotary_interleaved,
                 cache_seqlens, cache_batch_idx, cache_leftpad, block_table, softmax_scale,
                 causal, window_left, window_right, softcap, alibi_slopes, sink, num_splits):
    batch, seqlen_q, heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    return out, q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


def call_decode(*args):
    """flashjit::decode, straight to its implementation when eager (see _eager)."""
    return (_decode_impl if _eager(args) else decode)(*args)
