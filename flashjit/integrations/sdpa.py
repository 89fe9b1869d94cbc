"""flashjit behind torch's SDPA flash backend: a provider for torch.nn.attention's registry.

    import flashjit                                   # registers the name "flashjit"
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl
    activate_flash_attention_impl("flashjit")         # calls register() below
    ...  # F.scaled_dot_product_attention's flash backend and varlen_attn now run flashjit
    restore_flash_attention_impl()                     # torch's own kernels again

register() overrides, for the CUDA dispatch key only, these aten ops where this torch has them
(schemas as in torch 2.11, 2.13 and 2.14; torch 2.11 has no
_flash_attention_forward_no_dropout_inplace; keyword arguments a torch's schema lacks are taken
as None; the fp8 ``.quantized`` overloads are left to torch):

  _scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
      return_debug_mask, *, scale) -> (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
      rng_state, unused, debug_attn_mask)
      query (batch, heads, seqlen_q, d), key/value (batch, heads_k, seqlen_k, d), heads a
      multiple of heads_k (GQA). output like query (query's strides, as empty_like(query));
      logsumexp float32 (batch, heads, seqlen_q), natural log; cum_seq_q/k undefined; max_q,
      max_k = seqlen_q, seqlen_k.
  _scaled_dot_product_flash_attention_backward(grad_out, query, key, value, out, logsumexp,
      cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset,
      *, scale) -> (grad_query, grad_key, grad_value), each like its input.
  _flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
      is_causal, return_debug_mask, *, scale, window_size_left, window_size_right, seqused_k,
      alibi_slopes, block_table, num_splits) -> (output, softmax_logsumexp, rng_state, unused,
      debug_attn_mask)
      dense: query (batch, seqlen_q, heads, d), key/value (batch, seqlen_k, heads_k, d), lse
      (batch, heads, seqlen_q); ragged (cum_seq_q/k int32 (batch + 1,)): query (total_q, heads,
      d), key/value (total_k, heads_k, d), lse (heads, total_q). max_q/max_k bound the
      sequence lengths.
  _flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
      max_q, max_k, dropout_p, is_causal, rng_state, unused, *, scale, window_size_left,
      window_size_right) -> (grad_query, grad_key, grad_value)
  _flash_attention_forward_no_dropout_inplace(out, ...): as _flash_attention_forward, the
      output written into `out` (one copy: flashjit's op allocates its own), returns the lse.

Conventions (sources: torch's meta registrations in torch/_meta_registrations.py for shapes,
dtypes and strides; torch/nn/attention/bias.py and sdp_utils for causal alignment; the
flash-attn 2.x kernels torch's flash backend is a port of, for windows):
  * is_causal of these ops is aligned bottom-right (query i sees key j iff
    j <= i + seqlen_k - seqlen_q, per sequence when ragged), as in torch's own flash kernels
    (bias.py calls _scaled_dot_product_flash_attention with is_causal=True to get
    causal_lower_right). F.scaled_dot_product_attention's is_causal is top-left; torch's SDPA
    dispatcher never sends it here with seqlen_q != seqlen_k
    (check_flash_causal_non_square_seqlens), so both agree on what reaches these ops.
  * window_size_left/right: None or a negative value = no bound; is_causal sets the right bound
    to 0 (flash-attn 2.x); bounds as flashjit's flash_attn_func (bottom-right offset).
  * scale: None = 1 / sqrt(d).
  * logsumexp: float32, natural log (flashjit's kernels keep it in log2 units: converted here
    both ways). A query row that sees no key gets output 0 and logsumexp -inf (torch's FA2 port
    writes +inf there).
  * Dropout: the forward draws flashjit's (seed, offset) pair from torch's CUDA generator
    (interface._rng_state: one randint on the device, reproducible under torch.manual_seed and
    safe under CUDA-graph capture) and returns it as rng_state, a (2,) uint64 CUDA tensor
    (the int64 pair's bits, as the meta registration's dtype); the backward reads it back from
    philox_seed/rng_state, so it replays the same mask. `unused` is an uninitialised () uint64
    tensor, as torch's. Without dropout rng_state is zeros. The mask is flashjit's (Philox in
    csrc/common/dropout.cuh), not torch's: flashjit.testing.next_dropout_mask predicts it.
  * return_debug_mask=True (torch's own tests only): flashjit never materialises the attention
    probabilities, so the call goes to torch's kernel (without dropout) or is refused (with
    dropout, see below). Otherwise debug_attn_mask is an empty tensor of query's dtype.
  * num_splits (a split-KV hint) is ignored: flashjit chooses its own schedule.
  * Backward: deterministic when torch.are_deterministic_algorithms_enabled(). D = rowsum(dO O)
    comes from the rounded output the op receives (no residual, as torch's kernels).

What flashjit does not serve goes to the kernel that was registered for CUDA before register()
(torch's own, captured with torch.library.get_kernel), unchanged: non-CUDA or fp32/fp64/fp8
inputs, head dims that are not a multiple of 8 or above 256, empty inputs, GPUs older than
sm80, dropout_p outside [0, 1), scale not in flashjit's range, malformed cum_seq, and (forward
only) return_debug_mask, seqused_k, alibi_slopes, block_table. A forward-only reason with
dropout_p > 0 is refused with RuntimeError instead: the backward cannot see it, would take
flashjit's path and replay another mask than torch's forward drew; likewise a backward-only
reason (grad_out or logsumexp unlike what the forward gave) with dropout. Where no original
kernel can be had (torch without torch.library.get_kernel) every such call is refused, as
torch's FA3/FA4 providers refuse, with the reason.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _validate, interface, ops

log = logging.getLogger(__name__)

_HALF_TYPES = (torch.float16, torch.bfloat16)
_ORIGINAL_NOTE = "torch's own kernel for CUDA"

# op name -> the kernel registered for CUDA before register() (torch's own), or None.
_original: dict = {}
# the handle of the current registration (register() replaces it)
_active: Optional["FlashjitSDPAHandle"] = None


class FlashjitSDPAHandle:
    """What register() returns (torch's FlashAttentionHandle protocol): remove() destroys the
    library holding the CUDA overrides, so torch's own kernels serve the ops again. Idempotent."""

    def __init__(self, library) -> None:
        self._library = library

    @property
    def active(self) -> bool:
        return self._library is not None

    def remove(self) -> None:
        global _active
        library, self._library = self._library, None
        if library is not None:
            destroy = getattr(library, "_destroy", None)
            if destroy is not None:
                destroy()  # deregisters now; dropping the last reference does it too, later
        if _active is self:
            _active = None


# ------------------------------------------------------------------------------------------------
# Decisions: why flashjit cannot serve a call (None: it can)
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _arch_reason(device: torch.device) -> Optional[str]:
    major, minor = _capability(device.index if device.index is not None
                               else torch.cuda.current_device())
    if (major, minor) < (8, 0):
        return f"compute capability {major}.{minor} (flashjit needs 8.0 or newer)"
    return None


def common_reason(query: Tensor, key: Tensor, value: Tensor, cum_seq_q: Optional[Tensor],
                  cum_seq_k: Optional[Tensor], dropout_p: float, scale: Optional[float],
                  sdpa_layout: bool = False) -> Optional[str]:
    """Why flashjit cannot serve attention on these inputs, from what the forward and the
    backward schemas both carry (so both decide alike). sdpa_layout: (batch, heads, seq, d)
    rather than (batch, seq, heads, d); ragged inputs are 3-D (total, heads, d)."""
    tensors = (("query", query), ("key", key), ("value", value))
    for name, t in tensors:
        if t.device.type != "cuda":
            return f"{name} is on {t.device}, not CUDA"
        if t.dtype not in _HALF_TYPES:
            return f"{name} is {t.dtype} (flashjit serves float16 and bfloat16)"
    if key.device != query.device or value.device != query.device:
        return "query, key, value are on different devices"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return "query, key, value have different dtypes"
    ragged = cum_seq_q is not None
    if ragged != (cum_seq_k is not None):
        return "cum_seq_q and cum_seq_k must both be given or both be None"
    rank = 3 if ragged else 4
    if any(t.dim() != rank for _, t in tensors):
        return f"{'ragged' if ragged else 'dense'} inputs must be {rank}-D"
    if key.shape != value.shape:
        return "key and value have different shapes"
    d = query.shape[-1]
    if key.shape[-1] != d:
        return "query and key have different head dims"
    if d % 8 != 0 or not 8 <= d <= _validate.MAX_HEAD_DIM:
        return f"head dim {d} (flashjit serves multiples of 8 up to {_validate.MAX_HEAD_DIM})"
    if query.numel() == 0 or key.numel() == 0:
        return "empty input"
    head_dim = 1 if (ragged or sdpa_layout) else 2
    heads, heads_k = query.shape[head_dim], key.shape[head_dim]
    if heads % heads_k != 0:
        return f"query heads ({heads}) not a multiple of key heads ({heads_k})"
    if not ragged and key.shape[0] != query.shape[0]:
        return "query and key have different batch sizes"
    if ragged:
        for name, cu in (("cum_seq_q", cum_seq_q), ("cum_seq_k", cum_seq_k)):
            if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
                return f"{name} must be a 1-D int32 tensor of batch + 1 >= 2 offsets"
            if cu.device != query.device:
                return f"{name} is not on query's device"
        if cum_seq_q.numel() != cum_seq_k.numel():
            return "cum_seq_q and cum_seq_k have different lengths"
    if not 0.0 <= dropout_p < 1.0:
        return f"dropout_p {dropout_p} outside [0, 1)"
    if _validate.dropout_resolution_reason(dropout_p) is not None:
        return (f"dropout_p {dropout_p} is outside flashjit's dropout resolution (1/256: it "
                "takes effect above 1/512 and below 1 - 1/512)")
    if scale is not None and not (
            math.isfinite(scale) and _validate.SCALE_MIN <= scale <= _validate.SCALE_MAX):
        return (f"scale {scale} outside flashjit's [{_validate.SCALE_MIN:g}, "
                f"{_validate.SCALE_MAX:g}]")
    return _arch_reason(query.device)


def forward_only_reason(return_debug_mask: bool, seqused_k=None, alibi_slopes=None,
                        block_table=None) -> Optional[str]:
    """Why flashjit cannot serve a forward, from arguments the backward schema lacks."""
    if return_debug_mask:
        return "return_debug_mask=True (flashjit never materialises the attention probabilities)"
    if seqused_k is not None:
        return "seqused_k is not served through this op"
    if alibi_slopes is not None:
        return "alibi_slopes is not served through this op (its backward has no alibi_slopes)"
    if block_table is not None:
        return "block_table (paged KV) is not implemented in flashjit"
    return None


def backward_only_reason(grad_out: Tensor, query: Tensor, out: Tensor, logsumexp: Tensor,
                         lse_shape: Tuple[int, ...], dropout_p: float,
                         rng_state: Tensor) -> Optional[str]:
    """Why flashjit cannot serve a backward, from arguments the forward schema lacks."""
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != query.shape or t.dtype != query.dtype or t.device != query.device:
            return f"{name} is not shaped like query, of its dtype and device"
    if logsumexp.dtype != torch.float32 or tuple(logsumexp.shape) != tuple(lse_shape):
        return f"logsumexp must be float32 of shape {tuple(lse_shape)}"
    if logsumexp.device != query.device:
        return "logsumexp is not on query's device"
    if dropout_p > 0.0 and (rng_state.numel() != 2 or rng_state.element_size() != 8
                            or rng_state.device != query.device):
        return "rng_state is not a (2,) 8-byte tensor on query's device (flashjit's)"
    return None


def _lse_shape(query: Tensor, ragged: bool, sdpa_layout: bool) -> Tuple[int, ...]:
    if ragged:
        return (query.shape[1], query.shape[0])
    if sdpa_layout:
        return tuple(query.shape[:3])
    return (query.shape[0], query.shape[2], query.shape[1])


def _serve_or_fallback(op: str, keyset, reason: Optional[str], dropout_p: float,
                       side_reason: Optional[str], args, kwargs):
    """None where flashjit serves the call, else the original kernel's result (or a raise).
    reason: from common_reason (forward and backward see it alike); side_reason: one only this
    side sees, which may not go to torch's kernel with dropout (the other side would not)."""
    if reason is None and side_reason is None:
        return None
    why = reason if reason is not None else side_reason
    if reason is None and dropout_p > 0.0:
        raise RuntimeError(
            f"flashjit {op}: cannot serve this call ({why}) and, with dropout_p > 0, cannot hand "
            "it to torch's kernel either (the other pass would replay a different dropout "
            "mask). Call torch.nn.attention.restore_flash_attention_impl() to use torch's own "
            "flash kernels.")
    kernel = _original.get(op)
    if kernel is None:
        raise RuntimeError(f"flashjit {op} unsupported: {why} (and no original CUDA kernel to "
                           "hand it to)")
    log.debug("flashjit %s: %s; using %s", op, why, _ORIGINAL_NOTE)
    names = _schema_arguments(op)  # only what this torch's schema has (2.11 lacks some)
    kwargs = {name: value for name, value in kwargs.items() if name in names}
    return (kernel.call_boxed(keyset, *args, **kwargs),)


# ------------------------------------------------------------------------------------------------
# Runs: (batch, seq, heads, d) or ragged (total, heads, d) tensors, flashjit's ops
# ------------------------------------------------------------------------------------------------
def _window(value) -> int:
    return -1 if value is None or value < 0 else int(value)


def _resolve(q: Tensor, max_q: int, max_k: int, is_causal: bool, scale: Optional[float],
             window_left, window_right):
    """(softmax_scale, causal, left, right) for the kernels."""
    softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    causal, left, right = _validate.resolve_window((_window(window_left), _window(window_right)),
                                                   bool(is_causal), max_q, max_k)
    return softmax_scale, causal, left, right


def run_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor],
                max_q: int, max_k: int, dropout_p: float, is_causal: bool,
                scale: Optional[float], window_left=None,
                window_right=None) -> Tuple[Tensor, Tensor, Tensor]:
    """(out like q's shape, contiguous; lse float32 natural log, (batch, heads, seqlen_q) or
    ragged (heads, total_q); rng_state (2,) uint64) for flashjit-servable inputs."""
    softmax_scale, causal, left, right = _resolve(q, max_q, max_k, is_causal, scale,
                                                  window_left, window_right)
    d = q.shape[-1]
    q, k, v = (interface._kernel_layout(t, d) for t in (q, k, v))
    rng = interface._rng_state(q.device) if dropout_p > 0.0 else None
    out, lse_log2, _ = ops.call_fwd(q, k, v, cu_q, cu_k, None, None, max_q, max_k, softmax_scale,
                                    causal, True, left, right, 0.0, None, None, float(dropout_p),
                                    rng, False)
    if rng is None:
        rng = torch.zeros(2, dtype=torch.int64, device=q.device)
    return out, lse_log2 * interface._LN2, rng.view(torch.uint64)


