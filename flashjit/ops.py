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

from .jit import JitSpec, current_arch, head_dim_bucket, load_spec
from .jit.env import tile_override

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}

# Rows of the backward's fp32 scratch buffers are padded per sequence to this multiple.
BWD_ROW_PAD = 128


def attention_spec(kernel: str, q: Tensor, causal: bool, dropout: bool, window: bool = False,
                   softcap: bool = False, alibi: bool = False, sink: bool = False) -> JitSpec:
    """The JIT spec that serves an attention call on q's device, dtype and head dim, with the
    variant flags given (variant_flags() derives them from an op's arguments). Its kernel
    family follows from these (spec.default_family: kernel, arch and head dim) and
    FLASHJIT_KERNEL_FAMILY, its tile from FLASHJIT_FWD_TILE / FLASHJIT_BWD_TILE (tuning sweeps);
    bad values of either raise ValueError naming them."""
    return JitSpec(
        kernel=kernel,
        arch=current_arch(q.device),
        dtype=_DTYPE_NAMES[q.dtype],
        head_dim=head_dim_bucket(q.shape[-1]),
        causal=causal,
        window=window,
        softcap=softcap,
        alibi=alibi,
        sink=sink,
        dropout=dropout,
        tile=tile_override(kernel),
    )


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


# (kernel, device index, dtype, head dim, causal, window, softcap, alibi, sink, dropout) -> the
# spec's op. Resolved once per process (environment overrides included: arch list,
# FLASHJIT_KERNEL_FAMILY), so a call costs one dict lookup, not a spec build. The key determines
# the spec: the arch follows from the device and the family from kernel, arch, head dim and the
# environment.
_resolved: dict = {}


def _spec_op(kernel: str, q: Tensor, flags: Tuple[bool, ...]):
    """The op of the spec serving `kernel` for q and the variant_flags() `flags`."""
    key = (kernel, q.device.index, q.dtype, q.shape[-1], *flags)
    op = _resolved.get(key)
    if op is None:
        causal, window, softcap, alibi, sink, dropout = flags
        spec = attention_spec(kernel, q, causal, dropout, window, softcap, alibi, sink)
        op = getattr(load_spec(spec), kernel).default
        _resolved[key] = op
    return op


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
    lse includes the sink."""
    varlen = cu_seqlens_q is not None
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty(_lse_shape(q, varlen), torch.float32, q.device)
    residual = _empty(q.shape if with_residual else (0,), q.dtype, q.device)
    flags = variant_flags(causal, window_left, window_right, softcap, alibi_slopes, sink,
                          dropout_p)
    window_left, window_right = window_bounds(causal, window_left, window_right)
    _launch(_spec_op("fwd", q, flags), q.device,
            q, k, v, out, lse, residual if with_residual else None, cu_seqlens_q, cu_seqlens_k,
            seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal_bottom_right,
            window_left, window_right, softcap, alibi_slopes, sink, rng_state, dropout_p)
    return out, lse, residual


fwd = torch.library.custom_op("flashjit::fwd", _fwd_impl, mutates_args=(), device_types="cuda")


@fwd.register_fake
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
              softmax_scale, causal, causal_bottom_right, window_left, window_right, softcap,
              alibi_slopes, sink, dropout_p, rng_state, with_residual):
    varlen = cu_seqlens_q is not None
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty(_lse_shape(q, varlen), dtype=torch.float32)
    residual = q.new_empty(q.shape if with_residual else (0,))
    return out, lse, residual


def _bwd_scratch(q: Tensor, varlen: bool, batch: int, max_seqlen_q: int, bucket: int):
    """fp32 scratch of the backward: dq_accum and dsum (D = rowsum(dO * O)), rows padded."""
    if varlen:
        rows = q.shape[0] + BWD_ROW_PAD * batch
        heads = q.shape[1]
        dq_accum = torch.empty((heads, rows, bucket), dtype=torch.float32, device=q.device)
        dsum = torch.empty((heads, rows), dtype=torch.float32, device=q.device)
    else:
        rows = -(-max_seqlen_q // BWD_ROW_PAD) * BWD_ROW_PAD
        b, _, heads, _ = q.shape
        dq_accum = torch.empty((b, heads, rows, bucket), dtype=torch.float32, device=q.device)
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
    bucket = head_dim_bucket(q.shape[-1])
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(_expanded_kv_shape(q, k, varlen), k.dtype, k.device)
    dv = _empty(_expanded_kv_shape(q, v, varlen), v.dtype, v.device)
    dq_accum, dsum = _bwd_scratch(q, varlen, batch, max_seqlen_q, bucket)
    flags = variant_flags(causal, window_left, window_right, softcap, alibi_slopes, sink,
                          dropout_p)
    window_left, window_right = window_bounds(causal, window_left, window_right)
    _launch(_spec_op("bwd", q, flags), q.device,
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


def _eager(*tensors) -> bool:
    """True for a plain eager call: no torch.compile/export tracing, no tensor subclass (fake,
    functional). Such calls skip the custom-op dispatcher and run the implementation directly:
    the dispatcher path costs nothing later, but its first call imports much of torch's
    tracing machinery (seconds in a fresh process)."""
    return not torch.compiler.is_compiling() and all(
        t is None or type(t) is torch.Tensor for t in tensors)


def call_fwd(*args):
    """flashjit::fwd, straight to its implementation when eager (see _eager)."""
    return (_fwd_impl if _eager(*_tensors(args)) else fwd)(*args)


def call_bwd(*args):
    """flashjit::bwd, straight to its implementation when eager (see _eager)."""
    return (_bwd_impl if _eager(*_tensors(args)) else bwd)(*args)


def _tensors(args) -> list:
    return [a for a in args if isinstance(a, Tensor)]
