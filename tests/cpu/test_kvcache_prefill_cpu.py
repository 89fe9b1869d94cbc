"""flash_attn_with_kvcache's chunked prefill on the CPU: from ops.PREFILL_MIN_QUERIES queries on
(contiguous) or ops.paged_prefill_min_queries() (paged: PREFILL_MIN_QUERIES where the paged
forward is sm90ws, else ops.PAGED_PREFILL_MIN_QUERIES, or PREFILL_MIN_QUERIES where the decode
kernel's shared memory does not fit), a cache without cache_batch_idx and cache_leftpad is
appended to by the decode op (no splits) and attended by the forward op (its paged spec with a
block table), with each sequence's keys as seqused_k; the spec ops are recorded, not run. The forward's arguments
follow csrc/fwd_binding.cpp's schema (checked against its text)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from flashjit import ops
from flashjit.jit import csrc_dir

B, H, HK, D = 2, 8, 2, 64
NB, PAGE, MAXB, CAP = 9, 16, 4, 64  # paged (NB, PAGE, HK, D), table (B, MAXB); contiguous CAP
I32 = dict(dtype=torch.int32)

# the binding's argument names, but the stream (_launch adds it)
FWD_SCHEMA = ("q", "k", "v", "out", "lse", "out_residual", "cu_seqlens_q", "cu_seqlens_k",
              "seqused_k", "block_table", "max_seqlen_q", "max_seqlen_k", "softmax_scale",
              "causal_bottom_right", "window_left", "window_right", "softcap", "alibi_slopes",
              "sink", "rng_state", "dropout_p")
DECODE_SCHEMA = ("q", "k_cache", "v_cache", "out", "lse", "k_new", "v_new", "q_rot",
                 "rotary_cos", "rotary_sin", "rotary_interleaved", "cache_seqlens",
                 "cache_batch_idx", "cache_leftpad", "block_table", "o_partial", "lse_partial",
                 "softmax_scale", "window_left", "window_right", "softcap", "alibi_slopes",
                 "sink")


def _schema_names(binding: str, op: str) -> tuple:
    text = (csrc_dir() / binding).read_text()
    schema = re.search(rf'"{op}\((.*?)\) -> \(\)"\);', text, re.S).group(1)
    schema = re.sub(r'"\s*"', "", schema)  # the C++ string literals, joined
    return tuple(arg.split()[-1] for arg in schema.split(","))


def test_schemas_are_the_bindings():
    assert _schema_names("fwd_binding.cpp", "fwd") == FWD_SCHEMA + ("stream",)
    assert _schema_names("decode_binding.cpp", "decode") == DECODE_SCHEMA + ("stream",)


@pytest.fixture
def launched(monkeypatch):
    """ops._decode_impl on CPU tensors (sm90a specs), the spec ops recorded instead of run:
    [(spec name, {argument: value})]; 100 SMs."""
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(ops, "_resolved", {})
    monkeypatch.setattr(ops, "_limits", lambda device: (100, None, None))
    calls = []

    def load_spec(spec):
        op = SimpleNamespace(default=spec.name)
        return SimpleNamespace(fwd=op, decode=op)

    def launch(op, device, *args):
        schema = FWD_SCHEMA if op.startswith("fwd_") else DECODE_SCHEMA
        calls.append((op, dict(zip(schema, args, strict=True))))

    monkeypatch.setattr(ops, "load_spec", load_spec)
    monkeypatch.setattr(ops, "_launch", launch)
    return calls


def _tensors(seqlen_q, paged, seqlen_new=0, dtype=torch.float16):
    q = torch.zeros(B, seqlen_q, H, D, dtype=dtype)
    shape = (NB, PAGE, HK, D) if paged else (B, CAP, HK, D)
    k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    new = torch.zeros(B, seqlen_new, HK, D, dtype=dtype) if seqlen_new else None
    table = torch.tensor([[3, 0, 7, 1], [5, 2, 8, 4]], **I32) if paged else None
    return q, k_cache, v_cache, new, table


@pytest.mark.parametrize("paged", [False, True])
def test_prefill_appends_then_runs_the_forward(launched, paged):
    n = ops.PAGED_PREFILL_MIN_QUERIES if paged else ops.PREFILL_MIN_QUERIES
    q, k_cache, v_cache, new, table = _tensors(n, paged, seqlen_new=5)
    seqlens = torch.tensor([3, 40], **I32)
    slopes, sink = torch.ones(H), torch.zeros(H)
    out, lse = ops._decode_impl(q, k_cache, v_cache, new, new, None, None, True, seqlens, None,
                                None, table, 0.125, True, 7, 0, 30.0, slopes, sink, 4)
    (append, a), (attend, f) = launched
    # the decode op appends only: no splits (o_partial with 0 splits), through the table
    assert append == "decode_sm90a_fp16_hd64_causal_window_softcap_alibi_sink"
    assert a["o_partial"].shape == (0, B, H, n, D)
    assert a["block_table"] is table and a["cache_seqlens"] is seqlens and a["k_new"] is new
    # the forward attends: the paged spec with the table, each sequence's keys as seqused_k; the
    # default sm90a forward (sm90ws) either way
    suffix = "_paged_ws" if paged else "_ws"
    assert attend == "fwd_sm90a_fp16_hd64_causal_window_softcap_alibi_sink" + suffix
    assert f["block_table"] is table
    assert f["q"] is q and f["k"] is k_cache and f["v"] is v_cache
    assert f["out"] is out and f["lse"] is lse and f["out"] is a["out"]
    assert torch.equal(f["seqused_k"], torch.tensor([8, 45], **I32))
    assert f["seqused_k"].dtype == torch.int32
    assert (f["max_seqlen_q"], f["max_seqlen_k"]) == (n, MAXB * PAGE if paged else CAP)
    assert f["cu_seqlens_q"] is None and f["cu_seqlens_k"] is None and f["out_residual"] is None
    assert (f["softmax_scale"], f["causal_bottom_right"], f["window_left"], f["window_right"],
            f["softcap"]) == (0.125, True, 7, 0, 30.0)
    assert f["alibi_slopes"] is slopes and f["sink"] is sink
    assert f["rng_state"] is None and f["dropout_p"] == 0.0


def test_paged_prefill_with_rotary_and_a_full_cache(launched):
    # rotary: the forward attends with the decode op's rotated q
    q, k_cache, v_cache, new, table = _tensors(300, True, seqlen_new=3, dtype=torch.bfloat16)
    cos = torch.zeros(MAXB * PAGE, 8, dtype=torch.bfloat16)
    ops._decode_impl(q, k_cache, v_cache, new, new, cos, cos, False, torch.tensor([0, 61], **I32),
                     None, None, table, 0.125, False, -1, -1, 0.0, None, None, 0)
    (_, a), (attend, f) = launched
    assert attend == "fwd_sm90a_bf16_hd64_paged_ws"
    assert a["q_rot"] is not None and f["q"] is a["q_rot"]
    assert torch.equal(f["seqused_k"], torch.tensor([3, 64], **I32))
    # no lengths and nothing appended: every sequence holds the table's capacity, all keys used
    launched.clear()
    q, k_cache, v_cache, _, table = _tensors(ops.PAGED_PREFILL_MIN_QUERIES, True)
    ops._decode_impl(q, k_cache, v_cache, None, None, None, None, True, None, None, None, table,
                     0.125, True, -1, 0, 0.0, None, None, 0)
    (_, a), (attend, f) = launched
    assert attend == "fwd_sm90a_fp16_hd64_causal_paged_ws"
    assert f["seqused_k"] is None and f["max_seqlen_k"] == MAXB * PAGE
    assert f["block_table"] is table and a["block_table"] is table


@pytest.mark.parametrize("paged,seqlen_q", [(False, ops.PREFILL_MIN_QUERIES - 1),
                                             (True, ops.PREFILL_MIN_QUERIES - 1)])
def test_fewer_queries_stay_with_the_decode_kernel(launched, paged, seqlen_q):
    q, k_cache, v_cache, _, table = _tensors(seqlen_q, paged)
    ops._decode_impl(q, k_cache, v_cache, None, None, None, None, True, None, None, None, table,
                     0.125, True, -1, 0, 0.0, None, None, 2)
    ((name, a),) = launched
    assert name == "decode_sm90a_fp16_hd64_causal"
    assert a["block_table"] is table and a["o_partial"].shape[0] == 2


@pytest.mark.parametrize("family,attend", [(None, "fwd_sm90a_fp16_hd64_causal_paged_ws"),
                                           ("sm90", None), ("sm80", None)])
def test_paged_prefill_threshold_follows_the_paged_forward_family(launched, monkeypatch, family,
                                                                  attend):
    """On a paged cache the forward attends from PREFILL_MIN_QUERIES on where its paged spec is
    sm90ws (TMA boxes: as fast as on a contiguous cache), from PAGED_PREFILL_MIN_QUERIES where
    it reads K/V row by row (FLASHJIT_KERNEL_FAMILY sm90 or sm80 here)."""
    if family:
        monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", family)
    expected = ops.PREFILL_MIN_QUERIES if attend else ops.PAGED_PREFILL_MIN_QUERIES
    assert ops.paged_prefill_min_queries(torch.device("cpu"), D) == expected
    q, k_cache, v_cache, _, table = _tensors(ops.PREFILL_MIN_QUERIES, True)
    ops._decode_impl(q, k_cache, v_cache, None, None, None, None, True, None, None, None, table,
                     0.125, True, -1, 0, 0.0, None, None, 2)
    names = [name for name, _ in launched]
    assert names[0] == "decode_sm90a_fp16_hd64_causal"  # the decode family whatever the preference
    assert names[1:] == ([attend] if attend else [])
    launched.clear()
    q, k_cache, v_cache, _, table = _tensors(ops.PAGED_PREFILL_MIN_QUERIES, True)
    ops._decode_impl(q, k_cache, v_cache, None, None, None, None, True, None, None, None, table,
                     0.125, True, -1, 0, 0.0, None, None, 2)
    assert len(launched) == 2 and launched[1][0].startswith("fwd_sm90a_fp16_hd64_causal_paged")


def test_paged_prefill_runs_the_forward_where_the_decode_kernel_does_not_fit(launched,
                                                                             monkeypatch):
    # a paged forward that reads rows one by one (sm80), whose threshold is 256 queries
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", "sm80")
    fits = []
    monkeypatch.setattr(ops, "decode_smem_fits", lambda *args: fits.append(args) and False)
    q, k_cache, v_cache, _, table = _tensors(ops.PREFILL_MIN_QUERIES, True)
    ops._decode_impl(q, k_cache, v_cache, None, None, None, None, True, None, None, None, table,
                     0.125, True, -1, 0, 0.0, None, None, 0)
    assert [name for name, _ in launched] == ["decode_sm90a_fp16_hd64_causal",
                                              "fwd_sm90a_fp16_hd64_causal_paged"]
    assert fits == [(q.device, D, ops.PREFILL_MIN_QUERIES * H // HK)]  # packed rows per K/V head


def test_cache_batch_idx_and_leftpad_stay_with_the_decode_kernel(launched):
    q, k_cache, v_cache, _, _ = _tensors(ops.PREFILL_MIN_QUERIES, False)
    rows = torch.tensor([1, 0], **I32)
    for batch_idx, leftpad in ((rows, None), (None, rows)):
        launched.clear()
        ops._decode_impl(q, k_cache, v_cache, None, None, None, None, True, None, batch_idx,
                         leftpad, None, 0.125, False, -1, -1, 0.0, None, None, 1)
        ((name, a),) = launched
        assert name == "decode_sm90a_fp16_hd64"
        assert a["cache_batch_idx"] is batch_idx and a["cache_leftpad"] is leftpad
