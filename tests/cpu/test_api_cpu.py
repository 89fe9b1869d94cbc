"""The public API's CPU-side behaviour: input validation before any compile, the dispatcher's
mapping of tensors to specs, the reference math and the dropout RNG's CPU reference."""

import dataclasses
import inspect
import math

import pytest
import torch

import flashjit
from flashjit import _philox, ops
from flashjit.jit import JitSpec, registry
from tests.reference import attention_ref, max_error, visible_mask


def _qkv(b=1, s=16, h=2, d=64, dtype=torch.float16, device="cpu"):
    return tuple(torch.randn(b, s, h, d, dtype=dtype, device=device) for _ in range(3))


def test_cpu_tensors_are_rejected_naming_the_argument():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q must be a CUDA tensor") as err:
        flashjit.flash_attn_func(q, k, v)
    if torch.version.cuda is None:  # a CPU build of torch: the message says so
        assert "has no CUDA support" in str(err.value)
    with pytest.raises(ValueError, match="query must be a CUDA tensor"):
        flashjit.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    with pytest.raises(ValueError, match="qkv must be a CUDA tensor"):
        flashjit.flash_attn_qkvpacked_func(torch.stack((q, k, v), dim=2))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        flashjit.flash_attn_func([1, 2], k, v)
    with pytest.raises(ValueError, match="qkv must be a tensor of shape"):
        flashjit.flash_attn_qkvpacked_func(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="kv must be a tensor of shape"):
        flashjit.flash_attn_kvpacked_func(q, torch.zeros(1, 16, 3, 2, 64))
    with pytest.raises(ValueError, match="query must be a 4-D tensor"):
        flashjit.scaled_dot_product_attention(q[0], k, v)
    with pytest.raises(ValueError, match="enable_gqa"):
        flashjit.scaled_dot_product_attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        flashjit.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(16, dtype=torch.bool),
                                              is_causal=True)


def test_dispatcher_maps_tensors_to_specs(monkeypatch):
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "8.0")
    q = torch.empty(1, 8, 2, 80, dtype=torch.bfloat16)
    assert ops.attention_spec("fwd", q, causal=True, dropout=False).name == \
        "fwd_sm80_bf16_hd96_causal"
    q = torch.empty(1, 8, 2, 256, dtype=torch.float16)
    assert ops.attention_spec("bwd", q, causal=False, dropout=True).name == \
        "bwd_sm80_fp16_hd256_dropout"
    # Hopper: at head dims 33-256 the forward is the warp-specialised family (sm90ws) and the
    # backward the wgmma family (sm90), with and without dropout; a paged forward (block table)
    # is sm90ws's too (TMA boxes inside pages); at d <= 32 both are sm80's.
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "9.0")
    q = torch.empty(1, 8, 2, 120, dtype=torch.bfloat16)
    assert ops.attention_spec("fwd", q, causal=True, dropout=False).name == \
        "fwd_sm90a_bf16_hd128_causal_ws"
    assert ops.attention_spec("fwd", q, causal=True, dropout=True).name == \
        "fwd_sm90a_bf16_hd128_causal_dropout_ws"
    assert ops.attention_spec("fwd", q, causal=True, dropout=False, paged=True).name == \
        "fwd_sm90a_bf16_hd128_causal_paged_ws"
    assert ops.attention_spec("bwd", q, causal=True, dropout=False).name == \
        "bwd_sm90a_bf16_hd128_causal_wgmma"
    assert ops.attention_spec("bwd", q, causal=True, dropout=True).name == \
        "bwd_sm90a_bf16_hd128_causal_dropout_wgmma"
    assert ops.attention_spec("bwd", q[..., :96], causal=False, dropout=False).name == \
        "bwd_sm90a_bf16_hd96_wgmma"  # bucket 96: the wgmma backward's 128-column kernels
    # bucket 160: the wgmma backward's 192-column kernels
    assert ops.attention_spec("bwd", torch.empty(1, 8, 2, 160, dtype=torch.bfloat16),
                              causal=False, dropout=False).name == "bwd_sm90a_bf16_hd160_wgmma"
    assert ops.attention_spec("bwd", q[..., :32], causal=False, dropout=False).name == \
        "bwd_sm90a_bf16_hd32"
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", "sm90")  # the wgmma forward, as before sm90ws
    assert ops.attention_spec("fwd", q, causal=True, dropout=False).name == \
        "fwd_sm90a_bf16_hd128_causal_wgmma"
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", "sm80")
    assert ops.attention_spec("fwd", q, causal=True, dropout=False).name == \
        "fwd_sm90a_bf16_hd128_causal"
    assert ops.attention_spec("bwd", q, causal=True, dropout=False).name == \
        "bwd_sm90a_bf16_hd128_causal"
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", "hopper")
    with pytest.raises(ValueError, match="FLASHJIT_KERNEL_FAMILY"):
        ops.attention_spec("fwd", q, causal=False, dropout=False)


