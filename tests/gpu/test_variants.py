"""Attention variants on the GPU: sliding window, softcap, ALiBi, attention sinks, alone and in the
combinations models use (Gemma 2: window + softcap + GQA; gpt-oss: window + sink + GQA), against
flashjit.testing.attention_reference.

Criterion (as tests/gpu/test_fwd.py and test_bwd.py): for out, lse, dq, dk, dv and the sink's
gradient, flashjit's max error against the reference on float32 copies is at most twice
PyTorch's own error (the same reference on the fp16/bf16 inputs themselves) plus a small
absolute slack. Outputs start as NaN (conftest.py), so an element a kernel never writes fails.
Every check also asserts which specs served the call (the spec name lists the variant flags and
the kernel family), so a variant served by the wrong kernel fails even where the numbers agree.

Shapes: batch 2, seqlen_q != seqlen_k both ways (173 x 521 and 521 x 173: several key blocks, so
windows skip whole blocks), GQA in the model combinations. On sm90a the forward runs the
warp-specialised family at every head dim but 32 (96, 160, 224: tiles padded to whole 64-column
panels), the backward the wgmma family at 64, 96 (its 128-column kernels) and 128; everything
else, and every kernel on other GPUs, is mma.sync.
test_mma_sync_family_at_wgmma_head_dims forces mma.sync at 64/128 (FLASHJIT_KERNEL_FAMILY=sm80).

The specs used here are prebuilt by benchmarks/device_run.sh's build step (variant_specs_a/b);
a spec missing from the cache compiles on first use (5-10 s each).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

import flashjit
import flashjit.ops
from flashjit import testing
from tests.reference import cu_seqlens as _cu, leaf as _leaf, max_error

DEVICE = "cuda"
F16, BF16 = torch.float16, torch.bfloat16
_DTYPE_NAMES = {F16: "fp16", BF16: "bf16"}
SHAPES = [(173, 521), (521, 173)]  # (seqlen_q, seqlen_k)
BATCH = 2


@dataclass(frozen=True)
class Variant:
    """The variant arguments of one flash_attn_* call, and the inputs they need.

    alibi: None, "heads" (slopes (heads,), the standard geometric ones) or "batch" (random slopes
    (batch, heads)). sink: a float32 (heads,) sink that requires grad. q_scale: q is randn x
    q_scale, so that softcap sees logits beyond the cap. heads: (query heads, key/value heads)."""

    causal: bool = False
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None
    sink: bool = False
    softmax_scale: Optional[float] = None
    q_scale: float = 1.0
    heads: tuple = (4, 4)

    def flags(self) -> dict:
        """The variant flags of the spec that must serve it (contract: with causal, only a left
        bound makes a window; windows here exclude keys, so none is normalised away)."""
        window = self.window[0] != -1 if self.causal else self.window != (-1, -1)
        return dict(causal=self.causal, window=window, softcap=self.softcap > 0,
                    alibi=self.alibi is not None, sink=self.sink)


VARIANTS = {
    "window": Variant(window=(37, 11)),
    "causal_window": Variant(causal=True, window=(160, 0)),  # wider than one key block
    "softcap": Variant(softcap=3.0, q_scale=2.0),
    "causal_softcap": Variant(causal=True, softcap=3.0, q_scale=2.0),  # Gemma 2's global layers
    "alibi": Variant(alibi="heads"),
    "alibi_batch": Variant(alibi="batch"),
    "causal_alibi": Variant(causal=True, alibi="heads"),
    "sink": Variant(sink=True),
    "causal_sink": Variant(causal=True, sink=True),  # gpt-oss's full layers
    # Gemma 2's local layers: causal sliding window, logit softcap, GQA, a non-default scale
    "gemma2": Variant(causal=True, window=(100, 0), softcap=4.0, softmax_scale=0.3,
                      heads=(8, 2)),
    # gpt-oss's local layers: causal sliding window, a sink per head, GQA 8:1
    "gpt_oss": Variant(causal=True, window=(64, 0), sink=True, heads=(8, 1)),
    # softcaps in use (Gemma 2: 50) with logits up to and past the cap; with a sink, whose
    # gradient sums over every row, so that a bias in the softcapped logits would show there
    "softcap_50_sink": Variant(causal=True, softcap=50.0, q_scale=40.0, sink=True),
    "softcap_60": Variant(softcap=60.0, q_scale=40.0),
    # everything at once (softcap before ALiBi, the sink in every row's denominator)
    "all": Variant(causal=True, window=(90, 0), softcap=3.0, q_scale=2.0, alibi="batch",
                   sink=True, heads=(6, 2)),
}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def fresh_spec_cache(monkeypatch):
    """An empty flashjit.ops._resolved for each test (the original returns afterwards), so that
    _served_by sees only this test's specs and FLASHJIT_KERNEL_FAMILY set here takes effect."""
    monkeypatch.setattr(flashjit.ops, "_resolved", {})


