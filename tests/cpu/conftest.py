"""Helpers for the CPU tests of flashjit's JIT machinery.

Every test gets its own cache folder, and every build compiles a snapshot of csrc taken at
session start. The selftest op is compiled once per session by the real
prebuild command (``warm_cache``); tests that need a cache hit copy that folder, tests that need
a compile start from an empty one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import jithelpers
from jithelpers import entries, run_python


@pytest.fixture(scope="session", autouse=True)
def _csrc_snapshot(tmp_path_factory) -> Path:
    from flashjit.jit import csrc_dir

    snapshot = tmp_path_factory.mktemp("snapshot") / "csrc"
    shutil.copytree(csrc_dir(), snapshot, ignore=shutil.ignore_patterns("__pycache__"))
    jithelpers.CSRC_SNAPSHOT = snapshot
    return snapshot


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path, _csrc_snapshot):
    """In-process code sees a private cache, the csrc snapshot and no other FLASHJIT_*."""
    for name in list(os.environ):
        if name.startswith("FLASHJIT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FLASHJIT_CSRC_DIR", str(_csrc_snapshot))


@pytest.fixture(scope="session")
def warm_cache(tmp_path_factory) -> Path:
    """A cache holding the selftest spec, built by ``python -m flashjit.prebuild``."""
    cache = tmp_path_factory.mktemp("warm") / "cache"
    result = run_python(["-m", "flashjit.prebuild", "--kernel", "selftest"], cache)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1/1] selftest_cpu ... " in result.stdout
    assert len(entries(cache)) == 1
    return cache


@pytest.fixture
def cache_copy(warm_cache, tmp_path) -> Path:
    """A private copy of the warm cache (logs left out)."""
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache, cache, ignore=shutil.ignore_patterns("logs"))
    return cache


@pytest.fixture
def fake_cuda(monkeypatch):
    """A FakeTensorMode making fake CUDA tensors (no GPU needed); loading a spec fails the test;
    values (fake tensors have none: cu_seqlens, cache lengths) are not read, as under CUDA-graph
    capture (_validate.capturing() is True in an active FakeTensorMode). Shared by the API tests
    that check what is refused before any compile."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flashjit import ops

    def no_compile(*args, **kwargs):
        raise AssertionError("a spec was loaded")

    monkeypatch.setattr(ops, "load_spec", no_compile)
    with FakeTensorMode():
        yield
