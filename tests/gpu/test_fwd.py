"""Forward attention on the GPU against a float32 reference.

Criterion (for output and lse): flashjit's max error against the float32 reference is at most
twice PyTorch's own error (the same math in the input dtype), plus a tiny absolute slack for
cases where PyTorch happens to be exact.
"""

import random

import pytest
import torch

import flashjit
from tests.reference import attention_ref, max_error

DTYPES = [torch.float16, torch.bfloat16]


def _qkv(b, sq, sk, h, hk, d, dtype, device="cuda"):
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    return q, k, v


def assert_close_to_reference(out, lse, q, k, v, causal, scale=None, bottom_right=True,
                              key_lengths=None, lse_rows=None):
    out_ref, lse_ref = attention_ref(q.float(), k.float(), v.float(), causal, scale, bottom_right,
                                     key_lengths)
    out_pt, lse_pt = attention_ref(q, k, v, causal, scale, bottom_right, key_lengths)
    err, err_pt = max_error(out, out_ref), max_error(out_pt, out_ref)
    assert err <= 2 * err_pt + 1e-5, f"out: flashjit error {err:.3g} > 2 x PyTorch's {err_pt:.3g}"
    if lse is not None:
        lse_err, lse_err_pt = max_error(lse, lse_ref), max_error(lse_pt, lse_ref)
        assert lse_err <= 2 * lse_err_pt + 1e-4, (
            f"lse: flashjit error {lse_err:.3g} > 2 x PyTorch's {lse_err_pt:.3g}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [32, 40, 64, 80, 96, 128, 160, 176, 192, 224, 232, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(128, 128), (113, 203), (257, 129), (1, 77)])
def test_fwd_grid(dtype, d, causal, sq, sk):
    torch.manual_seed(sq * 1000 + sk + d)
    q, k, v = _qkv(2, sq, sk, 3, 3, d, dtype)
    out, lse, _ = flashjit.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, 3, sq) and lse.dtype == torch.float32
    assert_close_to_reference(out, lse, q, k, v, causal)


# On sm90a the d-64 forward has two tiles in one spec (csrc/sm90ws/fwd_launch.cuh): one consumer
# warpgroup while query and key lengths are both at most 512 (1024 causal), three above; lengths
# on both sides of each switch, fixed-length and varlen (where max_seqlen_q/k pick the tile).
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq", [512, 513, 1024, 1025, 1500])
def test_fwd_lengths_around_tile_switch(dtype, causal, sq):
    torch.manual_seed(sq)
    sk = sq - 37  # fewer keys: with causal the first 37 rows see none
    q, k, v = _qkv(1, sq, sk, 2, 1, 64, dtype)
    out, lse, _ = flashjit.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert_close_to_reference(out, lse, q, k, v, causal)
    # varlen: a short sequence next to this one, so the tile follows the longest
    lens = [(100, 90), (sq, sk)]
    qs, ks, vs = zip(*(_qkv(1, a, b, 2, 1, 64, dtype) for a, b in lens))
    cu_q = torch.tensor([0, 100, 100 + sq], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, 90, 90 + sk], device="cuda", dtype=torch.int32)
    out, lse, _ = flashjit.flash_attn_varlen_func(
        torch.cat(qs, 1)[0], torch.cat(ks, 1)[0], torch.cat(vs, 1)[0], cu_q, cu_k, sq, sk,
        causal=causal, return_attn_probs=True)
    for i, (a, b) in enumerate(lens):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        assert_close_to_reference(out[rows][None], lse[:, rows][None], qs[i], ks[i], vs[i], causal)


def _ws_consumers(fn) -> set:
    """Consumer warpgroups of the sm90ws forward kernels fn() launched (FwdWsTraits' last
    parameter, from the profiler's kernel names, demangled or not)."""
    import re

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    found = set()
    for name in (e.name for e in prof.events() if "fwd_ws_kernel" in e.name):
        m = (re.search(r"FwdWsTraits<[^<>]*?(\d+)>", name)
             or re.search(r"FwdWsTraitsI\w*?Li\d+ELi\d+ELi\d+ELi(\d+)E", name))
        assert m, f"no FwdWsTraits in the kernel name {name!r}"
        found.add(int(m.group(1)))
    return found


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the sm90ws forward's tile choice: sm90a (H100/H200) only")
@pytest.mark.parametrize("sq,sk,causal,consumers", [
    (512, 512, False, 1), (513, 513, False, 3), (1024, 1024, True, 1), (1025, 1025, True, 3),
    (256, 2048, False, 3),  # few queries, many keys: the main loop outweighs the overlap
])
def test_fwd_d64_tile_follows_the_lengths(monkeypatch, sq, sk, causal, consumers):
    monkeypatch.delenv("FLASHJIT_KERNEL_FAMILY", raising=False)
    monkeypatch.delenv("FLASHJIT_FWD_TILE", raising=False)
    from flashjit import ops
    monkeypatch.setattr(ops, "_resolved", {})  # the family follows the environment just set
    q, k, v = _qkv(1, sq, sk, 2, 2, 64, torch.bfloat16)
    assert _ws_consumers(lambda: flashjit.flash_attn_func(q, k, v, causal=causal)) == {consumers}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,hk", [(8, 1), (8, 2), (6, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_gqa(dtype, h, hk, causal):
    q, k, v = _qkv(2, 300, 300, h, hk, 64, dtype)
    out, lse, _ = flashjit.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert_close_to_reference(out, lse, q, k, v, causal)