def _seed(*parts) -> None:
    torch.manual_seed(zlib.crc32(repr(parts).encode()))


def _alibi(kind: Optional[str], batch: int, heads: int) -> Optional[torch.Tensor]:
    if kind is None:
        return None
    if kind == "heads":  # the ALiBi paper's slopes: 2^(-8 i / heads), i = 1 .. heads
        return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)],
                            device=DEVICE)
    return torch.rand(batch, heads, device=DEVICE) * 0.5 + 0.01


def _sink(heads: int) -> torch.Tensor:
    # around the rows' lse (log of a few hundred keys): from negligible to dominant
    return (torch.randn(heads, device=DEVICE) * 2 + 3).requires_grad_()


def _kwargs(variant: Variant, alibi, sink) -> dict:
    """The variant keyword arguments, the same for flashjit and attention_reference."""
    return dict(causal=variant.causal, window_size=variant.window, softcap=variant.softcap,
                alibi_slopes=alibi, sink=sink, softmax_scale=variant.softmax_scale)


def _served_by(q: torch.Tensor, flags: dict, dropout: bool, kernels=("fwd", "bwd"),
               family: Optional[str] = None) -> None:
    """Asserts that exactly the specs of `kernels` with these variant flags served the calls
    since flashjit.ops._resolved was last emptied (their family: the default, or
    FLASHJIT_KERNEL_FAMILY's; with `family`, it must be that one)."""
    from flashjit.jit import JitSpec, current_arch

    arch = current_arch(q.device)
    specs = [JitSpec(kernel=kernel, arch=arch, dtype=_DTYPE_NAMES[q.dtype], head_dim=q.shape[-1],
                     dropout=dropout, **flags) for kernel in kernels]
    if family is not None:
        assert all(spec.family == family for spec in specs), [spec.name for spec in specs]
    expected = {spec.op_namespace for spec in specs}
    used = {name for _, op in flashjit.ops._resolved.values()
            for name in re.findall(r"flashjit_\w+", str(op))}
    assert used == expected, f"served by {sorted(used)}, expected {sorted(expected)}"


def _compare(name: str, x, ref, pt, slack: float = 1e-4) -> None:
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    err, err_pt = max_error(x, ref), max_error(pt, ref)
    assert err <= 2 * err_pt + slack, \
        f"{name}: flashjit error {err:.3g} > 2 x PyTorch's {err_pt:.3g} + {slack:.2g}"


def _check_against_reference(reference, leaves, results, dout) -> None:
    """reference(*leaves) -> (out, lse) in the leaves' dtypes; leaves: q, k, v (+ sink), the
    inputs of flashjit's call; results: flashjit's (out, lse, dq, dk, dv (, dsink)). Runs the
    reference on float32 copies and on the inputs' own dtype, with gradients, and compares."""
    ref_leaves = [t.detach().float().clone().requires_grad_() for t in leaves]
    out_ref, lse_ref = reference(*ref_leaves)
    grads_ref = torch.autograd.grad(out_ref, ref_leaves, dout.float())
    pt_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out_pt, lse_pt = reference(*pt_leaves)
    grads_pt = torch.autograd.grad(out_pt, pt_leaves, dout)
    names = ("out", "lse", "dq", "dk", "dv", "dsink")
    for name, x, ref, pt in zip(names, results, (out_ref, lse_ref) + grads_ref,
                                (out_pt, lse_pt) + grads_pt):
        # dsink sums over every (batch, row): fp32 summation order alone differs by ~1e-7 of it
        slack = 1e-4 + (1e-5 * float(ref.abs().max()) if name == "dsink" else 0.0)
        _compare(name, x, ref, pt, slack)


