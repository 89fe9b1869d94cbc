"""compile_only: the spec's .cu files through nvcc alone (no torch headers), as CI checks them."""

from __future__ import annotations

import pytest

from flashjit.jit import BuildError, JitSpec, compile_only, csrc_dir
from flashjit.jit.env import nvcc_path

pytestmark = pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found")

# A stand-in kernel: proves the defines and -I csrc reach nvcc and that Hopper builds as sm_90a.
TINY_HEADER = "#pragma once\nconstexpr float kTiny = 2.0f;\n"
TINY_KERNEL = """
#include "tiny.cuh"
static_assert(FLASHJIT_HEAD_DIM == 128 && FLASHJIT_IS_CAUSAL == 1 && FLASHJIT_DTYPE_BF16 == 1,
              "spec defines reach nvcc");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "Hopper must build as sm_90a"
#endif
__global__ void scale(float* x) { x[threadIdx.x] *= kTiny; }
"""


@pytest.fixture
def tiny_csrc(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "tiny.cuh").write_text(TINY_HEADER)
    (csrc / "sm80").mkdir()
    (csrc / "sm80" / "fwd.cu").write_text(TINY_KERNEL)  # finds tiny.cuh through -I csrc
    monkeypatch.setenv("FLASHJIT_CSRC_DIR", str(csrc))
    return csrc


def test_compile_only_tiny_kernel(tiny_csrc, tmp_path):
    spec = JitSpec("fwd", "sm80-sm90a", "bf16", 128, causal=True)
    (obj,) = compile_only(spec, tmp_path / "out")
    assert obj.name == "fwd_sm80-sm90a_bf16_hd128_causal_fwd.o" and obj.stat().st_size > 0


def test_compile_only_has_no_torch_headers(tiny_csrc, tmp_path):
    (tiny_csrc / "sm80" / "fwd.cu").write_text("#include <ATen/core/Tensor.h>\n" + TINY_KERNEL)
    with pytest.raises(BuildError, match="Tensor.h"):
        compile_only(JitSpec("fwd", "sm80", "bf16", 128, causal=True), tmp_path / "out")


def test_compile_only_names_missing_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHJIT_CSRC_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="sm80/bwd.cu"):
        compile_only(JitSpec("bwd", "sm80", "fp16", 64), tmp_path / "out")


@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype, head_dim, causal", [("bf16", 128, True), ("fp16", 64, False)])
def test_compile_only_real_kernels(kernel, dtype, head_dim, causal, tmp_path):
    spec = JitSpec(kernel, "sm80-sm90a", dtype, head_dim, causal=causal)
    assert spec.sources()[-1] == csrc_dir() / "sm80" / f"{kernel}.cu"
    (obj,) = compile_only(spec, tmp_path)
    assert obj.stat().st_size > 0


@pytest.mark.parametrize(
    "spec",
    [
        # the sm90 forward (now the paged one, and FLASHJIT_KERNEL_FAMILY=sm90's) compiles in
        # test_compile_only_default_paged_forward and with every variant below
        JitSpec("bwd", "sm90a", "bf16", 128, causal=True, family="sm90"),
        JitSpec("bwd", "sm90a", "fp16", 64, dropout=True, family="sm90"),
        JitSpec("bwd", "sm90a", "bf16", 96, family="sm90"),  # bucket 96: the 128-column kernels
        JitSpec("bwd", "sm90a", "bf16", 224, family="sm90"),  # the 256-column kernels, halves
        JitSpec("bwd", "sm90a", "fp16", 160, family="sm90"),  # 192 columns, uneven halves
    ],
    ids=lambda spec: spec.name,
)
def test_compile_only_sm90_family(spec, tmp_path):
    """The wgmma backward: its own sources (csrc/sm90), built for sm_90a."""
    assert spec.sources()[-1] == csrc_dir() / "sm90" / f"{spec.kernel}.cu"
    (obj,) = compile_only(spec, tmp_path)
    assert obj.stat().st_size > 0


@pytest.mark.parametrize(
    "spec",
    [
        JitSpec("fwd", "sm90a", "bf16", 64, causal=True, family="sm90ws"),
        JitSpec("fwd", "sm90a", "fp16", 64, dropout=True, family="sm90ws"),
        JitSpec("fwd", "sm90a", "bf16", 192, family="sm90ws"),
        JitSpec("fwd", "sm90a", "bf16", 256, family="sm90ws"),
        JitSpec("fwd", "sm90a", "fp16", 224, dropout=True, family="sm90ws"),  # padded panels
    ],
    ids=lambda spec: spec.name,
)
def test_compile_only_sm90ws_family(spec, tmp_path):
    """The warp-specialised forward (the sm90a default at d 33-256), built for sm_90a from its
    own sources (csrc/sm90ws): d 64 without dropout holds two kernels (one and three consumer
    warpgroups, by sequence length), with dropout one (two consumers); d 192 and 256 issue P V
    in 64-column panels (d 192's last one a 64-column wgmma; d 128 compiles in
    test_compile_only_every_variant)."""
    assert spec.sources()[-1] == csrc_dir() / "sm90ws" / "fwd.cu"
    (obj,) = compile_only(spec, tmp_path)
    assert obj.stat().st_size > 0


