"""flash_attn_with_kvcache on the GPU (the decode kernel; without cache_batch_idx and
cache_leftpad, from 64 queries on (contiguous, and paged where the paged forward is sm90ws) or
256 (paged otherwise), the forward kernel after the decode op's append, its paged spec with a
block table) against tests/reference.py's kvcache_ref.

Criterion (the house one, tests/gpu/test_fwd.py): out and lse within 2x PyTorch's own error
against the float32 reference, plus a tiny absolute slack; PyTorch's error is kvcache_ref run in
the input dtype (upcast=False) on the same inputs. The caches after the append must equal the
reference's EXACTLY (torch.equal, every row: new rows copied, or rotated in float32 from exact
products and rounded once; no other row touched). Outputs, q_rot and the split-KV scratch start
as NaN (conftest.py poisons flashjit's allocations), so anything a kernel reads before writing,
or never writes, fails. Each case also asserts which decode spec served it, and which forward
spec (paged or not) for chunked prefill.

Covered: page sizes 16, 64, 256 with shuffled block tables (and spare pages); cache lengths 0 and
full (a tensor, an int, None); batch 1 and 256; seqlen_k 1 and 128k; GQA 32:8, MHA and (paged
prefill) MQA; fp16 and bf16; d 64, 128, 256 (and 192 in paged prefill); num_splits 1, auto
and 4 (also with no keys at all: empty splits); rotary GPT-NeoX, GPT-J and partial (rotary_dim < d); causal, sliding window, softcap + ALiBi
(per head and per sequence), sink; cache_batch_idx, cache_leftpad; 4 queries at once
(speculative decoding); a CUDA graph capturing one decode step with append and rotary, replayed
with new inputs copied into its static tensors; value errors raised before any launch.
Chunked prefill (64 to 288 queries, appending as many keys or none): contiguous, and paged
(the forward's paged spec; where that reads rows one by one, the decode kernel's 64-row tiles
below 256 queries) with
pages of 16, 48, 64 and 256 rows (shuffled tables), causal and not, a causal sliding window,
GQA and MHA, fp16 d 64, bf16 d 128 and d 256 (on sm90a the warp-specialised forward: TMA boxes
of 16-128 rows inside the pages), and the mma.sync forward at d 128 too
(FLASHJIT_KERNEL_FAMILY=sm80).

JIT specs (kernel decode, its default family on the GPU's arch; about 60 s of tests once built;
plus the forward specs of chunked prefill, paged and not; benchmarks/device_run.sh's decode step
builds them all):
    decode fp16 hd64, fp16 hd128, bf16 hd128, bf16 hd192, bf16 hd256 (plain: seqlen_q 1 drops
    causal)
    decode bf16 hd128 causal, causal_window, softcap_alibi, causal_sink; bf16 hd256 causal
    fwd bf16 hd128 causal; paged: bf16 hd128 (plain, causal, causal_window), fp16 hd64 (plain),
    bf16 hd256 causal, bf16 hd192 (plain), and bf16 hd128 causal of family sm80
    python -m flashjit.prebuild --kernel decode --dtype fp16 --head-dim 64 128 --causal no
    python -m flashjit.prebuild --kernel decode --dtype bf16 --head-dim 128 256 --causal both
    python -m flashjit.prebuild --kernel decode --dtype bf16 --head-dim 192 --causal no
    python -m flashjit.prebuild --kernel decode --dtype bf16 --head-dim 128 --causal yes \
        --window both
    python -m flashjit.prebuild --kernel decode --dtype bf16 --head-dim 128 --causal no \
        --softcap yes --alibi yes
    python -m flashjit.prebuild --kernel decode --dtype bf16 --head-dim 128 --causal yes --sink yes
    python -m flashjit.prebuild --kernel fwd --dtype bf16 --head-dim 128 --causal yes
    python -m flashjit.prebuild --kernel fwd --dtype bf16 --head-dim 128 --causal both --paged yes
    python -m flashjit.prebuild --kernel fwd --dtype bf16 --head-dim 128 --causal yes \
        --window yes --paged yes
    python -m flashjit.prebuild --kernel fwd --dtype fp16 --head-dim 64 --causal no --paged yes
    python -m flashjit.prebuild --kernel fwd --dtype bf16 --head-dim 256 --causal yes --paged yes
    python -m flashjit.prebuild --kernel fwd --dtype bf16 --head-dim 192 --causal no --paged yes
    python -m flashjit.prebuild --kernel fwd --dtype bf16 --head-dim 128 --causal yes \
        --paged yes --family sm80
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

import flashjit
import flashjit.ops
from tests.reference import kvcache_ref, max_error

DEVICE = "cuda"
F16, BF16 = torch.float16, torch.bfloat16


@dataclass(frozen=True)
class Case:
    """One flash_attn_with_kvcache call and its inputs.

    capacity: cache rows per sequence (seqlen_cache, or max_blocks * page when paged). page:
    paged with this page size, through a shuffled block table over batch * max_blocks + 5 pages.
    lengths: "random" (cache_seqlens uniform in 0 .. capacity - seqlen_new), "zero", "full"
    (cache_seqlens + seqlen_new = capacity) or "none" (cache_seqlens=None: full, no append);
    int_lengths: cache_seqlens as an int. rotary: None, "neox" or "gptj" (interleaved), on the
    first rotary_dim dims (default d). alibi: None, "heads" or "batch". batch_idx: a cache of
    batch + 3 rows, used in shuffled order. leftpad: random cache_leftpad <= cache_seqlens."""

    batch: int = 4
    seqlen_q: int = 1
    seqlen_new: int = 1
    heads: int = 32
    heads_k: int = 8
    d: int = 128
    dtype: torch.dtype = BF16
    capacity: int = 1024
    page: Optional[int] = None
    lengths: str = "random"
    int_lengths: bool = False
    rotary: Optional[str] = "neox"
    rotary_dim: Optional[int] = None
    num_splits: int = 0
    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None
    sink: bool = False
    batch_idx: bool = False
    leftpad: bool = False

    def flags(self) -> tuple:
        """The decode spec's flags (causal, window, softcap, alibi, sink, dropout): seqlen_q 1
        drops causal; the windows here all exclude keys."""
        causal = self.causal and self.seqlen_q > 1
        window = self.window[0] != -1 if causal else self.window != (-1, -1)
        return (causal, window, self.softcap > 0, self.alibi is not None, self.sink, False)

    def prefill(self) -> bool:
        """Attended by the forward kernel (ops._by_forward): PREFILL_MIN_QUERIES queries on, paged
        ops.paged_prefill_min_queries() (or PREFILL_MIN_QUERIES where the decode kernel does
        not fit the GPU's shared memory), without cache_batch_idx or cache_leftpad."""
        ops = flashjit.ops
        if self.seqlen_q < ops.PREFILL_MIN_QUERIES or self.batch_idx or self.leftpad:
            return False
        rows = self.seqlen_q * (self.heads // self.heads_k)
        return (self.page is None
                or self.seqlen_q >= ops.paged_prefill_min_queries(torch.device("cuda"), self.d)
                or not ops.decode_smem_fits(torch.device("cuda"), self.d, rows))


GQA = dict(heads=32, heads_k=8)
MHA = dict(heads=32, heads_k=32)
SPEC = dict(seqlen_q=4, seqlen_new=4, causal=True)  # speculative decoding: 4 tokens
# Chunked prefill on a paged cache (shuffled tables): the forward's paged specs from
# ops.paged_prefill_min_queries() queries on (64 on sm90a, 256 where the paged forward reads rows
# one by one), the decode kernel's 64-row tiles below.
PAGED_PREFILL = {
    "prefill256_causal_paged16": Case(batch=2, seqlen_q=256, seqlen_new=256, causal=True,
                                      page=16, capacity=2048),
    "prefill64_paged64_gptj": Case(batch=3, seqlen_q=64, seqlen_new=64, page=64, capacity=1024,
                                   rotary="gptj"),
    "prefill272_causal_paged256_mha": Case(batch=2, seqlen_q=272, seqlen_new=272, causal=True,
                                           page=256, capacity=4096, rotary=None, **MHA),
    "prefill288_window_paged48": Case(batch=2, seqlen_q=288, seqlen_new=288, causal=True,
                                      window=(350, 0), page=48, capacity=960),
    "prefill96_window_paged48": Case(batch=2, seqlen_q=96, seqlen_new=96, causal=True,
                                     window=(150, 0), page=48, capacity=960),
    "prefill64_no_append_paged64": Case(batch=3, seqlen_q=64, seqlen_new=0, rotary=None, page=64,
                                        capacity=1024),
    "prefill64_causal_full_none_paged16": Case(seqlen_q=64, seqlen_new=0, causal=True,
                                               lengths="none", rotary=None, page=16,
                                               capacity=512),
    "fp16_d64_prefill256_paged16": Case(batch=2, dtype=F16, d=64, heads=16, heads_k=2,
                                        seqlen_q=256, seqlen_new=256, page=16, capacity=1024),
    # d 256: the sm90ws forward on sm90a (80-key blocks: boxes of 16 rows), mma.sync elsewhere
    "bf16_d256_prefill256_causal_paged64": Case(batch=2, d=256, heads=8, heads_k=2,
                                                seqlen_q=256, seqlen_new=256, causal=True,
                                                page=64, capacity=1024),
    # d 192 (112-key blocks: boxes of 16 rows) with one K/V head (MQA) and pages of 32
    "bf16_d192_prefill256_mqa_paged32": Case(batch=2, d=192, heads=8, heads_k=1, seqlen_q=256,
                                             seqlen_new=256, page=32, capacity=768),
}
CASES = {
    # bf16 d 128, plain spec: layouts, lengths, sizes, splits, rotary, index tensors
    "paged16": Case(page=16, capacity=2048),
    "paged48": Case(page=48, capacity=960),  # a page size that is not a power of two
    "paged64_gptj_splits4": Case(page=64, capacity=4096, rotary="gptj", num_splits=4),
    "paged256_mha_splits1": Case(page=256, capacity=8192, batch=3, rotary=None, num_splits=1,
                                 **MHA),
    "contiguous_splits1": Case(num_splits=1),
    "contiguous_mha_splits4": Case(num_splits=4, **MHA),
    "contiguous_mha_auto": Case(batch=2, capacity=4096, **MHA),
    "empty_no_append_splits4": Case(lengths="zero", seqlen_new=0, rotary=None, num_splits=4),
    "empty_append_splits4": Case(lengths="zero", num_splits=4),
    "full": Case(lengths="full"),
    "full_int_paged64": Case(lengths="full", int_lengths=True, page=64),
    "full_none": Case(lengths="none", seqlen_new=0, rotary=None, page=16, capacity=512),
    "batch256": Case(batch=256, capacity=256),
    "seqlen_k1": Case(batch=1, capacity=1, lengths="zero"),
    "seqlen_k128k": Case(batch=1, capacity=131072, lengths="full"),
    "seqlen_k128k_paged256": Case(batch=1, capacity=131072, page=256, rotary=None),
    "batch_idx_gptj": Case(batch=5, batch_idx=True, rotary="gptj"),
    "leftpad": Case(leftpad=True),
    "leftpad_batch_idx_splits4": Case(leftpad=True, batch_idx=True, num_splits=4),
    "rotary_partial": Case(rotary_dim=32, page=16),
    # other dtypes and head dims, plain specs
    "fp16_mha_paged64": Case(dtype=F16, page=64, **MHA),
    "fp16_d128_gqa_leftpad": Case(dtype=F16, leftpad=True, rotary="gptj", num_splits=1),
    "fp16_d64": Case(dtype=F16, d=64, heads=16, heads_k=2, rotary="gptj"),
    "fp16_d64_paged16_splits4": Case(dtype=F16, d=64, heads=16, heads_k=16, page=16,
                                     num_splits=4),
    "bf16_d256": Case(d=256, heads=8, heads_k=2, capacity=2048),
    "bf16_d256_paged16_splits4": Case(d=256, heads=8, heads_k=8, page=16, num_splits=4),
    # variants (bf16 d 128)
    "spec4_causal_paged16_splits4": Case(page=16, num_splits=4, **SPEC),
    "spec4_causal_leftpad": Case(leftpad=True, **SPEC),
    "spec4_causal_no_append": Case(seqlen_q=4, seqlen_new=0, causal=True, rotary=None,
                                   capacity=64),  # some rows see no key
    "spec4_window_splits4": Case(window=(100, 0), num_splits=4, **SPEC),
    "spec4_window_paged64_gptj": Case(window=(30, 0), page=64, rotary="gptj", **SPEC),
    "softcap_alibi_batch": Case(softcap=5.0, alibi="batch"),
    "softcap_alibi_heads_paged16_splits4": Case(softcap=5.0, alibi="heads", page=16,
                                                num_splits=4),
    "spec4_sink": Case(sink=True, **SPEC),
    # more than 16 packed rows: the decode kernel's 64-row tiles (GQA 4: 192 rows per K/V head)
    "spec48_causal_paged64": Case(batch=2, seqlen_q=48, seqlen_new=48, causal=True, page=64,
                                  capacity=1024),
    "spec24_mha_splits4": Case(batch=2, seqlen_q=24, seqlen_new=24, causal=True, num_splits=4,
                               capacity=1024, **MHA),
    # chunked prefill: the decode op appends, the forward kernel attends (ops.PREFILL_MIN_QUERIES;
    # contiguous: spec fwd bf16 hd128 causal; paged: the fwd specs with _paged)
    "prefill128_causal": Case(batch=2, seqlen_q=128, seqlen_new=128, causal=True, capacity=2048),
    **PAGED_PREFILL,
    "spec4_sink_empty_splits4": Case(seqlen_q=4, seqlen_new=0, causal=True, sink=True,
                                     lengths="zero", rotary=None, num_splits=4),
}


@pytest.fixture(autouse=True)
def fresh_spec_cache(monkeypatch):
    """An empty ops._resolved per test, so that a test sees the specs its calls used."""
    monkeypatch.setattr(flashjit.ops, "_resolved", {})


def _served(kernel: str) -> set:
    """(flags..., paged) of the `kernel` specs this test's calls used (ops._resolved's keys:
    kernel, device, dtype, d, then these)."""
    return {key[4:] for key in flashjit.ops._resolved if key[0] == kernel}


def _assert_served(c: Case) -> None:
    assert _served("decode") == {c.flags() + (False,)}  # decoding, or only the append
    assert _served("fwd") == ({c.flags() + (c.page is not None,)} if c.prefill() else set())


def _build(c: Case, seed) -> tuple:
    """(q, k_cache, v_cache, keyword arguments for flashjit and kvcache_ref alike)."""
    torch.manual_seed(zlib.crc32(repr(seed).encode()))
    randn = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=c.dtype)  # noqa: E731
    q = randn(c.batch, c.seqlen_q, c.heads, c.d)
    kw = dict(causal=c.causal, window_size=c.window, softcap=c.softcap)
    if c.page:
        blocks = c.capacity // c.page
        num_blocks = c.batch * blocks + 5
        k_cache, v_cache = randn(num_blocks, c.page, c.heads_k, c.d), randn(
            num_blocks, c.page, c.heads_k, c.d)
        kw["block_table"] = torch.randperm(num_blocks, device=DEVICE)[:c.batch * blocks].view(
            c.batch, blocks).to(torch.int32)
    else:
        rows = c.batch + 3 if c.batch_idx else c.batch
        k_cache, v_cache = randn(rows, c.capacity, c.heads_k, c.d), randn(
            rows, c.capacity, c.heads_k, c.d)
        if c.batch_idx:
            kw["cache_batch_idx"] = torch.randperm(rows, device=DEVICE)[:c.batch].to(torch.int32)
    new = c.seqlen_new
    if new:
        kw["k"], kw["v"] = randn(c.batch, new, c.heads_k, c.d), randn(c.batch, new, c.heads_k, c.d)
    seqlens = {"random": lambda: torch.randint(0, c.capacity - new + 1, (c.batch,)),
               "zero": lambda: torch.zeros(c.batch, dtype=torch.int64),
               "full": lambda: torch.full((c.batch,), c.capacity - new),
               "none": lambda: None}[c.lengths]()
    if seqlens is not None:
        kw["cache_seqlens"] = (int(seqlens[0]) if c.int_lengths
                               else seqlens.to(DEVICE, torch.int32))
    if c.leftpad:
        kw["cache_leftpad"] = (torch.rand(c.batch) * (seqlens + 1)).long().clamp(
            max=seqlens).to(DEVICE, torch.int32)
    if c.rotary:
        half = (c.rotary_dim or c.d) // 2
        positions = torch.arange(c.capacity + c.seqlen_q, device=DEVICE, dtype=torch.float32)
        angles = positions[:, None] * 10000.0 ** (-torch.arange(half, device=DEVICE) / half)
        kw.update(rotary_cos=angles.cos().to(c.dtype), rotary_sin=angles.sin().to(c.dtype),
                  rotary_interleaved=c.rotary == "gptj")
    if c.alibi == "heads":  # the ALiBi paper's slopes
        kw["alibi_slopes"] = torch.tensor([2.0 ** (-8.0 * (i + 1) / c.heads)
                                           for i in range(c.heads)], device=DEVICE)
    elif c.alibi == "batch":
        kw["alibi_slopes"] = torch.rand(c.batch, c.heads, device=DEVICE) * 0.05 + 0.001
    if c.sink:
        kw["sink"] = torch.randn(c.heads, device=DEVICE) * 2 + 3
    return q, k_cache, v_cache, kw


def _compare(out, lse, ref, pt) -> None:
    err, err_pt = max_error(out, ref[0]), max_error(pt[0], ref[0])
    assert err <= 2 * err_pt + 1e-5, f"out: flashjit error {err:.3g} > 2 x PyTorch's {err_pt:.3g}"
    err, err_pt = max_error(lse, ref[1]), max_error(pt[1], ref[1])
    assert err <= 2 * err_pt + 1e-4, f"lse: flashjit error {err:.3g} > 2 x PyTorch's {err_pt:.3g}"


def check(c: Case, seed) -> None:
    q, k_cache, v_cache, kw = _build(c, seed)
    ref = kvcache_ref(q, k_cache, v_cache, **kw)  # before the call appends to the caches
    pt = kvcache_ref(q, k_cache, v_cache, upcast=False, **kw)
    out, lse = flashjit.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=c.num_splits,
                                                return_softmax_lse=True, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (c.batch, c.heads, c.seqlen_q) and lse.dtype == torch.float32
    assert torch.equal(k_cache, ref[2]), "k_cache after the append differs from the reference's"
    assert torch.equal(v_cache, ref[3]), "v_cache after the append differs from the reference's"
    _compare(out, lse, ref, pt)
    _assert_served(c)


@pytest.mark.parametrize("name", list(CASES))
def test_kvcache(name):
    check(CASES[name], name)


@pytest.mark.parametrize("name", ["prefill256_causal_paged16", "prefill288_window_paged48",
                                  "prefill96_window_paged48"])
def test_paged_prefill_mma_sync_family(name, monkeypatch):
    """The paged forward of the mma.sync family where the warp-specialised one serves by default
    (sm90a, d 128); elsewhere the same spec as test_kvcache's. With it the threshold is 256
    queries: at 96 the decode kernel's 64-row tiles on a paged cache (on sm90a the default
    paged forward serves there)."""
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", "sm80")
    check(replace(CASES[name], window=(-1, -1)), name)  # spec fwd bf16 hd128 causal paged


def test_rows_that_see_no_key_give_zero_and_minus_inf():
    """Empty caches (no append): out 0 and lse -inf, or the sink's logit with a sink; no NaN
    from the (NaN-poisoned) split scratch."""
    for c in (CASES["empty_no_append_splits4"], CASES["spec4_sink_empty_splits4"]):
        q, k_cache, v_cache, kw = _build(c, "empty")
        out, lse = flashjit.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=4,
                                                    return_softmax_lse=True, **kw)
        assert torch.all(out == 0)
        if c.sink:  # the sink's logit, through the kernels' log2 units and back (one rounding)
            expected = kw["sink"][None, :, None].expand(lse.shape)
            assert torch.allclose(lse, expected, rtol=1e-6, atol=0), (lse, expected)
        else:
            assert torch.equal(lse, torch.full_like(lse, float("-inf")))


