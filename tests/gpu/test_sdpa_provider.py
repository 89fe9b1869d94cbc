"""flashjit as torch's SDPA flash provider, on the GPU (flashjit/integrations/sdpa.py).

With activate_flash_attention_impl("flashjit"): F.scaled_dot_product_attention under
sdpa_kernel(SDPBackend.FLASH_ATTENTION) matches a float32 reference within 2x PyTorch's own error
(the criterion of test_bwd.py) in forward and backward, eager and torch.compile(fullgraph=True),
causal and not, GQA, dropout with the mask flashjit.testing predicts (so the backward replays
the forward's mask); the profiler shows flashjit's kernels ran; the aten ops' own conventions
(bottom-right is_causal, natural-log lse, windows, ragged inputs) agree with torch's kernels and
flashjit's API; fp32 still goes to torch. Skipped where torch has no flash registry.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flashjit
from flashjit import integrations, testing
from tests.reference import attention_ref, cu_seqlens, leaf, max_error

pytestmark = pytest.mark.skipif(
    not integrations.sdpa_registry_available(),
    reason=f"torch {torch.__version__} has no torch.nn.attention.register_flash_attention_impl "
           "(the flash provider registry: torch 2.13 and 2.14 have it)")

DTYPES = [torch.float16, torch.bfloat16]
# flashjit's kernel functions (csrc/sm80, csrc/sm90), in namespace flashjit; torch's own FA2
# port has a flash_fwd_kernel too, in namespace pytorch_flash
FWD_KERNELS = ("flash_fwd_kernel", "flash_fwd_sm90_kernel", "flash_fwd_ws_kernel")
BWD_KERNELS = ("flash_bwd_dk_dv_kernel", "flash_bwd_dk_dv_sm90_kernel")


@pytest.fixture
def active():
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

    activate_flash_attention_impl("flashjit")
    yield
    restore_flash_attention_impl()


def _flash_sdpa(*args, **kwargs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _check(fn, q, k, v, causal, dropout_mask=None, dropout_p=0.0, scale=None):
    """fn(q, k, v) on (batch, heads, seq, d) leaves vs attention_ref (top-left causal, as
    SDPA): out and every gradient within 2x PyTorch's own same-dtype error."""
    out = fn(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    bshd = lambda t: t.transpose(1, 2)  # noqa: E731
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out_ref, _ = attention_ref(bshd(q32), bshd(k32), bshd(v32), causal, scale, False, None,
                               dropout_mask, dropout_p)
    out_ref = bshd(out_ref)
    grads_ref = torch.autograd.grad(out_ref, (q32, k32, v32), dout.float())
    out_pt, _ = attention_ref(bshd(q), bshd(k), bshd(v), causal, scale, False, None,
                              dropout_mask, dropout_p)
    out_pt = bshd(out_pt)
    grads_pt = torch.autograd.grad(out_pt, (q, k, v), dout)
    for name, x, ref, pt in zip(("out", "dq", "dk", "dv"), (out,) + grads, (out_ref,) + grads_ref,
                                (out_pt,) + grads_pt):
        assert x.shape == ref.shape, name
        err, err_pt = max_error(x, ref), max_error(pt, ref)
        assert err <= 2 * err_pt + 1e-4, \
            f"{name}: SDPA-through-flashjit error {err:.3g} > 2 x PyTorch's {err_pt:.3g}"


def _kernel_names(fn) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _ran(names, kernels) -> bool:
    return any("flashjit::" in n and any(k in n for k in kernels) for n in names)


def _ran_any_flashjit(names) -> bool:
    return any("flashjit::" in n for n in names)


# ------------------------------------------------------------------------------------------------
# F.scaled_dot_product_attention, flash backend
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(128, 128), (113, 203)])
def test_sdpa_matches_reference(active, dtype, d, causal, sq, sk):
    if causal and sq != sk:
        pytest.skip("torch's dispatcher sends no non-square causal SDPA to the flash backend")
    b, h = 2, 3
    q, k, v = leaf(b, h, sq, d, dtype=dtype), leaf(b, h, sk, d, dtype=dtype), \
        leaf(b, h, sk, d, dtype=dtype)
    _check(lambda q, k, v: _flash_sdpa(q, k, v, is_causal=causal), q, k, v, causal)


