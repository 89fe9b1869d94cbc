"""Backward attention (dq, dk, dv) on the GPU against a float32 reference.

Same criterion as the forward: flashjit's max error against float32 autograd is at most twice
PyTorch's own error (the same math in the input dtype) for every gradient.
"""

import random

import pytest
import torch

import flashjit
from flashjit import _philox, testing
from tests.reference import attention_ref, max_error

DTYPES = [torch.float16, torch.bfloat16]


def _leaf(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_()


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def check_grads(q, k, v, causal, scale=None, dropout_mask=None, dropout_p=0.0, fn=None,
                key_lengths=None, bottom_right=True, dout=None, dv_rounding_slack=False):
    """Runs flashjit (fn) and both references; asserts out and every gradient are within 2x.
    dout: the output gradient (default: random). dv_rounding_slack: allow dv half an ulp of the
    input dtype at its largest reference value beyond the criterion (see
    test_compat.test_precision_tiny_sequences_fp16)."""
    fn = fn or (lambda q, k, v: flashjit.flash_attn_func(q, k, v, dropout_p=dropout_p,
                                                          softmax_scale=scale, causal=causal))
    out = fn(q, k, v)
    dout = torch.randn_like(out) if dout is None else dout
    grads = _grads(out, (q, k, v), dout)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out_ref, _ = attention_ref(q32, k32, v32, causal, scale, bottom_right, key_lengths,
                               dropout_mask, dropout_p)
    grads_ref = _grads(out_ref, (q32, k32, v32), dout.float())
    out_pt, _ = attention_ref(q, k, v, causal, scale, bottom_right, key_lengths, dropout_mask,
                              dropout_p)
    grads_pt = _grads(out_pt, (q, k, v), dout)
    for name, x, ref, pt in zip(("out", "dq", "dk", "dv"), (out,) + grads, (out_ref,) + grads_ref,
                                (out_pt,) + grads_pt):
        assert x.shape == ref.shape, name
        err, err_pt = max_error(x, ref), max_error(pt, ref)
        slack = 1e-4
        if dv_rounding_slack and name == "dv":
            slack += torch.finfo(x.dtype).eps / 2 * float(ref.abs().max())
        assert err <= 2 * err_pt + slack, \
            f"{name}: flashjit error {err:.3g} > 2 x PyTorch's {err_pt:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [32, 40, 64, 96, 128, 160, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(128, 128), (113, 203), (257, 129)])
def test_bwd_grid(dtype, d, causal, sq, sk):
    torch.manual_seed(sq + sk + d)
    check_grads(_leaf(2, sq, 3, d, dtype=dtype), _leaf(2, sk, 3, d, dtype=dtype),
                _leaf(2, sk, 3, d, dtype=dtype), causal)


@pytest.mark.parametrize("h,hk", [(8, 1), (6, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_bwd_gqa(h, hk, causal):
    dt = torch.bfloat16
    check_grads(_leaf(2, 190, h, 64, dtype=dt), _leaf(2, 230, hk, 64, dtype=dt),
                _leaf(2, 230, hk, 64, dtype=dt), causal)


def test_bwd_random_shapes():
    rng = random.Random(4321)
    for _ in range(12):
        b, h = rng.randint(1, 3), rng.choice([1, 2, 4])
        hk = rng.choice([x for x in (1, 2, 4) if h % x == 0])
        sq, sk = rng.randint(1, 400), rng.randint(1, 400)
        d = rng.choice([16, 32, 48, 64, 80, 128, 136, 256])
        dtype, causal = rng.choice(DTYPES), rng.random() < 0.5
        check_grads(_leaf(b, sq, h, d, dtype=dtype), _leaf(b, sk, hk, d, dtype=dtype),
                    _leaf(b, sk, hk, d, dtype=dtype), causal, rng.choice([None, 0.1]))


def test_bwd_strided_qkvpacked():
    qkv = _leaf(2, 150, 3, 4, 64, dtype=torch.float16)
    out = flashjit.flash_attn_qkvpacked_func(qkv, causal=True)
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, dout)
    q32 = qkv.detach().float().requires_grad_()
    ref, _ = attention_ref(*q32.unbind(2), causal=True)
    (g_ref,) = torch.autograd.grad(ref, q32, dout.float())
    pt, _ = attention_ref(*qkv.unbind(2), causal=True)
    (g_pt,) = torch.autograd.grad(pt, qkv, dout)
    assert max_error(g, g_ref) <= 2 * max_error(g_pt, g_ref) + 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_bwd_varlen(causal):
    lens_q, lens_k = [5, 0, 130, 64, 1], [7, 3, 130, 0, 200]
    h, hk, d, dtype = 4, 2, 64, torch.bfloat16
    q = _leaf(sum(lens_q), h, d, dtype=dtype)
    k, v = _leaf(sum(lens_k), hk, d, dtype=dtype), _leaf(sum(lens_k), hk, d, dtype=dtype)

    def cu(ls):
        return torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), device="cuda",
                            dtype=torch.int32)
    out = flashjit.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q),
                                          max(lens_k), causal=causal)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert not any(torch.isnan(g).any() for g in (dq, dk, dv))
    oq = ok = 0
    for lq, lk in zip(lens_q, lens_k):
        sq, sk = slice(oq, oq + lq), slice(ok, ok + lk)
        if lq and lk:
            qs, ks, vs = (t.detach()[s][None].float().requires_grad_()
                          for t, s in ((q, sq), (k, sk), (v, sk)))
            ref, _ = attention_ref(qs, ks, vs, causal)
            g_ref = torch.autograd.grad(ref, (qs, ks, vs), dout[sq][None].float())
            qp, kp, vp = (t.detach()[s][None].requires_grad_() for t, s in ((q, sq), (k, sk), (v, sk)))
            pt, _ = attention_ref(qp, kp, vp, causal)
            g_pt = torch.autograd.grad(pt, (qp, kp, vp), dout[sq][None])
            for g, r, p in zip((dq[sq], dk[sk], dv[sk]), g_ref, g_pt):
                assert max_error(g[None], r) <= 2 * max_error(p, r) + 1e-4
        else:  # no keys or no queries: every gradient of the sequence is zero
            assert torch.all(dq[sq] == 0) and torch.all(dk[sk] == 0) and torch.all(dv[sk] == 0)
        oq, ok = oq + lq, ok + lk