def test_forward_tile_skips_a_paged_spec_of_another_family(monkeypatch):
    # On sm90a the paged forward is sm90ws too, and takes a sweep's FLASHJIT_FWD_TILE. Where the
    # paged forward is another family (here: a registry whose sm90ws row reads no block table,
    # as before the sixteenth session), the tile (sm90ws parameters) must not reach the paged
    # spec, where it would mean something else; on sm80 both are one family and both take it.
    monkeypatch.setenv("FLASHJIT_FWD_TILE", "128,3,3")
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "9.0")
    q = torch.empty(1, 8, 2, 64, dtype=torch.bfloat16)
    plain = ops.attention_spec("fwd", q, causal=True, dropout=False)
    paged = ops.attention_spec("fwd", q, causal=True, dropout=False, paged=True)
    assert (plain.family, plain.tile) == ("sm90ws", (128, 3, 3))
    assert (paged.family, paged.tile) == ("sm90ws", (128, 3, 3))
    monkeypatch.setattr(registry, "REGISTRY", tuple(
        dataclasses.replace(r, paged=False) if (r.kernel, r.family) == ("fwd", "sm90ws") else r
        for r in registry.REGISTRY))
    paged = ops.attention_spec("fwd", q, causal=True, dropout=False, paged=True)
    assert (paged.family, paged.tile) == ("sm90", None)
    monkeypatch.setenv("FLASHJIT_FWD_TILE", "128,64,4,1")
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "8.0")
    paged = ops.attention_spec("fwd", q, causal=True, dropout=False, paged=True)
    assert (paged.family, paged.tile) == ("sm80", (128, 64, 4, 1))


def test_a_family_without_the_kernel_raises_value_error():
    with pytest.raises(ValueError, match="family 'sm90ws' has no kernel 'bwd'"):
        JitSpec("bwd", "sm90a", "bf16", 128, family="sm90ws")


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_torch_sdpa(causal):
    torch.manual_seed(0)
    q, k, v = (t.double() for t in _qkv(2, 33, 3, 16))
    out, lse = attention_ref(q, k, v, causal=causal, bottom_right=False)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    assert max_error(out, sdpa) < 1e-10
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(16)
    scores = scores.masked_fill(~visible_mask(33, 33, causal, False), float("-inf"))
    assert max_error(lse, torch.logsumexp(scores, -1)) < 1e-10


def test_reference_rows_without_keys_are_zero_and_minus_inf():
    q, k, v = (t.double() for t in _qkv(1, 10, 1, 8))
    out, lse = attention_ref(q, k[:, :4], v[:, :4], causal=True)  # bottom-right: rows 0..5 empty
    assert torch.all(out[:, :6] == 0) and torch.all(lse[..., :6] == float("-inf"))
    assert torch.isfinite(lse[..., 6:]).all()


def test_philox_known_answers_and_keep_rate():
    for counter, key, expected in _philox.KNOWN_ANSWERS:
        assert _philox.philox4x32_10(counter, key) == expected
    mask = torch.tensor(_philox.dropout_mask(seed=1234, offset=0, batch=1, heads=2, seqlen_q=40,
                                             seqlen_k=48, dropout_p=0.25), dtype=torch.float32)
    assert abs(mask.mean().item() - 0.75) < 0.03
    # element by element as dropout_byte draws it, with 48 keys: one whole m16 x n32 group, one
    # partial
    for b, h, i, j in [(0, 0, 0, 0), (0, 1, 39, 47), (0, 0, 17, 33), (0, 1, 8, 31)]:
        byte = _philox.dropout_byte(1234, 0, b, h, i, j, 2, 40, 48)
        assert mask[b, h, i, j] == float(byte <= _philox.keep_threshold(0.25))
    again = torch.tensor(_philox.dropout_mask(1234, 0, 1, 2, 40, 48, 0.25), dtype=torch.float32)
    other = torch.tensor(_philox.dropout_mask(1234, 10**6, 1, 2, 40, 48, 0.25), dtype=torch.float32)
    assert torch.equal(mask, again) and not torch.equal(mask, other)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_dropout_mask_helper_without_cuda_says_so(device):
    from flashjit import testing
    with pytest.raises(ValueError, match="need a CUDA device, got '(cuda|cpu)'"):
        testing.next_dropout_mask(1, 1, 4, 4, 0.1, device)