def test_fwd_random_shapes():
    rng = random.Random(1234)
    for _ in range(24):
        b, h = rng.randint(1, 4), rng.choice([1, 2, 4])
        hk = rng.choice([x for x in (1, 2, 4) if h % x == 0])
        sq, sk = rng.randint(1, 700), rng.randint(1, 700)
        d = rng.choice([8, 16, 24, 32, 48, 64, 72, 96, 112, 128, 136, 192, 256])
        dtype, causal = rng.choice(DTYPES), rng.random() < 0.5
        scale = rng.choice([None, 0.05, 0.3])
        q, k, v = _qkv(b, sq, sk, h, hk, d, dtype)
        out, lse, _ = flashjit.flash_attn_func(q, k, v, causal=causal, softmax_scale=scale,
                                               return_attn_probs=True)
        assert_close_to_reference(out, lse, q, k, v, causal, scale)


# On sm90a the sm90ws forward runs a persistent grid at d <= 128 where its tiles cost about the
# same (not causal, fixed length: csrc/sm90ws/fwd_launch.cuh): a CTA per SM slot takes every
# gridDim.x-th tile, its K/V buffers, barriers and ping-pong turn going on from one tile to the
# next. Here many more tiles than SMs (3 x 16 x 8 = 384 at d 128), key lengths that end inside a
# key block (a V tail in every tile), GQA, d 64's short tile (two CTAs per SM: 500 x 300, 768
# tiles on 264 CTAs) and three consumers (288 tiles), the padded 96; at 192/256 (112- and 80-key
# blocks) the kernel has no tile loop and these shapes check its one-tile-per-CTA order.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("b,sq,sk,h,hk", [(3, 1000, 777, 16, 4), (4, 500, 300, 24, 8)])
@pytest.mark.parametrize("causal", [False, True])  # causal: the grouped longest-first order
def test_fwd_many_tiles_per_cta(dtype, d, b, sq, sk, h, hk, causal):
    torch.manual_seed(d * 7 + sq)
    q, k, v = _qkv(b, sq, sk, h, hk, d, dtype)
    out, lse, _ = flashjit.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert_close_to_reference(out, lse, q, k, v, causal)


def test_fwd_large_batch_heads():
    q, k, v = _qkv(64, 64, 64, 40, 40, 64, torch.bfloat16)  # 2560 (batch, head) pairs
    out, lse, _ = flashjit.flash_attn_func(q, k, v, return_attn_probs=True)
    assert_close_to_reference(out, lse, q, k, v, False)


def test_fwd_rows_without_keys_give_zero_and_minus_inf():
    # causal, bottom-right, seqlen_q > seqlen_k: the first seqlen_q - seqlen_k rows see no key
    q, k, v = _qkv(2, 100, 30, 2, 2, 64, torch.float16)
    out, lse, _ = flashjit.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[:, :70] == 0) and torch.all(lse[:, :, :70] == float("-inf"))
    assert torch.all(torch.isfinite(lse[:, :, 70:]))
    assert_close_to_reference(out, lse, q, k, v, True)


