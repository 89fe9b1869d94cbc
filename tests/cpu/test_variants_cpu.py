"""The variants (window_size, softcap, alibi_slopes, sink) on the CPU: every bad input raises,
naming the argument, before the op is reached (so before any compile); good inputs reach the op
with the values and spec flags of the contract; the autograd backward returns the sink's
gradient.

The public functions need CUDA tensors: the validation tests call them with fake CUDA tensors
(FakeTensorMode: shapes, dtypes and devices, no data), which a CPU build of torch can make."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import flashjit
from flashjit import _validate, interface, ops
from flashjit.testing import attention_reference

LN2 = math.log(2.0)
B, SQ, SK, H, HK, D = 2, 16, 24, 4, 2, 64  # fixed-length sizes of the fake calls
TOTAL, BATCH = 40, 3  # varlen: packed rows, sequences


class _ReachedTheOp(AssertionError):
    pass


@pytest.fixture
def op_unreachable(fake_cuda, monkeypatch):
    """As fake_cuda, and the forward op raises: a bad input must be refused before it."""
    def reached(*args):
        raise _ReachedTheOp("validation let a bad input through to the forward op")

    monkeypatch.setattr(ops, "call_fwd", reached)


def _cuda(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="cuda")


def _call(entry: str, **kwargs):
    """One of the six flash_attn_* functions on fake CUDA inputs (heads 4, heads_k 2, d 64)."""
    fixed_q, fixed_kv = _cuda(B, SQ, H, D), _cuda(B, SK, HK, D)
    varlen_q, varlen_kv = _cuda(TOTAL, H, D), _cuda(TOTAL, HK, D)
    cu = _cuda(BATCH + 1, dtype=torch.int32)
    if entry == "func":
        return flashjit.flash_attn_func(fixed_q, fixed_kv, fixed_kv, **kwargs)
    if entry == "qkvpacked":
        return flashjit.flash_attn_qkvpacked_func(_cuda(B, SQ, 3, H, D), **kwargs)
    if entry == "kvpacked":
        return flashjit.flash_attn_kvpacked_func(fixed_q, _cuda(B, SK, 2, HK, D), **kwargs)
    if entry == "varlen":
        return flashjit.flash_attn_varlen_func(varlen_q, varlen_kv, varlen_kv, cu, cu, 20, 20,
                                               **kwargs)
    if entry == "varlen_qkvpacked":
        return flashjit.flash_attn_varlen_qkvpacked_func(_cuda(TOTAL, 3, H, D), cu, 20, **kwargs)
    if entry == "varlen_kvpacked":
        return flashjit.flash_attn_varlen_kvpacked_func(varlen_q, _cuda(TOTAL, 2, HK, D), cu, cu,
                                                        20, 20, **kwargs)
    raise ValueError(entry)


ENTRIES = ["func", "qkvpacked", "kvpacked", "varlen", "varlen_qkvpacked", "varlen_kvpacked"]
VARLEN = {"varlen", "varlen_qkvpacked", "varlen_kvpacked"}
Q_NAME = {"qkvpacked": "qkv", "varlen_qkvpacked": "qkv"}  # how the error names q's device


def _heads(entry):
    return 4 if entry not in ("qkvpacked", "varlen_qkvpacked") else H  # qkv: heads == heads_k


def _bad_inputs(entry):
    """(kwargs, exception, message) for one entry point; every message names the argument."""
    batch = BATCH if entry in VARLEN else B
    f32 = dict(dtype=torch.float32)
    bad = [
        (dict(window_size=(-2, 0)), ValueError, r"window_size entries must be >= -1"),
        (dict(window_size=(0, -3)), ValueError, r"window_size entries must be >= -1"),
        (dict(window_size=(1.5, 0)), TypeError, r"window_size must be a pair \(left, right\) of "
                                                r"ints"),
        (dict(window_size=(True, 0)), TypeError, r"window_size must be a pair"),
        (dict(window_size=(0, False)), TypeError, r"window_size must be a pair"),
        (dict(window_size=4), TypeError, r"window_size must be a pair"),
        (dict(window_size=(1, 2, 3)), TypeError, r"window_size must be a pair"),
        (dict(window_size=None), TypeError, r"window_size must be a pair"),
        (dict(softcap=-1.0), ValueError, r"softcap must be a finite number >= 0"),
        (dict(softcap=float("nan")), ValueError, r"softcap must be a finite number >= 0"),
        (dict(softcap=float("inf")), ValueError, r"softcap must be a finite number >= 0"),
        (dict(softcap=1e39), ValueError, r"softcap must be 0 \(off\) or between"),
        (dict(softcap=1e-50), ValueError, r"softcap must be 0 \(off\) or between"),
        (dict(softcap=1e6), ValueError, r"softcap must be 0 \(off\) or between"),
        (dict(softmax_scale=1e39), ValueError, r"softmax_scale must be between"),
        (dict(softmax_scale=1e-50), ValueError, r"softmax_scale must be between"),
        (dict(softcap="30"), TypeError, r"softcap must be a float"),
        (dict(softcap=True), TypeError, r"softcap must be a float"),
        (dict(softcap=1j), TypeError, r"softcap must be a float"),
        (dict(softcap=None), TypeError, r"softcap must be a float"),
        (dict(alibi_slopes=[0.5] * 4), TypeError, r"alibi_slopes must be None or a float32 "
                                                  r"tensor of shape \(heads,\) or \(batch, "
                                                  r"heads\), got list"),
        (dict(alibi_slopes=0.5), TypeError, r"alibi_slopes must be None or a float32 tensor"),
        (dict(alibi_slopes=_cuda(4)), ValueError, r"alibi_slopes must be float32, got "
                                                  r"torch.float16"),
        (dict(alibi_slopes=_cuda(4, dtype=torch.float64)), ValueError,
         r"alibi_slopes must be float32"),
        (dict(alibi_slopes=torch.empty(4)), ValueError, r"alibi_slopes must be on the device of "
                                                        rf"{Q_NAME.get(entry, 'q')} \(cuda:0\), "
                                                        r"got cpu"),
        (dict(alibi_slopes=_cuda(2, **f32)), ValueError,  # heads_k, not heads
         rf"alibi_slopes must have shape \(heads,\) = \(4,\) or \(batch, heads\) = "
         rf"\({batch}, 4\), got \(2,\)"),
        (dict(alibi_slopes=_cuda(batch + 1, 4, **f32)), ValueError, r"alibi_slopes must have "
                                                                    r"shape"),
        (dict(alibi_slopes=_cuda(batch, 4, 1, **f32)), ValueError, r"alibi_slopes must have "
                                                                   r"shape"),
        (dict(alibi_slopes=_cuda(**f32)), ValueError, r"alibi_slopes must have shape"),
        (dict(sink=[0.0] * 4), TypeError, r"sink must be None or a float32 tensor of shape "
                                          r"\(heads,\), got list"),
        (dict(sink=_cuda(4)), ValueError, r"sink must be float32, got torch.float16 \(convert "
                                          r"it with sink.float\(\)"),
        (dict(sink=_cuda(4, dtype=torch.bfloat16)), ValueError, r"sink must be float32"),
        (dict(sink=torch.empty(4)), ValueError, r"sink must be on the device of"),
        (dict(sink=_cuda(2, **f32)), ValueError, r"sink must have shape \(heads,\) = \(4,\), "
                                                 r"got \(2,\)"),
        (dict(sink=_cuda(1, 4, **f32)), ValueError, r"sink must have shape \(heads,\)"),
        (dict(sink=_cuda(batch, 4, **f32)), ValueError, r"sink must have shape \(heads,\)"),
        (dict(sink=_cuda(**f32)), ValueError, r"sink must have shape \(heads,\)"),
    ]
    return bad


@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_variant_arguments_raise_before_the_op(entry, op_unreachable):
    for kwargs, error, message in _bad_inputs(entry):
        with pytest.raises(error, match=message):
            _call(entry, **kwargs)


def test_varlen_block_table_goes_to_the_paged_path(op_unreachable):
    # flash-attn 2.x's paged varlen forward: k, v must then be paged caches (4-D)
    with pytest.raises(ValueError, match=r"k must be a paged cache \(num_blocks, page_size"):
        _call("varlen", block_table=_cuda(BATCH, 4, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="dropout_p must be 0 with block_table"):
        _call("varlen", block_table=_cuda(BATCH, 4, dtype=torch.int32), dropout_p=0.1)


def test_sink_is_keyword_only_and_not_in_sdpa(op_unreachable):
    with pytest.raises(TypeError):
        flashjit.flash_attn_func(*(_cuda(B, SQ, H, D) for _ in range(3)), 0.0, None, False,
                                 (-1, -1), 0.0, None, False, False, _cuda(H, dtype=torch.float32))
    with pytest.raises(TypeError, match="sink"):
        flashjit.scaled_dot_product_attention(*(_cuda(B, H, SQ, D) for _ in range(3)),
                                              sink=_cuda(H, dtype=torch.float32))


def test_alibi_slopes_requiring_grad_are_refused():
    """flash-attn silently gives alibi_slopes no gradient; flashjit says so instead (CPU tensors:
    check_variant_tensors alone)."""
    slopes = torch.ones(4, requires_grad=True)
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"alibi_slopes requires grad, but flashjit computes no "
                                         r"gradient for it: pass alibi_slopes.detach\(\)"):
        _validate.check_variant_tensors(slopes, None, cpu, 2, 4, "q")
    with torch.no_grad():  # inference: fine
        assert _validate.check_variant_tensors(slopes, None, cpu, 2, 4, "q")[0] is slopes
    sink = torch.zeros(4, requires_grad=True)  # a sink may require grad
    assert _validate.check_variant_tensors(None, sink, cpu, 2, 4, "q")[1] is sink
    strided = torch.zeros(8)[::2]  # copied to contiguous, gradient kept
    assert _validate.check_variant_tensors(strided, strided, cpu, 2, 4, "q")[0].is_contiguous()


# ---------------------------------------------------------------------------------------------
# What reaches the op, and which spec it picks
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def recorded_fwd(fake_cuda, monkeypatch):
    """As fake_cuda, with ops.call_fwd recording its arguments (then the fake forward)."""
    calls = []

    def record(*args):
        calls.append(args)
        return ops._fwd_fake(*args)

    monkeypatch.setattr(ops, "call_fwd", record)
    return calls


def _op_values(args):
    """(causal, window_left, window_right, softcap, alibi?, sink?, dropout_p) of a call_fwd."""
    (q, k, v, cu_q, cu_k, seqused_k, block_table, max_q, max_k, scale, causal, bottom_right,
     left, right, softcap, alibi, sink, dropout_p, rng_state, residual) = args
    assert block_table is None  # paged K/V reach the forward only from flash_attn_with_kvcache
    return causal, left, right, softcap, alibi is not None, sink is not None, dropout_p


def _spec_name(args, arch_list, monkeypatch):
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", arch_list)
    causal, left, right, softcap, alibi, sink, dropout_p = _op_values(args)
    flags = ops.variant_flags(causal, left, right, softcap, object() if alibi else None,
                              object() if sink else None, dropout_p)
    q = torch.empty(1, 1, 1, args[0].shape[-1], dtype=torch.bfloat16)  # a CPU stand-in
    return ops.attention_spec("fwd", q, flags[0], flags[5], *flags[1:5]).name


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kwargs, values, name", [
    (dict(), (False, -1, -1, 0.0, False, False, 0.0), "fwd_sm80_bf16_hd64"),
    (dict(causal=True), (True, -1, 0, 0.0, False, False, 0.0), "fwd_sm80_bf16_hd64_causal"),
    (dict(window_size=(-1, 0)), (True, -1, 0, 0.0, False, False, 0.0),
     "fwd_sm80_bf16_hd64_causal"),
    (dict(window_size=(10**6, 10**6)), (False, -1, -1, 0.0, False, False, 0.0),
     "fwd_sm80_bf16_hd64"),
    (dict(window_size=(8, 2)), (False, 8, 2, 0.0, False, False, 0.0),
     "fwd_sm80_bf16_hd64_window"),
    (dict(window_size=(8, 0)), (False, 8, 0, 0.0, False, False, 0.0),
     "fwd_sm80_bf16_hd64_window"),
    (dict(causal=True, window_size=(8, 5)), (True, 8, 0, 0.0, False, False, 0.0),
     "fwd_sm80_bf16_hd64_causal_window"),
    (dict(causal=True, window_size=(-1, 5)), (True, -1, 0, 0.0, False, False, 0.0),
     "fwd_sm80_bf16_hd64_causal"),
    (dict(softcap=30), (False, -1, -1, 30.0, False, False, 0.0), "fwd_sm80_bf16_hd64_softcap"),
    (dict(softcap=0), (False, -1, -1, 0.0, False, False, 0.0), "fwd_sm80_bf16_hd64"),
    (dict(alibi_slopes="heads"), (False, -1, -1, 0.0, True, False, 0.0),
     "fwd_sm80_bf16_hd64_alibi"),
    (dict(alibi_slopes="batch_heads"), (False, -1, -1, 0.0, True, False, 0.0),
     "fwd_sm80_bf16_hd64_alibi"),
    (dict(sink="heads"), (False, -1, -1, 0.0, False, True, 0.0), "fwd_sm80_bf16_hd64_sink"),
    (dict(causal=True, window_size=(4, -1), softcap=5.0, alibi_slopes="heads", sink="heads",
          dropout_p=0.1), (True, 4, 0, 5.0, True, True, 0.1),
     "fwd_sm80_bf16_hd64_causal_window_softcap_alibi_sink_dropout"),
])
def test_public_arguments_reach_the_op_and_pick_the_spec(entry, kwargs, values, name,
                                                         recorded_fwd, monkeypatch):
    heads, batch = _heads(entry), BATCH if entry in VARLEN else B
    tensors = {"heads": (heads,), "batch_heads": (batch, heads)}
    kwargs = {key: _cuda(*tensors[value], dtype=torch.float32)
              if key in ("alibi_slopes", "sink") else value for key, value in kwargs.items()}
    result = _call(entry, **kwargs, return_attn_probs=True)
    out, lse, s_dmask = result
    assert s_dmask is None
    if entry in VARLEN:
        assert out.shape == (TOTAL, heads, D) and lse.shape == (heads, TOTAL)
    else:
        assert out.shape == (B, SQ, heads, D) and lse.shape == (B, heads, SQ)
    (args,) = recorded_fwd
    assert _op_values(args) == values
    assert _spec_name(args, "8.0", monkeypatch) == name
    for key in ("alibi_slopes", "sink"):  # the very tensors, as the kernels read them
        if key in kwargs:
            assert args[15 if key == "alibi_slopes" else 16] is kwargs[key]


def test_variant_flags_and_window_bounds():
    f = ops.variant_flags
    assert f(False, -1, -1, 0.0, None, None, 0.0) == (False,) * 6
    assert f(True, -1, 0, 0.0, None, None, 0.0) == (True,) + (False,) * 5  # causal alone
    assert f(True, -1, -1, 0.0, None, None, 0.0) == (True,) + (False,) * 5  # right: causal's
    assert f(True, 3, 0, 0.0, None, None, 0.0) == (True, True) + (False,) * 4
    assert f(False, -1, 0, 0.0, None, None, 0.0)[:2] == (False, True)  # not normalised: a window
    assert f(False, 3, -1, 0.0, None, None, 0.0)[:2] == (False, True)
    assert f(False, -1, 3, 0.0, None, None, 0.0)[:2] == (False, True)
    assert f(False, -1, -1, 1e-3, torch.ones(1), torch.ones(1), 0.5) == (
        False, False, True, True, True, True)
    assert ops.window_bounds(True, 5, -1) == (5, 0) and ops.window_bounds(True, -1, 7) == (-1, 0)
    assert ops.window_bounds(False, 5, 7) == (5, 7)


def test_the_spec_ops_get_the_contracts_arguments(monkeypatch):
    """ops._fwd_impl / _bwd_impl call the spec op with the binding's argument order (the contract
    and csrc/*_binding.cpp), from the spec the variant values pick, cached per flag set."""
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(ops, "_resolved", {})
    loaded, launched = [], []

    def load_spec(spec):
        loaded.append(spec.name)
        op = SimpleNamespace(default=spec.name)
        return SimpleNamespace(fwd=op, bwd=op)

    monkeypatch.setattr(ops, "load_spec", load_spec)
    monkeypatch.setattr(ops, "_launch", lambda op, device, *args: launched.append((op, args)))
    q = torch.zeros(2, 8, 4, 64, dtype=torch.bfloat16)
    k = torch.zeros(2, 8, 2, 64, dtype=torch.bfloat16)
    slopes, sink = torch.ones(4), torch.zeros(4)
    args = (None, None, None, 8, 8, 0.125, True, True, 5, 3, 30.0, slopes, sink)
    fwd_impl_args = (*args[:3], None, *args[3:])  # block_table (None) after seqused_k
    ops._fwd_impl(q, k, k, *fwd_impl_args, 0.0, None, True)
    op, fwd_args = launched[-1]
    assert op == "fwd_sm90a_bf16_hd64_causal_window_softcap_alibi_sink_ws"
    assert len(fwd_args) == 21  # the binding's 22 arguments but the stream (_launch adds it)
    assert fwd_args[3].shape == q.shape and fwd_args[4].shape == (2, 4, 8)  # out, lse
    assert fwd_args[5] is not None and fwd_args[5].shape == q.shape  # out_residual
    assert fwd_args[9] is None  # block_table
    assert fwd_args[10:] == (8, 8, 0.125, True, 5, 0, 30.0, slopes, sink, None, 0.0)
    dout = torch.zeros_like(q)
    out, lse = fwd_args[3], fwd_args[4]
    ops._bwd_impl(dout, q, k, k, out, None, lse, *args, 0.0, None, False)
    op, bwd_args = launched[-1]
    assert op == "bwd_sm90a_bf16_hd64_causal_window_softcap_alibi_sink_wgmma"
    assert len(bwd_args) == 27
    assert bwd_args[15:] == (8, 8, 0.125, True, 5, 0, 30.0, slopes, sink, None, 0.0, False)
    ops._fwd_impl(q, k, k, None, None, None, None, 8, 8, 0.125, True, True, -1, 0, 0.0, None,
                  None, 0.0, None, False)
    assert launched[-1][0] == "fwd_sm90a_bf16_hd64_causal_ws"  # unchanged spec
    ops._fwd_impl(q, k, k, *fwd_impl_args, 0.0, None, True)  # cached: no second load
    # a block table: the paged spec (sm90ws's, as the plain one), which gets it after
    # seqused_k (k/v: 3 pages of 16 rows)
    pages = torch.zeros(3, 16, 2, 64, dtype=torch.bfloat16)
    table, used = torch.zeros(2, 2, dtype=torch.int32), torch.tensor([20, 9], dtype=torch.int32)
    ops._fwd_impl(q, pages, pages, None, None, used, table, 8, 32, 0.125, True, True, -1, 0, 0.0,
                  None, None, 0.0, None, False)
    op, fwd_args = launched[-1]
    assert op == "fwd_sm90a_bf16_hd64_causal_paged_ws"
    assert fwd_args[8] is used and fwd_args[9] is table and fwd_args[10:12] == (8, 32)
    assert loaded == ["fwd_sm90a_bf16_hd64_causal_window_softcap_alibi_sink_ws",
                      "bwd_sm90a_bf16_hd64_causal_window_softcap_alibi_sink_wgmma",
                      "fwd_sm90a_bf16_hd64_causal_ws", "fwd_sm90a_bf16_hd64_causal_paged_ws"]
    keys = list(ops._resolved)
    assert keys[0][4:] == (True, True, True, True, True, False, False)  # flags, paged in the key
    assert keys[-1][4:] == (True, False, False, False, False, False, True)


@pytest.mark.parametrize("family, head_dim, spec_name, width", [
    (None, 96, "bwd_sm90a_bf16_hd96_wgmma", 128),  # the 128-column kernels, padded scratch
    (None, 80, "bwd_sm90a_bf16_hd96_wgmma", 128),
    (None, 64, "bwd_sm90a_bf16_hd64_wgmma", 64),
    ("sm80", 96, "bwd_sm90a_bf16_hd96", 96),  # mma.sync: the bucket's own width
    (None, 160, "bwd_sm90a_bf16_hd160_wgmma", 192),  # the 192-column kernels
    (None, 192, "bwd_sm90a_bf16_hd192_wgmma", 192),
    ("sm80", 160, "bwd_sm90a_bf16_hd160", 160),
])
def test_bwd_scratch_has_the_kernels_padded_width(family, head_dim, spec_name, width,
                                                  monkeypatch):
    """The backward's fp32 dq_accum rows are as wide as the kernels the spec runs (JitSpec.
    padded_head_dim; the binding checks it against bwd_dq_accum_width())."""
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "9.0")
    if family:
        monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", family)
    monkeypatch.setattr(ops, "_resolved", {})
    launched = []
    monkeypatch.setattr(ops, "load_spec", lambda spec: SimpleNamespace(
        bwd=SimpleNamespace(default=spec.name)))
    monkeypatch.setattr(ops, "_launch", lambda op, device, *args: launched.append((op, args)))
    q = torch.zeros(2, 8, 4, head_dim, dtype=torch.bfloat16)
    lse = torch.zeros(2, 4, 8)
    ops._bwd_impl(q, q, q, q, q, None, lse, None, None, None, 8, 8, 0.125, False, True, -1, -1,
                  0.0, None, None, 0.0, None, False)
    op, args = launched[-1]
    dq_accum, dsum = args[10], args[11]
    assert op == spec_name
    assert dq_accum.shape == (2, 4, dq_accum.shape[2], width) and dq_accum.shape[2] >= 8
    assert dsum.shape == dq_accum.shape[:3]


def test_testing_dropout_mask_loads_the_dropout_mask_spec(monkeypatch):
    from flashjit import testing

    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "8.0;9.0")
    loaded, launched = [], []

    def load_spec(spec):
        loaded.append(spec)
        return SimpleNamespace(dropout_mask="the op")

    monkeypatch.setattr(testing, "load_spec", load_spec)
    monkeypatch.setattr(ops, "_launch", lambda op, device, *args: launched.append((op, args)))
    state = torch.tensor([1, 2], dtype=torch.int64)
    mask = testing.dropout_mask(state, 2, 3, 4, 5, 0.25)
    assert [s.name for s in loaded] == ["dropout_mask_sm80-sm90a"]
    (op, args), = launched
    assert op == "the op" and args[1] is state and args[2:] == (2, 3, 4, 5, 0.25)
    assert args[0].shape == (2, 3, 4, 5) and mask.dtype == torch.bool


# ---------------------------------------------------------------------------------------------
# Autograd: the sink's gradient through interface._attention, on CPU tensors, with the ops
# replaced by the reference (so only the Python side is under test)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def reference_ops(monkeypatch):
    """ops.call_fwd from attention_reference (float64, rounded to the inputs' dtype, with the
    rounding residual); ops.call_bwd records its arguments and returns zeros."""
    bwd_calls = []

    def call_fwd(q, k, v, cu_q, cu_k, seqused_k, block_table, max_q, max_k, scale, causal,
                 bottom_right, left, right, softcap, alibi, sink, dropout_p, rng_state,
                 with_residual):
        assert cu_q is None and seqused_k is None and block_table is None and dropout_p == 0.0
        out, lse = attention_reference(q.double(), k.double(), v.double(), causal=causal,
                                       window_size=(left, right), softcap=softcap,
                                       alibi_slopes=alibi, sink=sink, softmax_scale=scale,
                                       bottom_right=bottom_right)
        rounded = out.to(q.dtype)
        residual = (out - rounded.double()).to(q.dtype) if with_residual else q.new_empty(0)
        return rounded, (lse / LN2).float(), residual

    def call_bwd(*args):
        bwd_calls.append(args)
        dout, q, k, v, out, out_residual = args[:6]
        sink = args[19]
        # D = rowsum(dO * O) in lse's layout (batch, heads, seqlen_q), as flashjit::bwd returns
        # it with a sink; O at the precision the residual restores
        o = out.double() + (out_residual.double() if out_residual is not None else 0.0)
        d = (dout.double() * o).sum(-1).transpose(1, 2).float()
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                d if sink is not None else q.new_empty(0, dtype=torch.float32))

    monkeypatch.setattr(ops, "call_fwd", call_fwd)
    monkeypatch.setattr(ops, "call_bwd", call_bwd)
    return bwd_calls


@pytest.mark.parametrize("d", [20, 64])  # 20: zero-padded to 24 inside _attention
@pytest.mark.parametrize("qkv_grad", [False, True])
def test_sink_gradient_through_autograd(d, qkv_grad, reference_ops):
    """GQA (4 query heads, 2 K/V heads), causal with a window and seqlen_q > seqlen_k (rows
    without keys), fp16 inputs: the sink's gradient matches autograd of the float64 reference."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 12, 4, d, generator=g).half().requires_grad_(qkv_grad)
    k = torch.randn(2, 9, 2, d, generator=g).half().requires_grad_(qkv_grad)
    v = torch.randn(2, 9, 2, d, generator=g).half().requires_grad_(qkv_grad)
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    slopes = torch.tensor([0.1, 0.2, 0.3, 0.4])
    scale, window = 1 / math.sqrt(d), (3, 0)
    out, lse = interface._attention(q, k, v, None, None, None, 12, 9, scale, True, True, 0.0,
                                    False, window, 2.0, slopes, sink)
    assert out.shape == q.shape
    dout = torch.randn(out.shape, generator=g).half()
    out.backward(dout)
    ref_sink = sink.detach().double().requires_grad_()
    ref_out, ref_lse = attention_reference(q.detach().double(), k.detach().double(),
                                           v.detach().double(), causal=True, window_size=window,
                                           softcap=2.0, alibi_slopes=slopes, sink=ref_sink)
    ref_out.backward(dout.double())
    assert sink.grad.dtype == torch.float32 and sink.grad.shape == (4,)
    torch.testing.assert_close(sink.grad.double(), ref_sink.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double() * LN2, ref_lse, rtol=1e-6, atol=1e-6)
    # q, k, v's gradients come from the backward op, called only when one of them needs one,
    # with the contract's arguments (the padded head dim, the residual, the variant values)
    if not qkv_grad:
        assert reference_ops == []
        return
    (args,) = reference_ops
    assert args[1].shape[-1] == -(-d // 8) * 8 and args[5] is not None  # padded; residual
    assert args[10:] == (12, 9, scale, True, True, 3, 0, 2.0, slopes, sink, 0.0, None, False)
    assert q.grad.shape == q.shape and torch.all(q.grad == 0)


def test_sink_gradient_through_autograd_varlen(monkeypatch):
    """Varlen layout: lse (heads, total_q); rows past cu_seqlens_q[-1] (never written) left
    out."""
    seqs = [(5, 7), (0, 3), (8, 4)]  # (seqlen_q, seqlen_k)
    total_q, total_k, pad = 13, 14, 3
    g = torch.Generator().manual_seed(1)
    q = torch.randn(total_q + pad, 4, 16, generator=g).half()
    k = torch.randn(total_k, 2, 16, generator=g).half()
    v = torch.randn(total_k, 2, 16, generator=g).half()
    cu_q = torch.tensor([0, 5, 5, 13], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 10, 14], dtype=torch.int32)

    def call_fwd(q, k, v, cu_q, cu_k, seqused_k, block_table, max_q, max_k, scale, causal,
                 bottom_right, left, right, softcap, alibi, sink, dropout_p, rng_state,
                 with_residual):
        out = torch.full(q.shape, float("nan"), dtype=torch.float64)
        lse = torch.full((q.shape[1], q.shape[0]), float("nan"), dtype=torch.float64)
        out[total_q:] = 0  # rows past the end: output 0, lse never written
        for b, (sq, sk) in enumerate(seqs):
            qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
            o, l = attention_reference(q[None, qs].double(), k[None, ks].double(),
                                       v[None, ks].double(), causal=causal, sink=sink,
                                       softmax_scale=scale)
            out[qs], lse[:, qs] = o[0], l[0]
        rounded = out.to(q.dtype)
        return rounded, (lse / LN2).float(), (out - rounded.double()).to(q.dtype)

    monkeypatch.setattr(ops, "call_fwd", call_fwd)
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    out, _ = interface._attention(q, k, v, cu_q, cu_k, None, 8, 7, 0.25, True, True, 0.0, False,
                                  (-1, 0), 0.0, None, sink)
    dout = torch.randn(out.shape, generator=g).half()
    out.backward(dout)
    ref_sink = sink.detach().double().requires_grad_()
    for b, (sq, sk) in enumerate(seqs):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        o, _ = attention_reference(q[None, qs].double(), k[None, ks].double(),
                                   v[None, ks].double(), causal=True, sink=ref_sink,
                                   softmax_scale=0.25)
        o.backward(dout[None, qs].double())
    assert torch.isfinite(sink.grad).all()
    torch.testing.assert_close(sink.grad.double(), ref_sink.grad, rtol=1e-4, atol=1e-5)


def test_softmax_d_unpads_the_backward_scratch():
    """ops._softmax_d: the backward's D scratch (padded rows; varlen sequence b from
    cu_seqlens_q[b] + 128 b) back in lse's layout, as sink_grad_from_d reads it."""
    pad = ops.BWD_ROW_PAD
    dsum = torch.randn(2, 3, 2 * pad)  # fixed: (batch, heads, rows >= seqlen_q)
    lse = torch.empty(2, 3, 37)
    assert torch.equal(ops._softmax_d(dsum, lse, None), dsum[..., :37])
    lens = [5, 0, 130, 1]
    cu = torch.tensor([0, 5, 5, 135, 136], dtype=torch.int32)
    total = sum(lens) + 4  # 4 rows past cu_seqlens_q[-1]
    dsum = torch.randn(3, total + pad * len(lens))
    d = ops._softmax_d(dsum, torch.empty(3, total), cu)
    assert d.shape == (3, total)
    for b, (start, n) in enumerate(zip(cu[:-1].tolist(), lens)):
        assert torch.equal(d[:, start:start + n], dsum[:, start + pad * b:start + pad * b + n])
