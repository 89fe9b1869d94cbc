"""Spec names, head-dim buckets, arch parsing and compiler flags: pure functions, no builds."""

from __future__ import annotations

import dataclasses
import shlex

import pytest

from flashjit.jit import (JitSpec, current_arch, default_family, head_dim_bucket, nvcc_flags,
                          parse_arch_list, registry)
from flashjit.jit.spec import cxx_flags
from flashjit.prebuild import _parser, specs_from_args


@pytest.mark.parametrize(
    "spec, name",
    [
        # (family given where the default is a Hopper family, sm90 or sm90ws: these are built
        # at collection, outside the tests' clean environment; test_default_family checks the
        # default itself)
        (JitSpec("fwd", "sm90a", "bf16", 128, causal=True, family="sm90"),
         "fwd_sm90a_bf16_hd128_causal_wgmma"),
        (JitSpec("fwd", "sm90a", "bf16", 128, causal=True, family="sm80"),
         "fwd_sm90a_bf16_hd128_causal"),
        (JitSpec("fwd", "sm90a", "fp16", 64, dropout=True, family="sm90"),
         "fwd_sm90a_fp16_hd64_dropout_wgmma"),
        (JitSpec("fwd", "sm90a", "fp16", 96), "fwd_sm90a_fp16_hd96_ws"),
        (JitSpec("fwd", "sm90a", "bf16", 128, causal=True, family="sm90ws"),
         "fwd_sm90a_bf16_hd128_causal_ws"),
        (JitSpec("fwd", "sm90a", "fp16", 64, dropout=True, family="sm90ws"),
         "fwd_sm90a_fp16_hd64_dropout_ws"),
        (JitSpec("fwd", "sm90a", "bf16", 128, causal=True, family="sm90", paged=True),
         "fwd_sm90a_bf16_hd128_causal_paged_wgmma"),
        (JitSpec("bwd", "sm90a", "bf16", 128, causal=True, family="sm90"),
         "bwd_sm90a_bf16_hd128_causal_wgmma"),
        (JitSpec("bwd", "sm90a", "bf16", 128, family="sm80"), "bwd_sm90a_bf16_hd128"),
        (JitSpec("bwd", "sm90a", "fp16", 64, dropout=True, family="sm90"),
         "bwd_sm90a_fp16_hd64_dropout_wgmma"),
        (JitSpec("bwd", "sm90a", "fp16", 64, dropout=True, family="sm80"),
         "bwd_sm90a_fp16_hd64_dropout"),
        (JitSpec("bwd", "sm90a", "bf16", 96), "bwd_sm90a_bf16_hd96_wgmma"),
        (JitSpec("fwd", "sm80", "fp16", 64), "fwd_sm80_fp16_hd64"),
        (JitSpec("bwd", "sm86", "bf16", 256, causal=True, dropout=True),
         "bwd_sm86_bf16_hd256_causal_dropout"),
        (JitSpec("bwd", "sm80", "fp16", 32, dropout=True), "bwd_sm80_fp16_hd32_dropout"),
        (JitSpec("fwd", "sm80-sm90a", "bf16", 96), "fwd_sm80-sm90a_bf16_hd96"),
        (JitSpec("selftest"), "selftest_cpu"),
        (JitSpec("selftest", "cpu"), "selftest_cpu"),
        (JitSpec("dropout_mask", "9.0"), "dropout_mask_sm90a"),
        (JitSpec("dropout_mask", "sm80-sm90a"), "dropout_mask_sm80-sm90a"),
        # variants: causal, window, softcap, alibi, sink, dropout, then family and tile
        (JitSpec("fwd", "sm90a", "bf16", 128, causal=True, window=True, softcap=True,
                 family="sm90"), "fwd_sm90a_bf16_hd128_causal_window_softcap_wgmma"),
        (JitSpec("bwd", "sm80", "fp16", 64, window=True, softcap=True, alibi=True, sink=True,
                 dropout=True), "bwd_sm80_fp16_hd64_window_softcap_alibi_sink_dropout"),
        (JitSpec("fwd", "sm90a", "bf16", 96, sink=True), "fwd_sm90a_bf16_hd96_sink_ws"),
        (JitSpec("fwd", "sm90a", "bf16", 64, alibi=True, family="sm90", tile="128,2,1"),
         "fwd_sm90a_bf16_hd64_alibi_wgmma_t128x2x1"),
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
        dict(kernel="selftest", family="sm80"),
        dict(kernel="selftest", sink=True),
        dict(kernel="dropout_mask"),  # needs an arch
        dict(kernel="dropout_mask", arch="cpu"),
        dict(kernel="dropout_mask", arch="sm80", dtype="fp16"),
        dict(kernel="dropout_mask", arch="sm80", head_dim=64),
        dict(kernel="dropout_mask", arch="sm80", window=True),
        dict(kernel="dropout_mask", arch="sm80", dropout=True),
        dict(kernel="dropout_mask", arch="sm80", family="sm80"),
        dict(kernel="dropout_mask", arch="sm80", tile=(1,)),
        dict(kernel="fwd", arch="sm80", dtype="fp16", head_dim=64, family="sm70"),
        dict(kernel="fwd", arch="sm90a", dtype="fp16", head_dim=64, family="wgmma"),
    ],
)
def test_spec_rejects_bad_fields(kwargs):
    with pytest.raises(ValueError):
        JitSpec(**kwargs)


