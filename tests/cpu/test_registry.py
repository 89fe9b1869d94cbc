"""The kernel registry (flashjit/jit/registry.py): the one table of kernel families, read by
JitSpec, prebuild and `python -m flashjit info`."""

import dataclasses

import pytest

from flashjit.jit import registry, spec
from flashjit.jit.spec import JitSpec


def test_rows_are_unique_and_every_kernel_has_a_fallback():
    keys = [(r.kernel, r.family) for r in registry.REGISTRY]
    assert len(keys) == len(set(keys))
    for kernel in registry.ATTENTION_KERNELS:
        last = registry.rows(kernel)[-1]  # the least preferred row serves everything
        assert last.archs is None and last.head_dims is None
        assert last.suffix == ""


def test_each_family_has_its_own_sources():
    """No family shares a translation unit with another (the sources pick the family)."""
    for r in registry.REGISTRY:
        assert r.sources == (f"{r.kernel}_binding.cpp", f"{r.family}/{r.kernel}.cu")


@pytest.mark.parametrize("arch, bucket, fwd, bwd", [
    ("sm90a", 64, "sm90ws", "sm90"), ("sm90a", 128, "sm90ws", "sm90"),  # no sm90ws backward
    ("sm90a", 96, "sm90ws", "sm90"), ("sm90a", 160, "sm90ws", "sm90"),  # padded to 128, 192
    ("sm90a", 32, "sm80", "sm80"),  # a padded 64 would double the work
    ("sm90a", 192, "sm90ws", "sm90"), ("sm90a", 256, "sm90ws", "sm90"),  # by column halves
    ("sm90a", 224, "sm90ws", "sm90"),  # padded to 256
    ("sm80", 128, "sm80", "sm80"),
    ("sm80-sm90a", 128, "sm80", "sm80"),  # a row must serve every arch of a multi-arch binary
    ("sm100", 128, "sm80", "sm80"),
])
def test_default_family_is_the_first_row_that_serves(arch, bucket, fwd, bwd):
    assert registry.default_family("fwd", arch, bucket) == fwd
    assert registry.default_family("fwd", arch, bucket, paged=False) == fwd
    assert registry.default_family("bwd", arch, bucket) == bwd


@pytest.mark.parametrize("bucket", [64, 96, 128, 160, 192, 224, 256])
def test_the_paged_forward_is_sm90ws_on_sm90a(bucket):
    """sm90ws reads K/V through a block table (TMA boxes inside pages): on sm90a it serves the
    paged forward wherever it serves the plain one; bucket 32 and other archs stay sm80."""
    assert registry.row("fwd", "sm90ws").paged and registry.row("fwd", "sm90").paged
    assert registry.default_family("fwd", "sm90a", bucket, paged=True) == "sm90ws"
    assert registry.default_family("fwd", "sm90a", bucket, True) == "sm90ws"  # positional too
    assert registry.default_family("fwd", "sm90a", 32, paged=True) == "sm80"
    assert registry.default_family("fwd", "sm80", bucket, paged=True) == "sm80"
    assert registry.preferred_family("fwd", "sm80", bucket, "sm90ws", paged=True) == "sm80"


@pytest.mark.parametrize("bucket", [64, 128])
def test_paged_forward_skips_the_rows_that_read_no_block_table(bucket, monkeypatch):
    """With a registry whose sm90ws row reads no block table (as before the sixteenth session),
    a paged forward takes the first row with paged=True: sm90 (wgmma) at 64/128, sm80 elsewhere;
    the backward stays sm90."""
    monkeypatch.setattr(registry, "REGISTRY", tuple(
        dataclasses.replace(r, paged=False) if (r.kernel, r.family) == ("fwd", "sm90ws") else r
        for r in registry.REGISTRY))
    assert registry.default_family("fwd", "sm90a", bucket, paged=False) == "sm90ws"
    assert registry.default_family("fwd", "sm90a", bucket, paged=True) == "sm90"
    assert registry.default_family("bwd", "sm90a", bucket) == "sm90"
    # a preference for sm90ws applies where it serves, the paged default elsewhere
    assert registry.preferred_family("fwd", "sm90a", bucket, "sm90ws") == "sm90ws"
    assert registry.preferred_family("fwd", "sm90a", bucket, "sm90ws", paged=True) == "sm90"
    assert registry.preferred_family("fwd", "sm90a", bucket, "sm90", paged=True) == "sm90"
    assert registry.preferred_family("fwd", "sm90a", bucket, "sm80", paged=True) == "sm80"
    assert registry.preferred_family("bwd", "sm90a", bucket, "sm90ws") == "sm90"  # no row
    # elsewhere the paged forward is sm80's, as the plain one
    assert registry.default_family("fwd", "sm90a", 96, paged=True) == "sm80"


