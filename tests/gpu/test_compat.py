"""Drop-in compatibility with flash-attn 2.x and the inputs of public bug reports (issue 10).

Each test checks values against a float32 reference with the suite's criterion (tests/gpu/
test_bwd.py: flashjit's error at most twice PyTorch's own error in the same dtype), with outputs
poisoned with NaN before every call (tests/gpu/conftest.py).
"""

import pytest
import torch

import flashjit
from tests.gpu.test_bwd import check_grads
from tests.reference import attention_ref, cu_seqlens as _cu, leaf, max_error


def _leaf(*shape, dtype=torch.bfloat16, scale=1.0):
    return leaf(*shape, dtype=dtype, scale=scale)


# ------------------------------------------------------------------------------------------------
# Grid limits: more than 65535 (batch x heads) pairs or sequences (CUDA caps gridDim.y and .z)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deterministic", [False, True])
def test_grid_limits_batch_70000(deterministic):
    q, k, v = (_leaf(70000, 16, 2, 64) for _ in range(3))
    check_grads(q, k, v, causal=True, fn=lambda q, k, v: flashjit.flash_attn_func(
        q, k, v, causal=True, deterministic=deterministic))


def test_grid_limits_sdpa_70000_heads():
    q, k, v = (_leaf(1, 70000, 16, 64, dtype=torch.float16) for _ in range(3))
    check_grads(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False,
                fn=lambda q, k, v: flashjit.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2))


def test_grid_limits_varlen_80000_sequences():
    n, s, h, d = 80000, 16, 2, 64
    q, k, v = (_leaf(n * s, h, d) for _ in range(3))
    cu = _cu([s] * n)
    # Every sequence has the same length, so the fixed-length reference of the same rows applies.
    check_grads(*(t.view(n, s, h, d) for t in (q, k, v)), causal=True,
                fn=lambda q4, k4, v4: flashjit.flash_attn_varlen_func(
                    q4.reshape(n * s, h, d), k4.reshape(n * s, h, d), v4.reshape(n * s, h, d),
                    cu, cu, s, s, causal=True).view(n, s, h, d))


# ------------------------------------------------------------------------------------------------
# Varlen rows past cu_seqlens[-1]: no sequence owns them; out and every gradient are 0 there
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deterministic", [False, True])
def test_varlen_rows_past_the_last_sequence_are_zero(deterministic):
    lens_q, lens_k, extra_q, extra_k = [30, 0, 77], [45, 12, 0], 19, 250
    h, hk, d = 4, 2, 64
    q = _leaf(sum(lens_q) + extra_q, h, d)
    k, v = (_leaf(sum(lens_k) + extra_k, hk, d) for _ in range(2))
    out = flashjit.flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q),
                                          max(lens_k), causal=True, deterministic=deterministic)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    tail_q, tail_k = slice(sum(lens_q), None), slice(sum(lens_k), None)
    for name, x, tail in (("out", out, tail_q), ("dq", dq, tail_q), ("dk", dk, tail_k),
                          ("dv", dv, tail_k)):
        assert torch.all(x[tail] == 0), f"{name}: rows past cu_seqlens[-1] are not 0"
        assert not torch.isnan(x).any(), f"{name}: NaN"
    # all sequences empty (max_seqlen 0): every row is past the end
    out = flashjit.flash_attn_varlen_func(q, k, v, _cu([0, 0]), _cu([0, 0]), 0, 0)
    assert torch.all(out == 0)


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) through every public entry point, static and dynamic shapes
# ------------------------------------------------------------------------------------------------
def _entry_points():
    b, s, h, hk, d = 2, 64, 4, 2, 64
    cu = _cu([40, 24])
    qkv = lambda: _leaf(b, s, 3, h, d)  # noqa: E731
    return {
        "flash_attn_func": (lambda q, k, v: flashjit.flash_attn_func(q, k, v, causal=True),
                            (_leaf(b, s, h, d), _leaf(b, s, hk, d), _leaf(b, s, hk, d))),
        "flash_attn_qkvpacked_func": (lambda x: flashjit.flash_attn_qkvpacked_func(x), (qkv(),)),
        "flash_attn_kvpacked_func": (lambda q, kv: flashjit.flash_attn_kvpacked_func(q, kv),
                                     (_leaf(b, s, h, d), _leaf(b, s, 2, hk, d))),
        "flash_attn_varlen_func": (
            lambda q, k, v: flashjit.flash_attn_varlen_func(q, k, v, cu, cu, 40, 40, causal=True),
            (_leaf(b * s, h, d), _leaf(b * s, hk, d), _leaf(b * s, hk, d))),
        "flash_attn_varlen_qkvpacked_func": (
            lambda x: flashjit.flash_attn_varlen_qkvpacked_func(x, cu, 40),
            (_leaf(b * s, 3, h, d),)),
        "flash_attn_varlen_kvpacked_func": (
            lambda q, kv: flashjit.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 40, 40),
            (_leaf(b * s, h, d), _leaf(b * s, 2, hk, d))),
        "scaled_dot_product_attention": (
            lambda q, k, v: flashjit.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                  enable_gqa=True),
            (_leaf(b, h, s, d), _leaf(b, hk, s, d), _leaf(b, hk, s, d))),
        "scaled_dot_product_attention with a key mask": (
            lambda q, k, v: flashjit.scaled_dot_product_attention(
                q, k, v, attn_mask=torch.arange(s, device="cuda") < 50),
            (_leaf(b, h, s, d), _leaf(b, h, s, d), _leaf(b, h, s, d))),
    }


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_every_entry_point(dynamic):
    torch._dynamo.reset()
    for name, (fn, inputs) in _entry_points().items():
        eager = fn(*inputs)
        dout = torch.randn_like(eager)
        g_eager = torch.autograd.grad(eager, inputs, dout)
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
        out = compiled(*inputs)
        g_comp = torch.autograd.grad(out, inputs, dout)
        for what, a, b in zip(("out", "grad 0", "grad 1", "grad 2"), (out,) + g_comp,
                              (eager,) + g_eager):
            assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), f"{name}: {what} differs"