def check(variant: Variant, dtype, d: int, sq: int, sk: int, dropout_p: float = 0.0,
          deterministic: bool = False, repeats: int = 1, family: Optional[str] = None):
    """One fixed-length flash_attn_func call (forward with lse, backward incl. the sink's
    gradient) against the reference, and the specs that served it (of `family` when given).
    With repeats > 1 (use with deterministic) the call runs that often and every result must be
    bitwise the same. Returns (out, lse, grads, sink) of the last run."""
    _seed(variant, dtype, d, sq, sk, dropout_p)
    h, hk = variant.heads
    q = _leaf(BATCH, sq, h, d, dtype=dtype, scale=variant.q_scale)
    k, v = _leaf(BATCH, sk, hk, d, dtype=dtype), _leaf(BATCH, sk, hk, d, dtype=dtype)
    alibi = _alibi(variant.alibi, BATCH, h)
    sink = _sink(h) if variant.sink else None
    leaves = (q, k, v) + ((sink,) if sink is not None else ())
    kwargs = _kwargs(variant, alibi, sink)
    dout = torch.randn(BATCH, sq, h, d, device=DEVICE, dtype=dtype)
    flashjit.ops._resolved.clear()
    runs = []
    for _ in range(repeats):
        mask = None
        if dropout_p > 0:  # the mask the next call draws
            mask = testing.next_dropout_mask(BATCH, h, sq, sk, dropout_p, q.device)
        out, lse, _ = flashjit.flash_attn_func(q, k, v, dropout_p=dropout_p,
                                               deterministic=deterministic,
                                               return_attn_probs=True, **kwargs)
        assert out.shape == q.shape and out.dtype == dtype
        assert lse.shape == (BATCH, h, sq) and lse.dtype == torch.float32
        grads = torch.autograd.grad(out, leaves, dout)
        runs.append((out, lse) + grads)
    _served_by(q, variant.flags(), dropout_p > 0, family=family)
    for other in runs[1:]:
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dsink"), runs[0], other):
            assert torch.equal(a, b), f"{name} differs between identical deterministic calls"

    def reference(q, k, v, sink=None):
        return testing.attention_reference(q, k, v, dropout_mask=mask, dropout_p=dropout_p,
                                           **_kwargs(variant, alibi, sink))

    _check_against_reference(reference, leaves, runs[-1], dout)
    return runs[-1][0], runs[-1][1], runs[-1][2:], sink


# ------------------------------------------------------------------------------------------------
# Each variant alone, the model combinations, every head-dim family
# ------------------------------------------------------------------------------------------------
CASES = [
    # each variant alone at the wgmma family's head dims (sm90a); the window in both dtypes
    *[(n, dt, d) for n in ("window", "causal_window") for dt in (F16, BF16) for d in (64, 128)],
    *[(n, BF16, d) for n in ("softcap", "causal_softcap", "alibi", "alibi_batch", "causal_alibi",
                             "sink", "causal_sink") for d in (64, 128)],
    # d 32 (mma.sync), d 96 (padded panels in both directions), d 160-256 (the forward's 112- and
    # 80-key blocks, the mma.sync backward)
    ("window", BF16, 32), ("window", BF16, 96), ("all", F16, 32), ("all", F16, 96),
    ("all", BF16, 160), ("all", F16, 224), ("all", BF16, 256), ("gemma2", BF16, 256),
    # model combinations and everything at once (fp16 here: the alone cases above are bf16)
    ("gemma2", BF16, 128), ("gpt_oss", F16, 64), ("gpt_oss", BF16, 64), ("all", F16, 64),
    ("all", F16, 128),
    # large softcaps (bf16), and softcap in fp16
    ("softcap_50_sink", BF16, 128), ("softcap_60", BF16, 64), ("softcap", F16, 64),
]


def _case_id(case) -> str:
    name, dtype, d = case[:3]
    return f"{name}-{_DTYPE_NAMES[dtype]}-d{d}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_variant(case):
    name, dtype, d = case
    for sq, sk in SHAPES:
        check(VARIANTS[name], dtype, d, sq, sk)


@pytest.mark.parametrize("case", [("all", dt, d) for dt in (F16, BF16) for d in (64, 128)],
                         ids=_case_id)
def test_mma_sync_family_at_wgmma_head_dims(case, monkeypatch):
    """The mma.sync kernels at d 64/128, where the wgmma ones serve by default on sm90a (on
    other GPUs these are the default kernels): _served_by checks the family too."""
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", "sm80")
    name, dtype, d = case
    for sq, sk in SHAPES:
        check(VARIANTS[name], dtype, d, sq, sk, family="sm80")


