"""Packaging: a small py3-none-any wheel that carries csrc/ inside and compiles nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from jithelpers import REPO

_TREE = ["pyproject.toml", "README.md", "LICENSE", "flashjit", "csrc"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", reason="pip wheel --no-build-isolation needs setuptools")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    for name in _TREE:  # build from a copy: no build/ or egg-info left in the checkout
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (REPO / name).exists():
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(work / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = (work / "dist").glob("*.whl")
    return path, src


def test_wheel_is_small_pure_python_with_csrc(wheel):
    wheel, src = wheel
    assert wheel.name.endswith("-py3-none-any.whl")
    assert wheel.stat().st_size < 1 << 20
    names = zipfile.ZipFile(wheel).namelist()
    assert "flashjit/csrc/selftest/selftest_op.cpp" in names
    csrc_files = sorted(p.relative_to(src).as_posix() for p in (src / "csrc").rglob("*")
                        if p.is_file())
    assert all("flashjit/" + p in names for p in csrc_files)
    assert "flashjit/jit/build.py" in names and "flashjit/prebuild.py" in names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyd"))]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    requires = [line.split(b":", 1)[1].strip().split(b";")[0].strip()
                for line in metadata.splitlines() if line.startswith(b"Requires-Dist:")]
    dists = {re.match(rb"[\w.-]+", r).group(): r for r in requires}
    assert {b"torch", b"ninja", b"filelock", b"platformdirs"} <= dists.keys()
    # The tested torch range (pyproject.toml), its bounds in either order.
    torch_range = dists[b"torch"].removeprefix(b"torch")
    assert sorted(torch_range.split(b",")) == [b"<2.15", b">=2.11"], torch_range


def test_wheel_carries_license_and_urls(wheel):
    wheel, _ = wheel
    names = zipfile.ZipFile(wheel).namelist()
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert b"BSD 3-Clause" in zipfile.ZipFile(wheel).read(license_file)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    lines = metadata.decode().splitlines()
    assert "License-Expression: BSD-3-Clause" in lines
    assert "License-File: LICENSE" in lines
    assert "Project-URL: Repository, https://github.com/flashjit/flashjit" in lines


def test_installed_wheel_finds_its_own_csrc(wheel, tmp_path):
    wheel, _ = wheel
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
         str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    code = "import flashjit.jit as j; print(j.csrc_dir())"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(target / "flashjit" / "csrc")