@pytest.mark.parametrize(
    "kernel, arch, bucket, dropout, family",
    [
        ("fwd", "sm90a", 64, False, "sm90ws"),
        ("fwd", "sm90a", 128, False, "sm90ws"),
        ("fwd", "sm90a", 64, True, "sm90ws"),  # the warp-specialised forward has dropout
        ("fwd", "sm90a", 128, True, "sm90ws"),
        ("fwd", "sm90a", 32, False, "sm80"),
        ("fwd", "sm90a", 96, False, "sm90ws"),  # padded to 128 columns
        ("fwd", "sm90a", 192, False, "sm90ws"),  # 64-key blocks at d 192/256
        ("fwd", "sm90a", 256, False, "sm90ws"),
        ("fwd", "sm90a", 160, False, "sm90ws"),  # padded to 192 and 256 columns
        ("fwd", "sm90a", 224, False, "sm90ws"),
        ("bwd", "sm90a", 64, False, "sm90"),
        ("bwd", "sm90a", 128, False, "sm90"),
        ("bwd", "sm90a", 64, True, "sm90"),  # the wgmma backward has dropout too
        ("bwd", "sm90a", 128, True, "sm90"),
        ("bwd", "sm90a", 96, False, "sm90"),  # the 128-column kernels
        ("bwd", "sm90a", 160, True, "sm90"),  # the 192-column kernels (uneven halves)
        ("bwd", "sm90a", 192, False, "sm90"),
        ("bwd", "sm90a", 256, False, "sm90"),  # column halves
        ("bwd", "sm90a", 224, True, "sm90"),  # the 256-column kernels
        ("bwd", "sm80", 128, False, "sm80"),
        ("bwd", "sm80-sm90a", 64, False, "sm80"),
        ("fwd", "sm80", 128, False, "sm80"),
        ("fwd", "sm100", 128, False, "sm80"),
        ("fwd", "sm80-sm90a", 128, False, "sm80"),  # one family must serve every arch of the binary
    ],
)
def test_default_family(kernel, arch, bucket, dropout, family):
    assert default_family(kernel, arch, bucket) == family
    spec = JitSpec(kernel, arch, "bf16", bucket, dropout=dropout)
    assert spec.family == family
    assert spec.name.endswith("_wgmma") == (family == "sm90")
    assert spec.name.endswith("_ws") == (family == "sm90ws")


@pytest.mark.parametrize("bucket", [64, 128])
@pytest.mark.parametrize("dropout", [False, True])
def test_paged_forward_defaults_to_the_ws_family(bucket, dropout):
    """sm90ws reads a block table: on sm90a a paged forward is sm90ws's, as a plain one; an
    explicit sm90 (wgmma) paged spec is another spec; a family without paged K/V (sm90's
    backward has none: kernel bwd) is refused."""
    paged = JitSpec("fwd", "sm90a", "bf16", bucket, causal=True, dropout=dropout, paged=True)
    plain = JitSpec("fwd", "sm90a", "bf16", bucket, causal=True, dropout=dropout)
    name = f"fwd_sm90a_bf16_hd{bucket}_causal" + ("_dropout" if dropout else "")
    assert paged.family == "sm90ws" and paged.name == name + "_paged_ws"
    assert plain.family == "sm90ws" and plain.name == name + "_ws"
    assert paged == JitSpec("fwd", "sm90a", "bf16", bucket, causal=True, dropout=dropout,
                            paged=True, family="sm90ws")
    assert JitSpec(**paged.fields()) == paged  # the fields (family sm90ws) rebuild it
    wgmma = JitSpec("fwd", "sm90a", "bf16", bucket, causal=True, dropout=dropout, paged=True,
                    family="sm90")
    assert wgmma != paged and wgmma.name == name + "_paged_wgmma"