def test_fwd_strided_inputs_no_copy():
    qkv = torch.randn(2, 190, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    out = flashjit.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.unbind(2)
    assert_close_to_reference(out, None, q, k, v, True)
    q = torch.randn(2, 4, 150, 96, device="cuda", dtype=torch.float16).transpose(1, 2)
    kv = torch.randn(2, 170, 2, 2, 96, device="cuda", dtype=torch.float16)
    out = flashjit.flash_attn_kvpacked_func(q, kv)
    assert_close_to_reference(out, None, q, kv[:, :, 0], kv[:, :, 1], False)


@pytest.mark.parametrize("causal", [False, True])
def test_fwd_varlen_with_empty_sequences(causal):
    lens_q = [5, 0, 130, 64, 1, 0]
    lens_k = [7, 3, 130, 0, 200, 0]
    h, hk, d, dtype = 4, 2, 64, torch.bfloat16
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0)), device="cuda",  # noqa
                                 dtype=torch.int32)
    out, lse, _ = flashjit.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q),
                                                  max(lens_k), causal=causal,
                                                  return_attn_probs=True)
    assert lse.shape == (h, sum(lens_q))
    oq = ok = 0
    for lq, lk in zip(lens_q, lens_k):
        if lq > 0:
            sl = slice(oq, oq + lq)
            if lk == 0:
                assert torch.all(out[sl] == 0) and torch.all(lse[:, sl] == float("-inf"))
            else:
                ks = slice(ok, ok + lk)
                assert_close_to_reference(out[None, sl], lse[None, :, sl], q[None, sl],
                                          k[None, ks], v[None, ks], causal)
        oq, ok = oq + lq, ok + lk


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_torch(causal):
    q = torch.randn(2, 4, 200, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 4, 150, 64, device="cuda", dtype=torch.float16)
    v = torch.randn(2, 4, 150, 64, device="cuda", dtype=torch.float16)
    out = flashjit.scaled_dot_product_attention(q, k, v, is_causal=causal)
    # top-left causal alignment, as torch; rows with no key are 0 in flashjit
    assert_close_to_reference(out.transpose(1, 2), None, q.transpose(1, 2), k.transpose(1, 2),
                              v.transpose(1, 2), causal, bottom_right=False)


def test_sdpa_key_padding_mask_and_gqa():
    b, h, hk, s, d = 3, 8, 2, 180, 128
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([180, 77, 1], device="cuda")
    mask = (torch.arange(s, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    out = flashjit.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1),
        attn_mask=mask)
    assert_close_to_reference(out.transpose(1, 2), None, q.transpose(1, 2), k.transpose(1, 2),
                              v.transpose(1, 2), False, key_lengths=lengths)
    assert max_error(out, ref) < 0.05


def test_bad_inputs_raise_before_compile():
    q, k, v = _qkv(1, 16, 16, 2, 2, 64, torch.float16)
    with pytest.raises(TypeError, match="q must be float16 or bfloat16"):
        flashjit.flash_attn_func(q.float(), k, v)
    with pytest.raises(TypeError, match="one dtype"):
        flashjit.flash_attn_func(q, k.bfloat16(), v)
    with pytest.raises(ValueError, match="head_dim 260"):
        big = torch.randn(1, 16, 2, 260, device="cuda", dtype=torch.float16)
        flashjit.flash_attn_func(big, big, big)
    with pytest.raises(ValueError, match="multiple of the number"):
        kv3 = torch.randn(1, 16, 3, 64, device="cuda", dtype=torch.float16)
        flashjit.flash_attn_func(q, kv3, kv3)
    with pytest.raises(ValueError, match="CUDA tensor"):
        flashjit.flash_attn_func(q.cpu(), k, v)
    cu = torch.tensor([0, 10, 5], device="cuda", dtype=torch.int32)
    with pytest.raises(ValueError, match="non-decreasing"):
        flashjit.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 10, 10)
    with pytest.raises(TypeError, match="int32"):
        flashjit.flash_attn_varlen_func(q[0], k[0], v[0], cu.long(), cu, 10, 10)
    with pytest.raises(ValueError, match="right-padding"):
        mask = torch.tensor([True, False] * 8, device="cuda")
        flashjit.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), attn_mask=mask)


def test_fwd_varlen_rows_past_the_last_sequence():
    """q with more rows than cu_seqlens_q[-1] (e.g. a padded buffer): those rows belong to no
    sequence, get out 0 and lse -inf (the kernels write neither; out is zeroed by the binding,
    lse set by the interface), whatever the allocation held (poisoned with NaN here)."""
    h, hk, d, dtype = 4, 2, 64, torch.bfloat16
    q = torch.randn(50, h, d, device="cuda", dtype=dtype)
    k = torch.randn(40, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(40, hk, d, device="cuda", dtype=dtype)
    cu_q = torch.tensor([0, 10, 30], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, 15, 40], device="cuda", dtype=torch.int32)
    out, lse, _ = flashjit.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 25,
                                                  return_attn_probs=True)
    assert torch.all(out[30:] == 0)
    assert torch.equal(lse[:, 30:], torch.full((h, 20), float("-inf"), device="cuda"))
    for b, (q0, q1, k0, k1) in enumerate([(0, 10, 0, 15), (10, 30, 15, 40)]):
        assert_close_to_reference(out[None, q0:q1], lse[None, :, q0:q1], q[None, q0:q1],
                                  k[None, k0:k1], v[None, k0:k1], False)
