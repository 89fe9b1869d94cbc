"""flash_attn_with_kvcache on the CPU: every bad argument raises, naming it, before any spec is
loaded (so before any compile); the value checks (one device-to-host copy); good arguments reach
the decode op as its contract says; the split-KV heuristic and the shared-memory checks; the fake
op's shapes. The reference's own tests are in test_kvcache_reference_cpu.py.

The public function needs CUDA tensors: the validation tests use fake CUDA tensors
(FakeTensorMode: shapes, dtypes and devices, no data), which a CPU build of torch can make; the
value checks run on real CPU tensors."""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

import flashjit
from flashjit import _validate, _validate_kvcache, ops
from flashjit.jit.registry import ATTENTION_KERNELS

B, SQ, H, HK, D, CAP = 2, 1, 8, 2, 64, 64  # fake calls: contiguous cache (B, CAP, HK, D)
NB, PAGE, MAXB = 9, 16, 4  # paged: (NB, PAGE, HK, D), block_table (B, MAXB)
I32, F32 = dict(dtype=torch.int32), dict(dtype=torch.float32)


class _ReachedTheOp(AssertionError):
    pass


@pytest.fixture
def op_unreachable(fake_cuda, monkeypatch):
    def reached(*args):
        raise _ReachedTheOp("validation let a bad input through to the decode op")

    monkeypatch.setattr(ops, "call_decode", reached)


def _cuda(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="cuda")


def _call(**kwargs):
    """flash_attn_with_kvcache on fake CUDA inputs; kwargs override q, k_cache, v_cache too."""
    args = dict(q=_cuda(B, SQ, H, D), k_cache=_cuda(B, CAP, HK, D), v_cache=_cuda(B, CAP, HK, D))
    args.update(kwargs)
    return flashjit.flash_attn_with_kvcache(**args)


def _paged(**kwargs):
    args = dict(k_cache=_cuda(NB, PAGE, HK, D), v_cache=_cuda(NB, PAGE, HK, D),
                block_table=_cuda(B, MAXB, **I32))
    return _call(**{**args, **kwargs})


