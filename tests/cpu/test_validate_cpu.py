"""Argument checks that cut across the entry points (flashjit._validate, _validate_kvcache):
a dropout_p too small for the mask's 1/256 resolution, the SDPA entry's own names and layout,
numpy bools as flags, an append longer than the KV cache (a shape check, so also under capture),
and the docstrings' account of the numeric limits.

The public functions need CUDA tensors: these tests use fake CUDA tensors (conftest.fake_cuda:
FakeTensorMode, no data; capturing() is True there, as under CUDA-graph capture)."""

from __future__ import annotations

import math

import pytest
import torch

import flashjit
from flashjit import _philox, _validate, _validate_kvcache, ops

from test_variants_cpu import ENTRIES as FLASH_ENTRIES
from test_variants_cpu import BATCH, TOTAL, B, D, H, HK, SK, SQ, _cuda
from test_variants_cpu import _call as _call_flash

CAP, NB, PAGE, MAXB = 64, 9, 16, 4  # KV cache: contiguous (B, CAP, HK, D); paged
I32 = dict(dtype=torch.int32)


@pytest.fixture
def recorded_fwd(fake_cuda, monkeypatch):
    """As fake_cuda, with ops.call_fwd recording its arguments (then the fake forward), and the
    decode op unreachable."""
    calls = []

    def record(*args):
        calls.append(args)
        return ops._fwd_fake(*args)

    def unreachable(*args):
        raise AssertionError("validation let a bad input through to the decode op")

    monkeypatch.setattr(ops, "call_fwd", record)
    monkeypatch.setattr(ops, "call_decode", unreachable)
    return calls


def _call(entry: str, **kwargs):
    """Every public entry point that takes dropout_p, on fake CUDA inputs: test_variants_cpu's
    six flash_attn_* calls, the paged varlen forward and the SDPA entry."""
    if entry == "varlen_paged":
        varlen_q, pages, cu = _cuda(TOTAL, H, D), _cuda(NB, PAGE, HK, D), _cuda(BATCH + 1, **I32)
        return flashjit.flash_attn_varlen_func(varlen_q, pages, pages, cu, cu, 20, 20,
                                               block_table=_cuda(BATCH, MAXB, **I32), **kwargs)
    if entry == "sdpa":
        return flashjit.scaled_dot_product_attention(_cuda(B, H, SQ, D), _cuda(B, H, SK, D),
                                                     _cuda(B, H, SK, D), **kwargs)
    return _call_flash(entry, **kwargs)


ENTRIES = FLASH_ENTRIES + ["varlen_paged", "sdpa"]
TOO_SMALL = r"dropout_p = {} would drop nothing: dropout applies at a resolution of 1/256"


def re_float(x: float) -> str:
    return str(x).replace(".", r"\.").replace("+", r"\+")


# ---------------------------------------------------------------------------------------------
# dropout_p and its 1/256 resolution
# ---------------------------------------------------------------------------------------------
def test_dropout_min_is_the_smallest_dropout_p_that_drops_anything():
    assert _philox.keep_threshold(_validate.DROPOUT_MIN) == 254  # drops 1/256
    below = math.nextafter(_validate.DROPOUT_MIN, 0.0)
    assert _philox.keep_probability(below) == 1.0 and below > 1 / 512
    assert _validate.check_dropout(_validate.DROPOUT_MIN) == _validate.DROPOUT_MIN
    for p in (0, 0.0, 0.002, 0.1, 0.5, 0.998):  # 0.998 keeps 1/256 (it asks for 0.002)
        assert _validate.check_dropout(p) == p
    for p in (1e-300, 1e-6, 0.001, 1 / 512, below):
        with pytest.raises(ValueError, match=TOO_SMALL.format(re_float(p))) as err:
            _validate.check_dropout(p)
        message = str(err.value)
        assert "keep every weight; pass 0.0 for no dropout, or a value above 1/512 (e.g. " \
            "0.002" in message and "1/512 = 0.001953125" in message
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        _validate.check_dropout(-1e-3)
    with pytest.raises(TypeError, match="dropout_p must be a number"):
        _validate.check_dropout("0.001")


TOO_LARGE = r"dropout_p = {} would keep less than 1/512 of the weights"