def test_kernel_family_env(monkeypatch):
    hopper = dict(kernel="fwd", arch="9.0", dtype="bf16", head_dim=128)
    hopper_bwd = dict(hopper, kernel="bwd")
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", "sm80")  # forces mma.sync, backward included
    assert JitSpec(**hopper).family == "sm80"
    assert JitSpec(**hopper_bwd).family == "sm80"
    assert JitSpec(**hopper, family="sm90").family == "sm90"  # an explicit family wins
    assert JitSpec(**hopper_bwd, family="sm90").family == "sm90"
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", "sm90")  # a preference: sm80 where no sm90
    assert JitSpec(**hopper).family == "sm90"
    assert JitSpec(**hopper_bwd).family == "sm90"
    assert JitSpec(**hopper_bwd, dropout=True).family == "sm90"
    assert JitSpec("bwd", "sm90a", "bf16", 32).family == "sm80"
    assert JitSpec("fwd", "sm80", "bf16", 128).family == "sm80"
    assert JitSpec(**hopper, paged=True).family == "sm90"
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", "sm90ws")  # the forward only: no ws backward
    assert JitSpec(**hopper).family == "sm90ws"
    assert JitSpec(**hopper, dropout=True).family == "sm90ws"
    assert JitSpec(**hopper, paged=True).family == "sm90ws"  # sm90ws reads block tables too
    assert JitSpec(**hopper_bwd).family == "sm90"
    assert JitSpec("fwd", "sm90a", "bf16", 32).family == "sm80"
    assert JitSpec(**hopper, family="sm90").family == "sm90"  # an explicit family wins
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", "")  # empty: unset
    assert JitSpec(**hopper).family == "sm90ws"
    assert JitSpec(**hopper, paged=True).family == "sm90ws"
    assert JitSpec(**hopper_bwd).family == "sm90"
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", "hopper")
    with pytest.raises(ValueError, match="FLASHJIT_KERNEL_FAMILY.*'sm90ws'.*'sm90'.*'sm80'"):
        JitSpec(**hopper)
    assert JitSpec("selftest").family is None  # CPU-only specs have no family


@pytest.mark.parametrize(
    "kernel, arch, head_dim, dropout",
    [("bwd", "sm90a", 32, True), ("bwd", "sm90a", 32, False), ("bwd", "sm80", 128, False),
     ("bwd", "sm80-sm90a", 64, False), ("fwd", "sm80", 128, False),
     ("fwd", "sm80-sm90a", 64, False), ("fwd", "sm90a", 96, False), ("fwd", "sm90a", 256, False)],
)
def test_explicit_sm90_family_must_exist(kernel, arch, head_dim, dropout):
    # the message states where the family serves (its registry row) and what was asked
    # the backward pads 96 to 128, 160 to 192 and 224 to 256
    dims = "64, 96, 128, 160, 192, 224, 256" if kernel == "bwd" else "64, 128"
    with pytest.raises(ValueError, match=rf"family 'sm90' \(wgmma, on sm90a at head dims {dims}\) "
                                         rf"does not serve kernel '{kernel}' on arch"):
        JitSpec(kernel, arch, "bf16", head_dim, dropout=dropout, family="sm90")


def test_family_normalises_to_equal_specs():
    spec = JitSpec("fwd", "sm90", "bf16", 120)  # bucket 128: sm90ws
    assert spec == JitSpec("fwd", "sm90a", "bf16", 128, family="sm90ws")
    assert spec != JitSpec("fwd", "sm90a", "bf16", 128, family="sm90")
    assert spec != JitSpec("fwd", "sm90a", "bf16", 128, family="sm80")
    assert spec.fields()["family"] == "sm90ws"
    assert JitSpec(**spec.fields()) == spec
    bwd = JitSpec("bwd", "sm90", "bf16", 120)  # bucket 128: sm90
    assert bwd == JitSpec("bwd", "sm90a", "bf16", 128, family="sm90")
    assert bwd.fields()["family"] == "sm90" and JitSpec(**bwd.fields()) == bwd