# 80: bucket 96, the 128-column kernels on sm90a; 256: the dQ kernel with one K/V stage
@pytest.mark.parametrize("d", [128, 80, 176, 256])  # 176: bucket 192, uneven halves
def test_bwd_deterministic_is_bitwise_reproducible(d):
    q, k, v = (_leaf(2, 700, 4, d, dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    runs = []
    for _ in range(3):
        out = flashjit.flash_attn_func(q, k, v, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    check_grads(q, k, v, True, fn=lambda q, k, v: flashjit.flash_attn_func(
        q, k, v, causal=True, deterministic=True))


def test_bwd_with_lse_in_the_loss():
    """lse has no gradient: a loss that also uses it gets exactly the gradients of out alone (the
    backward receives no lse gradient, not a materialised zero one)."""
    q, k, v = (_leaf(2, 300, 4, 64, dtype=torch.float16) for _ in range(3))
    dout = torch.randn_like(q)
    out = flashjit.flash_attn_func(q, k, v, causal=True, deterministic=True)
    expected = torch.autograd.grad(out, (q, k, v), dout)
    out, lse, _ = flashjit.flash_attn_func(q, k, v, causal=True, deterministic=True,
                                           return_attn_probs=True)
    assert not lse.requires_grad
    loss = (out.float() * dout.float()).sum() + lse.sum()
    for a, b in zip(torch.autograd.grad(loss, (q, k, v)), expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])  # 192, 256: column halves on sm90a
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference_with_the_same_mask(dtype, d, causal):
    b, sq, sk, h, p = 2, 190, 250, 3, 0.17
    q, k, v = _leaf(b, sq, h, d, dtype=dtype), _leaf(b, sk, h, d, dtype=dtype), \
        _leaf(b, sk, h, d, dtype=dtype)
    mask = testing.next_dropout_mask(b, h, sq, sk, p, device=q.device)
    assert mask.shape == (b, h, sq, sk) and mask.dtype == torch.bool
    keep = mask.float().mean().item()
    assert abs(keep - _philox.keep_probability(p)) < 0.01, f"keep rate {keep:.4f} for p={p}"
    check_grads(q, k, v, causal, dropout_mask=mask, dropout_p=p)
    # the generator advanced: the next call draws a different mask
    assert not torch.equal(mask, testing.next_dropout_mask(b, h, sq, sk, p, device=q.device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk", [(190, 190), (64, 64), (130, 130), (256, 100)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_dropout_causal_shapes(dtype, sq, sk, deterministic):
    b, h, p = 2, 3, 0.17
    torch.manual_seed(sq * 1000 + sk)  # inputs independent of the tests run before
    q, k, v = _leaf(b, sq, h, 64, dtype=dtype), _leaf(b, sk, h, 64, dtype=dtype), \
        _leaf(b, sk, h, 64, dtype=dtype)
    torch.manual_seed(11)
    mask = testing.next_dropout_mask(b, h, sq, sk, p, device=q.device)
    torch.manual_seed(11)
    check_grads(q, k, v, True, dropout_mask=mask, dropout_p=p,
                fn=lambda q, k, v: flashjit.flash_attn_func(q, k, v, dropout_p=p, causal=True,
                                                            deterministic=deterministic))


def test_dropout_reproducible_with_manual_seed():
    q, k, v = (_leaf(1, 128, 2, 64, dtype=torch.float16) for _ in range(3))
    torch.manual_seed(7)
    a = flashjit.flash_attn_func(q, k, v, dropout_p=0.3)
    b = flashjit.flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(7)
    c = flashjit.flash_attn_func(q, k, v, dropout_p=0.3)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_dropout_mask_matches_cpu_philox():
    # 70 keys: two whole m16 x n32 Philox groups and a partial one; 20 queries: a partial m16 tile
    state = testing.next_rng_state(torch.device("cuda"))
    mask = testing.dropout_mask(state, 1, 2, 20, 70, 0.4)
    seed, offset = state.tolist()
    ref = torch.tensor(_philox.dropout_mask(seed, offset, 1, 2, 20, 70, 0.4), dtype=torch.bool)
    assert torch.equal(mask.cpu(), ref)


def test_sdpa_backward_with_key_padding():
    b, h, s, d = 3, 4, 160, 64
    q, k, v = (_leaf(b, h, s, d, dtype=torch.float16) for _ in range(3))
    lengths = torch.tensor([160, 50, 1], device="cuda")
    mask = (torch.arange(s, device="cuda")[None] < lengths[:, None])[:, None, None]
    check_grads(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), False,
                key_lengths=lengths,
                fn=lambda q, k, v: flashjit.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    attn_mask=mask).transpose(1, 2))


def test_backward_memory_is_linear_in_seqlen():
    """Peak extra memory at seqlen 16k stays far below one seqlen^2 buffer (512 MiB in fp16)."""
    b, s, h, d = 1, 16384, 2, 64
    q, k, v = (_leaf(b, s, h, d, dtype=torch.float16) for _ in range(3))
    dout = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = flashjit.flash_attn_func(q, k, v, causal=True)
    torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    tensor_bytes = q.numel() * q.element_size()
    assert extra < 16 * tensor_bytes, f"extra {extra / 2**20:.0f} MiB"
    assert extra < s * s * h * 2 / 8


def test_opcheck():
    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for residual in (False, True):
        fwd_args = (q, k, v, None, None, None, None, 64, 64, 0.125, True, True, -1, -1, 0.0,
                    None, None, 0.0, None, residual)
        torch.library.opcheck(torch.ops.flashjit.fwd.default, fwd_args)
        out, lse, out_residual = torch.ops.flashjit.fwd(*fwd_args)
        bwd_args = (torch.randn_like(out), q, k, v, out, out_residual if residual else None, lse,
                    None, None, None, 64, 64, 0.125, True, True, -1, -1, 0.0, None, None, 0.0,
                    None, False)
        torch.library.opcheck(torch.ops.flashjit.bwd.default, bwd_args)


class _Block(torch.nn.Module):
    def __init__(self, dim=256, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x):
        b, s, dim = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, dim // self.heads).unbind(2)
        return x + self.proj(flashjit.flash_attn_func(q, k, v, causal=True).reshape(b, s, dim))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    block = _Block().cuda().to(torch.bfloat16)
    x = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = block(x)
    (g_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    (g_comp,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(out, eager, atol=2e-2, rtol=2e-2)
    assert torch.allclose(g_comp, g_eager, atol=5e-2, rtol=5e-2)


def test_cuda_graph_capture_and_replay():
    q, k, v = (torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def step():
        out = flashjit.flash_attn_func(q, k, v, causal=True)
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            expected = step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
    expected = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, expected):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-3)