def test_dropout_max_is_the_smallest_dropout_p_that_would_keep_less_than_1_512():
    below = math.nextafter(_validate.DROPOUT_MAX, 0.0)
    assert _validate.DROPOUT_MAX == 1 - 1 / 512
    assert round((1 - below) * 256) == 1 and _philox.keep_probability(below) == 1 / 256
    assert round((1 - _validate.DROPOUT_MAX) * 256) == 0  # half to even: nothing kept
    assert _validate.check_dropout(below) == below
    for p in (_validate.DROPOUT_MAX, 0.999, 0.9999, math.nextafter(1.0, 0.0)):
        with pytest.raises(ValueError, match=TOO_LARGE.format(re_float(p))) as err:
            _validate.check_dropout(p)
        assert "values from 1 - 1/512 = 0.998046875 on cannot be applied" in str(err.value)
        assert _validate.dropout_resolution_reason(p) == str(err.value)
    for p in (0.0, 0.002, 0.5, below):
        assert _validate.dropout_resolution_reason(p) is None


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_refuses_a_dropout_p_that_would_keep_too_little(entry, recorded_fwd):
    for p in (0.999, _validate.DROPOUT_MAX):
        with pytest.raises(ValueError, match=TOO_LARGE.format(re_float(p))):
            _call(entry, dropout_p=p)
    assert recorded_fwd == []


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_refuses_a_dropout_p_that_would_drop_nothing(entry, recorded_fwd):
    for p in (0.001, 1 / 512):
        with pytest.raises(ValueError, match=TOO_SMALL.format(re_float(p))):
            _call(entry, dropout_p=p)
    assert recorded_fwd == []
    if entry == "varlen_paged":  # forward-only: any dropout is refused, as before
        with pytest.raises(NotImplementedError, match="dropout_p must be 0 with block_table"):
            _call(entry, dropout_p=0.002)
        return
    for p in (_validate.DROPOUT_MIN, 0.002):  # takes effect: accepted and passed on
        _call(entry, dropout_p=p)
        assert recorded_fwd[-1][17] == p  # call_fwd's dropout_p


# ---------------------------------------------------------------------------------------------
# scaled_dot_product_attention: its own argument names, shapes as passed
# ---------------------------------------------------------------------------------------------
def _sdpa(q_shape, kv_shape, v_shape=None, **kwargs):
    return flashjit.scaled_dot_product_attention(_cuda(*q_shape), _cuda(*kv_shape),
                                                 _cuda(*(v_shape or kv_shape)), **kwargs)


def test_sdpa_errors_name_its_arguments_and_shapes_as_passed(recorded_fwd):
    shape = (2, 4, 16, 64)  # (batch, heads, seq, d)
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"^scale must be a positive finite number"):
            _sdpa(shape, shape, scale=bad)
    for bad in (1e39, 1e-50):
        with pytest.raises(ValueError, match=r"^scale must be between 1e-30 and 1e\+30"):
            _sdpa(shape, shape, scale=bad)
    for bad in ("0.1", True):
        with pytest.raises(TypeError, match=r"^scale must be a number"):
            _sdpa(shape, shape, scale=bad)
    with pytest.raises(ValueError, match=r"key and value must have the same shape, got "
                                         r"\(2, 4, 16, 64\) and \(2, 2, 16, 64\)"):
        _sdpa(shape, shape, (2, 2, 16, 64), enable_gqa=True)
    with pytest.raises(ValueError, match=r"query heads of query \(4\) must be a multiple of the "
                                         r"number of key/value heads of key \(3\)"):
        _sdpa(shape, (2, 3, 16, 64), enable_gqa=True)
    with pytest.raises(ValueError, match=r"query and key must have the same batch size, got 2 "
                                         r"and 3"):
        _sdpa(shape, (3, 4, 16, 64))
    with pytest.raises(ValueError, match=r"query, key, value must have the same head_dim, got "
                                         r"64, 32, 32"):
        _sdpa(shape, (2, 4, 16, 32))
    assert recorded_fwd == []
    # GQA and a seqlen_k of its own: out is (batch, heads, seqlen_q, d), as query
    out = _sdpa(shape, (2, 2, 24, 64), enable_gqa=True, scale=0.5)
    assert out.shape == shape and out.dtype == torch.float16
    q, k = recorded_fwd[-1][:2]  # the kernels' (batch, seq, heads, d)
    assert q.shape == (2, 16, 4, 64) and k.shape == (2, 24, 2, 64)
    assert recorded_fwd[-1][9] == 0.5  # call_fwd's softmax_scale