@pytest.mark.parametrize("p,kept_bytes", [(0.25, 192), (0.1, 230), (0.5, 128), (0.9999, 1),
                                          (1e-4, 256), (0.001, 256), (0.003, 255)])
def test_dropout_keeps_a_whole_number_of_byte_values(p, kept_bytes):
    # round(256 (1 - p)) of the 256 byte values keep an element, at least one: the kept fraction
    # is 1 - p to 1/256, and the scale its inverse (csrc/binding_utils.h)
    assert _philox.keep_threshold(p) == kept_bytes - 1
    assert _philox.keep_probability(p) == kept_bytes / 256
    assert abs(_philox.keep_probability(p) - (1 - p)) <= 1 / 512 or kept_bytes == 1


def test_dropout_mask_draws_sixteen_elements_per_philox_call():
    # lane (g, t) of group (i16, j32): its 4 words are 4 n8 tiles of keys, its bytes the C layout's
    # 4 elements of each; so the 16 bytes of one call decide 16 different elements
    seed, offset, heads, sq, sk = 99, 5, 1, 16, 32
    words = _philox.philox4x32_10((2 * 4 + 1, 0, offset, 0), (seed, 0))  # lane g 2, t 1
    for w in range(4):
        for half in range(2):
            for e in range(2):
                i, j = half * 8 + 2, w * 8 + 2 * 1 + e
                assert _philox.dropout_byte(seed, offset, 0, 0, i, j, heads, sq, sk) == \
                    (words[w] >> (8 * (half * 2 + e))) & 0xFF
    assert _philox.philox_counters(2, 3, 17, 33) == 2 * 3 * 2 * 2


def _offset_view(shape, offset_elements, dtype=torch.float16):
    """A contiguous tensor of `shape` starting `offset_elements` into a fresh buffer."""
    numel = math.prod(shape)
    base = torch.randn(numel + offset_elements, dtype=torch.float32).to(dtype)
    return base[offset_elements:].view(shape)


def test_alignment_predicates():
    from flashjit.interface import _strides_aligned

    shape = (2, 16, 4, 64)
    assert _strides_aligned(torch.zeros(shape, dtype=torch.float16))
    assert _strides_aligned(torch.zeros(2, 16, 4, 72, dtype=torch.float16)[..., :64])  # % 8
    assert not _strides_aligned(torch.zeros(2, 16, 4, 68, dtype=torch.float16)[..., :64])
    assert not _strides_aligned(torch.zeros(2, 16, 64, 4, dtype=torch.float16).transpose(-1, -2))
    # the data pointer: fixed in the op, at run time
    aligned = _offset_view(shape, 8)  # 16 bytes in
    assert ops._aligned(aligned) is aligned and ops._aligned(None) is None
    misaligned = _offset_view(shape, 1)  # data pointer 2 bytes off
    fixed = ops._aligned(misaligned)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, misaligned)


