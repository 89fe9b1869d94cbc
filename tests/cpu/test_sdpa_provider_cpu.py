"""flashjit as torch's SDPA flash provider (flashjit/integrations/sdpa.py), on the CPU.

The overrides are for the CUDA dispatch key, so a CPU build of torch never runs them through the
dispatcher; these tests check the rest: registration with torch's registry (present or absent),
the activate/restore round trip of the library registration, the mapping of every aten
argument onto flashjit's ops (stubbed: they record their arguments and return fake outputs),
that the outputs agree with torch's own meta registrations in shape, dtype and strides (what
torch.compile relies on), the lse unit conversion, the rng state round trip, and the decisions to
serve, hand to torch's kernel, or refuse.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flashjit
from flashjit import integrations, interface, ops
from flashjit.integrations import sdpa

attention = torch.nn.attention
HAS_REGISTRY = all(hasattr(attention, n) for n in integrations._REGISTRY_API)
needs_registry = pytest.mark.skipif(not HAS_REGISTRY,
                                    reason=f"torch {torch.__version__} has no flash registry")
LN2 = math.log(2.0)
KEYSET = object()  # what the dispatcher would pass first; the fallback must forward it as is


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def test_registry_presence_matches_torch():
    assert integrations.sdpa_registry_available() == HAS_REGISTRY
    if HAS_REGISTRY:
        assert "flashjit" in attention.list_flash_attention_impls()


def test_torch_2_11_and_later_have_the_registry():
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) >= (2, 11):
        assert HAS_REGISTRY


def test_overrides_are_the_ops_this_torch_defines(monkeypatch):
    # torch 2.13/2.14 define all five; torch 2.11 has no _flash_attention_forward_no_dropout_inplace
    assert set(sdpa.available_overrides()) == {n for n in sdpa.OVERRIDES if hasattr(torch.ops.aten, n)}
    assert "_flash_attention_forward" in sdpa.available_overrides()
    assert not sdpa._op_exists("_flash_attention_forward_not_an_op")
    missing = "_flash_attention_forward_no_dropout_inplace"
    real = sdpa._op_exists
    monkeypatch.setattr(sdpa, "_op_exists", lambda name: name != missing and real(name))
    assert missing not in sdpa.available_overrides() and len(sdpa.available_overrides()) == 4


@needs_registry
def test_register_skips_ops_this_torch_lacks(monkeypatch):
    # as on torch 2.11: the registration covers the ops that exist, and restores cleanly
    missing = "_flash_attention_forward_no_dropout_inplace"
    real = sdpa._op_exists
    monkeypatch.setattr(sdpa, "_op_exists", lambda name: name != missing and real(name))
    before = _python_impls()
    handle = sdpa.register()
    try:
        impls = _python_impls() - before
        assert f"aten/{missing}/CUDA" not in impls
        assert {f"aten/{n}/CUDA" for n in sdpa.available_overrides()} <= impls
        assert missing not in sdpa._original
    finally:
        handle.remove()
    assert _python_impls() == before


def test_absent_registry_registers_nothing(monkeypatch):
    monkeypatch.delattr(attention, "register_flash_attention_impl", raising=False)
    assert not integrations.sdpa_registry_available()
    assert integrations.register_sdpa_provider() is False


def test_import_survives_a_failing_registration(monkeypatch):
    def broken():
        raise RuntimeError("registry exploded")

    monkeypatch.setattr(integrations, "register_sdpa_provider", broken)
    flashjit._register_sdpa_provider()  # must not raise


def test_import_flashjit_imports_no_override_module():
    import subprocess
    import sys

    code = ("import sys, torch, flashjit; "
            "print('flashjit.integrations.sdpa' in sys.modules)")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "False"


OPS = list(sdpa.available_overrides())


def _has_cuda_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "CUDA")


def _python_impls() -> set:
    return {key for key in torch.library._impls if key.startswith("aten/")}


@needs_registry
def test_activate_restore_round_trip():
    cpu_build = torch.version.cuda is None
    if cpu_build:
        assert not any(_has_cuda_kernel(n) for n in OPS)
    before = _python_impls()
    attention.activate_flash_attention_impl("flashjit")
    try:
        assert attention.current_flash_attention_impl() == "flashjit"
        assert sdpa._active is not None and sdpa._active.active
        assert {f"aten/{n}/CUDA" for n in OPS} <= _python_impls()
        if cpu_build:
            assert all(_has_cuda_kernel(n) for n in OPS)
            assert all(sdpa._original[n] is None for n in OPS)  # nothing to fall back to here
        # activating again replaces the registration (torch restores first)
        first = sdpa._active
        attention.activate_flash_attention_impl("flashjit")
        assert not first.active and sdpa._active is not first
    finally:
        attention.restore_flash_attention_impl()
    assert attention.current_flash_attention_impl() is None
    assert sdpa._active is None
    assert _python_impls() == before
    if cpu_build:
        assert not any(_has_cuda_kernel(n) for n in OPS)


def test_register_twice_directly_and_remove_is_idempotent():
    first = sdpa.register()
    second = sdpa.register()  # while active: the same registration and handle
    try:
        assert second is first and first.active
        assert f"aten/{OPS[0]}/CUDA" in _python_impls()
    finally:
        library = first._library  # a reference kept elsewhere must not keep the override alive
        first.remove()
        first.remove()
    assert f"aten/{OPS[0]}/CUDA" not in _python_impls()
    assert library.m is None  # destroyed now, not when the garbage collector gets to it
    third = sdpa.register()  # after removal: a new registration
    assert third is not first and third.active
    third.remove()


@needs_registry
def test_direct_register_while_active_is_undone_by_restore():
    # review finding: activate, then register() directly, then restore left the override in place
    before = _python_impls()
    attention.activate_flash_attention_impl("flashjit")
    try:
        sdpa.register()
    finally:
        attention.restore_flash_attention_impl()
    assert _python_impls() == before and sdpa._active is None


# ------------------------------------------------------------------------------------------------
# Argument mapping with flashjit's ops stubbed
# ------------------------------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.fwd, self.bwd, self.copies = [], [], []


@pytest.fixture
def stubbed(monkeypatch):
    """Fake CUDA tensors (FakeTensorMode), an sm90 GPU, and flashjit's ops replaced by recorders
    returning the shapes of the ops' own fake implementations. Tensor.copy_ only records its
    destination: a CPU build cannot run even a fake copy between CUDA tensors."""
    rec = Recorder()

    def copy_(self, src, non_blocking=False):
        assert self.shape == src.shape
        rec.copies.append(self)
        return self

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)

    def call_fwd(*args):
        rec.fwd.append(args)
        return ops._fwd_fake(*args)

    def call_bwd(*args):
        rec.bwd.append(args)
        return ops._bwd_fake(*args)

    monkeypatch.setattr(ops, "call_fwd", call_fwd)
    monkeypatch.setattr(ops, "call_bwd", call_bwd)
    monkeypatch.setattr(sdpa, "_capability", lambda index: (9, 0))
    with FakeTensorMode():
        yield rec


FWD_NAMES = ("q", "k", "v", "cu_q", "cu_k", "seqused_k", "block_table", "max_q", "max_k",
             "scale", "causal", "bottom_right", "left", "right", "softcap", "alibi", "sink",
             "dropout_p", "rng", "with_residual")
BWD_NAMES = ("dout", "q", "k", "v", "out", "out_residual", "lse", "cu_q", "cu_k", "seqused_k",
             "max_q", "max_k", "scale", "causal", "bottom_right", "left", "right", "softcap",
             "alibi", "sink", "dropout_p", "rng", "deterministic")


def _named(names, args):
    assert len(args) == len(names)
    return dict(zip(names, args))


def _cuda(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="cuda")


def _bhsd(b, h, s, d, dtype=torch.float16, bshd_memory=False):
    """(b, h, s, d); bshd_memory: a transposed view of (b, s, h, d) memory (SDPA's usual input)."""
    if bshd_memory:
        return _cuda(b, s, h, d, dtype=dtype).transpose(1, 2)
    return _cuda(b, h, s, d, dtype=dtype)


def _same_layout(ours, theirs, name):
    assert ours.shape == theirs.shape, name
    assert ours.dtype == theirs.dtype, name
    assert ours.stride() == theirs.stride(), name


@pytest.mark.parametrize("bshd_memory", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_sdpa_forward_mapping_and_meta_agreement(stubbed, bshd_memory, dropout_p):
    query = _bhsd(2, 4, 16, 64, bshd_memory=bshd_memory)
    key, value = _bhsd(2, 2, 24, 64, bshd_memory=bshd_memory), _bhsd(2, 2, 24, 64)
    result = sdpa.sdpa_flash_forward(KEYSET, query, key, value, dropout_p, True, False,
                                     scale=0.3)
    (args,) = stubbed.fwd
    a = _named(FWD_NAMES, args)
    assert a["q"].shape == (2, 16, 4, 64) and a["k"].shape == (2, 24, 2, 64)
    assert a["v"].shape == (2, 24, 2, 64)
    assert a["cu_q"] is None and a["cu_k"] is None and a["seqused_k"] is None
    assert a["block_table"] is None
    assert (a["max_q"], a["max_k"]) == (16, 24)
    assert a["scale"] == 0.3
    # the aten op's is_causal is bottom-right (torch's flash kernels; see the module docstring)
    assert a["causal"] is True and a["bottom_right"] is True
    assert (a["left"], a["right"]) == (-1, 0)
    assert a["softcap"] == 0.0 and a["alibi"] is None and a["sink"] is None
    assert a["dropout_p"] == dropout_p and a["with_residual"] is False
    if dropout_p:
        assert a["rng"].shape == (2,) and a["rng"].dtype == torch.int64
    else:
        assert a["rng"] is None

    # flashjit's out is (b, s, h, d) memory: a copy to query's layout only where that differs
    assert len(stubbed.copies) == (0 if bshd_memory else 1)
    expected = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p,
                                                                  True, False, scale=0.3)
    assert len(result) == len(expected) == 9
    _same_layout(result[0], expected[0], "output")
    _same_layout(result[1], expected[1], "logsumexp")
    assert result[2] is None and result[3] is None
    assert (result[4], result[5]) == (16, 24) == (expected[4], expected[5])
    for i, name in ((6, "rng_state"), (7, "unused")):
        assert result[i].shape == expected[i].shape and result[i].dtype == expected[i].dtype, name
        assert result[i].device == query.device, name
    _same_layout(result[8], expected[8], "debug_attn_mask")


def test_sdpa_default_scale_and_no_causal(stubbed):
    q = _bhsd(1, 2, 8, 128)
    sdpa.sdpa_flash_forward(KEYSET, q, q, q)
    a = _named(FWD_NAMES, stubbed.fwd[0])
    assert a["scale"] == pytest.approx(1 / math.sqrt(128))
    assert a["causal"] is False and (a["left"], a["right"]) == (-1, -1)
    assert a["dropout_p"] == 0.0 and a["rng"] is None


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_sdpa_backward_mapping_and_meta_agreement(stubbed, monkeypatch, deterministic,
                                                  dropout_p):
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    query, key, value = _bhsd(2, 4, 16, 64, bshd_memory=True), _bhsd(2, 2, 24, 64), \
        _bhsd(2, 2, 24, 64, bshd_memory=True)
    out = sdpa.sdpa_flash_forward(KEYSET, query, key, value, dropout_p, False, False)
    o, lse, _, _, max_q, max_k, rng, unused, _ = out
    dout = torch.empty_like(o)
    grads = sdpa.sdpa_flash_backward(KEYSET, dout, query, key, value, o, lse, None, None, max_q,
                                     max_k, dropout_p, False, rng, unused, scale=None)
    (args,) = stubbed.bwd
    b = _named(BWD_NAMES, args)
    assert b["dout"].shape == b["q"].shape == b["out"].shape == (2, 16, 4, 64)
    assert b["k"].shape == b["v"].shape == (2, 24, 2, 64)
    assert b["out_residual"] is None  # D from the output the op receives
    assert b["lse"].shape == (2, 4, 16) and b["lse"].dtype == torch.float32
    assert b["cu_q"] is None and b["cu_k"] is None and b["seqused_k"] is None
    assert (b["max_q"], b["max_k"]) == (16, 24)
    assert b["scale"] == pytest.approx(1 / 8)
    assert b["causal"] is False and b["bottom_right"] is True
    assert b["dropout_p"] == dropout_p and b["deterministic"] is deterministic
    if dropout_p:
        assert b["rng"].dtype == torch.int64 and b["rng"].shape == (2,)
    else:
        assert b["rng"] is None
    expected = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, query, key, value, o, lse, None, None, max_q, max_k, dropout_p, False, rng, unused)
    for ours, theirs, name in zip(grads, expected, ("dq", "dk", "dv")):
        _same_layout(ours, theirs, name)


