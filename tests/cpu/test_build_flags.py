"""The C++ standard comes from torch: flashjit's flags never name a ``-std`` of their own.

torch.utils.cpp_extension adds the standard its headers need (C++20 from torch 2.13 on); a
``-std`` of ours placed after it overrides it, and torch 2.14's headers then fail to compile.
The builds run in a child process with FLASHJIT_VERBOSE=1, so ninja prints every command.
"""

from __future__ import annotations

import re

import pytest
import torch

from jithelpers import run_python

from flashjit.jit import JitSpec
from flashjit.jit import env
from flashjit.jit.env import nvcc_path

# The -std value of each compile command: -std=c++20, --std=c++20 or --std c++20.
STD_FLAG = re.compile(r"(?<!\S)--?std[= ](\S+)")


def _is_std(flag: str) -> bool:
    return flag.lstrip("-").startswith("std")


def build_commands(spec: JitSpec, cache) -> str:
    """The compile commands ninja ran to build ``spec`` into the empty cache ``cache``."""
    child = f"from flashjit.jit import JitSpec, ensure_built\nensure_built({spec!r})\n"
    result = run_python(["-c", child], cache, timeout=1200, FLASHJIT_VERBOSE="1")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def assert_one_standard(commands: str, sources: list[str]) -> None:
    """Each source has a compile command and every ``-std`` in them names one standard, the one
    torch adds (a ``-std`` of ours would differ from the host command's, or replace torch's in
    the nvcc command, which gets torch's only when our flags name none)."""
    lines = [line for line in commands.splitlines() if any(s in line for s in sources)]
    for source in sources:
        assert any(source in line for line in lines), f"no compile command for {source}"
    standards = {value for line in lines for value in STD_FLAG.findall(line)}
    assert len(standards) == 1, f"-std values {sorted(standards)} in:\n" + "\n".join(lines)


def test_spec_flags_name_no_standard():
    for spec in (JitSpec("selftest"), JitSpec("fwd", "sm80-sm90a", "bf16", 128, causal=True),
                 JitSpec("bwd", "sm90a", "fp16", 64, dropout=True)):
        flags = spec.cflags() + spec.cuda_cflags(verbose=True)
        assert not [f for f in flags if _is_std(f)], spec.name


def test_selftest_build_uses_torchs_standard(tmp_path):
    commands = build_commands(JitSpec("selftest"), tmp_path / "cache")
    assert_one_standard(commands, ["selftest_op.cpp"])


@pytest.mark.skipif(torch.version.cuda is None,
                    reason=f"torch {torch.__version__} is a CPU build: no CUDA spec builds here")
@pytest.mark.skipif(nvcc_path() is None, reason="nvcc not found")
def test_cuda_build_uses_torchs_standard(tmp_path):
    """A real CUDA spec (host binding and nvcc kernel) built against this torch's headers."""
    commands = build_commands(JitSpec("fwd", "sm80", "fp16", 32), tmp_path / "cache")
    assert_one_standard(commands, ["fwd_binding.cpp", "sm80/fwd.cu"])


def test_compile_only_says_where_it_looked_for_nvcc(tmp_path, monkeypatch):
    """A CUDA_HOME (or CUDA_PATH) without bin/nvcc is named in the error, not "set CUDA_HOME"."""
    from flashjit.jit import BuildError, compile_only

    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-toolkit"))
    assert env.nvcc_path() is None
    with pytest.raises(BuildError, match=f"CUDA_HOME={re.escape(str(tmp_path))}/no-toolkit has no "
                                         "bin/nvcc"):
        compile_only(JitSpec("fwd", "sm80", "fp16", 64), tmp_path / "obj")
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "other"))
    assert env.nvcc_missing().startswith(f"nvcc not found: CUDA_PATH={tmp_path / 'other'}")
