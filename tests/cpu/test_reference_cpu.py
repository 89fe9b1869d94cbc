"""flashjit.testing.attention_reference against a naive per-row loop (so the reference the GPU
tests trust is itself tested), and the sink gradient's formula (interface.sink_grad) against
autograd of the reference, in both lse layouts (fixed and varlen) and with GQA."""

from __future__ import annotations

import math

import pytest
import torch

from flashjit._philox import keep_probability
from flashjit.interface import sink_grad
from flashjit.testing import attention_reference

LN2 = math.log(2.0)


def naive_attention(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    sink=None, softmax_scale=None, dropout_mask=None, dropout_p=0.0,
                    bottom_right=True):
    """One query row at a time, written from the conventions' text (flash-attn 2.x, gpt-oss
    sinks) with Python conditions: (out float64, lse float64 natural log)."""
    q, k, v = q.double(), k.double(), v.double()
    batch, sq, heads, d = q.shape
    sk, heads_k = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    left, right = window_size
    if causal:
        right = 0
    off = sk - sq if bottom_right else 0
    out = torch.zeros(batch, sq, heads, d, dtype=torch.float64)
    lse = torch.empty(batch, heads, sq, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            hk = h // (heads // heads_k)  # the K/V head of query head h
            for i in range(sq):
                keys, logits = [], []
                for j in range(sk):
                    if left != -1 and j < i + off - left:
                        continue
                    if right != -1 and j > i + off + right:
                        continue
                    z = scale * float(q[b, i, h] @ k[b, j, hk])
                    if softcap > 0:
                        z = softcap * math.tanh(z / softcap)
                    if alibi_slopes is not None:
                        slope = float(alibi_slopes[h] if alibi_slopes.dim() == 1
                                      else alibi_slopes[b, h])
                        z -= slope * abs(i + off - j)
                    keys.append(j)
                    logits.append(z)
                terms = [math.exp(z) for z in logits]
                if sink is not None:
                    terms.append(math.exp(float(sink[h])))
                total = sum(terms)
                lse[b, h, i] = math.log(total) if total > 0 else -math.inf
                for j, z in zip(keys, logits):
                    p = math.exp(z) / total
                    if dropout_mask is not None:
                        p = p * float(dropout_mask[b, h, i, j]) / keep_probability(dropout_p)
                    out[b, i, h] += p * v[b, j, hk]
    return out, lse


def _inputs(batch=2, sq=7, sk=9, heads=4, heads_k=2, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, sq, heads, d, generator=g, dtype=dtype)
    k = torch.randn(batch, sk, heads_k, d, generator=g, dtype=dtype)
    v = torch.randn(batch, sk, heads_k, d, generator=g, dtype=dtype)
    return q, k, v


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "causal_top_left": dict(causal=True, bottom_right=False),
    "window": dict(window_size=(2, 1)),
    "window_left_only": dict(window_size=(3, -1)),
    "window_right_only": dict(window_size=(-1, 0)),
    "window_zero": dict(window_size=(0, 0)),
    "causal_window": dict(causal=True, window_size=(2, 5)),  # right becomes 0
    "window_top_left": dict(window_size=(1, 2), bottom_right=False),
    "softcap": dict(softcap=0.7, softmax_scale=1.3),
    "alibi_heads": dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 1.0])),
    "alibi_batch_heads": dict(alibi_slopes=torch.rand(2, 4, generator=torch.Generator()
                                                      .manual_seed(1))),
    "alibi_causal_softcap": dict(causal=True, softcap=2.0,
                                 alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 1.0])),
    "sink": dict(sink=torch.tensor([0.0, 1.5, -2.0, 3.0])),
    "everything": dict(causal=True, window_size=(3, 0), softcap=1.5,
                       alibi_slopes=torch.tensor([0.3, 0.2, 0.1, 0.05]),
                       sink=torch.tensor([0.5, -0.5, 2.0, -3.0])),
}


@pytest.mark.parametrize("sq, sk", [(7, 9), (9, 7), (8, 8)])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_a_naive_loop(case, sq, sk):
    q, k, v = _inputs(sq=sq, sk=sk)
    kwargs = CASES[case]
    out, lse = attention_reference(q, k, v, **kwargs)
    want_out, want_lse = naive_attention(q, k, v, **kwargs)
    assert out.dtype == torch.float64 and lse.shape == (2, 4, sq)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


