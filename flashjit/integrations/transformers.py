"""flashjit as an attention implementation of Hugging Face transformers (5.x).

    import torch
    from transformers import AutoModelForCausalLM
    from flashjit.integrations import transformers as flashjit_hf

    name = flashjit_hf.register()                      # "fjit"; idempotent
    model = AutoModelForCausalLM.from_pretrained(repo, dtype=torch.bfloat16, attn_implementation=name)

Nothing happens at import: ``register()`` (explicit, so that importing this module has no effect
on transformers' global tables) adds two entries under NAME: ``attention_forward`` to
transformers.AttentionInterface and ``attention_mask`` to transformers.AttentionMaskInterface.
``import flashjit`` never imports this module or transformers.

Why the name is "fjit" and not "flashjit": transformers 5.x (read: 5.17, modeling_utils.
_check_and_adjust_attn_implementation and utils.generic.is_flash_attention_requested) treats every
attn_implementation whose name contains "flash" as one of its own flash-attn packages or a Hub
kernel: it then tries to import or download it and fails at model construction ("Could not find the
currently requested flash attention implementation at `flashjit`"), and models with
``_compatible_flash_implementations`` (gpt-oss) silently swap it for a Hub kernel. register()
refuses such names.

What the model gets (conventions of transformers' eager attention, which the tests compare
against, and of flash-attn 2.x, which flashjit follows):
  * Layout: transformers passes query (batch, heads, seqlen_q, d), key/value (batch, heads_k,
    seqlen_k, d) with heads % heads_k == 0 (GQA/MQA: given to flashjit as is, never repeated; key
    head j serves query heads j * heads / heads_k ..., as transformers' repeat_kv). Returns
    (out (batch, seqlen_q, heads, d_v), None): no attention weights.
  * Causal: ``is_causal`` if the model passes it, else ``module.is_causal`` (default True). flashjit's
    causal mask is aligned bottom-right (query i sees key j iff j <= i + seqlen_k - seqlen_q): the
    queries are the last seqlen_q of the keys, which is what a KV cache gives (decoding: seqlen_q = 1
    sees every cached key).
  * Sliding window w (``sliding_window``: Mistral, Qwen2, Gemma 2/3, gpt-oss): transformers' masks
    let query i see key j iff i - w < j <= i (masking_utils.sliding_window_overlay), w keys counting
    itself; its caches keep the last w - 1 keys (cache_utils.DynamicSlidingWindowLayer). That is
    flashjit's window_size (w - 1, 0) with causal. Without causal (Gemma 3's bidirectional option,
    |i - j| < w) it is (w - 1, w - 1), as transformers' flash-attention path.
  * softcap (Gemma 2's attn_logit_softcapping): z = scaling * q.k, then softcap * tanh(z / softcap),
    as eager and flashjit. scaling: the module's (default 1 / sqrt(d)).
  * Sinks (gpt-oss ``s_aux``, a learnable logit per query head joining each row's softmax
    denominator): flashjit's ``sink`` wants float32 (heads,); the parameter (often bf16) is cast
    with .float(), so autograd returns its gradient in the parameter's dtype.
  * Dropout: the model passes ``dropout`` (its attention_dropout while training, 0 in eval).
  * deterministic: the ``deterministic`` keyword if given, else
    torch.are_deterministic_algorithms_enabled().

Masks, padding and packing (never a dense (batch, heads, seqlen_q, seqlen_k) mask):
  * attention_mask() (the mask function) returns transformers' 2-D boolean padding mask (batch,
    seqlen_k), True = a real token, sliced to the keys' positions, or None when it pads nothing;
    causal and window structure come from the attention call itself, as in transformers' own
    flash-attention path. Mask overlays a model may add (or_mask_function/and_mask_function, e.g.
    bidirectional attention among image tokens) cannot be expressed and are not applied, also as in
    that path.
  * With a padding mask the real tokens are gathered ("unpadded") into flashjit.
    flash_attn_varlen_func with int32 cu_seqlens, and the output scattered back; padded query rows
    get 0. Since the queries are the last seqlen_q key positions, the real queries of a sequence are
    its last real keys, so bottom-right causal alignment per sequence is exact for any padding
    pattern. A sliding window counts real tokens: equal to transformers' masks for left or right
    padding (padding only at the ends, as generation and collators make it).
  * A mask shorter than the keys (a static cache's unused slots) drops the keys past it; longer,
    its last seqlen_k columns are used.
  * Packed sequences: exactly where transformers' own masks pack (position_ids given, no
    attention_mask, no cache; a sequence starts wherever a position is not the previous one plus
    1: masking_utils.find_packed_sequence_indices), attention_mask() reads that decision back from
    transformers' mask function and hands the attention function the rows' sequence ids (int32
    (batch, seqlen)); they become cu_seqlens of one varlen call over the rows laid end to end.
    With a cache (use_cache=True, also eval's default) or any attention_mask, transformers does
    not pack, and neither does flashjit.
  * Without either: precomputed ``cu_seq_lens_q/k`` and ``max_length_q/k`` (transformers'
    FlashAttentionKwargs, e.g. from DataCollatorWithFlattening) are used as given; otherwise
    flash_attn_func.
  * The unpadding indices and the packed cu_seqlens are memoised per mask / ids tensor (while it
    lives and is unmodified), so a forward pass pays their host synchronisations once, not once
    per layer.

Refused (a clear error instead of a silent slow fallback that would materialise the score matrix;
the message suggests attn_implementation="sdpa"): dtypes other than fp16/bf16 (a float32 query
under torch.autocast is cast to the autocast dtype, as autocast would), head dims above 256, a
4-D or other non-2-D attention_mask (a custom mask), and position_bias (T5-style biases). Head dims
that are not a multiple of 8 are served (flashjit pads them); value head dims unlike the query's
(MLA) are zero-padded to the larger and the output cropped.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _validate
from .. import interface as kernels  # the entry points called; the CPU tests replace them

NAME = "fjit"
# q/k/v dtypes flashjit's kernels take, and the largest head dim (flashjit._validate)
KERNEL_DTYPES = _validate.SUPPORTED_DTYPES
MAX_HEAD_DIM = _validate.MAX_HEAD_DIM
DEVICE_TYPES = ("cuda",)  # where the kernels run (the CPU tests add "cpu" for their stand-ins)
MIN_TRANSFORMERS = (5, 0)

_SDPA_HINT = 'load the model with attn_implementation="sdpa" (or "eager") instead'


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def register(name: str = NAME) -> str:
    """Registers flashjit with transformers under `name` and returns it, for
    ``from_pretrained(..., attn_implementation=name)`` / ``from_config(...)`` /
    ``model.set_attn_implementation(name)``. Idempotent: registering again replaces the same two
    entries. Call it before creating the model (transformers checks the name then).

    Errors: ImportError if transformers is missing or older than 5.0 (the API read and tested is
    5.17's); ValueError for a name that is not an identifier, contains "flash" (transformers would
    try to load a flash-attn package or Hub kernel by that name, see the module docstring) or is
    one of transformers' own implementations ("sdpa", "eager", ...: they would be replaced)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a Python identifier such as {NAME!r}, got {name!r} "
                         "(transformers reads names with '/' or '|' as Hub kernels or paged "
                         "variants)")
    if "flash" in name.lower():
        raise ValueError(f"name {name!r} contains 'flash': transformers treats such "
                         "attn_implementation names as flash-attn packages or Hub kernels and "
                         "fails to load them; choose another name (default: " + repr(NAME) + ")")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("flashjit.integrations.transformers needs transformers >= 5.0: "
                          "pip install 'flashjit[transformers]'") from e
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TRANSFORMERS:
        raise ImportError(f"flashjit.integrations.transformers needs transformers >= 5.0, found "
                          f"{transformers.__version__}")
    taken = {n for n, f in transformers.AttentionInterface._global_mapping.items()
             if f is not attention_forward}
    taken |= {n for n, f in transformers.AttentionMaskInterface._global_mapping.items()
              if f is not attention_mask}
    if name in taken | {"eager"}:
        raise ValueError(f"name {name!r} is one of transformers' own attention implementations: "
                         "registering flashjit under it would replace it for every model in the "
                         f"process; choose another name (default: {NAME!r})")
    transformers.AttentionInterface.register(name, attention_forward)
    transformers.AttentionMaskInterface.register(name, attention_mask)
    return name