def test_flash_forward_dense_mapping_and_meta_agreement(stubbed):
    q, k = _cuda(2, 16, 4, 64, dtype=torch.bfloat16), _cuda(2, 24, 1, 64, dtype=torch.bfloat16)
    v = _cuda(2, 24, 1, 64, dtype=torch.bfloat16)
    result = sdpa.flash_attention_forward(KEYSET, q, k, v, None, None, 16, 24, 0.0, False, False,
                                          scale=0.5, window_size_left=5, window_size_right=3)
    a = _named(FWD_NAMES, stubbed.fwd[0])
    assert a["q"].shape == (2, 16, 4, 64) and a["cu_q"] is None
    assert (a["max_q"], a["max_k"]) == (16, 24)
    assert a["causal"] is False and (a["left"], a["right"]) == (5, 3)
    assert a["bottom_right"] is True and a["scale"] == 0.5
    expected = torch.ops.aten._flash_attention_forward(
        q, k, v, None, None, 16, 24, 0.0, False, False, scale=0.5, window_size_left=5,
        window_size_right=3)
    assert len(result) == len(expected) == 5
    for i, name in ((0, "output"), (1, "lse"), (4, "debug_attn_mask")):
        _same_layout(result[i], expected[i], name)
    for i in (2, 3):
        assert result[i].shape == expected[i].shape and result[i].dtype == expected[i].dtype