# ------------------------------------------------------------------------------------------------
# Precision: tiny sequences and fp16 logits beyond the fp16 range
# ------------------------------------------------------------------------------------------------
def test_precision_tiny_sequences_fp16():
    """fp16, d 16, inputs ~3 (randn x 3), seqlen_q and seqlen_k 1-2, dout all ones, 144 seeds.
    Rows whose softmax is nearly one-hot have dS ~ 0: there D = rowsum(dO * O) must come from O
    at fp32 precision (the forward's rounding residual), not from the rounded O; that fixed dq and
    dk, which failed the criterion in 7 of these seeds.

    dv gets half an fp16 ulp of slack: with dout = 1, dv_j = sum_i P_ij over one or two rows,
    and flashjit and PyTorch both round P to fp16 before that product and round dv to fp16 after
    it. Measured on the H200 without the slack: 1 of 144 seeds over the criterion (8.2e-4
    against 2 x 3.5e-4 + 1e-4: PyTorch's roundings happened to cancel), i.e. within one ulp."""
    failures = []
    for seed in range(144):
        torch.manual_seed(seed)
        sq, sk = 1 + seed % 2, 1 + seed // 2 % 2
        q, k, v = (_leaf(2, n, 2, 16, dtype=torch.float16, scale=3.0) for n in (sq, sk, sk))
        try:
            check_grads(q, k, v, causal=False, dv_rounding_slack=True,
                        dout=torch.ones(2, sq, 2, 16, device="cuda", dtype=torch.float16))
        except AssertionError as err:
            failures.append(f"seed {seed} (sq {sq}, sk {sk}): {err}")
    assert not failures, "\n".join(failures)


