"""Spec names, head-dim buckets, arch parsing and compiler flags: pure functions, no builds."""

from __future__ import annotations

import pytest

from flashjit.jit import JitSpec, current_arch, head_dim_bucket, nvcc_flags, parse_arch_list
from flashjit.jit.spec import cxx_flags


@pytest.mark.parametrize(
    "spec, name",
    [
        (JitSpec("fwd", "sm90a", "bf16", 128, causal=True), "fwd_sm90a_bf16_hd128_causal"),
        (JitSpec("fwd", "sm80", "fp16", 64), "fwd_sm80_fp16_hd64"),
        (JitSpec("bwd", "sm86", "bf16", 256, causal=True, dropout=True),
         "bwd_sm86_bf16_hd256_causal_dropout"),
        (JitSpec("bwd", "sm80", "fp16", 32, dropout=True), "bwd_sm80_fp16_hd32_dropout"),
        (JitSpec("fwd", "sm80-sm90a", "bf16", 96), "fwd_sm80-sm90a_bf16_hd96"),
        (JitSpec("selftest"), "selftest_cpu"),
        (JitSpec("selftest", "cpu"), "selftest_cpu"),
    ],
)
def test_spec_names(spec, name):
    assert spec.name == name
    assert spec.op_namespace == "flashjit_" + name.replace("-", "_")
    assert spec.op_namespace.isidentifier()


def test_spec_normalises_fields():
    spec = JitSpec("fwd", "sm90", "bfloat16", 72, causal=1)
    assert (spec.arch, spec.dtype, spec.head_dim, spec.causal) == ("sm90a", "bf16", 96, True)
    assert spec == JitSpec("fwd", "9.0", "bf16", 96, causal=True)
    assert hash(spec) == hash(JitSpec("fwd", "9.0", "bf16", 96, causal=True))
    assert JitSpec("fwd", "sm90a-sm80", "fp16", 64).arch == "sm80-sm90a"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel="nope", arch="sm80", dtype="fp16", head_dim=64),
        dict(kernel="fwd", arch=None, dtype="fp16", head_dim=64),
        dict(kernel="fwd", arch="sm75", dtype="fp16", head_dim=64),
        dict(kernel="fwd", arch="sm80", dtype="fp32", head_dim=64),
        dict(kernel="fwd", arch="sm80", dtype="fp16", head_dim=None),
        dict(kernel="fwd", arch="sm80", dtype="fp16", head_dim=264),
        dict(kernel="selftest", arch="sm80"),
        dict(kernel="selftest", dtype="fp16"),
        dict(kernel="selftest", causal=True),
    ],
)
def test_spec_rejects_bad_fields(kwargs):
    with pytest.raises(ValueError):
        JitSpec(**kwargs)


def test_spec_defines_and_flags():
    spec = JitSpec("fwd", "sm80-sm90a", "bf16", 128, causal=True)
    defines = [
        "-DFLASHJIT_OP_NAMESPACE=flashjit_fwd_sm80_sm90a_bf16_hd128_causal",
        "-DFLASHJIT_DTYPE_BF16=1", "-DFLASHJIT_HEAD_DIM=128",
        "-DFLASHJIT_IS_CAUSAL=1", "-DFLASHJIT_HAS_DROPOUT=0",
    ]
    assert spec.defines == defines
    assert spec.cflags() == ["-O3", "-std=c++17", *defines]
    assert spec.cuda_cflags(verbose=False) == [
        "-O3", "-std=c++17", "--expt-relaxed-constexpr", "--use_fast_math", "-DNDEBUG",
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a", *defines,
    ]
    assert [s.name for s in spec.sources()] == ["fwd_binding.cpp", "flash_fwd.cu"]
    assert JitSpec("fwd", "sm80", "fp16", 64).defines[1] == "-DFLASHJIT_DTYPE_FP16=1"
    selftest = JitSpec("selftest")
    assert selftest.defines == ["-DFLASHJIT_OP_NAMESPACE=flashjit_selftest_cpu"]
    assert selftest.cuda_cflags() == [] and not selftest.with_cuda
    assert cxx_flags() == ["-O3", "-std=c++17"]