def test_paged_default_needs_a_paged_row(monkeypatch):
    """Without a row that reads a block table, a paged forward has no family (and says so)."""
    monkeypatch.setattr(registry, "REGISTRY", tuple(
        dataclasses.replace(r, paged=False) if r.kernel == "fwd" else r
        for r in registry.REGISTRY))
    assert registry.default_family("fwd", "sm90a", 128) == "sm90ws"
    with pytest.raises(ValueError, match="on arch 'sm90a' at head-dim bucket 128 with paged K/V"):
        registry.default_family("fwd", "sm90a", 128, paged=True)


def test_describe_and_lookup():
    assert registry.describe(registry.row("fwd", "sm90")) == "wgmma, on sm90a at head dims 64, 128"
    assert registry.describe(registry.row("fwd", "sm90ws")) == \
        "wgmma+tma, on sm90a at head dims 64, 96, 128, 160, 192, 224, 256"
    with pytest.raises(KeyError, match="no kernel 'bwd' in family 'sm90ws'"):
        registry.row("bwd", "sm90ws")
    assert registry.describe(registry.row("bwd", "sm80")) == "mma.sync, everywhere"
    with pytest.raises(KeyError, match="no kernel 'fwd' in family 'sm70'"):
        registry.row("fwd", "sm70")


def test_a_new_family_is_one_row(monkeypatch):
    """A family added to the registry alone reaches spec names, sources and defaults."""
    new = registry.FamilyRow("fwd", "sm100", "tcgen05", ("fwd_binding.cpp", "sm100/fwd.cu"),
                             archs=("sm100",), head_dims=(128,), suffix="_tcgen05")
    monkeypatch.setattr(registry, "REGISTRY", (new,) + registry.REGISTRY)
    families = registry.KERNEL_FAMILIES + ("sm100",)
    monkeypatch.setattr(registry, "KERNEL_FAMILIES", families)
    monkeypatch.setattr(spec, "KERNEL_FAMILIES", families)
    s = JitSpec("fwd", "sm100", "bf16", 128)
    assert s.family == "sm100" and s.name == "fwd_sm100_bf16_hd128_tcgen05"
    assert [p.name for p in s.sources()] == ["fwd_binding.cpp", "fwd.cu"]
    assert s.sources()[1].parent.name == "sm100"
    assert JitSpec("fwd", "sm100", "bf16", 128, sink=True).name == \
        "fwd_sm100_bf16_hd128_sink_tcgen05"  # every family serves every variant
    assert JitSpec("fwd", "sm100", "bf16", 64).family == "sm80"  # elsewhere the fallback
    with pytest.raises(ValueError, match="does not serve kernel 'fwd' on arch 'sm90a'"):
        JitSpec("fwd", "sm90a", "bf16", 128, family="sm100")


def test_preferred_family_falls_back_to_the_default():
    assert registry.preferred_family("fwd", "sm90a", 128, "sm80") == "sm80"  # serves everywhere
    assert registry.preferred_family("fwd", "sm90a", 128, "sm90") == "sm90"
    assert registry.preferred_family("fwd", "sm90a", 32, "sm90ws") == "sm80"  # no ws d 32
    assert registry.preferred_family("bwd", "sm90a", 32, "sm90") == "sm80"  # no wgmma d 32
    assert registry.preferred_family("fwd", "sm80", 64, "sm90") == "sm80"