def test_precision_fp16_logits_beyond_fp16_range():
    """q = k = randn x 40, fp16, d 64, seqlen 128: the scores (~1e4 after scaling) overflow fp16,
    so PyTorch's fp16 math gives inf/NaN; compare with SDPA's flash backend (FlashAttention-2) on
    the same input instead: flashjit must be no worse, and is far better on dq, dk (its D uses
    the forward's rounding residual)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    x = torch.randn(2, 128, 4, 64, device="cuda") * 40
    v0, dout = torch.randn_like(x), torch.randn_like(x).half()
    errors = {}
    for impl in ("flashjit", "sdpa_flash", "reference"):
        dtype = torch.float64 if impl == "reference" else torch.float16
        q, k, v = (t.to(dtype).requires_grad_() for t in (x, x, v0))
        if impl == "flashjit":
            out = flashjit.flash_attn_func(q, k, v)
        elif impl == "sdpa_flash":
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = torch.nn.functional.scaled_dot_product_attention(
                    *(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        else:
            q16, k16, v16 = (t.detach().half().double().requires_grad_() for t in (q, k, v))
            q, k, v = q16, k16, v16  # the reference sees the same fp16-rounded inputs
            out, _ = attention_ref(q, k, v, causal=False)
        errors[impl] = (out,) + torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    ref = errors.pop("reference")
    table = {impl: [max_error(x, r) for x, r in zip(vals, ref)] for impl, vals in errors.items()}
    print("max error vs float64 (out, dq, dk, dv):", table)
    for name, ours, flash in zip(("out", "dq", "dk", "dv"), table["flashjit"],
                                 table["sdpa_flash"]):
        assert ours <= flash + 1e-3, f"{name}: flashjit {ours:.3g} > SDPA flash {flash:.3g}"


# ------------------------------------------------------------------------------------------------
# flash-attn 2.x API: positional order, return convention, head dims, layouts, variant arguments
# ------------------------------------------------------------------------------------------------
def test_positional_call_means_what_it_means_in_flash_attn():
    q, k, v = (_leaf(2, 100, 4, 64) for _ in range(3))
    # flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
    #                 alibi_slopes, deterministic, return_attn_probs)
    positional = flashjit.flash_attn_func(q, k, v, 0.0, 0.2, True, (-1, -1), 0.0, None, False,
                                          True)
    keywords = flashjit.flash_attn_func(q, k, v, softmax_scale=0.2, causal=True,
                                        return_attn_probs=True)
    assert len(positional) == 3 and positional[2] is None
    assert torch.equal(positional[0], keywords[0]) and torch.equal(positional[1], keywords[1])
    out_ref, lse_ref = attention_ref(q.float(), k.float(), v.float(), True, 0.2)
    assert max_error(positional[1], lse_ref) < 1e-3
    assert isinstance(flashjit.flash_attn_func(q, k, v), torch.Tensor)


@pytest.mark.parametrize("d", [4, 20, 59, 111, 250])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_not_a_multiple_of_8(d, causal):
    torch.manual_seed(d)
    dtype = torch.float16 if d % 2 else torch.bfloat16
    q, k, v = (_leaf(2, n, 3, d, dtype=dtype) for n in (130, 97, 97))
    check_grads(q, k, v, causal)
    out, lse, _ = flashjit.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, 3, 130)


def test_head_dim_not_a_multiple_of_8_varlen_and_packed():
    qkv = _leaf(2, 77, 3, 2, 59, dtype=torch.float16)
    out = flashjit.flash_attn_qkvpacked_func(qkv, causal=True)
    (g,) = torch.autograd.grad(out, qkv, torch.randn_like(out))
    q32 = qkv.detach().float().requires_grad_()
    ref, _ = attention_ref(*q32.unbind(2), causal=True)
    assert g.shape == qkv.shape and max_error(out, ref) < 1e-2
    cu = _cu([50, 27])
    packed = qkv.detach().view(154, 3, 2, 59)
    out_v = flashjit.flash_attn_varlen_qkvpacked_func(packed, cu, 50)
    assert out_v.shape == (154, 2, 59) and not torch.isnan(out_v).any()


def test_misaligned_and_strided_inputs_are_copied_not_refused():
    shape = (2, 90, 4, 64)
    numel = 2 * 90 * 4 * 64
    base = torch.randn(numel + 1, device="cuda", dtype=torch.float16, requires_grad=True)
    q = base[1:].view(shape)  # data pointer 2 bytes past a 16-byte boundary
    k = torch.randn(2, 90, 4, 128, device="cuda", dtype=torch.float16)[..., ::2]  # stride 2
    k.requires_grad_()
    v = _leaf(2, 90, 4, 68, dtype=torch.float16)[..., :64]  # head stride 68: not a multiple of 8
    assert q.data_ptr() % 16 != 0 and k.stride(-1) == 2 and v.stride(-2) % 8 != 0
    check_grads(q, k, v, causal=True)


def test_variant_arguments_raise_before_any_compile(monkeypatch):
    monkeypatch.setenv("FLASHJIT_DISABLE_JIT", "1")  # a compile would raise JitDisabledError
    q, k, v = (_leaf(1, 16, 2, 64) for _ in range(3))
    with pytest.raises(ValueError, match="window_size"):
        flashjit.flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(ValueError, match="softcap"):
        flashjit.flash_attn_func(q, k, v, softcap=float("nan"))
    with pytest.raises(ValueError, match="alibi_slopes"):
        flashjit.flash_attn_func(q, k, v, alibi_slopes=torch.ones(3, device="cuda"))
    with pytest.raises(ValueError, match="sink"):
        flashjit.flash_attn_func(q, k, v, sink=torch.ones(2, device="cuda", dtype=torch.float16))
    with pytest.raises(ValueError, match="k must be a paged cache"):  # block_table: 4-D caches
        cu = _cu([16])
        flashjit.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 16, 16,
                                        block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="kv must have|q, kv, kv must have one dtype"):
        flashjit.flash_attn_kvpacked_func(q, torch.stack((k, v), 2).half())
    with pytest.raises(TypeError, match="qkv must be float16"):
        flashjit.flash_attn_qkvpacked_func(torch.stack((q, k, v), 2).float())
    with pytest.raises(TypeError, match="query must be float16"):
        flashjit.scaled_dot_product_attention(q.float(), k, v)


def test_windows_that_exclude_no_key_are_plain_or_causal():
    """flash-attn's window_size semantics: (-1, 0) is causal (bottom-right), a window at least as
    wide as the sequences is plain attention; both give exactly those kernels' results."""
    q, k, v = _leaf(2, 100, 4, 64), _leaf(2, 130, 2, 64), _leaf(2, 130, 2, 64)
    causal = flashjit.flash_attn_func(q, k, v, causal=True)
    plain = flashjit.flash_attn_func(q, k, v)
    assert torch.equal(flashjit.flash_attn_func(q, k, v, window_size=(-1, 0)), causal)
    assert torch.equal(flashjit.flash_attn_func(q, k, v, window_size=(129, 99)), plain)
    assert torch.equal(flashjit.flash_attn_func(q, k, v, causal=True, window_size=(10**6, 5)),
                       causal)
    # a window that excludes keys is the sliding-window kernel (tests/gpu/test_variants.py)
    assert not torch.equal(flashjit.flash_attn_func(q, k, v, window_size=(128, 98)), plain)