def test_verbose_flags(monkeypatch):
    assert "-lineinfo" not in nvcc_flags("sm80")
    assert nvcc_flags("sm100", verbose=True)[-3:] == [
        "-gencode=arch=compute_100,code=sm_100", "-lineinfo", "-Xptxas=-v"]
    monkeypatch.setenv("FLASHJIT_VERBOSE", "1")
    assert "-Xptxas=-v" in JitSpec("bwd", "sm80", "fp16", 64).cuda_cflags()


def test_prebuild_command():
    spec = JitSpec("bwd", "sm80-sm90a", "fp16", 64, causal=True)
    assert spec.prebuild_command() == (
        "python -m flashjit.prebuild --kernel bwd --arch 'sm80;sm90a' --dtype fp16 "
        "--head-dim 64 --causal yes --dropout no")
    assert JitSpec("selftest").prebuild_command() == "python -m flashjit.prebuild --kernel selftest"


@pytest.mark.parametrize(
    "d, bucket",
    [(8, 32), (32, 32), (40, 64), (64, 64), (72, 96), (96, 96), (104, 128), (128, 128),
     (136, 160), (168, 192), (200, 224), (256, 256)],
)
def test_head_dim_bucket(d, bucket):
    assert head_dim_bucket(d) == bucket


@pytest.mark.parametrize("d", [0, 4, 12, 100, 257, 264, 512, -8, 64.0, True])
def test_head_dim_bucket_rejects(d):
    with pytest.raises(ValueError):
        head_dim_bucket(d)


@pytest.mark.parametrize(
    "text, archs",
    [
        ("8.0", ["sm80"]),
        ("9.0", ["sm90a"]),
        ("8.0;9.0", ["sm80", "sm90a"]),
        ("9.0 8.0", ["sm80", "sm90a"]),
        ("sm80,sm90a", ["sm80", "sm90a"]),
        ("sm_86, sm_89", ["sm86", "sm89"]),
        ("8.6+PTX", ["sm86"]),
        ("9.0a;9.0", ["sm90a"]),
        ("sm90", ["sm90a"]),
        ("10.0 12.0", ["sm100", "sm120"]),
        ("10.0a", ["sm100a"]),
        ("Ampere;Hopper", ["sm80", "sm86", "sm90a"]),
        ("sm90a;8.0;8.0", ["sm80", "sm90a"]),
    ],
)
def test_parse_arch_list(text, archs):
    assert parse_arch_list(text) == archs


@pytest.mark.parametrize("text", ["", "7.5", "sm70", "8.0;7.0", "Volta", "banana", "sm8"])
def test_parse_arch_list_rejects(text):
    with pytest.raises(ValueError):
        parse_arch_list(text)


def test_parse_arch_list_drop_old():
    assert parse_arch_list("5.2 6.0 7.0 7.5 8.0 8.6 9.0+PTX", drop_old=True) == ["sm80", "sm86", "sm90a"]
    with pytest.raises(ValueError):
        parse_arch_list("7.0 7.5", drop_old=True)


def test_current_arch_from_env(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "9.0")
    assert current_arch() == "sm90a"
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "sm80,sm90a")
    assert current_arch() == "sm80-sm90a"
    # FLASHJIT_CUDA_ARCH_LIST wins over TORCH_CUDA_ARCH_LIST.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert current_arch() == "sm80-sm90a"
    monkeypatch.delenv("FLASHJIT_CUDA_ARCH_LIST")
    assert current_arch() == "sm86"
    # TORCH_CUDA_ARCH_LIST is shared with other extensions: its old archs are skipped.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0 7.5 8.0 8.6 9.0+PTX")
    assert current_arch() == "sm80-sm86-sm90a"
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "7.5")
    with pytest.raises(RuntimeError, match="FLASHJIT_CUDA_ARCH_LIST"):
        current_arch()


def test_current_arch_without_gpu_or_list(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with pytest.raises(RuntimeError, match="FLASHJIT_CUDA_ARCH_LIST"):
        current_arch()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")  # native means: ask the GPU
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        current_arch()


def test_csrc_dir_without_override(monkeypatch):
    """The package's own csrc (an installed wheel), else the checkout's top-level csrc."""
    from pathlib import Path

    import flashjit.jit.paths as paths

    monkeypatch.delenv("FLASHJIT_CSRC_DIR")
    package = Path(paths.__file__).resolve().parents[1]
    expected = package / "csrc" if (package / "csrc").is_dir() else package.parent / "csrc"
    assert paths.csrc_dir() == expected
    assert (expected / "selftest" / "selftest_op.cpp").is_file()