def test_spec_defines_and_flags():
    spec = JitSpec("fwd", "sm80-sm90a", "bf16", 128, causal=True)
    defines = [
        "-DFLASHJIT_OP_NAMESPACE=flashjit_fwd_sm80_sm90a_bf16_hd128_causal",
        "-DFLASHJIT_DTYPE_BF16=1", "-DFLASHJIT_HEAD_DIM=128",
        "-DFLASHJIT_IS_CAUSAL=1", "-DFLASHJIT_HAS_DROPOUT=0",
    ]
    assert spec.defines == defines
    assert spec.cflags() == ["-O3", *defines]
    assert spec.cuda_cflags(verbose=False) == [
        "-O3", "--expt-relaxed-constexpr", "--use_fast_math", "-DNDEBUG",
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a", *defines,
    ]
    assert JitSpec("fwd", "sm80", "fp16", 64).defines[1] == "-DFLASHJIT_DTYPE_FP16=1"
    # The family is its sources' (one folder per family), not a define: the defines of a wgmma
    # or warp-specialised spec are those of any other.
    assert JitSpec("fwd", "sm90a", "bf16", 128, causal=True).family == "sm90ws"
    assert JitSpec("bwd", "sm90a", "bf16", 128, causal=True).family == "sm90"
    for kernel, family, suffix in (("fwd", "sm90ws", "_ws"), ("fwd", "sm90", "_wgmma"),
                                   ("bwd", "sm90", "_wgmma")):
        hopper = JitSpec(kernel, "sm90a", "bf16", 128, causal=True, family=family)
        assert hopper.defines == [
            f"-DFLASHJIT_OP_NAMESPACE=flashjit_{kernel}_sm90a_bf16_hd128_causal{suffix}",
            "-DFLASHJIT_DTYPE_BF16=1", "-DFLASHJIT_HEAD_DIM=128",
            "-DFLASHJIT_IS_CAUSAL=1", "-DFLASHJIT_HAS_DROPOUT=0",
        ]
    selftest = JitSpec("selftest")
    assert selftest.defines == ["-DFLASHJIT_OP_NAMESPACE=flashjit_selftest_cpu"]
    assert selftest.cuda_cflags() == [] and not selftest.with_cuda
    assert cxx_flags() == ["-O3"]


@pytest.mark.parametrize("kernel, family", [
    ("fwd", "sm80"), ("fwd", "sm90"), ("fwd", "sm90ws"), ("bwd", "sm80"), ("bwd", "sm90")])
def test_sources_are_the_familys_own_folder(kernel, family):
    spec = JitSpec(kernel, "sm90a", "fp16", 64, family=family)
    root = spec.sources()[0].parent
    assert [p.relative_to(root).as_posix() for p in spec.sources()] == [
        f"{kernel}_binding.cpp", f"{family}/{kernel}.cu"]


@pytest.mark.parametrize("variant", ["window", "softcap", "alibi", "sink"])
def test_variant_defines_only_when_set(variant):
    """Each variant adds one define, -DFLASHJIT_HAS_<VARIANT>=1, after the old ones; a spec
    without variants keeps its defines byte for byte."""
    plain = JitSpec("bwd", "sm90a", "bf16", 128, causal=True, dropout=True, family="sm90")
    with_variant = JitSpec("bwd", "sm90a", "bf16", 128, causal=True, dropout=True,
                           family="sm90", **{variant: True})
    assert plain.defines == [
        "-DFLASHJIT_OP_NAMESPACE=flashjit_bwd_sm90a_bf16_hd128_causal_dropout_wgmma",
        "-DFLASHJIT_DTYPE_BF16=1", "-DFLASHJIT_HEAD_DIM=128", "-DFLASHJIT_IS_CAUSAL=1",
        "-DFLASHJIT_HAS_DROPOUT=1"]
    name = f"bwd_sm90a_bf16_hd128_causal_{variant}_dropout_wgmma"
    assert with_variant.name == name
    assert with_variant.defines == [f"-DFLASHJIT_OP_NAMESPACE=flashjit_{name}",
                                    *plain.defines[1:], f"-DFLASHJIT_HAS_{variant.upper()}=1"]
    assert with_variant.cuda_cflags(verbose=False)[-1] == f"-DFLASHJIT_HAS_{variant.upper()}=1"
    everything = JitSpec("fwd", "sm80", "fp16", 64, window=True, softcap=True, alibi=True,
                         sink=True)
    assert everything.defines[-4:] == ["-DFLASHJIT_HAS_WINDOW=1", "-DFLASHJIT_HAS_SOFTCAP=1",
                                       "-DFLASHJIT_HAS_ALIBI=1", "-DFLASHJIT_HAS_SINK=1"]
    assert not any("HAS_WINDOW" in d or "HAS_SINK" in d for d in plain.cuda_cflags())