def _bad_inputs():
    """(call, kwargs, exception, message): every message names the argument."""
    kv = dict(k=_cuda(B, 1, HK, D), v=_cuda(B, 1, HK, D), cache_seqlens=_cuda(B, **I32))
    rot = dict(rotary_cos=_cuda(CAP + 1, 16), rotary_sin=_cuda(CAP + 1, 16))
    c, p = _call, _paged
    return [
        (c, dict(q=[1]), TypeError, r"q must be a torch.Tensor, got list"),
        (c, dict(q=torch.empty(B, SQ, H, D)), ValueError, r"q must be a CUDA tensor"),
        (c, dict(q=_cuda(B, SQ, H, D, **F32)), TypeError, r"q must be float16 or bfloat16"),
        (c, dict(q=_cuda(SQ, H, D)), ValueError, r"q must have 4 dimensions"),
        (c, dict(k_cache=_cuda(B, CAP, HK, D, dtype=torch.bfloat16)), TypeError,
         r"k_cache must have q's dtype \(torch.float16\), got torch.bfloat16"),
        (c, dict(v_cache=torch.empty(B, CAP, HK, D, dtype=torch.float16)), ValueError,
         r"v_cache must be a CUDA tensor"),
        (c, dict(v_cache=_cuda(B, CAP + 16, HK, D)), ValueError,
         r"k_cache and v_cache must have the same shape"),
        (c, dict(k_cache=_cuda(B, CAP, HK, 32)), ValueError, r"same head_dim, got 64, 32, 64"),
        (c, dict(q=_cuda(B, SQ, H, 60), k_cache=_cuda(B, CAP, HK, 60),
                 v_cache=_cuda(B, CAP, HK, 60)), ValueError,
         r"head_dim 60 of q is not supported by flash_attn_with_kvcache: it must be a multiple "
         r"of 8 from 8 to 256 \(the cache is written in place"),
        (c, dict(q=_cuda(B, SQ, 3, D)), ValueError, r"query heads of q \(3\) must be a multiple "
                                                    r"of .* key/value heads of k_cache \(2\)"),
        (c, dict(k_cache=_cuda(B, CAP, D, HK).transpose(-1, -2)), ValueError,
         r"k_cache must have a contiguous last dim .* in place, so flashjit does not copy"),
        (c, dict(v_cache=torch.empty_strided((B, CAP, HK, D), (CAP * HK * 68, HK * 68, 68, 1),
                                             dtype=torch.float16, device="cuda")), ValueError,
         r"v_cache must have a contiguous last dim and its other strides multiples of 8"),
        (c, dict(k_cache=_cuda(1, CAP, HK, D), v_cache=_cuda(1, CAP, HK, D)), ValueError,
         r"k_cache holds 1 sequences but q has batch 2: pass cache_batch_idx"),
        # a zero stride (heads sharing memory) is refused where the cache is written (appending)
        (c, dict(k_cache=torch.empty_strided((B, CAP, HK, D), (CAP * D, D, 0, 1),
                                             dtype=torch.float16, device="cuda"), **kv),
         ValueError, r"k_cache has a zero stride"),
        (c, dict(block_table=[[0]]), TypeError, r"block_table must be None or an int32 tensor"),
        (p, dict(block_table=_cuda(B, MAXB, dtype=torch.int64)), TypeError,
         r"block_table must be int32, got torch.int64"),
        (p, dict(block_table=torch.zeros(B, MAXB, **I32)), ValueError,
         r"block_table must be on the device of q"),
        (p, dict(block_table=_cuda(B + 1, MAXB, **I32)), ValueError,
         r"block_table must have shape \(batch, max_blocks\) = \(2, max_blocks\), got \(3, 4\)"),
        (p, dict(k_cache=_cuda(NB, 24, HK, D), v_cache=_cuda(NB, 24, HK, D)), ValueError,
         r"k_cache's page size \(its dim 1, with a block_table\) must be a positive multiple"),
        (p, dict(cache_batch_idx=_cuda(B, **I32)), ValueError,
         r"cache_batch_idx is only supported with a contiguous cache"),
        (p, dict(cache_leftpad=_cuda(B, **I32)), ValueError,
         r"cache_leftpad is only supported with a contiguous cache"),
        (c, dict(cache_batch_idx=_cuda(B, dtype=torch.int64)), TypeError,
         r"cache_batch_idx must be int32"),
        (c, dict(cache_batch_idx=_cuda(B + 1, **I32)), ValueError,
         r"cache_batch_idx must have shape \(batch,\) = \(2,\), got \(3,\)"),
        (c, dict(cache_leftpad=torch.zeros(B, **I32)), ValueError,
         r"cache_leftpad must be on the device of q"),
        (c, dict(cache_leftpad=(0, 0)), TypeError, r"cache_leftpad must be None or an int32 "),
        (c, dict(k=_cuda(B, 1, HK, D)), ValueError, r"k and v \(the new keys .* given together"),
        (c, {**kv, "k": _cuda(B, 1, H, D), "v": _cuda(B, 1, H, D)}, ValueError,
         r"k must have shape \(batch, seqlen_new, heads_k, d\) = \(2, 1, 2, 64\), got "
         r"\(2, 1, 8, 64\)"),
        (c, {**kv, "v": _cuda(B, 2, HK, D)}, ValueError, r"v must have shape \(batch, seqlen_new"),
        (c, {**kv, "k": _cuda(B, 1, HK, D, dtype=torch.bfloat16)}, TypeError,
         r"k must have q's dtype"),
        (c, {**kv, "v": torch.empty(B, 1, HK, D, dtype=torch.float16)}, ValueError,
         r"v must be a CUDA tensor"),
        (c, {**kv, "q": _cuda(B, 0, H, D)}, ValueError, r"q has no query rows"),
        (c, {**kv, "rotary_cos": rot["rotary_cos"]}, ValueError,
         r"rotary_cos and rotary_sin must be given together"),
        (c, rot, ValueError, r"rotary_cos/rotary_sin need k and v"),
        (c, {**kv, **rot, "rotary_sin": _cuda(CAP + 1, 16, **F32)}, TypeError,
         r"rotary_sin must have q's dtype"),
        (c, {**kv, **rot, "rotary_cos": _cuda(1, CAP + 1, 16)}, ValueError,
         r"rotary_cos must have 2 dimensions"),
        (c, {**kv, **rot, "rotary_sin": _cuda(CAP + 1, 8)}, ValueError,
         r"rotary_cos and rotary_sin must have the same shape"),
        (c, {**kv, "rotary_cos": _cuda(CAP, 33), "rotary_sin": _cuda(CAP, 33)}, ValueError,
         r"rotary_cos must have shape \(seqlen_ro, rotary_dim / 2\) with 2 <= rotary_dim <= "
         r"head_dim \(64\), got \(64, 33\)"),
        (c, {**kv, "rotary_cos": _cuda(CAP, 0), "rotary_sin": _cuda(CAP, 0)}, ValueError,
         r"rotary_cos must have shape \(seqlen_ro, rotary_dim / 2\)"),
        (c, dict(cache_seqlens=_cuda(B, **F32)), TypeError, r"cache_seqlens must be int32"),
        (c, dict(cache_seqlens=_cuda(B + 1, **I32)), ValueError,
         r"cache_seqlens must have shape \(batch,\) = \(2,\)"),
        (c, dict(cache_seqlens="3"), TypeError,
         r"cache_seqlens must be None, an int or an int32 tensor \(batch,\), got str"),
        (c, dict(cache_seqlens=True), TypeError, r"cache_seqlens must be None, an int or"),
        (c, dict(cache_seqlens=-1), ValueError, r"cache_seqlens must be between 0 and 64"),
        (c, dict(cache_seqlens=CAP + 1), ValueError, r"cache_seqlens must be between 0 and 64"),
        (c, {**kv, "cache_seqlens": CAP}, ValueError,
         r"cache_seqlens \(64\) \+ the 1 new keys of k exceed the cache's capacity \(64 rows\)"),
        (p, {**kv, "cache_seqlens": MAXB * PAGE}, ValueError, r"capacity \(64 rows\)"),
        (c, {**kv, "cache_seqlens": None}, ValueError, r"k and v need cache_seqlens"),
        (c, dict(num_splits=-1), ValueError, r"num_splits must be between 0 and 128, got -1"),
        (c, dict(num_splits=129), ValueError, r"num_splits must be between 0 and 128"),
        (c, dict(num_splits=1.5), TypeError, r"num_splits must be an int"),
        (c, dict(causal="yes"), TypeError, r"causal must be a bool"),
        (c, dict(rotary_interleaved=None), TypeError, r"rotary_interleaved must be a bool"),
        (c, dict(return_softmax_lse=2), TypeError, r"return_softmax_lse must be a bool"),
        (c, dict(softmax_scale=0.0), ValueError, r"softmax_scale must be a positive"),
        (c, dict(window_size=(-2, 0)), ValueError, r"window_size entries must be >= -1"),
        (c, dict(softcap=-1.0), ValueError, r"softcap must be a finite number >= 0"),
        (c, dict(alibi_slopes=_cuda(H)), ValueError, r"alibi_slopes must be float32"),
        (c, dict(alibi_slopes=_cuda(HK, **F32)), ValueError,
         r"alibi_slopes must have shape \(heads,\) = \(8,\) or \(batch, heads\) = \(2, 8\)"),
        (c, dict(sink=_cuda(HK, **F32)), ValueError, r"sink must have shape \(heads,\) = \(8,\)"),
        (c, dict(sink=torch.zeros(H)), ValueError, r"sink must be on the device of q"),
        # no backward: a gradient asked for raises instead of silently missing
        (c, dict(q=_cuda(B, SQ, H, D).requires_grad_()), NotImplementedError,
         r"flash_attn_with_kvcache has no backward \(inference only\), but q requires grad"),
        (c, {**kv, "v": _cuda(B, 1, HK, D).requires_grad_()}, NotImplementedError,
         r"but v requires grad"),
        (c, dict(alibi_slopes=_cuda(H, **F32).requires_grad_()), NotImplementedError,
         r"but alibi_slopes requires grad"),
        (c, dict(sink=_cuda(H, **F32).requires_grad_()), NotImplementedError,
         r"but sink requires grad"),
    ]