# ---------------------------------------------------------------------------------------------
# numpy bools are bools
# ---------------------------------------------------------------------------------------------
def test_numpy_bools_are_flags(recorded_fwd, monkeypatch):
    np = pytest.importorskip("numpy")
    assert _validate.check_flag("causal", np.True_) is True
    assert _validate.check_flag("causal", np.bool_(False)) is False
    for bad in (np.array([True]), np.int64(1), "True"):
        with pytest.raises(TypeError, match="causal must be a bool"):
            _validate.check_flag("causal", bad)
    _call("func", causal=np.True_, deterministic=np.False_, return_attn_probs=np.False_)
    assert recorded_fwd[-1][10] is True  # call_fwd's causal
    _call("sdpa", is_causal=np.True_, enable_gqa=np.False_)
    assert recorded_fwd[-1][10] is True
    monkeypatch.setattr(_validate, "_numpy_bool", ())  # as without numpy: Python's bools only
    assert _validate.check_flag("causal", True) is True
    with pytest.raises(TypeError, match="causal must be a bool"):
        _validate.check_flag("causal", np.True_)


# ---------------------------------------------------------------------------------------------
# flash_attn_with_kvcache: an append longer than the cache is a shape error, checked always
# ---------------------------------------------------------------------------------------------
def _kvcache(seqlen_new, paged=False, **kwargs):
    args = dict(q=_cuda(B, 1, H, D), k_cache=_cuda(B, CAP, HK, D), v_cache=_cuda(B, CAP, HK, D),
                k=_cuda(B, seqlen_new, HK, D), v=_cuda(B, seqlen_new, HK, D),
                cache_seqlens=_cuda(B, **I32))
    if paged:
        args.update(k_cache=_cuda(NB, PAGE, HK, D), v_cache=_cuda(NB, PAGE, HK, D),
                    block_table=_cuda(B, MAXB, **I32))
    return flashjit.flash_attn_with_kvcache(**{**args, **kwargs})


@pytest.mark.parametrize("capturing", [True, False])
def test_an_append_longer_than_the_cache_is_refused(capturing, fake_cuda, monkeypatch):
    value_checks = []
    monkeypatch.setattr(_validate_kvcache, "check_kvcache_values",
                        lambda *a, **kw: value_checks.append(kw))
    monkeypatch.setattr(_validate, "capturing", lambda: capturing)
    decoded = []
    monkeypatch.setattr(ops, "call_decode", lambda *a: decoded.append(a) or ops._decode_fake(*a))
    with pytest.raises(ValueError, match=r"k and v have 65 new keys \(seqlen_new, dim 1\) but "
                                         r"the cache holds 64 rows per sequence \(k_cache's "
                                         r"seqlen_cache \(dim 1\)\): the append cannot fit"):
        _kvcache(CAP + 1)
    with pytest.raises(ValueError, match=r"k and v have 65 new keys .* holds 64 rows per "
                                         r"sequence \(block_table's max_blocks \(4\) x "
                                         r"k_cache's page size \(16\)\)"):
        _kvcache(MAXB * PAGE + 1, paged=True)
    with pytest.raises(ValueError, match=r"k and v have 65 new keys"):  # an int cache_seqlens
        _kvcache(CAP + 1, cache_seqlens=0)
    assert decoded == [] and value_checks == []
    # an append that fills the cache exactly passes the shape checks
    _kvcache(CAP)
    _kvcache(MAXB * PAGE, paged=True)
    assert len(decoded) == 2 and len(value_checks) == (0 if capturing else 2)


# ---------------------------------------------------------------------------------------------
# Docstrings: the numeric limits the checks apply
# ---------------------------------------------------------------------------------------------
def test_docstrings_give_the_limits_of_softmax_scale_and_softcap():
    assert (_validate.SCALE_MIN, _validate.SCALE_MAX) == (1e-30, 1e30)
    assert (_validate.SOFTCAP_MIN, _validate.SOFTCAP_MAX) == (1e-6, 1e4)
    for f in (flashjit.flash_attn_func, flashjit.flash_attn_varlen_func,
              flashjit.flash_attn_with_kvcache):
        doc = " ".join(f.__doc__.split())
        assert "softmax_scale not in [1e-30, 1e30]" in doc, f.__name__
        assert "softcap neither 0 nor in [1e-6, 1e4]" in doc, f.__name__
    for f in (flashjit.flash_attn_func, flashjit.flash_attn_varlen_func):
        assert "dropout_p outside [0, 1), in (0, 1/512] (it would drop nothing) or in " \
            "[1 - 1/512, 1) (keep less than 1/512)" in " ".join(f.__doc__.split())
    doc = " ".join(flashjit.scaled_dot_product_attention.__doc__.split())
    assert "Returns out (batch, heads, seqlen_q, d)" in doc and "Errors, before" in doc
    assert "scale not in [1e-30, 1e30]" in doc
    assert "dropout_p outside [0, 1), in (0, 1/512] (it would drop nothing) or in " \
        "[1 - 1/512, 1) (keep less than 1/512)" in doc


