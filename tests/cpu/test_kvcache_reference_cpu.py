"""tests/reference.py's kvcache_ref (the GPU tests' reference for flash_attn_with_kvcache)
against independent formulas, in float64 on the CPU: rotary as a complex rotation, paged equal to
contiguous, the append's rows, empty and full caches, leftpad, one speculative call equal to
token-by-token decoding, and the yardstick in the inputs' dtype."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from flashjit.testing import attention_reference
from tests.reference import kvcache_ref, max_error, rotary_ref

I32 = dict(dtype=torch.int32)

# ---------------------------------------------------------------------------------------------
# The reference (tests/reference.py: kvcache_ref) against independent formulas, in float64
# ---------------------------------------------------------------------------------------------
def _rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def _tables(seqlen_ro, half, dtype=torch.float64):
    """RoPE tables (seqlen_ro, half) and their angles: position p, column c at
    p * 10000^(-c / half)."""
    angles = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * \
        10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    return angles.cos().to(dtype), angles.sin().to(dtype), angles


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_ref_is_a_complex_rotation(interleaved):
    torch.manual_seed(0)
    x = _rand(2, 5, 3, 16)
    cos, sin, angles = _tables(32, 6)  # rotary_dim 12 of 16
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    got = rotary_ref(x, cos, sin, pos, interleaved)
    pairs = (x[..., 0:12:2], x[..., 1:12:2]) if interleaved else (x[..., :6], x[..., 6:12])
    z = torch.complex(*pairs) * torch.polar(torch.ones_like(angles), angles)[pos][..., None, :]
    rotated = (torch.stack((z.real, z.imag), -1).flatten(-2) if interleaved
               else torch.cat((z.real, z.imag), -1))
    assert max_error(got[..., :12], rotated) < 1e-12
    assert torch.equal(got[..., 12:], x[..., 12:])
    # GPT-NeoX is GPT-J with the dims of each pair (c, c + 6) moved next to each other
    perm = [i for c in range(6) for i in (c, c + 6)] + list(range(12, 16))
    assert max_error(rotary_ref(x[..., perm], cos, sin, pos, True),
                     rotary_ref(x, cos, sin, pos, False)[..., perm]) < 1e-12


def _inputs(batch=3, seqlen_q=2, seqlen_new=2, heads=4, heads_k=2, d=16, capacity=64,
            batch_cache=None, dtype=torch.float64):
    torch.manual_seed(batch * 100 + seqlen_q * 10 + seqlen_new)
    shapes = dict(q=(batch, seqlen_q, heads), k=(batch, seqlen_new, heads_k),
                  k_cache=(batch_cache or batch, capacity, heads_k))
    shapes.update(v=shapes["k"], v_cache=shapes["k_cache"])
    return SimpleNamespace(**{name: _rand(*s, d, dtype=dtype) for name, s in shapes.items()})


def _to_pages(cache, page, table=None, extra=3):
    """A contiguous cache (batch, capacity, ...) as shuffled pages (given a table, its order),
    its block table, and `extra` pages no sequence uses (random)."""
    batch, capacity = cache.shape[:2]
    blocks = capacity // page
    if table is None:
        table = torch.randperm(batch * blocks + extra)[:batch * blocks].view(batch, blocks)
    pages = _rand(batch * blocks + extra, page, *cache.shape[2:], dtype=cache.dtype)
    pages[table.flatten().long()] = cache.reshape(batch * blocks, page, *cache.shape[2:])
    return pages, table.to(torch.int32)


@pytest.mark.parametrize("page", [16, 32])
def test_paged_equals_contiguous(page):
    x = _inputs()
    cos, sin, _ = _tables(80, 4)
    seqlens = torch.tensor([0, 17, 62], **I32)  # 62 + 2 new keys: full
    kw = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, causal=True,
              rotary_interleaved=False, alibi_slopes=torch.rand(3, 4).double(), softcap=3.0)
    out, lse, k_after, v_after = kvcache_ref(x.q, x.k_cache, x.v_cache, x.k, x.v, **kw)
    k_pages, table = _to_pages(x.k_cache, page)
    v_pages, _ = _to_pages(x.v_cache, page, table)
    p_out, p_lse, k_pages_after, v_pages_after = kvcache_ref(x.q, k_pages, v_pages, x.k, x.v,
                                                             block_table=table, **kw)
    assert max_error(p_out, out) < 1e-12 and max_error(p_lse, lse) < 1e-12
    used = table.flatten().long()
    assert torch.equal(k_pages_after[used].reshape(k_after.shape), k_after)
    assert torch.equal(v_pages_after[used].reshape(v_after.shape), v_after)
    unused = torch.ones(k_pages.shape[0], dtype=torch.bool)
    unused[used] = False
    assert torch.equal(k_pages_after[unused], k_pages[unused])  # other pages untouched


@pytest.mark.parametrize("rotary", [False, True])
def test_append_writes_exactly_the_new_rows(rotary):
    x = _inputs(batch=3, seqlen_new=3, batch_cache=5)
    index, seqlens = [4, 0, 2], [0, 5, 61]
    cos, sin, _ = _tables(70, 8)
    kw = dict(rotary_cos=cos, rotary_sin=sin) if rotary else {}
    k_before, v_before = x.k_cache.clone(), x.v_cache.clone()
    _, _, k_after, v_after = kvcache_ref(
        x.q, x.k_cache, x.v_cache, x.k, x.v, cache_seqlens=torch.tensor(seqlens, **I32),
        cache_batch_idx=torch.tensor(index, **I32), **kw)
    assert torch.equal(x.k_cache, k_before) and torch.equal(x.v_cache, v_before)  # copies
    k_expected, v_expected = k_before.clone(), v_before.clone()
    for b, (row, n) in enumerate(zip(index, seqlens)):
        new = x.k[b]
        if rotary:
            new = rotary_ref(x.k[b:b + 1], cos, sin, torch.arange(n, n + 3)[None], True)[0]
        k_expected[row, n:n + 3] = new
        v_expected[row, n:n + 3] = x.v[b]  # values are never rotated
    assert torch.equal(k_after, k_expected) and torch.equal(v_after, v_expected)


def test_empty_and_full_caches():
    x = _inputs(batch=2, seqlen_q=3, seqlen_new=3)
    sink = torch.randn(4, dtype=torch.float64)
    for kw in (dict(), dict(sink=sink)):  # no key: out 0, lse -inf (the sink's logit with one)
        out, lse, k_after, _ = kvcache_ref(x.q, x.k_cache, x.v_cache, cache_seqlens=0, **kw)
        assert torch.all(out == 0) and torch.equal(k_after, x.k_cache)
        expected = sink[None, :, None].expand(lse.shape) if kw else torch.full_like(lse, -math.inf)
        assert torch.equal(lse, expected)
    # an empty cache plus new keys: attention over the new keys alone
    out, lse, _, _ = kvcache_ref(x.q, x.k_cache, x.v_cache, x.k, x.v, cache_seqlens=0,
                                 causal=True)
    ref_out, ref_lse = attention_reference(x.q, x.k, x.v, causal=True)
    assert max_error(out, ref_out) < 1e-12 and max_error(lse, ref_lse) < 1e-12
    # full: None, the capacity as an int or a tensor, all the cache
    kw = dict(window_size=(10, 1), softcap=2.0, alibi_slopes=torch.rand(4).double(), sink=sink)
    ref_out, ref_lse = attention_reference(x.q, x.k_cache, x.v_cache, **kw)
    for seqlens in (None, 64, torch.tensor([64, 64], **I32)):
        out, lse, _, _ = kvcache_ref(x.q, x.k_cache, x.v_cache, cache_seqlens=seqlens, **kw)
        assert max_error(out, ref_out) < 1e-12 and max_error(lse, ref_lse) < 1e-12


def test_leftpad_starts_the_keys():
    x = _inputs(batch=2, seqlen_q=1, seqlen_new=1)
    seqlens, leftpad = [10, 20], [4, 0]
    out, lse, _, _ = kvcache_ref(x.q, x.k_cache, x.v_cache, cache_seqlens=torch.tensor(
        seqlens, **I32), cache_leftpad=torch.tensor(leftpad, **I32))
    for b in range(2):
        keys = slice(leftpad[b], seqlens[b])
        ref_out, ref_lse = attention_reference(x.q[b:b + 1], x.k_cache[b:b + 1, keys],
                                               x.v_cache[b:b + 1, keys])
        assert max_error(out[b:b + 1], ref_out) < 1e-12 and max_error(lse[b:b + 1], ref_lse) < 1e-12


def test_one_speculative_call_equals_token_by_token_decoding():
    """Four tokens appended and attended causally in one call (rotary at per-row positions,
    leftpad, window, ALiBi) equal four one-token decode steps: the positions agree."""
    x = _inputs(batch=2, seqlen_q=4, seqlen_new=4)
    cos, sin, _ = _tables(80, 8)
    seqlens, leftpad = torch.tensor([5, 30], **I32), torch.tensor([2, 0], **I32)
    kw = dict(rotary_cos=cos, rotary_sin=sin, cache_leftpad=leftpad, causal=True,
              window_size=(6, 0), alibi_slopes=torch.rand(4).double())
    out, lse, k_after, v_after = kvcache_ref(x.q, x.k_cache, x.v_cache, x.k, x.v,
                                             cache_seqlens=seqlens, **kw)
    k_cache, v_cache = x.k_cache, x.v_cache
    for t in range(4):
        step = slice(t, t + 1)
        o, l, k_cache, v_cache = kvcache_ref(x.q[:, step], k_cache, v_cache, x.k[:, step],
                                             x.v[:, step], cache_seqlens=seqlens + t, **kw)
        assert max_error(o, out[:, step]) < 1e-12 and max_error(l, lse[..., step]) < 1e-12
    assert torch.equal(k_cache, k_after) and torch.equal(v_cache, v_after)


def test_yardstick_runs_in_the_inputs_dtype():
    x = _inputs(batch=2, seqlen_q=1, seqlen_new=1, dtype=torch.bfloat16)
    cos, sin, _ = _tables(70, 8, torch.bfloat16)
    kw = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=torch.tensor([7, 40], **I32))
    ref = kvcache_ref(x.q, x.k_cache, x.v_cache, x.k, x.v, **kw)
    pt = kvcache_ref(x.q, x.k_cache, x.v_cache, x.k, x.v, upcast=False, **kw)
    assert ref[0].dtype == torch.float32 and pt[0].dtype == torch.bfloat16
    assert 0 < max_error(pt[0], ref[0]) < 0.05 and max_error(pt[1], ref[1]) < 0.05
    assert torch.equal(ref[2], pt[2]) and ref[2].dtype == torch.bfloat16  # the same append


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (5, 0))])
def test_paged_varlen_places_each_sequences_queries_bottom_right(monkeypatch, causal, window):
    """flash_attn_varlen_func(..., block_table=...) (interface._paged_varlen): the varlen queries
    go to the end of a left-padded tile for flash_attn_with_kvcache (stood in for here by
    kvcache_ref on the CPU), and come back to their rows; rows past the last sequence get 0 and
    lse -inf. Against attention per sequence on its own gathered pages, bottom-right."""
    from flashjit import interface

    tiles = []

    def stand_in(q, k_cache, v_cache, return_softmax_lse=False, **kw):
        tiles.append(q.shape[1])
        out, lse, _, _ = kvcache_ref(q, k_cache, v_cache, **kw)
        return out.to(q.dtype), lse

    monkeypatch.setattr(interface, "flash_attn_with_kvcache", stand_in)
    torch.manual_seed(0)
    heads, heads_k, d, page, pages = 4, 2, 16, 16, 12
    lens_k = [20, 5, 40]  # queries per sequence: 3, 1, 7 (cu_q)
    k_cache, v_cache = (_rand(pages, page, heads_k, d) for _ in range(2))
    table = torch.randperm(pages)[:9].view(3, 3).int()
    cu_q = torch.tensor([0, 3, 4, 11], **I32)
    cu_k = torch.tensor([0, 20, 25, 65], **I32)
    q = _rand(13, heads, d)  # 2 rows past the last sequence
    names = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")
    # a loose max_seqlen_q (an upper bound, as flash-attn allows): the tile is the longest
    # sequence's 7 rows all the same (eager: read from cu_seqlens_q)
    out, lse, _ = interface._paged_varlen(q, k_cache, v_cache, cu_q, cu_k, 1000, 40, 0.0, None,
                                          causal, window, 0.0, None, False, True, table, None,
                                          names)
    assert tiles == [7]
    assert out.shape == q.shape and lse.shape == (heads, 13)
    for b in range(3):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        keys = torch.cat([k_cache[p] for p in table[b]])[:lens_k[b]]
        vals = torch.cat([v_cache[p] for p in table[b]])[:lens_k[b]]
        ref, ref_lse = attention_reference(q[rows][None], keys[None], vals[None], causal=causal,
                                           window_size=window)
        assert max_error(out[rows], ref[0]) < 1e-12
        assert max_error(lse[:, rows], ref_lse[0]) < 1e-12
    assert torch.equal(out[11:], torch.zeros_like(out[11:]))
    assert torch.equal(lse[:, 11:], torch.full((heads, 2), float("-inf"), dtype=lse.dtype))


def test_paged_varlen_checks_its_arguments_under_the_callers_names():
    """flash_attn_varlen_func(..., block_table=...) checks its own arguments, named as the caller
    passed them (k, v, cu_seqlens_k, ...), before any allocation (found by a new user)."""
    import numpy as np

    import flashjit
    q = torch.zeros(5, 4, 16, dtype=torch.float16)
    k = torch.zeros(9, 16, 2, 16, dtype=torch.float16)
    cu_q = torch.tensor([0, 2, 5], **I32)
    cu_k = torch.tensor([0, 20, 40], **I32)
    table = torch.arange(8, **I32).view(2, 4)

    def call(q=q, k=k, v=k.clone(), cu_k=cu_k, max_q=3, max_k=40, table=table, **kw):
        return flashjit.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k,
                                               block_table=table, **kw)

    with pytest.raises(NotImplementedError, match="dropout_p must be 0 with block_table"):
        call(dropout_p=np.float32(0.1))
    with pytest.raises((TypeError, ValueError), match="dropout_p"):
        call(dropout_p="abc")
    with pytest.raises((TypeError, ValueError), match="return_attn_probs"):
        call(return_attn_probs="no")
    with pytest.raises((TypeError, ValueError), match="deterministic"):
        call(deterministic="maybe")
    with pytest.raises(TypeError, match="k must have q's dtype"):
        call(k=k.bfloat16())
    # q's own dtype is named, not the caches' (found by a new user); likewise its head dim range
    # and a sink that requires grad (no backward here), under this call's rules
    with pytest.raises(TypeError, match="q must be float16 or bfloat16, got torch.float32"):
        call(q=q.float(), k=k.float(), v=k.float())
    with pytest.raises(ValueError, match="head dim 264 of q: with block_table it must be a "
                                         "multiple of 8 from 8 to 256"):
        call(q=torch.zeros(5, 4, 264, dtype=torch.float16),
             k=torch.zeros(9, 16, 2, 264, dtype=torch.float16),
             v=torch.zeros(9, 16, 2, 264, dtype=torch.float16))
    with pytest.raises(NotImplementedError, match="block_table .paged KV. has no backward"):
        call(sink=torch.zeros(4, requires_grad=True))
    # a CUDA cache (fake: no GPU here) with a CPU q: q is the one named as off the GPU
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        k_gpu = torch.empty(9, 16, 2, 16, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="q must be a CUDA tensor, got device cpu"):
        call(k=k_gpu, v=k_gpu)
    with pytest.raises(ValueError, match="key/value heads of v"):
        call(v=torch.zeros(9, 16, 3, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="head dim 12 of q: with block_table"):
        call(q=torch.zeros(5, 4, 12, dtype=torch.float16),
             k=torch.zeros(9, 16, 2, 12, dtype=torch.float16),
             v=torch.zeros(9, 16, 2, 12, dtype=torch.float16))
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0 and be non-decreasing"):
        call(cu_k=torch.tensor([0, 30, 20], **I32))
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0"):
        call(cu_k=torch.tensor([7, 27, 47], **I32))
    with pytest.raises(ValueError, match="max_seqlen_k is 10 but a sequence of cu_seqlens_k"):
        call(max_k=10)
    with pytest.raises(ValueError, match="more than block_table holds .64 rows"):
        call(cu_k=torch.tensor([0, 100, 120], **I32), max_k=100)
    with pytest.raises(TypeError, match="cu_seqlens_k must be int32"):
        call(cu_k=cu_k.long())
    # the paged cache's own rules, under the names k, v, cu_seqlens_k (not k_cache, v_cache,
    # cache_seqlens of flash_attn_with_kvcache, which serves the call)
    with pytest.raises(ValueError, match="page size of k .its dim 1, with block_table. must be a "
                                         "positive multiple of 16, got 8"):
        call(k=torch.zeros(9, 8, 2, 16, dtype=torch.float16),
             v=torch.zeros(9, 8, 2, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="k and v must have the same shape with block_table"):
        call(v=torch.zeros(9, 32, 2, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"k has a zero stride .*: the kernels read each row"):
        call(k=torch.zeros(1, 16, 2, 16, dtype=torch.float16).expand(9, 16, 2, 16))
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 9 is not a page of k "
                                         r"\(num_blocks 9\): sequence 1 has 20 keys in "
                                         r"cu_seqlens_k, so it uses block_table\[1, :2\]"):
        call(table=torch.tensor([[0, 1, 2, 3], [4, 9, 6, 7]], **I32))
    # block_table itself and the variant tensors are checked here too, before the query tile is
    # allocated and flash_attn_with_kvcache is called (found by a new user)
    import flashjit.interface as interface

    def kvcache_reached(*args, **kwargs):
        raise AssertionError("flash_attn_with_kvcache was reached")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interface, "flash_attn_with_kvcache", kvcache_reached)
        with pytest.raises(TypeError, match="block_table must be int32, got torch.int64"):
            call(table=table.long())
        with pytest.raises(ValueError, match=r"block_table must have shape \(batch, max_blocks\)"):
            call(table=table[:1])
        with pytest.raises(ValueError, match="alibi_slopes"):
            call(alibi_slopes=torch.zeros(3))
        with pytest.raises((TypeError, ValueError), match="sink"):
            call(sink=torch.zeros(4, dtype=torch.float16))
    # entries past the pages a sequence uses are not read, so any value passes these checks (the
    # call then stops at flash_attn_with_kvcache's device check: these are CPU tensors)
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        call(table=torch.tensor([[0, 1, -1, 99], [4, 5, 99, -7]], **I32))