def test_bad_arguments_raise_before_the_op(op_unreachable):
    for call, kwargs, error, message in _bad_inputs():
        with pytest.raises(error, match=message):
            call(**kwargs)


def test_a_cache_that_is_only_read_with_a_zero_stride_is_refused_for_what_it_is(op_unreachable):
    # no k, v to append: the message does not say the cache is written
    shared = torch.empty_strided((B, CAP, HK, D), (CAP * D, D, 0, 1), dtype=torch.float16,
                                 device="cuda")
    with pytest.raises(ValueError, match=r"k_cache has a zero stride .*: the kernels read each "
                                         r"row from memory of its own; materialize it"):
        _call(k_cache=shared, v_cache=shared)


def test_signature_is_flash_attns_plus_keyword_only_sink():
    """flash-attn 2.x's flash_attn_with_kvcache (v2.6-2.8), then flashjit's keyword-only sink,
    as in the other entry points: a positional call written for flash-attn means the same."""
    params = inspect.signature(flashjit.flash_attn_with_kvcache).parameters.values()
    positional = [(p.name, p.default) for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    empty = inspect.Parameter.empty
    assert positional == [
        ("q", empty), ("k_cache", empty), ("v_cache", empty), ("k", None), ("v", None),
        ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
        ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None),
        ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0),
        ("rotary_interleaved", True), ("alibi_slopes", None), ("num_splits", 0),
        ("return_softmax_lse", False)]
    assert [(p.name, p.default) for p in params if p.kind is p.KEYWORD_ONLY] == [("sink", None)]
    assert "flash_attn_with_kvcache" in flashjit.__all__


# ---------------------------------------------------------------------------------------------
# What reaches the op
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def recorded_decode(fake_cuda, monkeypatch):
    calls = []

    def record(*args):
        calls.append(args)
        return ops._decode_fake(*args)

    monkeypatch.setattr(ops, "call_decode", record)
    return calls


_OP_ARGS = list(inspect.signature(ops._decode_impl).parameters)