# ------------------------------------------------------------------------------------------------
# The mask function (transformers.AttentionMaskInterface)
# ------------------------------------------------------------------------------------------------
def attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function=None, attention_mask: Optional[Tensor] = None,
                   **kwargs) -> Optional[Tensor]:
    """What the attention function needs of a mask, cheaply: None; the 2-D boolean padding mask
    (batch, <= kv_length), True = a real token, covering the keys' positions; or, for packed
    sequences, their int32 ids (batch, q_length) (0, 0, 1, 1, 1, 2, ... per row).

    Called by transformers' create_causal_mask / create_sliding_window_causal_mask /
    create_bidirectional_mask with their keywords (masking_utils.py): attention_mask is the
    user's 2-D mask over every position so far (batch, past + q_length), already boolean, or None.
    The keys are its last kv_length positions (a sliding-window cache keeps only the last ones);
    with a static cache the mask is shorter than kv_length and is returned whole (the attention
    function then drops the keys past it). None when it covers exactly the keys and pads nothing
    (then the dense kernel serves; the check reads one value on the host, skipped under
    torch.compile). Without attention_mask, packing is transformers' own decision, read back from
    mask_function (_packed_sequence_ids); other structure in mask_function (causal, window) comes
    from the attention call, and overlays are not applied."""
    if attention_mask is None:
        return _packed_sequence_ids(batch_size, q_length, kv_length, q_offset, kv_offset,
                                    mask_function, kwargs.get("device"))
    if attention_mask.dim() != 2:
        return attention_mask  # refused by attention_forward
    mask = attention_mask[:, -kv_length:].bool()
    if (not torch.compiler.is_compiling() and mask.shape[1] == kv_length
            and bool(mask.all())):
        return None
    return mask