def test_cuda_graph_decode_step_with_append_and_rotary():
    """One decode step (append one token with GPT-NeoX rotary, paged, split-KV chosen by the
    heuristic) captured in a CUDA graph, replayed three times with new q, k, v and lengths copied
    into its static tensors: every replay matches the reference from the caches as they were."""
    c = Case(batch=3, capacity=1024, page=64)
    q, k_cache, v_cache, kw = _build(c, "graph")
    seqlens = torch.tensor([5, 100, 1000], device=DEVICE, dtype=torch.int32)
    kw["cache_seqlens"] = seqlens.clone()  # static
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: loads the spec, checks the values (appends too)
        flashjit.flash_attn_with_kvcache(q, k_cache, v_cache, return_softmax_lse=True, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = flashjit.flash_attn_with_kvcache(q, k_cache, v_cache, return_softmax_lse=True,
                                                    **kw)
    for step in range(1, 4):
        q.copy_(torch.randn_like(q))
        kw["k"].copy_(torch.randn_like(kw["k"]))
        kw["v"].copy_(torch.randn_like(kw["v"]))
        kw["cache_seqlens"].copy_(seqlens + step)
        ref = kvcache_ref(q, k_cache, v_cache, **kw)
        pt = kvcache_ref(q, k_cache, v_cache, upcast=False, **kw)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k_cache, ref[2]) and torch.equal(v_cache, ref[3]), f"step {step}"
        _compare(out, lse, ref, pt)
    _assert_served(c)