def test_good_arguments_reach_the_op(recorded_decode):
    k, v = _cuda(B, 1, HK, D), _cuda(B, 1, HK, D)
    cos, sin = _cuda(CAP, 16), _cuda(CAP, 16)
    slopes, sink = _cuda(B, H, **F32), _cuda(H, **F32)
    out, lse = _call(k=k, v=v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=5, causal=True,
                     window_size=(8, 3), softcap=30, rotary_interleaved=False,
                     alibi_slopes=slopes, num_splits=4, return_softmax_lse=True, sink=sink)
    assert out.shape == (B, SQ, H, D) and out.dtype == torch.float16
    assert lse.shape == (B, H, SQ) and lse.dtype == torch.float32
    args = dict(zip(_OP_ARGS, recorded_decode[-1]))
    assert args["k_new"] is k and args["v_new"] is v and args["alibi_slopes"] is slopes
    assert args["sink"] is sink and args["rotary_interleaved"] is False
    seqlens = args["cache_seqlens"]  # an int is broadcast to an int32 tensor (batch,)
    assert seqlens.shape == (B,) and seqlens.dtype == torch.int32 and seqlens.device.type == "cuda"
    # seqlen_q 1: causal hides nothing and is dropped; the right bound 3 >= seqlen_q - 1 is none
    assert (args["causal"], args["window_left"], args["window_right"]) == (False, 8, -1)
    assert (args["softcap"], args["num_splits"], args["softmax_scale"]) == (30.0, 4, 0.125)
    # seqlen_q 4: causal stays, its right bound 0; a left bound past the capacity is none
    _call(q=_cuda(B, 4, H, D), causal=True, window_size=(CAP - 1, -1))
    args = dict(zip(_OP_ARGS, recorded_decode[-1]))
    assert (args["causal"], args["window_left"], args["window_right"]) == (True, -1, 0)
    assert args["cache_seqlens"] is None and args["k_new"] is None and args["num_splits"] == 0
    table = _cuda(B, MAXB, **I32)
    assert _paged(block_table=table, cache_seqlens=_cuda(B, **I32)).shape == (B, SQ, H, D)
    assert dict(zip(_OP_ARGS, recorded_decode[-1]))["block_table"] is table


@pytest.mark.skipif("decode" not in ATTENTION_KERNELS, reason="no decode row in the registry")
def test_decode_spec_names(monkeypatch):
    """The decode spec a call picks (kernel decode; variant flags as the forward's, never
    dropout): the names tests/gpu/test_kvcache.py lists."""
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "9.0")
    q = torch.empty(1, 1, 8, 128, dtype=torch.bfloat16)
    for args, name in [((False, -1, -1, 0.0, None, None), "decode_sm90a_bf16_hd128"),
                       ((True, 100, 0, 0.0, None, None), "decode_sm90a_bf16_hd128_causal_window"),
                       ((False, -1, -1, 5.0, q, None), "decode_sm90a_bf16_hd128_softcap_alibi"),
                       ((True, -1, 0, 0.0, None, q), "decode_sm90a_bf16_hd128_causal_sink")]:
        causal, window, softcap, alibi, sink, dropout = ops.variant_flags(*args, 0.0)
        spec = ops.attention_spec("decode", q, causal, dropout, window, softcap, alibi, sink)
        assert spec.name == name


def test_lse_is_returned_in_natural_log(monkeypatch):
    """The kernels' lse is in log2 units; the public lse is natural-log (as flash-attn's)."""
    from flashjit import interface

    lse2 = torch.tensor([[[1.0, float("-inf")]]])
    monkeypatch.setattr(interface, "check_kvcache", lambda *a: _validate_kvcache.KvCacheArgs(
        *(None,) * 4, True, *(None,) * 4, 0.125, False, -1, -1, 0.0, None, None, 0, True))
    monkeypatch.setattr(ops, "call_decode", lambda *a: (torch.zeros(1, 2, 1, 8), lse2))
    q = torch.zeros(1, 2, 1, 8, dtype=torch.float16)
    out, lse = flashjit.flash_attn_with_kvcache(q, q, q, return_softmax_lse=True)
    assert torch.equal(lse, torch.tensor([[[math.log(2.0), float("-inf")]]]))


def test_the_fake_op_gives_the_shapes_and_compiles_nothing(fake_cuda):
    """Through the torch.library op (fake tensors take the dispatcher path): shapes and dtypes
    from the fake implementation, no spec loaded; the caches are declared mutated."""
    q, cache = _cuda(3, 4, H, D, dtype=torch.bfloat16), _cuda(3, CAP, HK, D, dtype=torch.bfloat16)
    out, lse = ops.decode(q, cache, cache, None, None, None, None, True, None, None, None, None,
                          0.125, False, -1, -1, 0.0, None, None, 0)
    assert out.shape == (3, 4, H, D) and out.dtype == torch.bfloat16
    assert lse.shape == (3, H, 4) and lse.dtype == torch.float32
    out, lse = _call(q=_cuda(B, 3, H, D), k=_cuda(B, 3, HK, D), v=_cuda(B, 3, HK, D),
                     cache_seqlens=_cuda(B, **I32), return_softmax_lse=True)
    assert out.shape == (B, 3, H, D) and lse.shape == (B, H, 3)
    schema = ops.decode._opoverload._schema
    mutated = [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write]
    assert mutated == ["k_cache", "v_cache"]