def test_compile_only_default_paged_forward(tmp_path, monkeypatch):
    """A paged forward on sm90a at d 128 defaults to the warp-specialised family (TMA boxes
    inside pages): csrc/sm90ws's forward with -DFLASHJIT_HAS_PAGED=1 compiles."""
    monkeypatch.delenv("FLASHJIT_KERNEL_FAMILY", raising=False)
    spec = JitSpec("fwd", "sm90a", "bf16", 128, causal=True, paged=True)
    assert spec.family == "sm90ws" and spec.name == "fwd_sm90a_bf16_hd128_causal_paged_ws"
    assert spec.sources()[-1] == csrc_dir() / "sm90ws" / "fwd.cu"
    assert "-DFLASHJIT_HAS_PAGED=1" in spec.cuda_cflags(verbose=False)
    (obj,) = compile_only(spec, tmp_path)
    assert obj.stat().st_size > 0


@pytest.mark.parametrize(
    "spec",
    [
        JitSpec("fwd", "sm80", "bf16", 128, causal=True, window=True, softcap=True, alibi=True,
                sink=True, family="sm80"),
        JitSpec("bwd", "sm80", "fp16", 64, window=True, softcap=True, alibi=True, sink=True,
                dropout=True, family="sm80"),
        JitSpec("fwd", "sm90a", "bf16", 128, causal=True, window=True, softcap=True,
                alibi=True, sink=True, family="sm90"),
        JitSpec("fwd", "sm90a", "bf16", 128, causal=True, window=True, softcap=True,
                alibi=True, sink=True, family="sm90ws"),
        JitSpec("bwd", "sm90a", "bf16", 64, window=True, softcap=True, alibi=True, sink=True,
                dropout=True, family="sm90"),
    ],
    ids=lambda spec: spec.name,
)
def test_compile_only_every_variant(spec, tmp_path):
    """Every variant define at once, in each family: the variant code compiles."""
    assert {"-DFLASHJIT_HAS_WINDOW=1", "-DFLASHJIT_HAS_SOFTCAP=1", "-DFLASHJIT_HAS_ALIBI=1",
            "-DFLASHJIT_HAS_SINK=1"} <= set(spec.cuda_cflags())
    (obj,) = compile_only(spec, tmp_path)
    assert obj.stat().st_size > 0


def test_compile_only_dropout_mask_kernel(tmp_path):
    """The test-only dropout-mask kernel: arch only, its own sources."""
    spec = JitSpec("dropout_mask", "sm80-sm90a")
    (obj,) = compile_only(spec, tmp_path)
    assert obj.name == "dropout_mask_sm80-sm90a_dropout_mask.o" and obj.stat().st_size > 0


def test_compile_only_real_kernel_with_a_spec_tile(tmp_path):
    """A tile chosen by the spec (JitSpec.tile) reaches the launch code as defines, no header
    patching: the sm80 forward at a 64 x 32 tile with 4 warps compiles."""
    spec = JitSpec("fwd", "sm80", "fp16", 64, tile="64,32,4,2")
    assert spec.name == "fwd_sm80_fp16_hd64_t64x32x4x2"
    assert "-DFLASHJIT_TILE_BLOCK_M=64" in spec.cuda_cflags(verbose=False)
    (obj,) = compile_only(spec, tmp_path)
    assert obj.stat().st_size > 0


@pytest.mark.parametrize(
    "spec",
    [
        JitSpec("decode", "sm80-sm90a", "bf16", 128, causal=True),
        JitSpec("decode", "sm90a", "fp16", 256, window=True, softcap=True, alibi=True, sink=True),
    ],
    ids=lambda spec: spec.name,
)
def test_compile_only_decode(spec, tmp_path):
    """The split-KV decode family (csrc/splitkv): its own sources, every variant, no dropout."""
    assert spec.family == "splitkv" and spec.sources()[-1] == csrc_dir() / "splitkv" / "decode.cu"
    (obj,) = compile_only(spec, tmp_path)
    assert obj.stat().st_size > 0