@pytest.mark.parametrize("window,causal,mapped", [
    ((None, None), False, (False, -1, -1)),
    ((-1, -1), True, (True, -1, 0)),
    ((-7, -3), False, (False, -1, -1)),     # any negative bound: none (flash-attn 2.x)
    ((8, 4), False, (False, 8, 4)),
    ((8, 4), True, (True, 8, 0)),           # causal: the band ends at the diagonal
    ((-1, 0), False, (True, -1, 0)),        # (-1, 0) is causal
    ((100, 100), False, (False, -1, -1)),   # wider than the sequences: no bound
])
def test_flash_forward_ragged_windows(stubbed, window, causal, mapped):
    total_q, total_k, batch = 40, 50, 3
    q, k, v = _cuda(total_q, 4, 32), _cuda(total_k, 2, 32), _cuda(total_k, 2, 32)
    cu_q, cu_k = _cuda(batch + 1, dtype=torch.int32), _cuda(batch + 1, dtype=torch.int32)
    result = sdpa.flash_attention_forward(KEYSET, q, k, v, cu_q, cu_k, 20, 25, 0.0, causal,
                                          False, window_size_left=window[0],
                                          window_size_right=window[1])
    a = _named(FWD_NAMES, stubbed.fwd[0])
    assert a["cu_q"] is cu_q and a["cu_k"] is cu_k
    assert (a["max_q"], a["max_k"]) == (20, 25)
    assert (a["causal"], a["left"], a["right"]) == mapped
    expected = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, 20, 25, 0.0, causal, False, window_size_left=window[0],
        window_size_right=window[1])
    _same_layout(result[0], expected[0], "output")
    _same_layout(result[1], expected[1], "lse")
    assert result[1].shape == (4, total_q)