@pytest.mark.parametrize("d,family", [(64, None), (128, None), (64, "sm80")])
def test_dropout_with_every_variant(d, family, monkeypatch):
    """Dropout beside window, softcap, ALiBi and sink, with the keep mask the call draws
    (testing.next_dropout_mask) applied by the reference; the sink's gradient includes it.
    family sm80: the mma.sync kernels (FLASHJIT_KERNEL_FAMILY), else the default."""
    if family is not None:
        monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", family)
    for sq, sk in SHAPES:
        check(VARIANTS["all"], BF16, d, sq, sk, dropout_p=0.17, family=family)


@pytest.mark.parametrize("case", [("all", F16, 128), ("gpt_oss", BF16, 64)], ids=_case_id)
def test_deterministic_backward_with_variants(case):
    """deterministic=True: three identical calls give bitwise identical out, lse and gradients
    (the sink's included), and they pass the reference check."""
    name, dtype, d = case
    check(VARIANTS[name], dtype, d, 521, 173, deterministic=True, repeats=3)


@pytest.mark.parametrize("variant,dropout_p", [
    (Variant(window=(32, 0), sink=True, heads=(16, 4)), 0.0),
    (Variant(softcap=20.0, alibi="heads", heads=(16, 4), q_scale=4.0), 0.0),
    (Variant(heads=(16, 4)), 0.13),
], ids=["window_sink", "softcap_alibi", "dropout"])
def test_variants_through_the_persistent_grid(variant, dropout_p):
    """Non-causal fixed-length calls run the sm90ws forward's persistent grid on sm90a (a CTA
    takes every gridDim.x-th tile): 2 x 16 heads x 8 query blocks of 128 rows = 256 tiles, more
    than the H100/H200's 132 SMs, so most CTAs run two. With the window (32, 0) and 1000 queries
    against 300 keys (bottom-right) the first 700 rows see no key, so a CTA's tiles without a key
    block (no loads, the sink's lse) come before, after or instead of tiles with some; the other
    cases carry softcap + ALiBi and dropout across the tiles of a CTA."""
    out, lse, _, sink = check(variant, BF16, 128, 1000, 300, dropout_p=dropout_p)
    if variant.sink:
        assert torch.all(out[:, :700] == 0)
        expected = sink.detach()[None, :, None].expand(BATCH, -1, 700)
        torch.testing.assert_close(lse[:, :, :700], expected, rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Edges: rows that see no key, windows wider than the sequences, argument forms
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [("window", F16, 64), ("causal_sink", BF16, 64),
                                  ("all", F16, 64)], ids=_case_id)
def test_rows_that_see_no_key(case):
    """seqlen_q 150 > seqlen_k 60, bottom-right: with a (0, 0) band (each row sees only key
    i - 90) or causal, rows 0..89 see no key: out 0, lse -inf, or the sink's logit with a sink;
    no NaN anywhere, no gradient into those rows. The other rows see one key ((0, 0)) or more."""
    name, dtype, d = case
    variant = VARIANTS[name]
    if variant.window != (-1, -1):
        variant = replace(variant, window=(0, 0))
    sq, sk, empty = 150, 60, 90
    out, lse, grads, sink = check(variant, dtype, d, sq, sk)
    assert torch.all(out[:, :empty] == 0) and torch.isfinite(out).all()
    if sink is None:
        assert torch.all(lse[:, :, :empty] == float("-inf"))
    else:
        expected = sink.detach()[None, :, None].expand(BATCH, -1, empty)
        torch.testing.assert_close(lse[:, :, :empty], expected, rtol=1e-6, atol=1e-5)
    assert torch.isfinite(lse[:, :, empty:]).all()
    assert torch.all(grads[0][:, :empty] == 0), "dq of rows that see no key"
    assert all(torch.isfinite(g).all() for g in grads)


def test_windows_wider_than_the_sequences():
    """A bound at least as wide as the sequences excludes no key and is dropped; the other one
    stays (the window spec). (10**4, 3) at 521 x 173 leaves rows 0..344 without keys."""
    for window in [(10**4, 3), (2, 10**4)]:
        for sq, sk in SHAPES:
            check(Variant(window=window), F16, 64, sq, sk)
    # both bounds wider: plain attention, and causal with a wider window: causal, bitwise
    q, k, v = (_leaf(BATCH, n, 4, 64, dtype=F16) for n in (173, 521, 521))
    assert torch.equal(flashjit.flash_attn_func(q, k, v, window_size=(600, 200)),
                       flashjit.flash_attn_func(q, k, v))
    assert torch.equal(flashjit.flash_attn_func(q, k, v, causal=True, window_size=(10**5, 0)),
                       flashjit.flash_attn_func(q, k, v, causal=True))