@pytest.fixture
def launched(monkeypatch):
    """ops._decode_impl on CPU tensors with the spec op recorded instead of run: [(spec flags,
    arguments of the spec op)]; 100 SMs."""
    monkeypatch.setattr(ops, "_resolved", {})
    calls, flags = [], []

    def attention_spec(kernel, q, causal, dropout, window, softcap, alibi, sink, paged=False):
        assert not paged  # decoding: the decode spec (paged prefill: test_kvcache_prefill_cpu)
        flags.append((kernel, causal, window, softcap, alibi, sink, dropout))
        return "spec"

    monkeypatch.setattr(ops, "attention_spec", attention_spec)
    monkeypatch.setattr(ops, "load_spec", lambda spec: SimpleNamespace(
        decode=SimpleNamespace(default="the decode op")))
    monkeypatch.setattr(ops, "_launch", lambda op, device, *args: calls.append((flags[-1], args)))
    monkeypatch.setattr(ops, "_limits", lambda device: (100, None, None))  # 100 SMs
    return calls


# the spec op's schema (the decode binding's), but the stream, which _launch adds
DECODE_SCHEMA = ("q", "k_cache", "v_cache", "out", "lse", "k_new", "v_new", "q_rot", "rotary_cos",
                 "rotary_sin", "rotary_interleaved", "cache_seqlens", "cache_batch_idx",
                 "cache_leftpad", "block_table", "o_partial", "lse_partial", "softmax_scale",
                 "window_left", "window_right", "softcap", "alibi_slopes", "sink")