def test_value_errors_before_any_launch(monkeypatch):
    """Values that would make the kernel read or write out of bounds raise (one host copy)."""
    def no_op(*args):
        raise AssertionError("the decode op was reached")

    monkeypatch.setattr(flashjit.ops, "call_decode", no_op)
    c = replace(CASES["paged16"], batch=2, capacity=256)
    q, k_cache, v_cache, kw = _build(c, "values")
    table = kw["block_table"]
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = 999 is not a page"):
        table[1, 0] = 999
        flashjit.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)
    table[1, 0] = 0
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 256 plus the 1 new keys"):
        flashjit.flash_attn_with_kvcache(q, k_cache, v_cache,
                                         **{**kw, "cache_seqlens": kw["cache_seqlens"] * 0 + 256})
    with pytest.raises(ValueError, match=r"rotary_cos/rotary_sin have 10 rows"):
        short = dict(rotary_cos=kw["rotary_cos"][:10], rotary_sin=kw["rotary_sin"][:10])
        flashjit.flash_attn_with_kvcache(q, k_cache, v_cache, **{**kw, **short,
                                         "cache_seqlens": kw["cache_seqlens"] * 0 + 200})
    misaligned = torch.empty(k_cache.numel() + 1, device=DEVICE, dtype=c.dtype)[1:].view(
        k_cache.shape)
    with pytest.raises(ValueError, match="k_cache's data pointer is not 16-byte aligned"):
        flashjit.flash_attn_with_kvcache(q, misaligned, v_cache, **kw)