def test_flash_backward_ragged_mapping(stubbed):
    q, k, v = _cuda(40, 4, 64), _cuda(50, 2, 64), _cuda(50, 2, 64)
    cu_q, cu_k = _cuda(4, dtype=torch.int32), _cuda(4, dtype=torch.int32)
    o, lse, rng, unused, _ = sdpa.flash_attention_forward(
        KEYSET, q, k, v, cu_q, cu_k, 20, 25, 0.2, True, False, window_size_left=6)
    grads = sdpa.flash_attention_backward(KEYSET, torch.empty_like(o), q, k, v, o, lse, cu_q,
                                          cu_k, 20, 25, 0.2, True, rng, unused,
                                          window_size_left=6, window_size_right=None)
    b = _named(BWD_NAMES, stubbed.bwd[0])
    assert b["cu_q"] is cu_q and b["cu_k"] is cu_k and (b["max_q"], b["max_k"]) == (20, 25)
    assert (b["causal"], b["left"], b["right"]) == (True, 6, 0)
    assert b["lse"].shape == (4, 40) and b["dropout_p"] == 0.2 and b["rng"].dtype == torch.int64
    expected = torch.ops.aten._flash_attention_backward(
        torch.empty_like(o), q, k, v, o, lse, cu_q, cu_k, 20, 25, 0.2, True, rng, unused,
        window_size_left=6)
    for ours, theirs, name in zip(grads, expected, ("dq", "dk", "dv")):
        _same_layout(ours, theirs, name)


