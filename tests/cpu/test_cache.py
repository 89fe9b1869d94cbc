"""The cache: loading the real selftest op, keys, damaged entries, and the error paths."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from jithelpers import SELFTEST_CHILD, entries, run_python

from flashjit.jit import (
    CacheDirError, JitDisabledError, JitSpec, cache_dir, csrc_dir, ensure_built, load_spec,
)
from flashjit.jit.cache import CacheEntry, digest_key, key_fields, sources_digest

SELFTEST = JitSpec("selftest")


def test_load_and_call_in_process(cache_copy):
    ops = load_spec(SELFTEST)
    x = torch.linspace(-2, 2, 17)
    expected = x * -0.75
    ops.scale_(x, -0.75)
    assert torch.equal(x, expected)
    assert load_spec(JitSpec("selftest", "cpu")) is ops  # memoised: one dict lookup
    with pytest.raises(RuntimeError, match="float32"):
        ops.scale_(torch.ones(3, dtype=torch.float64), 2.0)


def test_fresh_process_hit_does_not_build(cache_copy):
    before = {p.name: p.stat().st_mtime_ns for p in cache_copy.rglob("*")}
    result = run_python(["-c", SELFTEST_CHILD], cache_copy, FLASHJIT_DISABLE_JIT="1")
    assert result.returncode == 0, result.stderr
    assert "selftest ok" in result.stdout
    assert "compiling" not in result.stderr
    after = {p.name: p.stat().st_mtime_ns for p in cache_copy.rglob("*")}
    assert after == before  # no lock taken, nothing written


def test_manifest_contents(cache_copy):
    (entry,) = entries(cache_copy)
    manifest = json.loads((entry / "manifest.json").read_text())
    library = entry / manifest["library"]
    assert manifest["name"] == "selftest_cpu"
    assert entry.name == f"selftest_cpu-{manifest['key'][:12]}"
    assert manifest["size"] == library.stat().st_size > 0
    assert len(manifest["sha256"]) == 64 and manifest["build_seconds"] > 0
    fields = manifest["key_fields"]
    assert digest_key(fields) == manifest["key"]
    assert fields["torch"] == torch.__version__
    assert fields["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert fields["spec"]["kernel"] == "selftest"
    assert fields["sources"] == sources_digest(csrc_dir())
    assert CacheEntry.for_spec(SELFTEST).check(verify=True).ok


def test_key_covers_every_input(tmp_path, monkeypatch):
    """Each field that changes a binary changes the key (and so the folder)."""
    spec = JitSpec("fwd", "sm80", "fp16", 64)
    fields = key_fields(spec)
    assert fields["nvcc"] is None or "release" in fields["nvcc"]
    for name in ("flashjit", "sources", "torch", "torch_cuda", "cxx11_abi", "nvcc", "cxx",
                 "cflags", "cuda_cflags", "python", "spec"):
        assert name in fields
        changed = dict(fields, **{name: "something else"})
        assert digest_key(changed) != digest_key(fields), name
    for other in (JitSpec("fwd", "sm90a", "fp16", 64), JitSpec("fwd", "sm80", "bf16", 64),
                  JitSpec("fwd", "sm80", "fp16", 128), JitSpec("fwd", "sm80", "fp16", 64, True),
                  JitSpec("fwd", "sm80", "fp16", 64, dropout=True), JitSpec("bwd", "sm80", "fp16", 64)):
        assert digest_key(key_fields(other)) != digest_key(fields), other.name
    hopper = JitSpec("fwd", "sm90a", "fp16", 64)  # the kernel family is part of the key
    assert hopper.family == "sm90ws" and key_fields(hopper)["spec"]["family"] == "sm90ws"
    for family in ("sm90", "sm80"):
        assert digest_key(key_fields(JitSpec("fwd", "sm90a", "fp16", 64, family=family))) != \
            digest_key(key_fields(hopper)), family
    monkeypatch.setenv("FLASHJIT_VERBOSE", "1")  # -lineinfo changes the binary
    assert digest_key(key_fields(spec)) != digest_key(fields)
    # A one-byte change anywhere under csrc changes the sources digest.
    copy = tmp_path / "csrc"
    shutil.copytree(csrc_dir(), copy)
    assert sources_digest(copy) == fields["sources"]
    (copy / "selftest" / "selftest_op.cpp").write_text(
        (copy / "selftest" / "selftest_op.cpp").read_text() + "\n")
    assert sources_digest(copy) != fields["sources"]


# Appended to a copy of selftest_op.cpp: a second op whose answer tells which binary loaded.
MARKER_OP = """
namespace { int64_t marker() { return 4242; } }
TORCH_LIBRARY_FRAGMENT(flashjit_selftest_cpu, m) { m.def("marker() -> int", &marker); }
"""


def test_changed_source_forces_a_real_rebuild(cache_copy, tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(csrc_dir(), csrc)
    source = csrc / "selftest" / "selftest_op.cpp"
    source.write_text(source.read_text() + MARKER_OP)
    child = SELFTEST_CHILD + "print('marker', ops.marker())\n"
    result = run_python(["-c", child], cache_copy, FLASHJIT_CSRC_DIR=str(csrc))
    assert result.returncode == 0, result.stderr
    assert "compiling selftest_cpu" in result.stderr
    assert "marker 4242" in result.stdout  # the new binary, not the stale one
    assert len(entries(cache_copy)) == 2
    # The original sources still load the original entry, without a build.
    result = run_python(["-c", SELFTEST_CHILD], cache_copy, FLASHJIT_DISABLE_JIT="1")
    assert result.returncode == 0, result.stderr


def _truncate_library(entry):
    library = next(entry.glob("*.so"))
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])


def _garbage_manifest(entry):
    (entry / "manifest.json").write_bytes(b"\x00{not json")


def _missing_library(entry):
    next(entry.glob("*.so")).unlink()


@pytest.mark.parametrize("damage", [_truncate_library, _garbage_manifest, _missing_library])
def test_damaged_entry_is_reported_removed_and_rebuilt(cache_copy, damage):
    (entry,) = entries(cache_copy)
    damage(entry)
    assert CacheEntry.for_spec(SELFTEST).check().status == "damaged"
    result = run_python(["-c", SELFTEST_CHILD], cache_copy)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("is damaged") == 1, result.stderr
    assert "compiling selftest_cpu" in result.stderr
    assert CacheEntry.for_spec(SELFTEST).check(verify=True).ok
    assert [p.name for p in cache_copy.glob(".tmp-*")] == []


def test_disable_jit_names_the_spec_and_the_prebuild_command(monkeypatch):
    monkeypatch.setenv("FLASHJIT_DISABLE_JIT", "1")
    spec = JitSpec("fwd", "sm90a", "bf16", 128, causal=True)
    with pytest.raises(JitDisabledError) as err:
        ensure_built(spec)
    message = str(err.value)
    assert "fwd_sm90a_bf16_hd128_causal" in message and "FLASHJIT_DISABLE_JIT" in message
    assert spec.prebuild_command() in message
    assert not cache_dir().exists()  # nothing was written


def test_unwritable_cache_dir_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # a path under a regular file cannot be made, even as root
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(CacheDirError, match="FLASHJIT_CACHE_DIR"):
        ensure_built(SELFTEST)