def _packed_sequence_ids(batch: int, q_length: int, kv_length: int, q_offset, kv_offset,
                         mask_function, device) -> Optional[Tensor]:
    """transformers packs rows (masking_utils._preprocess_mask_arguments) only with position_ids,
    no attention_mask and no cache, and then ands packed_sequence_mask_function into
    mask_function: key q - 1 is hidden from query q exactly where q starts a sequence (a causal or
    sliding-window function alone shows key q - 1 to q for any window of 2 keys or more; a window
    of 1 key or chunked attention hide it at their own boundaries, where splitting the rows into
    sequences computes the same attention). So the packing flashjit applies is the one transformers'
    own eager and sdpa masks apply, by construction. Evaluated on (batch, q_length - 1) index
    pairs with broadcasting, as transformers' non-vmap mask path does; a mask function that
    cannot be (a custom overlay written for vmap) is read as no packing, as overlays are not
    applied. int32 (batch, q_length) ids, or None where every row is one sequence (one host
    read, skipped under torch.compile: then the ids always go to the varlen path)."""
    if (mask_function is None or q_length < 2 or q_length != kv_length
            or not isinstance(q_offset, int) or not isinstance(kv_offset, int)
            or q_offset != 0 or kv_offset != 0):
        return None
    rows = torch.arange(batch, device=device)[:, None]
    query = torch.arange(1, q_length, device=device)[None, :]
    try:
        visible = mask_function(rows, torch.zeros_like(rows), query, query - 1)
        visible = torch.as_tensor(visible, device=device).expand(batch, q_length - 1)
    except Exception:  # noqa: BLE001 - written for vmap only: see the docstring
        return None
    starts = torch.ones(batch, q_length, dtype=torch.int32, device=device)
    starts[:, 1:] = (~visible.bool()).to(torch.int32)
    ids = torch.cumsum(starts, 1, dtype=torch.int32) - 1
    if not torch.compiler.is_compiling() and not bool(ids[:, -1].any()):
        return None
    return ids


# ------------------------------------------------------------------------------------------------
# Per-tensor memo: a forward pass hands every layer the same mask objects
# ------------------------------------------------------------------------------------------------
class _TensorMemo:
    """Values computed from a tensor, reused while that tensor object lives with the same
    version counter (no in-place change since). Holds a few entries (a model may alternate two
    masks: full and sliding layers). Bypassed under torch.compile and for inference-mode tensors
    (no version counter)."""

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: OrderedDict = OrderedDict()

    def get(self, t: Tensor, extra, compute):
        if torch.compiler.is_compiling():
            return compute()
        try:
            version = t._version
        except RuntimeError:  # an inference tensor: no version counter, so no memo
            return compute()
        key = (id(t), version, extra)
        entry = self.entries.get(key)
        if entry is not None and entry[0]() is t:
            self.entries.move_to_end(key)
            return entry[1]
        value = compute()
        self.entries[key] = (weakref.ref(t), value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


_unpad_memo = _TensorMemo()
_packing_memo = _TensorMemo()


def _offsets(counts: Tensor) -> Tensor:
    """int32 cu_seqlens [0, c0, c0 + c1, ...] of per-sequence counts."""
    return F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0))