# ---------------------------------------------------------------------------------------------
# Expanded (zero-stride) inputs, meta tensors, messages
# ---------------------------------------------------------------------------------------------
def test_kernel_layout_copies_expanded_views():
    from flashjit.interface import _kernel_layout
    k1 = torch.randn(2, 16, 1, 64, dtype=torch.bfloat16)
    for view in (k1.expand(2, 16, 8, 64), k1[:1].expand(3, 16, 1, 64)):  # heads, batch
        out = _kernel_layout(view, 64)
        assert 0 not in out.stride() and out.is_contiguous() and torch.equal(out, view)
    one = torch.randn(2, 16, 8, 64, dtype=torch.bfloat16)
    assert _kernel_layout(one, 64) is one  # aligned: no copy
    single = one[:, :, :1]  # a dim of one element: its stride does not matter
    assert _kernel_layout(single.as_strided(single.shape, (8192, 512, 0, 1)), 64).stride()[2] == 0


def test_expanded_mqa_keys_reach_the_op_without_a_zero_stride(recorded_fwd):
    q = _cuda(B, SQ, H, D)
    k, v = (_cuda(B, SK, 1, D).expand(B, SK, H, D) for _ in range(2))
    flashjit.flash_attn_func(q, k, v)
    for t in recorded_fwd[-1][:3]:
        assert 0 not in t.stride(), t.stride()


def test_meta_tensors_get_their_own_message():
    m = torch.empty(2, 16, 4, 64, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="q must be a CUDA tensor, got device meta: flashjit's "
                       "kernels have no meta-device implementation") as err:
        flashjit.flash_attn_func(m, m, m)
    assert "install" not in str(err.value)