def test_kernel_layout_copies_only_what_the_kernels_cannot_read():
    """Inputs with strides the kernels cannot load are copied; head dims not a multiple of 8 are
    zero-padded; an input the kernels can read is passed through as it is."""
    from flashjit.interface import _kernel_layout, _strides_aligned

    aligned = torch.randn(2, 16, 4, 64, dtype=torch.float16)
    assert _kernel_layout(aligned, 64) is aligned
    for bad in (torch.randn(2, 16, 4, 68, dtype=torch.float16)[..., :64],
                torch.randn(2, 16, 64, 4, dtype=torch.float16).transpose(-1, -2)):
        fixed = _kernel_layout(bad, 64)
        assert _strides_aligned(fixed) and torch.equal(fixed, bad)
    misaligned = _offset_view((2, 16, 4, 64), 1)  # eager: the data pointer is fixed here too
    fixed = _kernel_layout(misaligned, 64)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, misaligned)
    # torch.compile(fullgraph=True) traces it (no data pointer while tracing; ops._aligned then)
    traced = torch.compile(lambda t: _kernel_layout(t, 64), fullgraph=True, backend="eager")
    assert torch.equal(traced(misaligned), misaligned)
    strided = torch.randn(2, 16, 4, 68, dtype=torch.float16)[..., :64]
    assert _strides_aligned(traced(strided)) and torch.equal(traced(strided), strided)
    odd = torch.randn(2, 16, 4, 59, dtype=torch.float16, requires_grad=True)
    padded = _kernel_layout(odd, 64)
    assert padded.shape == (2, 16, 4, 64) and _strides_aligned(padded)
    assert torch.equal(padded[..., :59], odd) and torch.all(padded[..., 59:] == 0)
    grad = torch.randn(padded.shape, dtype=torch.float16)
    (g,) = torch.autograd.grad(padded, odd, grad)
    assert torch.equal(g, grad[..., :59])  # the padding's gradient is dropped, the rest exact


def test_backward_copies_a_dout_with_unaligned_strides(monkeypatch):
    """A dout whose strides the kernels cannot load is copied before ops.call_bwd (its data
    pointer is ops._aligned's, checked above)."""
    from types import SimpleNamespace

    from flashjit.interface import _FlashAttnFunction, _strides_aligned

    seen = []

    def fake_call_bwd(dout, *args):
        seen.append(dout)
        return None, None, None, None

    monkeypatch.setattr(ops, "call_bwd", fake_call_bwd)
    ctx = SimpleNamespace(saved_tensors=(None,) * 12, needs_input_grad=(True,) * 3 + (False,) * 15,
                          args=(16, 16, 0.125, False, True, -1, -1, 0.0, 0.0, False, True))
    strided = torch.zeros(2, 16, 4, 68, dtype=torch.float16)[..., :64]
    _FlashAttnFunction.backward(ctx, strided, None)
    assert seen[-1] is not strided and _strides_aligned(seen[-1])
    assert torch.equal(seen[-1], strided)
    aligned = torch.zeros(2, 16, 4, 64, dtype=torch.float16)
    _FlashAttnFunction.backward(ctx, aligned, None)
    assert seen[-1] is aligned  # no copy when none is needed


# flash-attn 2.x's public signatures (flash_attn/flash_attn_interface.py, v2.6-2.8): a positional
# call written for flash-attn must mean the same here.
_VARIANTS = [("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None),
             ("deterministic", False), ("return_attn_probs", False)]
_COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False)] + _VARIANTS
_REQUIRED = inspect.Parameter.empty
FLASH_ATTN_SIGNATURES = {
    "flash_attn_func": [("q", _REQUIRED), ("k", _REQUIRED), ("v", _REQUIRED)] + _COMMON,
    "flash_attn_qkvpacked_func": [("qkv", _REQUIRED)] + _COMMON,
    "flash_attn_kvpacked_func": [("q", _REQUIRED), ("kv", _REQUIRED)] + _COMMON,
    "flash_attn_varlen_func": [(n, _REQUIRED) for n in (
        "q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
        + _COMMON + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": [(n, _REQUIRED) for n in (
        "qkv", "cu_seqlens", "max_seqlen")] + _COMMON,
    "flash_attn_varlen_kvpacked_func": [(n, _REQUIRED) for n in (
        "q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")] + _COMMON,
}


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_SIGNATURES))
def test_signatures_match_flash_attn(name):
    """flash-attn's positional parameters, then flashjit's own keyword-only sink=None."""
    params = inspect.signature(getattr(flashjit, name)).parameters.values()
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert [(p.name, p.default) for p in positional] == FLASH_ATTN_SIGNATURES[name]
    keyword_only = [(p.name, p.default) for p in params if p.kind is p.KEYWORD_ONLY]
    assert keyword_only == [("sink", None)]


def test_softcap_is_checked():
    from flashjit._validate import check_softcap

    assert check_softcap(0) == 0.0 and check_softcap(30) == 30.0 and check_softcap(0.5) == 0.5
    for bad in (-1.0, -1e-30, float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="softcap must be a finite number >= 0"):
            check_softcap(bad)
    for bad in ("30", True, None, 1 + 2j, torch.tensor(30.0)):
        with pytest.raises(TypeError, match="softcap must be a float"):
            check_softcap(bad)