def test_the_spec_op_gets_the_contracts_arguments(launched):
    q = torch.zeros(B, 2, H, D, dtype=torch.float16)
    cache = torch.zeros(NB, PAGE, HK, D, dtype=torch.float16)
    k = torch.zeros(B, 2, HK, D, dtype=torch.float16)
    cos = torch.zeros(40, 8, dtype=torch.float16)
    seqlens, table = torch.tensor([3, 7], **I32), torch.zeros(B, MAXB, **I32)
    slopes, sink = torch.ones(H), torch.zeros(H)
    out, lse = ops._decode_impl(q, cache, cache, k, k, cos, cos, False, seqlens, None, None, table,
                                0.125, True, 5, 0, 30.0, slopes, sink, 4)
    flags, args = launched[-1]
    assert flags == ("decode", True, True, True, True, True, False)  # never dropout
    args = dict(zip(DECODE_SCHEMA, args, strict=True))
    assert args["out"] is out and args["lse"] is lse
    assert out.shape == q.shape and lse.shape == (B, H, 2) and lse.dtype == torch.float32
    assert args["q_rot"].shape == q.shape and args["q_rot"].is_contiguous()
    assert args["o_partial"].shape == (4, B, H, 2, D) and args["o_partial"].dtype == torch.float32
    assert args["lse_partial"].shape == (4, B, H, 2)
    assert all(args[n] is t for n, t in (("cache_seqlens", seqlens), ("block_table", table),
                                         ("rotary_cos", cos), ("alibi_slopes", slopes),
                                         ("sink", sink), ("k_cache", cache)))
    assert (args["softmax_scale"], args["window_left"], args["window_right"], args["softcap"],
            args["rotary_interleaved"]) == (0.125, 5, 0, 30.0, False)
    # one split: no scratch; no rotary: no q_rot; plain attention: the plain spec
    ops._decode_impl(q, cache, cache, None, None, None, None, True, None, None, None, table,
                     0.125, False, -1, -1, 0.0, None, None, 1)
    flags, args = launched[-1]
    args = dict(zip(DECODE_SCHEMA, args))
    assert flags == ("decode",) + (False,) * 6
    assert args["o_partial"] is None and args["lse_partial"] is None and args["q_rot"] is None
    # num_splits 0: the heuristic, from the capacity (MAXB pages of PAGE rows) and 100 SMs
    big = torch.zeros(NB, 1024, HK, D, dtype=torch.float16)
    ops._decode_impl(q, big, big, None, None, None, None, True, None, None, None, table,
                     0.125, False, -1, -1, 0.0, None, None, 0)
    splits = ops.num_splits_heuristic(B, HK, 2 * H // HK, MAXB * 1024, 100)
    assert splits > 1 and dict(zip(DECODE_SCHEMA, launched[-1][1]))["o_partial"].shape[0] == splits
    # a cache whose data pointer is 2 bytes off: no copy can fix it (written in place)
    cache = torch.zeros(cache.numel() + 1, dtype=torch.float16)[1:].view(cache.shape)
    with pytest.raises(ValueError, match="k_cache's data pointer is not 16-byte aligned"):
        ops._decode_impl(q, cache, cache, None, None, None, None, True, None, None, None, None,
                         0.125, False, -1, -1, 0.0, None, None, 1)


# ---------------------------------------------------------------------------------------------
# The split-KV heuristic
# ---------------------------------------------------------------------------------------------
def test_num_splits_heuristic():
    f, eff = ops.num_splits_heuristic, ops.wave_efficiency
    sms = 132
    assert f(256, 8, 4, 131072, sms) == 1  # 2048 CTAs: 7.8 waves of 264, 97% busy already
    # small batches (fewer CTAs than half the 264 slots): fill the slots once, >= 64 keys a split
    assert f(1, 8, 4, 1024, sms) == 16  # 8 CTAs: 33 would fit, 16 blocks of 64 keys
    assert f(1, 8, 4, 4096, sms) == 33 and f(1, 8, 4, 100, sms) == 2 and f(1, 8, 4, 64, sms) == 1
    assert f(1, 1, 1, 10**6, sms) == 128  # one CTA: the most splits allowed
    assert f(8, 8, 4, 131072, sms) == 4  # 64 CTAs x 4 = 256 of 264 slots, one wave
    assert f(16, 8, 4, 8192, sms) == 2  # 128 CTAs x 2
    assert f(1, 32, 1, 131072, sms) == 8  # 32 x 8 = 256, one wave (9 would make 288: two)
    assert f(1, 32, 1, 131072, sms, ctas_per_sm=1) == 4  # d > 128: one CTA per SM
    # from half the slots on: waves, >= 256 keys a split
    assert f(8, 32, 1, 1024, sms) == 1  # 256 CTAs, one wave already
    assert f(5, 32, 1, 511, sms) == 1  # 160 CTAs, not two splits of 256 keys
    assert f(5, 32, 1, 131072, sms) == 3  # 160 x 3 = 480 of two waves of 264: 91% (1: 61%)
    assert ops.decode_ctas(1, 8, 16) == 8 and ops.decode_ctas(1, 8, 17) == 8
    assert ops.decode_ctas(1, 8, 65) == 16 and ops.decode_ctas(2, 8, 0) == 0
    assert f(0, 8, 4, 4096, sms) == 1 and f(1, 8, 0, 4096, sms) == 1 and f(1, 8, 4, 0, sms) == 1
    for batch in (1, 2, 3, 7, 16, 64, 300):
        for heads_k, rows in ((1, 1), (8, 4), (8, 64), (32, 1), (8, 512)):
            ctas = ops.decode_ctas(batch, heads_k, rows)
            small = 2 * ctas <= 2 * sms
            previous = None
            for seqlen_k in (0, 255, 512, 1000, 4096, 65536, 131072):
                s = f(batch, heads_k, rows, seqlen_k, sms)
                assert 1 <= s <= 128
                # a 64-key block a split at least (small), else >= 256 keys a split
                assert s == 1 or (s <= -(-seqlen_k // 64) if small else seqlen_k // s >= 256)
                assert previous is None or s >= previous  # longer caches: no fewer splits
                previous = s
            s = f(batch, heads_k, rows, 131072, sms)
            if small:  # the slots filled once
                assert s == min(128, 2 * sms // ctas)
                continue
            # the fewest splits within 85% of the best wave efficiency
            most = min(128, 131072 // 256)
            best = max(eff(ctas * n, 2 * sms) for n in range(1, most + 1))
            assert eff(ctas * s, 2 * sms) >= 0.85 * best
            assert all(eff(ctas * n, 2 * sms) < 0.85 * best for n in range(1, s))


# ---------------------------------------------------------------------------------------------
# Value checks: one device-to-host copy, and only outside CUDA-graph capture
# ---------------------------------------------------------------------------------------------
def _values(cache_seqlens=None, cache_leftpad=None, cache_batch_idx=None, block_table=None, **kw):
    sizes = dict(batch=2, seqlen_q=1, seqlen_new=1, capacity=16, page_size=16, num_slots=2,
                 seqlen_ro=None, rotary_per_row=False)
    tensor = lambda x: x if x is None or isinstance(x, int) else torch.tensor(x, **I32)  # noqa
    args = map(tensor, (cache_seqlens, cache_leftpad, cache_batch_idx, block_table))
    _validate_kvcache.check_kvcache_values(*args, **{**sizes, **kw})


@pytest.mark.parametrize("kwargs, message", [
    (dict(cache_seqlens=[3, 16]), r"cache_seqlens\[1\] = 16 plus the 1 new keys of k exceeds the "
                                  r"cache's capacity \(16 rows; for a paged cache pass its "
                                  r"block_table\)"),
    (dict(cache_seqlens=[3, 17], seqlen_new=0), r"cache_seqlens\[1\] = 17 exceeds the cache's"),
    (dict(cache_seqlens=[3, 15], seqlen_new=2), r"cache_seqlens\[1\] = 15 plus the 2 new keys"),
    (dict(cache_seqlens=[-1, 0]), r"cache_seqlens\[0\] = -1 is negative"),
    (dict(cache_seqlens=[3, 10], cache_leftpad=[4, 0]),
     r"cache_leftpad\[0\] = 4 must be between 0 and cache_seqlens\[0\] = 3"),
    (dict(cache_seqlens=[3, 10], cache_leftpad=[0, -1]), r"cache_leftpad\[1\] = -1 must be"),
    (dict(cache_leftpad=[0, 17], seqlen_new=0), r"cache_leftpad\[1\] = 17 must be between 0 and "
                                                r"cache_seqlens\[1\] = 16"),
    (dict(cache_seqlens=[3, 4], cache_batch_idx=[0, 2]),
     r"cache_batch_idx\[1\] = 2 is not a row of k_cache \(batch_cache 2\)"),
    (dict(cache_seqlens=[3, 4], cache_batch_idx=[-1, 0]), r"cache_batch_idx\[0\] = -1 is not"),
    (dict(cache_seqlens=[3, 4], cache_batch_idx=[1, 1]), r"cache_batch_idx repeats a cache row "
                                                         r"while k and v are appended"),
    (dict(cache_seqlens=[20, 0], block_table=[[0, 5, 9, -1], [4, -7, 0, 0]], capacity=64,
          num_slots=5), r"block_table\[0, 1\] = 5 is not a page of k_cache \(num_blocks 5\), and "
                        r"sequence 0 uses that page \(cache_seqlens\[0\] \+ 1 new keys = 21 rows "
                        r"of 16\)"),
    (dict(cache_seqlens=[0, 15], block_table=[[0, 1, 2, 3], [-7, 0, 0, 0]], capacity=64,
          num_slots=5), r"block_table\[1, 0\] = -7 is not a page"),
    (dict(block_table=[[0, 1, 2, 3], [0, 1, 4, 5]], capacity=64, num_slots=5, seqlen_new=0),
     r"block_table\[1, 3\] = 5 is not a page .* \(cache_seqlens=None: every sequence holds "
     r"the table's 64 rows of 16\)"),  # cache_seqlens None: every page in use
    (dict(cache_seqlens=[3, 3], block_table=[[0, 1], [0, 2]], capacity=32, num_slots=5),
     r"block_table: two sequences append k and v into the same cache rows"),  # page 0, row 3
    (dict(cache_seqlens=[14, 30], seqlen_new=2, block_table=[[0, 1], [2, 0]], capacity=32,
          num_slots=5), r"two sequences append"),  # rows 14-15 of both: page 0, rows 14-15
    (dict(cache_seqlens=[3, 8], seqlen_new=2, seqlen_ro=9),
     r"rotary_cos/rotary_sin have 9 rows \(positions\), but sequence 1 uses position 9 "
     r"\(cache_seqlens\[1\] - cache_leftpad\[1\] \+ 1\): they need at least 10 rows"),
    (dict(cache_seqlens=[3, 8], seqlen_q=4, rotary_per_row=True, seqlen_ro=11),
     r"sequence 1 uses position 11 .* at least 12 rows"),
    (dict(cache_seqlens=3, seqlen_q=4, rotary_per_row=True, seqlen_ro=6),
     r"sequence 0 uses position 6"),
])
def test_value_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _values(**kwargs)


def test_values_that_pass_and_the_single_transfer(monkeypatch):
    copies = []
    cpu = torch.Tensor.cpu

    def counted(self, *args, **kwargs):
        copies.append(self.shape)
        return cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counted)
    _values(cache_seqlens=[3, 15])  # 15 + 1 new key = the capacity
    _values(cache_seqlens=[3, 4], cache_batch_idx=[1, 1], seqlen_new=0)  # shared rows, reading
    _values(cache_seqlens=[3, 8], cache_leftpad=[3, 2], cache_batch_idx=[1, 0], seqlen_new=2,
            seqlen_ro=10)
    _values(cache_seqlens=[3, 8], cache_leftpad=[0, 2], seqlen_q=4, rotary_per_row=True,
            seqlen_ro=10)  # 8 - 2 + 3 = 9: the last position
    _values(cache_seqlens=[20, 0], block_table=[[0, 4, 9, -1], [4, -7, 0, 0]], capacity=64,
            num_slots=5)  # entries of pages not in use are not read
    _values(cache_seqlens=[16, 16], block_table=[[0, 1], [0, 2]], capacity=32, num_slots=5,
            seqlen_new=2)  # page 0 shared for reading, the appends go to pages 1 and 2
    # one copy per call: the lengths (2), leftpad and rows (2 each), the bad page and its entry,
    # and with a block table and an append whether two sequences write one row
    assert [tuple(c) for c in copies] == [(2,), (4,), (6,), (4,), (8,), (8,)]
    copies.clear()
    _values(cache_seqlens=5, seqlen_ro=7)  # an int and no tensor: nothing to copy
    _values(seqlen_new=0)
    assert copies == []


def test_value_checks_run_only_outside_capture(fake_cuda, monkeypatch):
    seen = []
    monkeypatch.setattr(_validate_kvcache, "check_kvcache_values",
                        lambda *a, **kw: seen.append(kw))
    monkeypatch.setattr(ops, "call_decode", ops._decode_fake)
    _call(cache_seqlens=_cuda(B, **I32))  # fake_cuda: capturing() is True
    assert seen == []
    monkeypatch.setattr(_validate, "capturing", lambda: False)
    _call(q=_cuda(B, 4, H, D), k=_cuda(B, 3, HK, D), v=_cuda(B, 3, HK, D),
          rotary_cos=_cuda(70, 8), rotary_sin=_cuda(70, 8), cache_seqlens=_cuda(B, **I32),
          causal=True)
    (kw,) = seen
    assert kw == dict(batch=B, seqlen_q=4, seqlen_new=3, capacity=CAP, page_size=CAP, num_slots=B,
                      seqlen_ro=70, rotary_per_row=True)


def test_decode_shared_memory_mirror_and_refusal(monkeypatch):
    # ops.decode_smem_bytes mirrors DecodeTraits (csrc/splitkv/decode_kernel.cuh): 16-row tiles
    # up to 16 packed rows, else 64; 3 K/V buffers where they fit, else 2
    assert ops.decode_smem_bytes(128, 4, 3) == (16 + 6 * 64) * 136 * 2 == 108800
    assert ops.decode_smem_bytes(128, 17, 3) == (64 + 6 * 64) * 136 * 2
    assert ops.decode_smem_bytes(256, 16, 2) == (16 + 4 * 64) * 264 * 2 == 143616
    monkeypatch.setattr(ops, "_device_limits", {0: (84, 99 * 1024, 100 * 1024)})  # sm86/sm89
    dev = torch.device("cuda", 0)
    ops.check_decode_smem(dev, 128, 4)  # two buffers: 74 KB
    ops.check_decode_smem(dev, 160, 16)
    with pytest.raises(NotImplementedError, match=r"head dim 192 with 16 query rows.*99 KB"):
        ops.check_decode_smem(dev, 192, 16)
    with pytest.raises(NotImplementedError, match="seqlen_q >= 64 runs the forward kernel"):
        ops.check_decode_smem(dev, 256, 64)
    assert ops.decode_ctas_per_sm(dev, 128, 4) == 1  # two buffers, 74 KB: one CTA per SM
    monkeypatch.setattr(ops, "_device_limits", {0: (132, 227 * 1024, 228 * 1024)})  # H200
    ops.check_decode_smem(dev, 256, 512)  # everything fits
    assert ops.decode_ctas_per_sm(dev, 128, 4) == 2  # 16-row tiles, three buffers: 106 KB
    assert ops.decode_ctas_per_sm(dev, 128, 64) == 1  # 64-row tiles: 119 KB
    assert ops.decode_ctas_per_sm(dev, 64, 64) == 2 and ops.decode_ctas_per_sm(dev, 256, 1) == 1


def test_caches_overlap():
    """k_cache and v_cache must share no element when appending
    (_validate_kvcache._caches_overlap): slices of one buffer that overlap at an offset are
    caught, a packed (.., 2, heads_k, d) buffer split into k and v is not (found by a new user:
    only equal pointers were caught)."""
    f = _validate_kvcache._caches_overlap
    buf = torch.zeros(2, 80, 2, 64)
    assert f(buf[:, :64], buf[:, 16:80]) and f(buf, buf)
    assert not f(buf[:, :40], buf[:, 40:80])
    packed = torch.zeros(2, 64, 2, 4, 64)
    assert not f(packed[:, :, 0], packed[:, :, 1])
    pages = torch.zeros(9, 16, 2, 64)
    assert not f(pages[:4], pages[4:8]) and f(pages[:5], pages[4:9])
    assert not f(pages, pages.clone()) and not f(pages[:0], pages)
    flat = torch.zeros(2 * 64 * 2 * 64)  # different strides: spans that meet count
    assert f(flat[:8192].view(2, 32, 2, 64), flat[4096:12288].view(2, 64, 2, 32))
    assert not f(flat[:8192].view(2, 32, 2, 64), flat[8192:].view(2, 64, 2, 32))