def test_variant_fields_round_trip_and_key():
    from flashjit.jit.cache import CacheEntry

    plain = JitSpec("fwd", "sm80", "bf16", 64, causal=True)
    assert set(plain.fields()) == {"kernel", "arch", "dtype", "head_dim", "causal", "dropout",
                                   "family"}  # as before the variants existed
    keys = {CacheEntry.for_spec(plain).key}
    for variant in ("window", "softcap", "alibi", "sink"):
        spec = JitSpec("fwd", "sm80", "bf16", 64, causal=True, **{variant: True})
        assert spec.fields()[variant] is True and JitSpec(**spec.fields()) == spec
        assert spec != plain and hash(spec) != hash(plain)
        keys.add(CacheEntry.for_spec(spec).key)
    assert len(keys) == 5
    assert JitSpec("fwd", "sm80", "bf16", 64, window=1).window is True  # normalised to bool


def test_dropout_mask_kernel_is_arch_only():
    spec = JitSpec("dropout_mask", "9.0")
    assert spec.with_cuda and spec.family is None and spec.dtype is None
    root = spec.sources()[0].parent
    assert [p.relative_to(root).as_posix() for p in spec.sources()] == [
        "dropout_mask_binding.cpp", "common/dropout_mask.cu"]
    assert spec.defines == ["-DFLASHJIT_OP_NAMESPACE=flashjit_dropout_mask_sm90a"]
    assert spec.cuda_cflags(verbose=False)[-2:] == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-DFLASHJIT_OP_NAMESPACE=flashjit_dropout_mask_sm90a"]
    assert spec.fields() == {"kernel": "dropout_mask", "arch": "sm90a"}
    assert JitSpec(**spec.fields()) == spec
    assert spec.prebuild_command() == \
        "python -m flashjit.prebuild --kernel dropout_mask --arch sm90a"
    with pytest.raises(ValueError, match="kernel 'dropout_mask' takes only an arch: no dtype"):
        JitSpec("dropout_mask", "sm90a", "bf16")


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
        "--head-dim 64 --causal yes --dropout no --family sm80")
    assert JitSpec("fwd", "sm90a", "bf16", 128).prebuild_command().endswith(" --family sm90ws")
    assert JitSpec("fwd", "sm90a", "bf16", 128, paged=True).prebuild_command().endswith(
        " --paged yes --family sm90ws")
    assert JitSpec("bwd", "sm90a", "bf16", 128).prebuild_command().endswith(" --family sm90")
    assert JitSpec("selftest").prebuild_command() == "python -m flashjit.prebuild --kernel selftest"
    variant = JitSpec("fwd", "sm90a", "bf16", 128, causal=True, window=True, sink=True)
    assert variant.prebuild_command() == (
        "python -m flashjit.prebuild --kernel fwd --arch sm90a --dtype bf16 --head-dim 128 "
        "--causal yes --window yes --sink yes --dropout no --family sm90ws")


@pytest.mark.parametrize(
    "spec",
    [
        JitSpec("bwd", "sm80-sm90a", "fp16", 64, causal=True, family="sm80"),
        JitSpec("fwd", "sm90a", "bf16", 128, causal=True, family="sm90"),
        JitSpec("fwd", "sm90a", "bf16", 128, causal=True, family="sm90ws"),
        JitSpec("fwd", "sm90a", "fp16", 64, dropout=True, sink=True, family="sm90ws"),
        JitSpec("fwd", "sm90a", "bf16", 64, dropout=True, family="sm80"),
        JitSpec("bwd", "sm90a", "fp16", 64, causal=True, family="sm90"),
        JitSpec("bwd", "sm90a", "fp16", 64, family="sm80"),
        JitSpec("bwd", "sm90a", "bf16", 128, dropout=True, family="sm80"),
        JitSpec("fwd", "sm86", "fp16", 256, family="sm80"),
        JitSpec("fwd", "sm90a", "bf16", 128, causal=True, window=True, softcap=True,
                family="sm90"),
        JitSpec("bwd", "sm90a", "bf16", 96, alibi=True, sink=True, dropout=True),
        JitSpec("bwd", "sm80", "fp16", 64, window=True, softcap=True, alibi=True, sink=True),
        JitSpec("fwd", "sm80", "fp16", 64, softcap=True, tile="64,32,4,2"),
        JitSpec("fwd", "sm90a", "bf16", 128, causal=True, family="sm90", paged=True),
        JitSpec("fwd", "sm90a", "fp16", 96, window=True, sink=True, paged=True),
        JitSpec("dropout_mask", "sm80-sm90a"),
        JitSpec("selftest"),
    ],
    ids=lambda spec: spec.name,
)
@pytest.mark.parametrize("env_family", [None, "sm80", "sm90", "sm90ws"])
def test_prebuild_command_rebuilds_the_same_spec(spec, env_family, monkeypatch):
    """Whatever FLASHJIT_KERNEL_FAMILY says where the command runs."""
    if env_family:
        monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", env_family)
    argv = shlex.split(spec.prebuild_command())
    assert argv[:3] == ["python", "-m", "flashjit.prebuild"]
    assert specs_from_args(_parser().parse_args(argv[3:])) == [spec]