def test_alibi_dtype_message_does_not_promise_a_gradient(fake_cuda):
    q = _cuda(B, SQ, H, D)
    with pytest.raises(ValueError, match=r"alibi_slopes must be float32, got torch.float16 "
                       r"\(convert it with alibi_slopes.float\(\)\)$"):
        flashjit.flash_attn_func(q, q, q, alibi_slopes=_cuda(H, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"sink.float\(\), which keeps its gradient"):
        flashjit.flash_attn_func(q, q, q, sink=_cuda(H, dtype=torch.float16))



def test_a_call_with_nothing_to_differentiate_skips_autograd(recorded_fwd, monkeypatch):
    """With no input that requires grad, or grad mode off (inference), the forward op is called
    directly: no autograd.Function (its host cost per call), no rounding residual of O, the same
    dropout draw. With an input that requires grad the call goes to _FlashAttnFunction (here a
    stand-in: autograd on fake CUDA tensors aborts in a CPU build of torch)."""
    from flashjit import interface

    applied = []

    def apply(q, *args):
        applied.append(True)
        return torch.empty_like(q), torch.empty(q.shape[0], q.shape[2], q.shape[1])
    monkeypatch.setattr(interface._FlashAttnFunction, "apply", apply)
    q, k, v = _cuda(B, SQ, H, D), _cuda(B, SK, HK, D), _cuda(B, SK, HK, D)
    out = flashjit.flash_attn_func(q, k, v, dropout_p=0.1)
    assert applied == [] and out.grad_fn is None
    assert recorded_fwd[-1][19] is False  # call_fwd's with_residual
    assert recorded_fwd[-1][18] is not None and recorded_fwd[-1][17] == 0.1  # rng_state, p
    q.requires_grad_()
    with torch.no_grad():
        flashjit.flash_attn_func(q, k, v)
    assert applied == [] and recorded_fwd[-1][19] is False
    calls = len(recorded_fwd)
    flashjit.flash_attn_func(q, k, v)
    assert applied == [True] and len(recorded_fwd) == calls


def test_index_tensors_get_a_unit_last_stride_even_with_one_element():
    # a batch-1 expand() (stride 0) or a column of a wider tensor (stride 2): the bindings refuse
    # any last stride but 1, so the check copies them (.contiguous() would return them as they
    # are, a last dim of one element counting as contiguous)
    for t in (torch.tensor(5, dtype=torch.int32).expand(1),
              torch.zeros(1, 2, dtype=torch.int32)[:, 1],
              torch.zeros(1, 3, dtype=torch.int32)[:, :1].expand(1, 1).as_strided((1, 1), (3, 0))):
        assert t.stride(-1) != 1
        out = _validate_kvcache._check_index("cache_seqlens", t, t.device, tuple(t.shape), "(b,)")
        assert out.stride(-1) == 1 and torch.equal(out, t)
    aligned = torch.arange(4, dtype=torch.int32)
    assert _validate_kvcache._check_index("x", aligned, aligned.device, (4,), "(b,)") is aligned


def test_varlen_lse_past_the_last_sequence_is_minus_inf():
    # rows from cu_seqlens_q[-1] on belong to no sequence and no kernel writes them
    from flashjit.interface import _varlen_lse
    lse = torch.full((3, 7), float("nan"))
    lse[:, :5] = torch.arange(15, dtype=torch.float32).view(3, 5)
    out = _varlen_lse(lse, torch.tensor([0, 2, 5], dtype=torch.int32))
    assert torch.equal(out[:, :5], lse[:, :5])
    assert torch.equal(out[:, 5:], torch.full((3, 2), float("-inf")))


def test_a_cache_written_in_place_may_not_overlap_itself():
    buf = torch.zeros(2 * 8 * 2 * 64 + 64 * 2 * 64, dtype=torch.bfloat16)
    # sequence 0's rows 8.. are sequence 1's rows 0..: an append to one writes the other
    aliased = buf.as_strided((2, 64, 2, 64), (8 * 2 * 64, 2 * 64, 64, 1))
    with pytest.raises(ValueError, match=r"k_cache's elements overlap .* written in place"):
        _validate.check_cache_layout("k_cache", aliased, written=True)
    _validate.check_cache_layout("k_cache", aliased, written=False)  # read only: allowed
    # allocated, permuted, sliced (every other sequence) and paged layouts do not overlap
    cache = torch.zeros(4, 64, 2, 64, dtype=torch.bfloat16)
    for t in (cache, cache[::2], cache[:, :32], torch.zeros(4, 2, 64, 64,
                                                            dtype=torch.bfloat16).transpose(1, 2)):
        assert not _validate._may_overlap(t)
        _validate.check_cache_layout("k_cache", t, written=True)


def test_kvcache_q_without_heads_raises_before_skipping_an_append(fake_cuda):
    # heads 0 passes "a multiple of heads_k" (0 % heads_k == 0); the op would then return before
    # the append, leaving the cache unwritten
    q = _cuda(1, 1, 0, 64, dtype=torch.bfloat16)
    cache = _cuda(1, 16, 2, 64, dtype=torch.bfloat16)
    new = _cuda(1, 1, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"q has no heads"):
        _validate_kvcache.check_kvcache(q, cache, _cuda(1, 16, 2, 64, dtype=torch.bfloat16), new,
                                        new, None, None, None, None,
                                        None, None, None, False, (-1, -1), 0.0, True, None, 0,
                                        False, None, 128)


def test_plain_fake_tensor_mode_skips_value_checks(monkeypatch):
    """Under a plain FakeTensorMode (no stand-in for capturing()), the value checks that read
    device data (cu_seqlens, cache_seqlens, a key-padding mask) are skipped as under torch.compile,
    instead of failing with torch's DataDependentOutputException: the calls reach the ops' fake
    implementations and return fake outputs of the right shapes. Outside the mode capturing() is
    False on this CPU machine."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def no_compile(*args, **kwargs):
        raise AssertionError("a spec was loaded")

    monkeypatch.setattr(ops, "load_spec", no_compile)
    assert not _validate.capturing()
    with FakeTensorMode():
        assert _validate.capturing()
        q, kv = _cuda(TOTAL, H, D), _cuda(TOTAL, HK, D)
        cu = _cuda(BATCH + 1, dtype=torch.int32)
        assert flashjit.flash_attn_varlen_func(q, kv, kv, cu, cu, 20, 20).shape == (TOTAL, H, D)
        cache = _cuda(B, CAP, HK, D)
        lengths = _cuda(B, **I32)
        out = flashjit.flash_attn_with_kvcache(_cuda(B, 1, H, D), cache, cache,
                                               cache_seqlens=lengths)
        assert out.shape == (B, 1, H, D)
        query, key = _cuda(B, H, SQ, D), _cuda(B, H, SK, D)
        mask = _cuda(B, 1, 1, SK, dtype=torch.bool)
        from flashjit.interface import scaled_dot_product_attention
        assert scaled_dot_product_attention(query, key, key, attn_mask=mask).shape == (B, H, SQ, D)