def test_no_dropout_inplace_writes_out(stubbed):
    q, k, v = _cuda(40, 4, 64), _cuda(50, 4, 64), _cuda(50, 4, 64)
    cu = _cuda(4, dtype=torch.int32)
    out = torch.empty_like(q)
    lse = sdpa.flash_attention_forward_no_dropout_inplace(KEYSET, out, q, k, v, cu, cu, 20, 25,
                                                          0.0, True, False)
    assert lse.shape == (4, 40) and lse.dtype == torch.float32
    assert any(t is out for t in stubbed.copies)
    assert _named(FWD_NAMES, stubbed.fwd[0])["dropout_p"] == 0.0


# ------------------------------------------------------------------------------------------------
# Units and the rng state, with real (CPU) values through the run_* helpers
# ------------------------------------------------------------------------------------------------
def test_lse_units_and_rng_round_trip(monkeypatch):
    lse_log2 = torch.tensor([[[1.0, -2.5, float("-inf")]]])  # (1, 1, 3)
    state = torch.tensor([2**62 - 1, 12345], dtype=torch.int64)
    seen = {}

    def call_fwd(*args):
        seen["fwd"] = _named(FWD_NAMES, args)
        return torch.zeros_like(args[0]), lse_log2.clone(), torch.empty(0)

    def call_bwd(*args):
        seen["bwd"] = _named(BWD_NAMES, args)
        return (torch.zeros_like(args[1]), torch.zeros_like(args[2]), torch.zeros_like(args[3]),
                torch.empty(0))

    monkeypatch.setattr(ops, "call_fwd", call_fwd)
    monkeypatch.setattr(ops, "call_bwd", call_bwd)
    monkeypatch.setattr(interface, "_rng_state", lambda device: state.clone())
    q = torch.zeros(1, 3, 1, 8, dtype=torch.float16)
    out, lse, rng = sdpa.run_forward(q, q, q, None, None, 3, 3, 0.5, False, None)
    assert torch.equal(lse, lse_log2 * LN2)  # natural log, as torch's ops return it
    assert lse[0, 0, 0].item() == pytest.approx(LN2)
    assert rng.dtype == torch.uint64 and rng.shape == (2,)
    assert torch.equal(seen["fwd"]["rng"], state)
    sdpa.run_backward(out, q, q, q, out, lse, None, None, 3, 3, 0.5, False, rng, None)
    back = seen["bwd"]
    assert torch.equal(back["rng"], state)  # the same (seed, offset): the same mask
    assert torch.allclose(back["lse"][..., :2], lse_log2[..., :2], rtol=1e-6)
    assert back["lse"][0, 0, 2].item() == float("-inf")
    # no dropout: zeros, and the backward does not read it
    _, _, rng0 = sdpa.run_forward(q, q, q, None, None, 3, 3, 0.0, False, None)
    assert torch.equal(rng0.view(torch.int64), torch.zeros(2, dtype=torch.int64))
    sdpa.run_backward(out, q, q, q, out, lse, None, None, 3, 3, 0.0, False, rng0, None)
    assert seen["bwd"]["rng"] is None