@pytest.mark.parametrize(
    "d, bucket",
    [(1, 32), (4, 32), (8, 32), (32, 32), (40, 64), (59, 64), (64, 64), (72, 96), (96, 96),
     (100, 128), (104, 128), (111, 128), (128, 128), (136, 160), (168, 192), (200, 224),
     (250, 256), (256, 256)],
)
def test_head_dim_bucket(d, bucket):
    assert head_dim_bucket(d) == bucket


@pytest.mark.parametrize("d", [0, 257, 264, 512, -8, 64.0, True])
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
    """Without a GPU visible (test_current_arch_lists_with_a_gpu_visible: with one)."""
    from flashjit.jit import arch

    monkeypatch.setattr(arch, "_gpu_arch", lambda index: None)
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


@pytest.fixture
def fake_gpu(monkeypatch):
    """Makes torch report one visible GPU of the capability passed to the returned function."""
    import torch

    from flashjit.jit import arch

    def set_capability(major: int, minor: int):
        arch._gpu_arch.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")

    yield set_capability
    arch._gpu_arch.cache_clear()


def test_runs_on():
    from flashjit.jit.arch import runs_on

    assert runs_on("sm80", "sm86") and runs_on("sm86", "sm89") and runs_on("sm90a", "sm90a")
    assert not runs_on("sm86", "sm80") and not runs_on("sm80", "sm90a")
    assert not runs_on("sm90a", "sm100") and not runs_on("sm100a", "sm103")


def test_current_arch_lists_with_a_gpu_visible(monkeypatch, fake_gpu):
    """TORCH_CUDA_ARCH_LIST (set for every extension, e.g. by containers) builds only the newest
    arch of it that the visible GPU runs, so a Hopper GPU keeps its wgmma families;
    FLASHJIT_CUDA_ARCH_LIST is taken whole; a list with nothing the GPU runs raises, naming it."""
    monkeypatch.delenv("FLASHJIT_CUDA_ARCH_LIST", raising=False)
    fake_gpu(9, 0)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "5.2 6.0 7.0 7.5 8.0 8.6 8.7 9.0+PTX")
    assert current_arch() == "sm90a"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    with pytest.raises(RuntimeError, match=r"TORCH_CUDA_ARCH_LIST='8.0' holds no arch that runs "
                                           r"on Fake GPU \(sm90a\): add sm90a to it"):
        current_arch()
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "8.0;9.0")
    assert current_arch() == "sm80-sm90a"  # asked for by name: one binary for both
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "8.6")
    with pytest.raises(RuntimeError, match="FLASHJIT_CUDA_ARCH_LIST='8.6' holds no arch"):
        current_arch()
    monkeypatch.delenv("FLASHJIT_CUDA_ARCH_LIST")
    fake_gpu(8, 9)  # sm80 and sm86 SASS run on sm89; the newer is taken
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0")
    assert current_arch() == "sm86"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert current_arch() == "sm89"
    fake_gpu(7, 5)  # too old to run flashjit: a list is for other GPUs, without a list it raises
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert current_arch() == "sm80-sm90a"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    with pytest.raises(RuntimeError, match="compute capability 7.5; flashjit needs 8.0"):
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