def test_reference_with_dropout_matches_a_naive_loop():
    q, k, v = _inputs()
    mask = torch.rand(2, 4, 7, 9, generator=torch.Generator().manual_seed(2)) > 0.3
    kwargs = dict(causal=True, sink=torch.tensor([0.0, 1.0, 2.0, 3.0]), dropout_mask=mask,
                  dropout_p=0.3)
    out, lse = attention_reference(q, k, v, **kwargs)
    want_out, want_lse = naive_attention(q, k, v, **kwargs)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


def test_rows_without_keys_are_zero_without_nan():
    """Bottom-right causal with seqlen_q > seqlen_k: the first rows see no key. out 0 and lse
    -inf, or lse = sink with a sink; gradients finite everywhere."""
    q, k, v = _inputs(sq=9, sk=4)
    sink = torch.tensor([0.0, 1.5, -2.0, 3.0], dtype=torch.float64)
    for s in (None, sink):
        q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
        s_ = None if s is None else s.clone().requires_grad_()
        out, lse = attention_reference(q_, k_, v_, causal=True, sink=s_)
        empty = slice(0, 5)  # rows 0..4 see nothing (j <= i - 5)
        assert torch.all(out[:, empty] == 0)
        expected = torch.full((2, 4, 5), -math.inf, dtype=torch.float64) if s is None else \
            s[None, :, None].expand(2, 4, 5)
        assert torch.equal(lse[..., empty], expected)
        assert torch.isfinite(lse[..., 5:]).all()
        (out.sum() + lse[..., 5:].sum()).backward()
        for t in (q_, k_, v_) + (() if s_ is None else (s_,)):
            assert torch.isfinite(t.grad).all()
        assert torch.all(q_.grad[:, empty] == 0)


def test_no_keys_at_all():
    """seqlen_k = 0 (which flash_attn_func accepts): out 0, lse -inf, or the sink's logit."""
    q = torch.randn(2, 3, 2, 8, dtype=torch.float64)
    k = v = torch.randn(2, 0, 2, 8, dtype=torch.float64)
    out, lse = attention_reference(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    sink = torch.tensor([0.5, -1.0], dtype=torch.float64)
    out, lse = attention_reference(q, k, v, sink=sink)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(lse, sink.view(1, 2, 1).expand(2, 2, 3))


def test_reference_gradients_are_right():
    """gradcheck: autograd through the reference is its true derivative, sink included."""
    q, k, v = _inputs(batch=1, sq=4, sk=5, heads=2, heads_k=1, d=3)
    sink = torch.tensor([0.3, -0.7], dtype=torch.float64)
    slopes = torch.tensor([0.2, 0.4], dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v, sink))

    def f(q, k, v, sink):
        return attention_reference(q, k, v, causal=True, window_size=(2, -1), softcap=1.2,
                                   alibi_slopes=slopes, sink=sink)

    assert torch.autograd.gradcheck(f, inputs)


def test_reference_in_low_precision_is_close_and_keeps_dtypes():
    q, k, v = _inputs(dtype=torch.float32)
    kwargs = dict(causal=True, window_size=(3, 0), softcap=5.0,
                  alibi_slopes=torch.tensor([0.3, 0.2, 0.1, 0.05]),
                  sink=torch.tensor([0.5, -0.5, 2.0, -3.0]))
    ref_out, ref_lse = attention_reference(*(t.double() for t in (q, k, v)), **kwargs)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        out, lse = attention_reference(*(t.to(dtype) for t in (q, k, v)), **kwargs)
        assert out.dtype == dtype and lse.dtype == torch.float32
        tol = {torch.float16: 5e-3, torch.bfloat16: 4e-2, torch.float32: 1e-5}[dtype]
        assert (out.double() - ref_out).abs().max() < tol
        assert (lse.double() - ref_lse).abs().max() < tol


# ---------------------------------------------------------------------------------------------
# The sink's gradient (interface.sink_grad), as the autograd backward computes it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(), dict(causal=True), dict(window_size=(2, 0)),
                                    dict(causal=True, softcap=2.0)],
                         ids=["plain", "causal", "window", "causal_softcap"])