def test_window_size_as_flash_attn_defines_it():
    """flash-attn 2.x's window_size, bottom-right aligned: bounds that exclude no key are none,
    causal sets the right bound to 0, (-1, 0) is causal; resolve_window gives (causal, left,
    right) for the kernels."""
    from flashjit._validate import resolve_window

    sq, sk = 100, 120
    assert resolve_window((-1, -1), False, sq, sk) == (False, -1, -1)
    assert resolve_window((-1, -1), True, sq, sk) == (True, -1, 0)  # causal: right edge 0
    assert resolve_window([-1, 0], False, sq, sk) == (True, -1, 0)  # (-1, 0) is causal
    assert resolve_window((sk - 1, sq - 1), False, sq, sk) == (False, -1, -1)  # excludes none
    assert resolve_window((10**6, 0), False, sq, sk) == (True, -1, 0)
    assert resolve_window((-1, sq - 1), True, sq, sk) == (True, -1, 0)
    assert resolve_window((10**6, 5), True, sq, sk) == (True, -1, 0)
    # sliding windows
    assert resolve_window((sk - 2, -1), False, sq, sk) == (False, sk - 2, -1)
    assert resolve_window((-1, sq - 2), False, sq, sk) == (False, -1, sq - 2)
    assert resolve_window((64, 0), False, sq, sk) == (False, 64, 0)
    assert resolve_window((4, 4), False, sq, sk) == (False, 4, 4)
    assert resolve_window((0, 0), False, sq, sk) == (False, 0, 0)
    assert resolve_window((4, 4), True, sq, sk) == (True, 4, 0)  # causal: right edge 0
    assert resolve_window((4, -1), True, sq, sk) == (True, 4, 0)
    assert resolve_window((4, 10**6), False, sq, sk) == (False, 4, -1)
    for bad in (128, None, (1, 2, 3), (1,), "ab", (1.5, 0), (0, 2.0), (True, 0), (0, False),
                (None, 0), (torch.tensor(1), 0)):
        with pytest.raises(TypeError, match="window_size must be a pair"):
            resolve_window(bad, False, sq, sk)
    for bad in ((-2, 0), (0, -2), (-100, -100)):
        with pytest.raises(ValueError, match="window_size entries must be >= -1"):
            resolve_window(bad, False, sq, sk)


def test_scalar_arguments_name_themselves():
    from flashjit._validate import check_flag as _check_flag
    from flashjit._validate import check_int as _check_int
    from flashjit._validate import check_scalars as _check_scalars

    assert _check_scalars(0.1, None, 64) == 0.125 and _check_scalars(0, 2, 64) == 2.0
    for bad in ("0.1", None, True):
        with pytest.raises(TypeError, match="dropout_p must be a number"):
            _check_scalars(bad, None, 64)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        _check_scalars(1.0, None, 64)
    for bad in ("0.5", True):
        with pytest.raises(TypeError, match="softmax_scale must be a number"):
            _check_scalars(0.0, bad, 64)
    with pytest.raises(ValueError, match="softmax_scale must be a positive"):
        _check_scalars(0.0, float("inf"), 64)
    assert _check_int("max_seqlen_q", 16) == 16
    for bad in (16.7, "16", None, True):
        with pytest.raises(TypeError, match="max_seqlen_q must be an int"):
            _check_int("max_seqlen_q", bad)
    for bad in (-1, 2**31, 10**12):
        with pytest.raises(ValueError, match="max_seqlen_q must be between 0 and"):
            _check_int("max_seqlen_q", bad)
    assert _check_flag("causal", True) is True and _check_flag("causal", 0) is False
    for bad in ("False", None, 2, 0.0):
        with pytest.raises(TypeError, match="causal must be a bool"):
            _check_flag("causal", bad)


def test_sdpa_signature_matches_torch():
    """scale and enable_gqa are keyword-only in torch.nn.functional.scaled_dot_product_attention."""
    params = inspect.signature(flashjit.scaled_dot_product_attention).parameters
    assert list(params) == ["query", "key", "value", "attn_mask", "dropout_p", "is_causal",
                            "scale", "enable_gqa"]
    assert params["scale"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["enable_gqa"].kind is inspect.Parameter.KEYWORD_ONLY