def test_tile_is_a_spec_option(monkeypatch):
    """A tile (JitSpec.tile) is part of the name, defines and cache fields, in the family's own
    parameters (registry row); FLASHJIT_FWD_TILE / FLASHJIT_BWD_TILE set it through the
    dispatcher; kernels without tile parameters refuse one."""
    from flashjit.jit.cache import CacheEntry

    base = JitSpec("fwd", "sm80", "bf16", 64)
    tiled = JitSpec("fwd", "sm80", "bf16", 64, tile=[128, 32, 4, 2])
    assert tiled.tile == (128, 32, 4, 2) and tiled == JitSpec("fwd", "sm80", "bf16", 64,
                                                               tile="128, 32, 4, 2")
    assert tiled.name == "fwd_sm80_bf16_hd64_t128x32x4x2"
    assert {"-DFLASHJIT_TILE=1", "-DFLASHJIT_TILE_BLOCK_M=128", "-DFLASHJIT_TILE_BLOCK_N=32",
            "-DFLASHJIT_TILE_WARPS=4", "-DFLASHJIT_TILE_MIN_BLOCKS=2"} <= set(tiled.defines)
    assert not any("TILE" in d for d in base.defines) and "tile" not in base.fields()
    assert JitSpec(**tiled.fields()) == tiled
    assert CacheEntry.for_spec(tiled).path != CacheEntry.for_spec(base).path
    assert "--tile 128,32,4,2" in tiled.prebuild_command()
    assert JitSpec("fwd", "sm90a", "bf16", 128, family="sm90", tile="128,2,1").name == \
        "fwd_sm90a_bf16_hd128_wgmma_t128x2x1"
    # the sm90ws forward (the sm90a default at d 128): its own parameters (registry row)
    ws_params = registry.row("fwd", "sm90ws").tile_params
    ws_tile = tuple(range(2, 2 + len(ws_params)))
    ws = JitSpec("fwd", "sm90a", "bf16", 128, tile=ws_tile)
    assert ws.family == "sm90ws"
    assert ws.name == "fwd_sm90a_bf16_hd128_ws_t" + "x".join(map(str, ws_tile))
    assert {f"-DFLASHJIT_TILE_{p.upper()}={t}" for p, t in zip(ws_params, ws_tile)} <= \
        set(ws.defines)
    with pytest.raises(ValueError, match=rf"{len(ws_params)} positive ints \({ws_params[0]}"):
        JitSpec("fwd", "sm90a", "bf16", 128, tile=(128,) * (len(ws_params) + 1))
    assert JitSpec("bwd", "sm90a", "bf16", 64, tile=(128,)).name == "bwd_sm90a_bf16_hd64_wgmma_t128"
    with pytest.raises(ValueError, match="kernel 'bwd' of family 'sm80' takes no tile"):
        JitSpec("bwd", "sm80", "bf16", 64, tile=(64,))
    for bad in ("128,64", "a,b,c,d", (128, 64, 0, 2)):
        with pytest.raises(ValueError, match=r"4 positive ints \(block_m, block_n, warps"):
            JitSpec("fwd", "sm80", "bf16", 64, tile=bad)
    with pytest.raises(ValueError, match="takes only arch 'cpu': no dtype, head_dim, causal, "
                                         "window, softcap, alibi, sink, dropout, family or tile"):
        JitSpec("selftest", tile=(1,))

    import torch

    from flashjit import ops
    monkeypatch.setenv("FLASHJIT_CUDA_ARCH_LIST", "8.0")
    monkeypatch.setenv("FLASHJIT_FWD_TILE", "64,32,4,2")
    q = torch.empty(1, 8, 2, 64, dtype=torch.bfloat16)
    assert ops.attention_spec("fwd", q, causal=False, dropout=False).name == \
        "fwd_sm80_bf16_hd64_t64x32x4x2"
    assert ops.attention_spec("bwd", q, causal=False, dropout=False).tile is None
    monkeypatch.setenv("FLASHJIT_FWD_TILE", "64,32")
    with pytest.raises(ValueError, match="FLASHJIT_FWD_TILE"):
        ops.attention_spec("fwd", q, causal=False, dropout=False)