# ------------------------------------------------------------------------------------------------
# Serve, hand to torch's kernel, or refuse
# ------------------------------------------------------------------------------------------------
class FakeKernel:
    def __init__(self, result="torch's result"):
        self.calls, self.result = [], result

    def call_boxed(self, keyset, *args, **kwargs):
        self.calls.append((keyset, args, kwargs))
        return self.result


@pytest.fixture
def originals(monkeypatch):
    kernels = {name: FakeKernel() for name in sdpa.OVERRIDES}
    monkeypatch.setattr(sdpa, "_original", kernels)
    return kernels


def _sdpa_inputs(dtype=torch.float16, d=64, device="cuda"):
    q = torch.empty(2, 4, 16, d, dtype=dtype, device=device)
    k = torch.empty(2, 2, 24, d, dtype=dtype, device=device)
    return q, k, torch.empty_like(k)


@pytest.mark.parametrize("case,reason", [
    (dict(dtype=torch.float32), "float32"),
    (dict(dtype=torch.float64), "float64"),
    (dict(d=100), "head dim 100"),
    (dict(d=264), "head dim 264"),
])
def test_sdpa_forward_falls_back(stubbed, originals, case, reason):
    q, k, v = _sdpa_inputs(**case)
    for dropout_p in (0.0, 0.3):  # a common reason: the backward falls back alike
        result = sdpa.sdpa_flash_forward(KEYSET, q, k, v, dropout_p, True, False, scale=0.2)
        assert result == "torch's result"
        keyset, args, kwargs = originals["_scaled_dot_product_flash_attention"].calls[-1]
        assert keyset is KEYSET
        assert args == (q, k, v, dropout_p, True, False) and kwargs == {"scale": 0.2}
        assert sdpa.common_reason(q, k, v, None, None, dropout_p, 0.2, True).find(reason) >= 0
    assert not stubbed.fwd


def test_backward_falls_back_on_the_same_reasons(stubbed, originals):
    q, k, v = _sdpa_inputs(dtype=torch.float32)
    rng, unused = torch.empty(2, dtype=torch.uint64, device="cuda"), _cuda(0)
    lse = torch.empty(2, 4, 16, device="cuda")
    result = sdpa.sdpa_flash_backward(KEYSET, torch.empty_like(q), q, k, v, torch.empty_like(q),
                                      lse, None, None, 16, 24, 0.3, False, rng, unused)
    assert result == "torch's result" and not stubbed.bwd
    (keyset, args, kwargs), = originals["_scaled_dot_product_flash_attention_backward"].calls
    assert keyset is KEYSET and args[10:13] == (0.3, False, rng) and kwargs == {"scale": None}