def test_sink_grad_matches_autograd_fixed_length(kwargs):
    """GQA, seqlen_q > seqlen_k with causal (rows without keys), float64 reference."""
    q, k, v = _inputs(sq=9, sk=6)
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    out, lse = attention_reference(q, k, v, sink=sink, **kwargs)
    dout = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, sink, dout)
    # as the kernels give them: lse float32 in log2 units; sink float32
    got = sink_grad(dout, out.detach(), None, (lse.detach() / LN2).float(), sink.detach().float())
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_sink_grad_with_a_minus_inf_sink_and_rows_without_keys_is_finite():
    """A -inf sink (no sink at all) where causal leaves rows with no key (lse -inf there): the
    gradient is finite (0 for that head), never NaN."""
    q, k, v = _inputs(sq=9, sk=6)
    sink = torch.tensor([float("-inf"), -1.0, 2.0, 0.0], dtype=torch.float64)
    out, lse = attention_reference(q, k, v, sink=sink, causal=True)
    assert bool(torch.isneginf(lse[:, 0]).any())  # the case: rows with lse = -inf
    dout = torch.randn_like(out)
    got = sink_grad(dout, out, None, (lse / LN2).float(), sink.float())
    assert bool(torch.isfinite(got).all()) and got[0].item() == 0.0


def test_sink_grad_with_dropout_uses_the_dropped_output():
    q, k, v = _inputs()
    mask = torch.rand(2, 4, 7, 9, generator=torch.Generator().manual_seed(3)) > 0.25
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    out, lse = attention_reference(q, k, v, sink=sink, dropout_mask=mask, dropout_p=0.25)
    dout = torch.randn_like(out)
    (want,) = torch.autograd.grad(out, sink, dout)
    got = sink_grad(dout, out.detach(), None, (lse.detach() / LN2).float(), sink.detach().float())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_sink_grad_uses_the_rounding_residual():
    """With out in fp16 the residual out - round(out) restores D's precision, as the kernels'
    D: the gradient from out + residual is close to the float64 one, from out alone less so."""
    q, k, v = _inputs(sq=64, sk=64, d=16)
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    out, lse = attention_reference(q, k, v, sink=sink)
    dout = torch.randn_like(out).half()  # what the backward receives, in the inputs' dtype
    (want,) = torch.autograd.grad(out, sink, dout.double())
    rounded = out.detach().half()
    residual = (out.detach() - rounded.double()).half()
    lse2 = (lse.detach() / LN2).float()
    with_residual = sink_grad(dout, rounded, residual, lse2, sink.detach().float())
    without = sink_grad(dout, rounded, None, lse2, sink.detach().float())
    err_with = (with_residual.double() - want).abs().max()
    err_without = (without.double() - want).abs().max()
    assert err_with < err_without / 10
    torch.testing.assert_close(with_residual.double(), want, rtol=1e-5, atol=1e-5)


def test_sink_grad_varlen_layout():
    """Packed sequences: lse (heads, total_q), out (total_q, heads, d); rows past
    cu_seqlens_q[-1] hold garbage (NaN lse, nonzero dout) and must not count."""
    lengths_q, lengths_k = [5, 0, 8], [7, 3, 4]
    heads, heads_k, d = 4, 2, 8
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    outs, lses, douts, want = [], [], [], torch.zeros(heads, dtype=torch.float64)
    for b, (sq, sk) in enumerate(zip(lengths_q, lengths_k)):
        q, k, v = _inputs(batch=1, sq=sq, sk=sk, heads=heads, heads_k=heads_k, d=d, seed=b)
        out, lse = attention_reference(q, k, v, causal=True, sink=sink)
        dout = torch.randn_like(out)
        if sq:
            want += torch.autograd.grad(out, sink, dout)[0]
        outs.append(out[0].detach())
        lses.append(lse[0].detach())
        douts.append(dout[0])
    total = sum(lengths_q)
    padding = 3  # rows past the last sequence
    out = torch.cat(outs + [torch.randn(padding, heads, d, dtype=torch.float64)])
    dout = torch.cat(douts + [torch.randn(padding, heads, d, dtype=torch.float64)])
    lse = torch.cat(lses + [torch.full((heads, padding), float("nan"), dtype=torch.float64)],
                    dim=1)
    cu = torch.tensor([0, 5, 5, 13], dtype=torch.int32)
    assert out.shape == (total + padding, heads, d) and lse.shape == (heads, total + padding)
    got = sink_grad(dout, out, None, (lse / LN2).float(), sink.detach().float(), cu)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