@pytest.mark.parametrize("h,hk", [(8, 2), (6, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_gqa(active, h, hk, causal):
    b, s, d = 2, 160, 64
    q = leaf(b, h, s, d, dtype=torch.bfloat16)
    k, v = leaf(b, hk, s, d, dtype=torch.bfloat16), leaf(b, hk, s, d, dtype=torch.bfloat16)
    _check(lambda q, k, v: _flash_sdpa(q, k, v, is_causal=causal, enable_gqa=True), q, k, v,
           causal)


def test_sdpa_odd_head_dim_and_scale(active):
    # SDPA pads head dim 72 -> 72 (multiple of 8) and 36 -> 40 itself before the aten op
    for d in (72, 36):
        q, k, v = (leaf(2, 4, 96, d, dtype=torch.float16) for _ in range(3))
        _check(lambda q, k, v: _flash_sdpa(q, k, v, scale=0.2), q, k, v, False, scale=0.2)


def test_sdpa_bshd_memory_layout(active):
    # the usual layout: projections (b, s, h, d) viewed as (b, h, s, d)
    q, k, v = (torch.randn(2, 128, 4, 64, device="cuda", dtype=torch.float16)
               .transpose(1, 2).requires_grad_() for _ in range(3))
    _check(lambda q, k, v: _flash_sdpa(q, k, v, is_causal=True), q, k, v, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_dropout_uses_the_predicted_mask_in_both_passes(active, dtype, causal):
    b, h, s, d, p = 2, 3, 190, 64, 0.17
    torch.manual_seed(s)  # inputs independent of the tests run before
    q, k, v = (leaf(b, h, s, d, dtype=dtype) for _ in range(3))
    torch.manual_seed(11)
    mask = testing.next_dropout_mask(b, h, s, s, p, device=q.device)
    torch.manual_seed(11)
    # forward and gradients against the reference with this mask: a backward replaying another
    # mask than the forward's would fail the gradient check
    _check(lambda q, k, v: _flash_sdpa(q, k, v, dropout_p=p, is_causal=causal), q, k, v, causal,
           dropout_mask=mask, dropout_p=p)


def test_sdpa_dropout_reproducible_with_manual_seed(active):
    q, k, v = (leaf(1, 2, 128, 64, dtype=torch.float16) for _ in range(3))

    def run():
        out = _flash_sdpa(q, k, v, dropout_p=0.3)
        return (out,) + torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(7)
        a = run()
        b = run()
        torch.manual_seed(7)
        c = run()
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0], b[0])


def test_cuda_graph_replays_draw_fresh_masks_that_the_backward_replays(active):
    """Under CUDA-graph capture, as torch's flash kernels: each replay draws a new dropout mask
    (the seed/offset come from torch's generator, which advances per replay), and the captured
    backward uses the mask of the same replay. With V = I (seqlen_k = d) the output is the
    dropped, rescaled probability matrix itself, so dV = out^T dO checks the backward's mask."""
    b, h, s, d, p = 2, 4, 96, 64, 0.3
    q, k = leaf(b, h, s, d, dtype=torch.float16), leaf(b, h, d, d, dtype=torch.float16)
    v = torch.eye(d, device="cuda", dtype=torch.float16).expand(b, h, d, d).clone()
    v.requires_grad_()
    dout = torch.randn(b, h, s, d, device="cuda", dtype=torch.float16)

    def step():
        out = _flash_sdpa(q, k, v, dropout_p=p)
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (compiles the specs)
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append(tuple(t.clone() for t in captured))
    assert not torch.equal(replays[0][0], replays[1][0]), "the same mask on every replay"
    for out, dq, dk, dv in replays:
        assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
        dropped = (out == 0).float().mean().item()
        assert abs(dropped - p) < 0.03, dropped
        expected = out.float().transpose(-1, -2) @ dout.float()  # (b, h, d = seqlen_k, d)
        assert max_error(dv, expected) <= 1e-2 * float(expected.abs().max()), \
            "the captured backward replayed another mask than its forward"


def test_flashjit_kernels_ran(active):
    q, k, v = (leaf(2, 4, 256, 64, dtype=torch.bfloat16) for _ in range(3))

    def step():
        out = _flash_sdpa(q, k, v, is_causal=True)
        out.sum().backward()

    step()  # compile the specs outside the profiled region
    names = _kernel_names(step)
    assert _ran(names, FWD_KERNELS), names
    assert _ran(names, BWD_KERNELS), names


def test_restore_gives_torch_kernels_back():
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

    q, k, v = (leaf(2, 4, 256, 64, dtype=torch.float16) for _ in range(3))

    def step():
        _flash_sdpa(q, k, v).sum().backward()

    activate_flash_attention_impl("flashjit")
    try:
        step()
        assert _ran_any_flashjit(_kernel_names(step))
    finally:
        restore_flash_attention_impl()
    assert not _ran_any_flashjit(_kernel_names(step))


def test_torch_compile_fullgraph(active):
    q, k, v = (leaf(2, 4, 192, 64, dtype=torch.bfloat16) for _ in range(3))

    @torch.compile(fullgraph=True)
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        _check(attn, q, k, v, True)

        def step():
            attn(q, k, v).sum().backward()

        names = _kernel_names(step)
    assert _ran(names, FWD_KERNELS) and _ran(names, BWD_KERNELS), names


def test_fp32_still_served_by_torch(active):
    q, k, v = (leaf(2, 4, 128, 64, dtype=torch.float32) for _ in range(3))

    def step():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # torch picks a backend

    out = step()
    ref, _ = attention_ref(*(t.detach().transpose(1, 2).double() for t in (q, k, v)), True,
                           None, False)
    assert max_error(out, ref.transpose(1, 2)) < 1e-3
    assert not _ran_any_flashjit(_kernel_names(lambda: step().sum().backward()))
    # and the aten flash op itself, called with fp32, reaches torch's kernel (torch's message)
    with pytest.raises(RuntimeError) as err:
        torch.ops.aten._scaled_dot_product_flash_attention(q.detach(), k.detach(), v.detach())
    assert "flashjit" not in str(err.value)


# ------------------------------------------------------------------------------------------------
# The aten ops called directly: conventions shared with torch's kernels
# ------------------------------------------------------------------------------------------------
def test_aten_is_causal_is_bottom_right_like_torchs_kernel():
    from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl

    q = torch.randn(2, 4, 100, 64, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(2, 4, 230, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    op = torch.ops.aten._scaled_dot_product_flash_attention
    torch_out, torch_lse = op(q, k, v, 0.0, True)[:2]
    activate_flash_attention_impl("flashjit")
    try:
        out, lse = op(q, k, v, 0.0, True)[:2]
    finally:
        restore_flash_attention_impl()
    ref, ref_lse = attention_ref(*(t.transpose(1, 2).float() for t in (q, k, v)), True, None,
                                 True)
    assert lse.shape == torch_lse.shape == (2, 4, 100) and lse.dtype == torch.float32
    assert max_error(out, ref.transpose(1, 2)) <= 2 * max_error(torch_out, ref.transpose(1, 2)) \
        + 1e-4
    assert torch.allclose(lse, ref_lse, atol=1e-3)  # natural log, as torch's
    assert torch.allclose(lse, torch_lse, atol=1e-3)


@pytest.mark.parametrize("window", [(32, 16), (-1, -1)])
@pytest.mark.parametrize("causal", [False, True])
def test_aten_flash_attention_forward_backward_ragged(active, window, causal):
    lens_q, lens_k = [37, 128, 1], [50, 128, 77]
    h, hk, d = 4, 2, 64
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    q = leaf(sum(lens_q), h, d, dtype=torch.bfloat16)
    k, v = leaf(sum(lens_k), hk, d, dtype=torch.bfloat16), \
        leaf(sum(lens_k), hk, d, dtype=torch.bfloat16)
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), 0.0, causal, False,
        window_size_left=window[0], window_size_right=window[1])
    ref_out, ref_lse, _ = flashjit.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window_size=window,
        return_attn_probs=True)
    assert torch.equal(out, ref_out)  # the same kernels and arguments
    assert lse.shape == (h, sum(lens_q)) and torch.allclose(lse, ref_lse, atol=1e-5)
    dout = torch.randn_like(out)
    grads = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, max(lens_q), max(lens_k), 0.0, causal, rng, unused,
        window_size_left=window[0], window_size_right=window[1])
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        # D from the rounded output here (the aten backward has no residual): close, not equal
        assert max_error(g, r) <= 2e-2 * float(r.abs().max()) + 1e-3, name


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_flash_attention_forward_no_dropout_inplace"),
                    reason=f"torch {torch.__version__} has no "
                           "aten::_flash_attention_forward_no_dropout_inplace (2.13 has)")
def test_aten_no_dropout_inplace(active):
    q, k, v = (torch.randn(64, 4, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    cu = torch.tensor([0, 20, 64], device="cuda", dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    lse = torch.ops.aten._flash_attention_forward_no_dropout_inplace(
        out, q, k, v, cu, cu, 44, 44, 0.0, True, False)
    ref, ref_lse, _ = flashjit.flash_attn_varlen_func(q, k, v, cu, cu, 44, 44, causal=True,
                                                      return_attn_probs=True)
    assert torch.equal(out, ref) and torch.allclose(lse, ref_lse, atol=1e-5)