def run_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 cu_q: Optional[Tensor], cu_k: Optional[Tensor], max_q: int, max_k: int,
                 dropout_p: float, is_causal: bool, rng_state: Tensor, scale: Optional[float],
                 window_left=None, window_right=None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) shaped like (q, k, v); lse natural log as run_forward returns it; rng_state
    the forward's (read only with dropout)."""
    softmax_scale, causal, left, right = _resolve(q, max_q, max_k, is_causal, scale,
                                                  window_left, window_right)
    d = q.shape[-1]
    dout, q, k, v, out = (interface._kernel_layout(t, d) for t in (dout, q, k, v, out))
    lse_log2 = (lse / interface._LN2).contiguous()
    rng = rng_state.view(torch.int64) if dropout_p > 0.0 else None
    dq, dk, dv, _ = ops.call_bwd(dout, q, k, v, out, None, lse_log2, cu_q, cu_k, None, max_q,
                                 max_k, softmax_scale, causal, True, left, right, 0.0, None,
                                 None, float(dropout_p), rng,
                                 torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv


def _like(ref: Tensor, t: Tensor) -> Tensor:
    """t with the strides torch's meta registration gives (empty_like(ref)); a copy only where
    they differ (torch.compile checks the strides of an extern kernel's outputs)."""
    target = torch.empty_like(ref)
    if target.stride() == t.stride():
        return t
    return target.copy_(t)


def _uint64_scalar(device: torch.device) -> Tensor:
    return torch.empty((), dtype=torch.uint64, device=device)


def _no_debug_mask(query: Tensor) -> Tensor:
    return torch.empty(0, dtype=query.dtype, device=query.device)


# ------------------------------------------------------------------------------------------------
# The aten op implementations (keyset first: registered with_keyset=True, for the fallback)
# ------------------------------------------------------------------------------------------------
def sdpa_flash_forward(keyset, query, key, value, dropout_p=0.0, is_causal=False,
                       return_debug_mask=False, *, scale=None):
    """aten::_scaled_dot_product_flash_attention for CUDA."""
    args, kwargs = (query, key, value, dropout_p, is_causal, return_debug_mask), {"scale": scale}
    fallback = _serve_or_fallback(
        "_scaled_dot_product_flash_attention", keyset,
        common_reason(query, key, value, None, None, dropout_p, scale, sdpa_layout=True),
        dropout_p, forward_only_reason(return_debug_mask), args, kwargs)
    if fallback is not None:
        return fallback[0]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    max_q, max_k = query.shape[2], key.shape[2]
    out, lse, rng = run_forward(q, k, v, None, None, max_q, max_k, dropout_p, is_causal, scale)
    return (_like(query, out.transpose(1, 2)), lse, None, None, max_q, max_k, rng,
            _uint64_scalar(query.device), _no_debug_mask(query))


def sdpa_flash_backward(keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q,
                        cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed,
                        philox_offset, *, scale=None):
    """aten::_scaled_dot_product_flash_attention_backward for CUDA. cum_seq_q/k (undefined in
    the dense SDPA path) and max_q/max_k are taken from the tensors, as the forward set them."""
    args = (grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
            dropout_p, is_causal, philox_seed, philox_offset)
    fallback = _serve_or_fallback(
        "_scaled_dot_product_flash_attention_backward", keyset,
        common_reason(query, key, value, None, None, dropout_p, scale, sdpa_layout=True),
        dropout_p,
        backward_only_reason(grad_out, query, out, logsumexp, _lse_shape(query, False, True),
                             dropout_p, philox_seed),
        args, {"scale": scale})
    if fallback is not None:
        return fallback[0]
    do, q, k, v, o = (t.transpose(1, 2) for t in (grad_out, query, key, value, out))
    dq, dk, dv = run_backward(do, q, k, v, o, logsumexp, None, None, query.shape[2],
                              key.shape[2], dropout_p, is_causal, philox_seed, scale)
    return tuple(_like(ref, g.transpose(1, 2)) for ref, g in ((query, dq), (key, dk), (value, dv)))


def _sizes(query: Tensor, key: Tensor, ragged: bool, max_q: int, max_k: int) -> Tuple[int, int]:
    """(max_q, max_k) for the kernels: the dense sequence lengths, or the ragged bounds given."""
    return (int(max_q), int(max_k)) if ragged else (query.shape[1], key.shape[1])


def flash_attention_forward(keyset, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                            dropout_p, is_causal, return_debug_mask, *, scale=None,
                            window_size_left=None, window_size_right=None, seqused_k=None,
                            alibi_slopes=None, block_table=None, num_splits=None):
    """aten::_flash_attention_forward for CUDA, dense or ragged (cum_seq_q/k)."""
    args = (query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
            return_debug_mask)
    kwargs = dict(scale=scale, window_size_left=window_size_left,
                  window_size_right=window_size_right, seqused_k=seqused_k,
                  alibi_slopes=alibi_slopes, block_table=block_table, num_splits=num_splits)
    fallback = _serve_or_fallback(
        "_flash_attention_forward", keyset,
        common_reason(query, key, value, cum_seq_q, cum_seq_k, dropout_p, scale), dropout_p,
        forward_only_reason(return_debug_mask, seqused_k, alibi_slopes, block_table),
        args, kwargs)
    if fallback is not None:
        return fallback[0]
    ragged = cum_seq_q is not None
    mq, mk = _sizes(query, key, ragged, max_q, max_k)
    out, lse, rng = run_forward(query, key, value, cum_seq_q, cum_seq_k, mq, mk, dropout_p,
                                is_causal, scale, window_size_left, window_size_right)
    return (_like(query, out), lse, rng, _uint64_scalar(query.device), _no_debug_mask(query))


def flash_attention_forward_no_dropout_inplace(keyset, out, query, key, value, cum_seq_q,
                                               cum_seq_k, max_q, max_k, dropout_p, is_causal,
                                               return_debug_mask, *, scale=None,
                                               window_size_left=None, window_size_right=None,
                                               seqused_k=None, alibi_slopes=None,
                                               block_table=None, num_splits=None):
    """aten::_flash_attention_forward_no_dropout_inplace for CUDA: the output is copied into
    `out`; returns the lse. dropout_p != 0 goes to torch's kernel (the op has no rng output)."""
    args = (out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
            return_debug_mask)
    kwargs = dict(scale=scale, window_size_left=window_size_left,
                  window_size_right=window_size_right, seqused_k=seqused_k,
                  alibi_slopes=alibi_slopes, block_table=block_table, num_splits=num_splits)
    reason = common_reason(query, key, value, cum_seq_q, cum_seq_k, dropout_p, scale)
    if reason is None and dropout_p != 0.0:
        reason = "dropout_p != 0 in the no-dropout op"
    if reason is None and (out.shape != query.shape or out.dtype != query.dtype
                           or out.device != query.device):
        reason = "out is not shaped like query, of its dtype and device"
    # No backward replays this op's randomness: every reason may go to torch's kernel.
    fallback = _serve_or_fallback(
        "_flash_attention_forward_no_dropout_inplace", keyset,
        reason or forward_only_reason(return_debug_mask, seqused_k, alibi_slopes, block_table),
        0.0, None, args, kwargs)
    if fallback is not None:
        return fallback[0]
    ragged = cum_seq_q is not None
    mq, mk = _sizes(query, key, ragged, max_q, max_k)
    result, lse, _ = run_forward(query, key, value, cum_seq_q, cum_seq_k, mq, mk, 0.0,
                                 is_causal, scale, window_size_left, window_size_right)
    out.copy_(result)
    return lse


def flash_attention_backward(keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q,
                             cum_seq_k, max_q, max_k, dropout_p, is_causal, rng_state, unused,
                             *, scale=None, window_size_left=None, window_size_right=None):
    """aten::_flash_attention_backward for CUDA, dense or ragged. cum_seq_q/k: undefined
    (None) for dense inputs, as _flash_attention_forward's dense form leaves them."""
    args = (grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
            dropout_p, is_causal, rng_state, unused)
    kwargs = dict(scale=scale, window_size_left=window_size_left,
                  window_size_right=window_size_right)
    ragged = cum_seq_q is not None
    fallback = _serve_or_fallback(
        "_flash_attention_backward", keyset,
        common_reason(query, key, value, cum_seq_q, cum_seq_k, dropout_p, scale), dropout_p,
        backward_only_reason(grad_out, query, out, logsumexp, _lse_shape(query, ragged, False),
                             dropout_p, rng_state),
        args, kwargs)
    if fallback is not None:
        return fallback[0]
    mq, mk = _sizes(query, key, ragged, max_q, max_k)
    dq, dk, dv = run_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
                              mq, mk, dropout_p, is_causal, rng_state, scale, window_size_left,
                              window_size_right)
    return _like(query, dq), _like(key, dk), _like(value, dv)