def test_cpu_tensors_and_old_gpus_fall_back(originals, monkeypatch):
    q, k, v = _sdpa_inputs(device="cpu")
    assert "not CUDA" in sdpa.common_reason(q, k, v, None, None, 0.0, None, True)
    monkeypatch.setattr(sdpa, "_capability", lambda index: (7, 5))
    with FakeTensorMode():
        q, k, v = _sdpa_inputs()
        assert "7.5" in sdpa.common_reason(q, k, v, None, None, 0.0, None, True)
        assert sdpa.sdpa_flash_forward(KEYSET, q, k, v) == "torch's result"


@pytest.mark.parametrize("bad,reason", [
    (dict(scale=-1.0), "scale"),
    (dict(scale=float("inf")), "scale"),
    (dict(dropout_p=1.0), "dropout_p"),
    (dict(dropout_p=0.001), "dropout_p 0.001 is outside flashjit's dropout resolution"),
    (dict(dropout_p=0.999), "dropout_p 0.999 is outside flashjit's dropout resolution"),
])
def test_scalar_reasons(stubbed, bad, reason):
    q, k, v = _sdpa_inputs()
    args = dict(dropout_p=0.0, scale=None) | bad
    assert reason in sdpa.common_reason(q, k, v, None, None, args["dropout_p"], args["scale"],
                                        True)


def test_shape_reasons(stubbed):
    q, k, v = _sdpa_inputs()
    assert "multiple" in sdpa.common_reason(q, _bhsd(2, 3, 24, 64), _bhsd(2, 3, 24, 64), None,
                                            None, 0.0, None, True)
    assert "different dtypes" in sdpa.common_reason(q, k.bfloat16(), v, None, None, 0.0, None,
                                                    True)
    assert "empty" in sdpa.common_reason(_bhsd(0, 4, 16, 64), _bhsd(0, 2, 24, 64),
                                         _bhsd(0, 2, 24, 64), None, None, 0.0, None, True)
    ragged = _cuda(40, 4, 64), _cuda(50, 2, 64), _cuda(50, 2, 64)
    cu64 = _cuda(4, dtype=torch.int64)
    assert "int32" in sdpa.common_reason(*ragged, cu64, cu64, 0.0, None)
    cu = _cuda(4, dtype=torch.int32)
    assert "both" in sdpa.common_reason(*ragged, cu, None, 0.0, None)
    assert "different lengths" in sdpa.common_reason(*ragged, cu, _cuda(5, dtype=torch.int32),
                                                     0.0, None)
    assert sdpa.common_reason(*ragged, cu, cu, 0.0, None) is None


@pytest.mark.parametrize("extra,reason", [
    (dict(return_debug_mask=True), "return_debug_mask"),
    (dict(seqused_k="cuda-int32"), "seqused_k"),
    (dict(alibi_slopes="cuda-f32"), "alibi_slopes"),
    (dict(block_table="cuda-int32"), "block_table"),
])
def test_forward_only_reasons_fall_back_without_dropout_and_raise_with(stubbed, originals,
                                                                       extra, reason):
    tensors = {"cuda-int32": _cuda(2, dtype=torch.int32), "cuda-f32": _cuda(4, dtype=torch.float32)}
    extra = {k: tensors.get(v, v) if isinstance(v, str) else v for k, v in extra.items()}
    q, k, v = _cuda(2, 16, 4, 64), _cuda(2, 24, 2, 64), _cuda(2, 24, 2, 64)
    debug = extra.pop("return_debug_mask", False)
    result = sdpa.flash_attention_forward(KEYSET, q, k, v, None, None, 16, 24, 0.0, False, debug,
                                          **extra)
    assert result == "torch's result"
    _, args, kwargs = originals["_flash_attention_forward"].calls[-1]
    assert args[9] is debug and all(kwargs[name] is t for name, t in extra.items())
    with pytest.raises(RuntimeError, match=reason):
        sdpa.flash_attention_forward(KEYSET, q, k, v, None, None, 16, 24, 0.1, False, debug,
                                     **extra)
    if debug:
        with pytest.raises(RuntimeError, match="return_debug_mask"):
            sdpa.sdpa_flash_forward(KEYSET, *_sdpa_inputs(), 0.1, False, True)
        assert sdpa.sdpa_flash_forward(KEYSET, *_sdpa_inputs(), 0.0, False, True) == \
            "torch's result"
    assert not stubbed.fwd