def _unpad_data(mask: Tensor, q_length: int):
    """For a boolean padding mask (batch, seqlen_k) of keys whose last q_length positions are the
    queries: ((query batch idx, query pos idx), (key batch idx, key pos idx), cu_seqlens_q,
    cu_seqlens_k, max_seqlen_q, max_seqlen_k). Host reads: the nonzero() sizes and one list of the
    two maxima."""
    def compute():
        mask_q = mask[:, -q_length:]
        counts_k = mask.sum(1, dtype=torch.int32)
        counts_q = counts_k if q_length == mask.shape[1] else mask_q.sum(1, dtype=torch.int32)
        idx_k = torch.nonzero(mask, as_tuple=True)
        idx_q = idx_k if q_length == mask.shape[1] else torch.nonzero(mask_q, as_tuple=True)
        max_q, max_k = torch.stack((counts_q.max(), counts_k.max())).tolist()
        return idx_q, idx_k, _offsets(counts_q), _offsets(counts_k), max_q, max_k
    return _unpad_memo.get(mask, q_length, compute)


def _packed_sequences(ids: Tensor):
    """(cu_seqlens int32, max_seqlen) of packed sequence ids (batch, seqlen) (attention_mask()),
    the rows laid end to end: a sequence starts at every row start and wherever the id changes.
    One host read (the longest sequence)."""
    def compute():
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        first = torch.nonzero(starts.reshape(-1)).reshape(-1)
        end = torch.full((1,), ids.numel(), dtype=first.dtype, device=first.device)
        cu = torch.cat((first, end)).to(torch.int32)
        return cu, int(cu.diff().max())
    return _packing_memo.get(ids, None, compute)


# ------------------------------------------------------------------------------------------------
# The attention function (transformers.AttentionInterface)
# ------------------------------------------------------------------------------------------------
def _window(sliding_window, causal: bool) -> Tuple[int, int]:
    """flashjit's window_size for transformers' sliding_window w (None or <= 0: no window): w keys
    counting the query itself, (w - 1, 0) causal, (w - 1, w - 1) not (see module docstring)."""
    if sliding_window is None or sliding_window <= 0:
        return (-1, -1)
    w = int(sliding_window)
    return (w - 1, 0) if causal else (w - 1, w - 1)


def _kernel_dtype(query: Tensor) -> torch.dtype:
    """The dtype the call runs in: query's if flashjit serves it; under torch.autocast a float32
    query is cast to the autocast dtype (as autocast does for a matmul); otherwise TypeError."""
    if query.dtype in KERNEL_DTYPES:
        return query.dtype
    device = query.device.type
    if query.dtype == torch.float32 and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype in KERNEL_DTYPES:
            return dtype
    raise TypeError(f"flashjit attention needs float16 or bfloat16 query/key/value, got "
                    f"{query.dtype}: load the model with dtype=torch.bfloat16 (or float16), run "
                    f"it under torch.autocast, or {_SDPA_HINT}")