def test_paged_is_a_forward_spec_flag():
    """paged (K/V through a block table: chunked prefill on a paged KV cache): the forward of
    either family only; name part _paged after the variants, before the family suffix; its own
    define, field and prebuild flag only when set, so every other spec is as it was."""
    from flashjit.jit.cache import CacheEntry

    for family, suffix in (("sm90", "_wgmma"), ("sm80", "")):
        plain = JitSpec("fwd", "sm90a", "bf16", 128, causal=True, family=family)
        paged = JitSpec("fwd", "sm90a", "bf16", 128, causal=True, family=family, paged=True)
        assert paged.name == f"fwd_sm90a_bf16_hd128_causal_paged{suffix}"
        assert paged.defines == [f"-DFLASHJIT_OP_NAMESPACE=flashjit_{paged.name}",
                                 *plain.defines[1:], "-DFLASHJIT_HAS_PAGED=1"]
        assert not any("PAGED" in d for d in plain.cuda_cflags())
        assert paged.fields() == {**plain.fields(), "paged": True}
        assert "paged" not in plain.fields() and JitSpec(**paged.fields()) == paged
        assert paged != plain and CacheEntry.for_spec(paged).key != CacheEntry.for_spec(plain).key
        assert paged.prebuild_command() == plain.prebuild_command().replace(
            " --family", " --paged yes --family")
    every = JitSpec("fwd", "sm80", "fp16", 256, causal=True, window=True, softcap=True,
                    alibi=True, sink=True, dropout=True, paged=1, tile="64,16,4,1")
    assert every.paged is True
    assert every.name == ("fwd_sm80_fp16_hd256_causal_window_softcap_alibi_sink_dropout_paged"
                          "_t64x16x4x1")
    assert every.defines.index("-DFLASHJIT_HAS_PAGED=1") == every.defines.index(
        "-DFLASHJIT_TILE=1") - 1  # after the variants' defines, before the tile's
    assert JitSpec("fwd", "sm80", "fp16", 64, paged=False).name == "fwd_sm80_fp16_hd64"
    # a family whose forward reads no block table (here sm90ws in a registry without its paged
    # flag, as before the sixteenth session) refuses paged=True
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "REGISTRY", tuple(
            dataclasses.replace(r, paged=False) if (r.kernel, r.family) == ("fwd", "sm90ws")
            else r for r in registry.REGISTRY))
        with pytest.raises(ValueError,
                           match="kernel 'fwd' of family 'sm90ws' takes no paged K/V"):
            JitSpec("fwd", "sm90a", "bf16", 128, causal=True, family="sm90ws", paged=True)
    for kernel, arch in (("bwd", "sm90a"), ("decode", "sm90a"), ("dropout_mask", "sm90a"),
                         ("selftest", None)):
        attention = kernel in ("bwd", "decode")
        kwargs = dict(dtype="bf16", head_dim=128) if attention else {}
        with pytest.raises(ValueError, match=f"kernel '{kernel}' takes no paged K/V"):
            JitSpec(kernel, arch, paged=True, **kwargs)


def test_prebuild_paged_flag():
    """--paged yes/no/both (default no) builds the paged forward specs and skips the kernels
    that take none (as --dropout skips decode)."""
    def names(*argv):
        return [s.name for s in specs_from_args(_parser().parse_args(list(argv)))]

    base = ["--arch", "sm90a", "--dtype", "bf16", "--head-dim", "96", "128", "--causal", "yes"]
    assert _parser().parse_args([]).paged == "no"
    assert names(*base, "--kernel", "fwd", "bwd", "decode") == names(
        *base, "--kernel", "fwd", "bwd", "decode", "--paged", "no")
    assert names(*base, "--kernel", "fwd", "bwd", "decode", "--paged", "both") == [
        "fwd_sm90a_bf16_hd96_causal_ws", "fwd_sm90a_bf16_hd96_causal_paged_ws",
        "fwd_sm90a_bf16_hd128_causal_ws", "fwd_sm90a_bf16_hd128_causal_paged_ws",
        "bwd_sm90a_bf16_hd96_causal_wgmma", "bwd_sm90a_bf16_hd128_causal_wgmma",
        "decode_sm90a_bf16_hd96_causal", "decode_sm90a_bf16_hd128_causal"]
    # --family sm90ws: where it serves (the paged forward too; not the backward)
    assert names(*base, "--kernel", "fwd", "bwd", "--paged", "both", "--family", "sm90ws") == [
        "fwd_sm90a_bf16_hd96_causal_ws", "fwd_sm90a_bf16_hd96_causal_paged_ws",
        "fwd_sm90a_bf16_hd128_causal_ws", "fwd_sm90a_bf16_hd128_causal_paged_ws",
        "bwd_sm90a_bf16_hd96_causal_wgmma", "bwd_sm90a_bf16_hd128_causal_wgmma"]
    assert names(*base, "--kernel", "fwd", "--paged", "both", "--family", "sm90") == [
        "fwd_sm90a_bf16_hd96_causal_ws", "fwd_sm90a_bf16_hd96_causal_paged_ws",
        "fwd_sm90a_bf16_hd128_causal_wgmma", "fwd_sm90a_bf16_hd128_causal_paged_wgmma"]
    assert names(*base, "--kernel", "fwd", "bwd", "--paged", "yes", "--family", "sm80") == [
        "fwd_sm90a_bf16_hd96_causal_paged", "fwd_sm90a_bf16_hd128_causal_paged"]
    with pytest.raises(SystemExit):
        _parser().parse_args(["--paged", "maybe"])