def test_no_key_rows_with_a_minus_inf_sink():
    """A sink of -inf on rows that see no key: lse -inf and out 0, never NaN, with one split
    (the decode kernel's own epilogue) and with four (the combine kernel)."""
    for splits in (1, 4):
        c = Case(seqlen_q=4, seqlen_new=0, causal=True, sink=True, lengths="zero", rotary=None,
                 num_splits=splits)
        q, k_cache, v_cache, kw = _build(c, "minus_inf_sink")
        kw["sink"] = torch.full_like(kw["sink"], float("-inf"))
        out, lse = flashjit.flash_attn_with_kvcache(q, k_cache, v_cache, num_splits=splits,
                                                    return_softmax_lse=True, **kw)
        assert torch.all(out == 0), splits
        assert torch.equal(lse, torch.full_like(lse, float("-inf"))), splits


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_with_block_table(causal):
    """flash_attn_varlen_func(..., block_table=...): varlen queries (chunked prefill and
    speculative decoding of several sequences at once) against paged caches, through the decode
    kernel; per sequence against the float32 reference on its own pages, bottom-right."""
    from flashjit.testing import attention_reference

    torch.manual_seed(7)
    heads, heads_k, d, page = 32, 8, 128, 64
    lens_k = [300, 64, 1000, 17]  # queries: 5, 1, 130, 17
    table = torch.randperm(80, device=DEVICE)[:4 * 16].view(4, 16).int()
    k_pages, v_pages = (torch.randn(80, page, heads_k, d, device=DEVICE, dtype=BF16)
                        for _ in range(2))
    cu_q = torch.tensor([0, 5, 6, 136, 153], device=DEVICE, dtype=torch.int32)
    cu_k = torch.tensor([0, 300, 364, 1364, 1381], device=DEVICE, dtype=torch.int32)
    q = torch.randn(153, heads, d, device=DEVICE, dtype=BF16)
    with torch.no_grad():
        out, lse, _ = flashjit.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 130, 1000,
                                                      causal=causal, block_table=table,
                                                      return_attn_probs=True)
    for b in range(4):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        keys = torch.cat([k_pages[p] for p in table[b]])[:lens_k[b]][None]
        vals = torch.cat([v_pages[p] for p in table[b]])[:lens_k[b]][None]
        qb = q[rows][None]
        ref, ref_lse = attention_reference(qb.float(), keys.float(), vals.float(), causal=causal)
        pt, pt_lse = attention_reference(qb, keys, vals, causal=causal)  # PyTorch in bf16
        assert max_error(out[rows], ref[0]) <= 2 * max_error(pt[0], ref[0]) + 1e-3, b
        assert max_error(lse[:, rows], ref_lse[0]) <= 2 * max_error(pt_lse[0], ref_lse[0]) + 1e-3