def test_causal_window_right_bound_is_the_diagonal():
    """flash-attn 2.x: with causal=True the window's right bound is 0 whatever is passed."""
    q, k, v = (_leaf(BATCH, n, 4, 64, dtype=BF16) for n in (173, 521, 521))
    a = flashjit.flash_attn_func(q, k, v, causal=True, window_size=(45, 0))
    _served_by(q, dict(causal=True, window=True, softcap=False, alibi=False, sink=False),
               dropout=False, kernels=("fwd",))
    for right in (7, -1):
        assert torch.equal(flashjit.flash_attn_func(q, k, v, causal=True,
                                                    window_size=(45, right)), a)


def test_alibi_slopes_per_head_and_per_sequence_agree():
    """(heads,) slopes and the same slopes repeated per sequence (batch, heads) give bitwise
    the same output and gradients (deterministic: the default dQ sums with fp32 atomics, whose
    order varies run to run)."""
    q, k, v = (_leaf(BATCH, n, 4, 64, dtype=BF16) for n in (173, 521, 521))
    slopes = _alibi("heads", BATCH, 4)
    dout = torch.randn_like(q)
    results = []
    for s in (slopes, slopes.expand(BATCH, 4).contiguous()):
        out = flashjit.flash_attn_func(q, k, v, alibi_slopes=s, deterministic=True)
        results.append((out,) + torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Varlen: per-sequence fixed-length references, put together
# ------------------------------------------------------------------------------------------------
LENS_Q = [5, 0, 130, 64, 1, 300, 17]
LENS_K = [7, 3, 130, 0, 200, 40, 17]  # no queries; no keys (rows: 0, lse -inf or sink); q > k


@pytest.mark.parametrize("case", [("all", F16, 128), ("window", BF16, 64), ("sink", BF16, 64)],
                         ids=_case_id)
def test_varlen_variants(case):
    """flash_attn_varlen_func with the variants: sequences narrower than the window, empty
    ones, ALiBi slopes per sequence ((sequences, heads)); against the fixed-length reference of
    each sequence, concatenated (the sink's gradient sums over all of them)."""
    name, dtype, d = case
    variant = VARIANTS[name]
    _seed("varlen", name, dtype, d)
    h, hk = variant.heads
    n = len(LENS_Q)
    q = _leaf(sum(LENS_Q), h, d, dtype=dtype, scale=variant.q_scale)
    k, v = _leaf(sum(LENS_K), hk, d, dtype=dtype), _leaf(sum(LENS_K), hk, d, dtype=dtype)
    alibi = _alibi(variant.alibi, n, h)
    sink = _sink(h) if variant.sink else None
    leaves = (q, k, v) + ((sink,) if sink is not None else ())
    cu_q, cu_k = _cu(LENS_Q), _cu(LENS_K)
    flashjit.ops._resolved.clear()
    out, lse, _ = flashjit.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K),
                                                  return_attn_probs=True,
                                                  **_kwargs(variant, alibi, sink))
    assert lse.shape == (h, sum(LENS_Q))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    _served_by(q, variant.flags(), dropout=False)

    def reference(q, k, v, sink=None):
        outs, lses = [], []
        oq = ok = 0
        for i, (lq, lk) in enumerate(zip(LENS_Q, LENS_K)):
            if lq and lk:
                a = alibi[i] if alibi is not None and alibi.dim() == 2 else alibi
                o, l = testing.attention_reference(  # noqa: E741
                    q[None, oq:oq + lq], k[None, ok:ok + lk], v[None, ok:ok + lk],
                    **_kwargs(variant, a, sink))
                outs.append(o[0])
                lses.append(l[0])
            elif lq:  # no keys: out 0, lse the sink's logit or -inf
                outs.append(q.new_zeros(lq, h, d))
                lses.append(sink.detach()[:, None].expand(h, lq) if sink is not None
                            else torch.full((h, lq), float("-inf"), device=q.device))
            oq, ok = oq + lq, ok + lk
        return torch.cat(outs), torch.cat(lses, dim=1)

    _check_against_reference(reference, leaves, (out, lse) + grads, dout)
    rows_without_keys = slice(sum(LENS_Q[:3]), sum(LENS_Q[:4]))
    assert torch.all(out[rows_without_keys] == 0)
    keys_without_queries = slice(LENS_K[0], LENS_K[0] + LENS_K[1])
    assert torch.all(grads[1][keys_without_queries] == 0)
    assert torch.all(grads[2][keys_without_queries] == 0)