def _check_mask(mask) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if hasattr(mask, "shape") else type(mask).__name__
        raise ValueError(
            f"flashjit attention got an attention_mask of shape {shape}: it serves padding masks "
            "(the 2-D (batch, seqlen) mask of its mask function), packed sequences "
            "and causal/sliding-window structure, not custom 4-D masks; "
            f"{_SDPA_HINT}")
    if mask.dtype == torch.int32:  # packed sequence ids from attention_mask()
        return mask
    return mask if mask.dtype == torch.bool else mask.bool()


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, is_causal: Optional[bool] = None,
                      s_aux: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                      cu_seq_lens_q: Optional[Tensor] = None,
                      cu_seq_lens_k: Optional[Tensor] = None, max_length_q=None,
                      max_length_k=None, **kwargs) -> Tuple[Tensor, None]:
    """transformers' attention-function signature (integrations/sdpa_attention.py,
    integrations/flash_attention.py), served by flashjit.

    module: the attention layer (is_causal read from it when is_causal is None).
    query (batch, heads, seqlen_q, d), key/value (batch, heads_k, seqlen_k, d / d_v), fp16 or
    bf16 on a CUDA device (float32 under autocast is cast); heads % heads_k == 0.
    attention_mask: None, the 2-D boolean padding mask of attention_mask(), or its int32 packed
    sequence ids (module docstring).
    dropout: attention dropout probability; scaling: softmax scale (None: 1 / sqrt(d));
    sliding_window: w keys per query counting itself (None: none); softcap: None/0 or > 0;
    s_aux: None or per-head sink logits (heads,), any float dtype, may require grad;
    position_ids: not read (packing comes through attention_mask); cu_seq_lens_q/k, max_length_q/k:
    precomputed varlen boundaries of the flattened rows. kwargs: ``deterministic``,
    ``position_bias`` (refused), and what models pass along (use_cache, ...; ignored).
    Returns (out (batch, seqlen_q, heads, d_v) in the kernel dtype, None).
    Errors: ValueError (tensors not on a CUDA device, a non-2-D mask, position_bias), TypeError
    (dtype), NotImplementedError (head dim > 256); flashjit's own errors for the rest (shapes)."""
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"flashjit attention does not add position_bias; {_SDPA_HINT}")
    if query.device.type not in DEVICE_TYPES:
        raise ValueError(f"flashjit attention runs on CUDA GPUs, but the model's tensors are on "
                         f"{query.device}: move the model to a GPU (model.to('cuda') or "
                         f"device_map='cuda'), or {_SDPA_HINT}")
    mask = _check_mask(attention_mask)
    d_qk, d_v = query.shape[-1], value.shape[-1]
    d = max(d_qk, d_v)
    if d > MAX_HEAD_DIM:
        raise NotImplementedError(f"flashjit attention supports head dims up to {MAX_HEAD_DIM}, "
                                  f"got {d}; {_SDPA_HINT}")
    dtype = _kernel_dtype(query)
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    deterministic = kwargs.get("deterministic")
    options = dict(
        dropout_p=float(dropout or 0.0),
        softmax_scale=float(scaling) if scaling is not None else 1.0 / math.sqrt(d_qk),
        causal=causal, window_size=_window(sliding_window, causal),
        softcap=float(softcap or 0.0),
        deterministic=bool(torch.are_deterministic_algorithms_enabled()
                           if deterministic is None else deterministic),
        sink=None if s_aux is None else s_aux.float())

    # (batch, seq, heads, d) views of the model's (batch, heads, seq, d) tensors; flashjit reads
    # strided inputs in place (a copy only where strides are not 16-byte aligned). Padding to a
    # common head dim changes no score (zeros add nothing to q.k); the output is cropped to d_v.
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (query, key, value))
    if d_qk < d:
        q, k = (F.pad(t, (0, d - d_qk)) for t in (q, k))
    if d_v < d:
        v = F.pad(v, (0, d - d_v))

    if mask is not None and mask.dtype == torch.int32:  # packed rows (attention_mask())
        cu, max_len = _packed_sequences(mask)
        out = _flattened(q, k, v, cu, cu, max_len, max_len, options)
    elif mask is not None:
        out = _padded(q, k, v, mask, options)
    elif cu_seq_lens_q is not None and cu_seq_lens_k is not None:
        max_q = max_length_q if max_length_q is not None else cu_seq_lens_q.diff().max()
        max_k = max_length_k if max_length_k is not None else cu_seq_lens_k.diff().max()
        cu_q, cu_k = (cu.to(device=q.device, dtype=torch.int32) for cu in (cu_seq_lens_q,
                                                                             cu_seq_lens_k))
        out = _flattened(q, k, v, cu_q, cu_k, int(max_q), int(max_k), options)
    else:
        out = kernels.flash_attn_func(q, k, v, **options)
    return (out if d_v == d else out[..., :d_v]), None


def _flattened(q, k, v, cu_q, cu_k, max_q, max_k, options):
    """Rows laid end to end ((batch * seq, heads, d)) as varlen sequences; out like q."""
    batch, seqlen_q = q.shape[:2]
    out = kernels.flash_attn_varlen_func(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]),
                                         v.reshape(-1, *v.shape[2:]), cu_q, cu_k, max_q, max_k,
                                         **options)
    return out.reshape(batch, seqlen_q, *out.shape[1:])


def _padded(q, k, v, mask, options):
    """q (batch, seqlen_q, heads, d), k/v (batch, seqlen_k, heads_k, d), mask (batch, n) True =
    real: the real tokens through flash_attn_varlen_func, padded query rows 0."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if mask.shape[1] < seqlen_k:  # static cache: slots past the mask hold no token yet
        k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
    elif mask.shape[1] > seqlen_k:
        mask = mask[:, -seqlen_k:]
    idx_q, idx_k, cu_q, cu_k, max_q, max_k = _unpad_data(mask, seqlen_q)
    out = kernels.flash_attn_varlen_func(q[idx_q], k[idx_k], v[idx_k], cu_q, cu_k, max_q, max_k,
                                         **options)
    return out.new_zeros(q.shape[:3] + out.shape[-1:]).index_put(idx_q, out)