def test_fallback_passes_only_the_keywords_this_torchs_schema_has(stubbed, originals,
                                                                   monkeypatch):
    # torch 2.11's _flash_attention_forward has no num_splits, say: the fallback must not pass it
    names = sdpa._schema_arguments("_flash_attention_forward")
    assert {"scale", "window_size_left", "window_size_right"} <= names
    monkeypatch.setattr(sdpa, "_schema_arguments",
                        lambda op: names - {"num_splits", "block_table"})
    q, k, v = _cuda(2, 16, 4, 64, dtype=torch.float32), _cuda(2, 24, 2, 64, dtype=torch.float32), \
        _cuda(2, 24, 2, 64, dtype=torch.float32)
    assert sdpa.flash_attention_forward(KEYSET, q, k, v, None, None, 16, 24, 0.0, False, False,
                                        scale=0.5, window_size_left=3) == "torch's result"
    _, _, kwargs = originals["_flash_attention_forward"].calls[-1]
    assert "num_splits" not in kwargs and "block_table" not in kwargs
    assert kwargs["scale"] == 0.5 and kwargs["window_size_left"] == 3


def test_backward_only_reasons(stubbed, originals):
    q, k, v = _sdpa_inputs()
    o, dout = torch.empty_like(q), torch.empty_like(q)
    rng, unused = torch.empty(2, dtype=torch.uint64, device="cuda"), _cuda(0)
    bad_lse = torch.empty(2, 4, 16, dtype=torch.float16, device="cuda")
    args = (dout, q, k, v, o, bad_lse, None, None, 16, 24)
    assert sdpa.sdpa_flash_backward(KEYSET, *args, 0.0, False, rng, unused) == "torch's result"
    with pytest.raises(RuntimeError, match="logsumexp"):
        sdpa.sdpa_flash_backward(KEYSET, *args, 0.1, False, rng, unused)
    lse = torch.empty(2, 4, 16, device="cuda")
    with pytest.raises(RuntimeError, match="rng_state"):
        sdpa.sdpa_flash_backward(KEYSET, dout, q, k, v, o, lse, None, None, 16, 24, 0.1, False,
                                 torch.empty(3, dtype=torch.uint64, device="cuda"), unused)
    assert not stubbed.bwd


def test_no_original_kernel_refuses_with_the_reason(stubbed, monkeypatch):
    monkeypatch.setattr(sdpa, "_original", {})
    with pytest.raises(RuntimeError, match="float32"):
        sdpa.sdpa_flash_forward(KEYSET, *_sdpa_inputs(dtype=torch.float32))


def test_no_dropout_inplace_falls_back_for_dropout(stubbed, originals):
    q = _cuda(40, 4, 64)
    cu = _cuda(4, dtype=torch.int32)
    out = torch.empty_like(q)
    assert sdpa.flash_attention_forward_no_dropout_inplace(
        KEYSET, out, q, q, q, cu, cu, 20, 20, 0.1, False, False) == "torch's result"
    assert not stubbed.fwd


def test_cuda_kernel_lookup_without_cuda_is_none():
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build has torch's kernels")
    assert all(sdpa._current_cuda_kernel(n) is None for n in sdpa.OVERRIDES)