# op name -> implementation; all take the dispatch keyset first
OVERRIDES = {
    "_scaled_dot_product_flash_attention": sdpa_flash_forward,
    "_scaled_dot_product_flash_attention_backward": sdpa_flash_backward,
    "_flash_attention_forward": flash_attention_forward,
    "_flash_attention_forward_no_dropout_inplace": flash_attention_forward_no_dropout_inplace,
    "_flash_attention_backward": flash_attention_backward,
}


def _op_exists(name: str) -> bool:
    """Whether this torch defines aten::name."""
    try:
        getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.lru_cache(maxsize=None)
def _schema_arguments(name: str) -> frozenset:
    """The argument names of aten::name's default overload in this torch."""
    return frozenset(a.name for a in getattr(torch.ops.aten, name).default._schema.arguments)


def available_overrides() -> dict:
    """OVERRIDES restricted to the ops this torch defines."""
    return {name: impl for name, impl in OVERRIDES.items() if _op_exists(name)}


def _current_cuda_kernel(name: str):
    """The kernel registered for CUDA for aten::name now, or None (CPU-only torch, or a torch
    without torch.library.get_kernel)."""
    get_kernel = getattr(torch.library, "get_kernel", None)
    qualified = f"aten::{name}"
    if get_kernel is None or not torch._C._dispatch_has_kernel_for_dispatch_key(qualified,
                                                                                   "CUDA"):
        return None
    try:
        return get_kernel(qualified, "CUDA")
    except RuntimeError:
        return None


def register() -> FlashjitSDPAHandle:
    """Overrides the aten flash ops (OVERRIDES, those this torch defines) for the CUDA dispatch
    key with flashjit's and returns the handle whose remove() restores them. The kernels
    registered before (torch's own: activate_flash_attention_impl restores any other provider
    first) are kept for the calls flashjit does not serve. While a registration is active,
    register() returns its handle again (so torch's registry, holding that handle, can always
    undo it). Nothing compiles here: a spec compiles on the first call that needs it."""
    if _active is not None and _active.active:
        return _active  # one registration, one handle: whoever holds it can remove it
    overrides = available_overrides()
    originals = {name: _current_cuda_kernel(name) for name in overrides}
    library = torch.library.Library("aten", "IMPL", "CUDA")
    try:
        for name, impl in overrides.items():
            library.impl(name, impl, "CUDA", with_keyset=True)
    except Exception:
        FlashjitSDPAHandle(library).remove()
        raise
    _original.clear()
    _original.update(originals)
    return _set_active(FlashjitSDPAHandle(library))


def _set_active(handle: FlashjitSDPAHandle) -> FlashjitSDPAHandle:
    global _active
    _active = handle
    return handle
