"""Command lines: python -m flashjit.prebuild, python -m flashjit info / cache list|clear."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch
from jithelpers import REPO, child_env, entries, run_python

import flashjit
from flashjit.jit import csrc_dir, registry
from flashjit.jit.env import nvcc_path
from flashjit.prebuild import _parser, default_jobs, failure_summary


def test_prebuild_list_is_the_deduplicated_cross_product(tmp_path):
    result = run_python(
        ["-m", "flashjit.prebuild", "--kernel", "fwd", "bwd", "--arch", "8.0", "sm90a",
         "--dtype", "fp16", "bf16", "--head-dim", "64", "56", "128", "--causal", "both",
         "--dropout", "no", "--list"],
        tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr
    names = result.stdout.split()
    # 2 kernels x 2 archs x 2 dtypes x 2 buckets (56 -> 64) x 2 causal
    assert len(names) == len(set(names)) == 32
    assert "fwd_sm80_fp16_hd64" in names and "bwd_sm90a_bf16_hd128_causal_wgmma" in names
    assert "bwd_sm80_bf16_hd128_causal" in names
    assert not (tmp_path / "cache").exists()  # --list touches nothing


def test_prebuild_list_multi_arch_and_selftest(tmp_path):
    result = run_python(
        ["-m", "flashjit.prebuild", "--kernel", "fwd", "selftest", "--arch", "8.0;9.0",
         "--dtype", "bf16", "--head-dim", "128", "--causal", "yes", "--dropout", "both", "--list"],
        tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "fwd_sm80-sm90a_bf16_hd128_causal", "fwd_sm80-sm90a_bf16_hd128_causal_dropout", "selftest_cpu"]


@pytest.mark.parametrize("flag,why", [("--dropout", "decode has no dropout"),
                                      ("--paged", "decode takes no block table")])
def test_prebuild_empty_selection_says_why(tmp_path, flag, why):
    result = run_python(["-m", "flashjit.prebuild", "--arch", "sm90a", "--kernel", "decode",
                         flag, "yes", "--list"], tmp_path / "cache")
    assert result.returncode == 0 and result.stdout == ""
    assert f"note: nothing to build or list ({flag} yes: {why}" in result.stderr


def test_prebuild_variant_flags_are_a_cross_product():
    """--window/--softcap/--alibi/--sink: yes, no or both, default no (the default list is the
    one it was before the variants)."""
    from flashjit.prebuild import specs_from_args

    def names(*argv):
        return [s.name for s in specs_from_args(_parser().parse_args(list(argv)))]

    base = ["--kernel", "fwd", "--arch", "sm80", "--dtype", "bf16", "--head-dim", "64",
            "--causal", "no"]
    assert names(*base) == ["fwd_sm80_bf16_hd64"]
    assert names(*base, "--window", "both", "--sink", "yes") == [
        "fwd_sm80_bf16_hd64_sink", "fwd_sm80_bf16_hd64_window_sink"]
    assert names(*base, "--softcap", "yes", "--alibi", "yes", "--dropout", "yes") == [
        "fwd_sm80_bf16_hd64_softcap_alibi_dropout"]
    every = names(*base, "--causal", "both", "--window", "both", "--softcap", "both", "--alibi",
                  "both", "--sink", "both", "--dropout", "both")
    assert len(every) == len(set(every)) == 64
    assert "fwd_sm80_bf16_hd64_causal_window_softcap_alibi_sink_dropout" in every
    args = _parser().parse_args(["--arch", "sm90a"])
    assert (args.window, args.softcap, args.alibi, args.sink) == ("no",) * 4
    # 8 head dims x 2 dtypes x causal both, per kernel (every attention kernel by default)
    assert [s.kernel for s in specs_from_args(args)] == ["fwd"] * 32 + ["bwd"] * 32 + ["decode"] * 32
    # --dropout yes/both: decoding has no dropout, so its dropout specs are left out
    dropout = _parser().parse_args(["--arch", "sm90a", "--dropout", "both"])
    assert [s.kernel for s in specs_from_args(dropout)].count("decode") == 32
    for flag in ("--window", "--softcap", "--alibi", "--sink"):
        with pytest.raises(SystemExit):
            _parser().parse_args([flag, "maybe"])


def test_prebuild_paged_specs_have_no_dropout(tmp_path):
    """A block table is forward-only inference (dropout with it raises NotImplementedError), so
    --paged with --dropout lists no spec no call could use."""
    from flashjit.prebuild import specs_from_args

    args = _parser().parse_args(["--kernel", "fwd", "--arch", "sm90a", "--dtype", "bf16",
                                 "--head-dim", "64", "--causal", "no", "--paged", "both",
                                 "--dropout", "both"])
    assert [s.name for s in specs_from_args(args)] == [
        "fwd_sm90a_bf16_hd64_ws", "fwd_sm90a_bf16_hd64_paged_ws", "fwd_sm90a_bf16_hd64_dropout_ws"]
    result = run_python(["-m", "flashjit.prebuild", "--arch", "sm90a", "--kernel", "fwd",
                         "--paged", "yes", "--dropout", "yes", "--list"], tmp_path / "cache")
    assert result.returncode == 0 and result.stdout == ""
    assert "--paged yes with --dropout yes: paged K/V is forward-only inference" in result.stderr


def test_prebuild_takes_the_tile_variables_as_calls_do(monkeypatch):
    """FLASHJIT_FWD_TILE / FLASHJIT_BWD_TILE name the same specs in prebuild as in a call
    (ops.attention_spec); --tile wins; a paged forward of the same family (sm90ws) takes it too."""
    from flashjit.prebuild import specs_from_args

    def names(*argv):
        return [s.name for s in specs_from_args(_parser().parse_args(
            ["--arch", "sm90a", "--dtype", "bf16", "--head-dim", "64", "--causal", "no", *argv]))]

    monkeypatch.setenv("FLASHJIT_FWD_TILE", "128,3,2")
    assert names("--kernel", "fwd", "bwd", "--paged", "both") == [
        "fwd_sm90a_bf16_hd64_ws_t128x3x2", "fwd_sm90a_bf16_hd64_paged_ws_t128x3x2",
        "bwd_sm90a_bf16_hd64_wgmma"]
    assert names("--kernel", "fwd", "--tile", "64,2,2") == ["fwd_sm90a_bf16_hd64_ws_t64x2x2"]
    monkeypatch.setenv("FLASHJIT_FWD_TILE", "1,2")
    with pytest.raises(ValueError, match="FLASHJIT_FWD_TILE"):
        names("--kernel", "fwd")


def test_prebuild_dropout_mask_kernel():
    """The test-only mask kernel: one spec per arch, only when asked for."""
    from flashjit.prebuild import specs_from_args

    args = _parser().parse_args(["--kernel", "dropout_mask", "selftest", "--arch", "8.0",
                                 "8.0;9.0", "--window", "both"])
    assert [s.name for s in specs_from_args(args)] == [
        "dropout_mask_sm80", "dropout_mask_sm80-sm90a", "selftest_cpu"]
    args = _parser().parse_args(["--arch", "9.0", "--kernel", "fwd", "dropout_mask",
                                 "--head-dim", "64", "--dtype", "fp16", "--causal", "no"])
    assert [s.name for s in specs_from_args(args)] == ["fwd_sm90a_fp16_hd64_ws",
                                                       "dropout_mask_sm90a"]


def test_prebuild_list_kernel_families(tmp_path):
    """On sm90a at head dims 64 and 96 the forward is the warp-specialised family (sm90ws), the
    backward the wgmma family (sm90, at 96 its 128-column kernels), with and without dropout, unless
    told otherwise; --family sm90 (or FLASHJIT_KERNEL_FAMILY=sm90) picks the wgmma forward where
    it serves (64; at 96 the default stays)."""
    args = ["-m", "flashjit.prebuild", "--kernel", "fwd", "bwd", "--arch", "sm90a",
            "--dtype", "bf16", "--head-dim", "64", "96", "--causal", "no", "--dropout", "both",
            "--list"]
    result = run_python(args, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    default_names = [
        "fwd_sm90a_bf16_hd64_ws", "fwd_sm90a_bf16_hd64_dropout_ws", "fwd_sm90a_bf16_hd96_ws",
        "fwd_sm90a_bf16_hd96_dropout_ws", "bwd_sm90a_bf16_hd64_wgmma",
        "bwd_sm90a_bf16_hd64_dropout_wgmma", "bwd_sm90a_bf16_hd96_wgmma",
        "bwd_sm90a_bf16_hd96_dropout_wgmma"]
    assert result.stdout.split() == default_names
    sm90_names = [
        "fwd_sm90a_bf16_hd64_wgmma", "fwd_sm90a_bf16_hd64_dropout_wgmma", "fwd_sm90a_bf16_hd96_ws",
        "fwd_sm90a_bf16_hd96_dropout_ws", "bwd_sm90a_bf16_hd64_wgmma",
        "bwd_sm90a_bf16_hd64_dropout_wgmma", "bwd_sm90a_bf16_hd96_wgmma",
        "bwd_sm90a_bf16_hd96_dropout_wgmma"]
    for extra_args, env in (([], {"FLASHJIT_KERNEL_FAMILY": "sm90"}), (["--family", "sm90"], {})):
        result = run_python(args + extra_args, tmp_path / "cache", **env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == sm90_names
    sm80_names = [
        "fwd_sm90a_bf16_hd64", "fwd_sm90a_bf16_hd64_dropout", "fwd_sm90a_bf16_hd96",
        "fwd_sm90a_bf16_hd96_dropout", "bwd_sm90a_bf16_hd64", "bwd_sm90a_bf16_hd64_dropout",
        "bwd_sm90a_bf16_hd96", "bwd_sm90a_bf16_hd96_dropout"]
    for extra_args, env in (([], {"FLASHJIT_KERNEL_FAMILY": "sm80"}), (["--family", "sm80"], {})):
        result = run_python(args + extra_args, tmp_path / "cache", **env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == sm80_names
    # --family wins over the environment, as in the commands spec.prebuild_command() writes
    result = run_python(args + ["--family", "sm90"], tmp_path / "cache",
                        FLASHJIT_KERNEL_FAMILY="sm80")
    assert result.returncode == 0 and result.stdout.split() == sm90_names
    result = run_python(args + ["--family", "sm90ws"], tmp_path / "cache",
                        FLASHJIT_KERNEL_FAMILY="sm90")  # no sm90ws backward: sm90's
    assert result.returncode == 0 and result.stdout.split() == default_names
    result = run_python(args, tmp_path / "cache", FLASHJIT_KERNEL_FAMILY="mma")
    assert result.returncode == 2 and "FLASHJIT_KERNEL_FAMILY='mma'" in result.stderr


def test_prebuild_without_arch_or_gpu_says_what_to_set(tmp_path):
    import torch

    result = run_python(["-m", "flashjit.prebuild", "--kernel", "fwd", "--list"], tmp_path / "cache",
                        TORCH_CUDA_ARCH_LIST="")
    if torch.cuda.is_available():
        assert result.returncode == 0
    else:
        assert result.returncode == 2
        assert "FLASHJIT_CUDA_ARCH_LIST" in result.stderr
        assert "no CUDA GPU is visible; pass --arch (e.g. --arch 9.0" in result.stderr
        assert "flashjit:" not in result.stderr
    result = run_python(["-m", "flashjit.prebuild", "--kernel", "fwd", "--list"], tmp_path / "cache",
                        FLASHJIT_CUDA_ARCH_LIST="8.6", TORCH_CUDA_ARCH_LIST="")
    assert result.returncode == 0 and result.stdout.split()[0] == "fwd_sm86_fp16_hd32"
    result = run_python(["-m", "flashjit.prebuild", "--kernel", "fwd", "--list"], tmp_path / "cache",
                        FLASHJIT_CUDA_ARCH_LIST="7.0")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("error: cannot use FLASHJIT_CUDA_ARCH_LIST")


def test_prebuild_help_is_plain_words_with_examples(tmp_path):
    result = run_python(["-m", "flashjit.prebuild", "--help"], tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "['" not in result.stdout and "()" not in result.stdout  # no Python reprs
    examples = result.stdout.split("\nexamples:\n", 1)[1]
    assert "python -m flashjit.prebuild --kernel selftest\n" in examples
    for action in _parser()._actions:
        if action.help not in (None, argparse.SUPPRESS) and action.dest != "help":
            assert "(default: " in action.help, action.option_strings


def test_prebuild_cuda_specs_need_cuda_torch_and_nvcc(tmp_path):
    """A missing CUDA toolchain is reported once, before any build; no worker, no log folder."""
    cache = tmp_path / "cache"
    args = ["-m", "flashjit.prebuild", "--kernel", "fwd", "selftest", "--arch", "9.0",
            "--dtype", "bf16", "--head-dim", "64", "--causal", "no"]
    result = run_python(args, cache, CUDA_HOME=str(tmp_path / "no-toolkit"))
    assert result.returncode == 1
    assert "error: cannot build 1 CUDA spec here" in result.stderr
    assert "nvcc (set CUDA_HOME to a CUDA toolkit)" in result.stderr
    if torch.version.cuda is None:
        assert f"a CUDA build of torch (torch {torch.__version__} has no CUDA support)" in \
            result.stderr
    assert "flashjit prebuild:" not in result.stdout  # nothing was started
    assert not cache.exists() or (entries(cache) == [] and not (cache / "logs").exists())
    # --list and --dry-run need neither
    for flag in ("--list", "--dry-run"):
        result = run_python(args + [flag], cache, CUDA_HOME=str(tmp_path / "no-toolkit"))
        assert result.returncode == 0, result.stderr
        assert "fwd_sm90a_bf16_hd64_ws" in result.stdout


@pytest.mark.skipif(nvcc_path() is None, reason="needs nvcc (its --list-gpu-code)")
def test_prebuild_refuses_an_arch_nvcc_cannot_build(tmp_path):
    """An --arch that parses but that this nvcc has no target for (there is no sm91) is refused
    before any build, naming the arch and the ones nvcc builds; exit status 2 (bad argument)."""
    from flashjit.jit.env import nvcc_gpu_codes, nvcc_unsupported_archs

    assert "sm_80" in nvcc_gpu_codes() and "sm_90" in nvcc_gpu_codes()
    assert nvcc_unsupported_archs(["sm80-sm90a", "sm86"]) == []
    assert nvcc_unsupported_archs(["sm80-sm91", "sm91"]) == ["sm91"]
    cache = tmp_path / "cache"
    result = run_python(["-m", "flashjit.prebuild", "--kernel", "fwd", "--arch", "9.1", "8.0",
                         "--dtype", "bf16", "--head-dim", "64", "--causal", "no"], cache)
    assert result.returncode == 2, result.stderr
    assert "error: --arch: nvcc" in result.stderr and "cannot build for sm91;" in result.stderr
    assert "sm_90" in result.stderr
    assert "flashjit prebuild:" not in result.stdout  # nothing was started
    assert not cache.exists() or not (cache / "logs").exists()


def test_prebuild_dry_run_reports_cache_state(cache_copy):
    result = run_python(
        ["-m", "flashjit.prebuild", "--kernel", "selftest", "fwd", "--arch", "8.0", "--dtype",
         "bf16", "--head-dim", "64", "--causal", "no", "--dry-run"], cache_copy)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("selftest_cpu") and "cached" in line for line in lines)
    assert any(line.startswith("fwd_sm80_bf16_hd64") and "missing" in line for line in lines)
    assert "2 specs, 1 cached, 1 to build" in result.stdout
    assert len(entries(cache_copy)) == 1


def test_prebuild_warm_run_reports_cached(cache_copy):
    result = run_python(["-m", "flashjit.prebuild", "--kernel", "selftest"], cache_copy)
    assert result.returncode == 0, result.stderr
    assert "[1/1] selftest_cpu ... cached" in result.stdout
    assert "flashjit prebuild: 1 spec, 1 cached, 0 to build with " in result.stdout
    assert "built 0, cached 1, failed 0" in result.stdout
    assert "logs in" not in result.stdout
    assert not (cache_copy / "logs").exists()  # nothing built: no empty prebuild-* folder


def test_prebuild_failure_exits_nonzero_with_the_log(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(csrc_dir(), csrc)
    source = csrc / "selftest" / "selftest_op.cpp"
    source.write_text('#include "deliberately_missing_header.h"\n' + source.read_text())
    cache = tmp_path / "cache"
    result = run_python(["-m", "flashjit.prebuild", "--kernel", "selftest", "--jobs", "1"], cache,
                        FLASHJIT_CSRC_DIR=str(csrc))
    assert result.returncode == 1
    assert "flashjit prebuild: 1 spec, 0 cached, 1 to build with 1 job;" in result.stdout
    assert "[1/1] selftest_cpu ... FAILED" in result.stdout
    assert "built 0, cached 0, failed 1" in result.stdout
    log = next((cache / "logs").glob("prebuild-*/selftest_cpu.log"))
    assert str(log) in result.stdout and str(log) in result.stderr
    text = log.read_text()
    assert "deliberately_missing_header.h" in text and "BuildError" in text
    assert entries(cache) == [] and list(cache.glob(".tmp-*")) == []
    # the compiler's own error line reaches the console, with the log that holds it
    (compiler_log,) = (cache / "logs").glob("selftest_cpu-*.log")
    error = f"{source}:1:10: fatal error: deliberately_missing_header.h: No such file or directory"
    assert "[1/1] selftest_cpu ... FAILED" in result.stdout and f"    {error}\n" in result.stdout
    assert f"FAILED selftest_cpu: {error}\n  compiler output: {compiler_log}\n" in result.stderr


# nvcc 13.0's output for an undefined name, as torch's cpp_extension passes it on
NVCC_OUTPUT = """\
Error building extension 'flashjit_fwd_sm90a_bf16_hd64_1a2b': [1/3] nvcc -Werror=all-warnings -c k.cu
FAILED: k.cuda.o
k.cu(1): error: identifier "undefined_name" is undefined
  __attribute__((global)) void k(float* x) { x[0] = undefined_name; }
                                                    ^

1 error detected in the compilation of "k.cu".
ninja: build stopped: subcommand failed.
"""


def test_failure_summary_reads_the_compiler_log_the_worker_log_names(tmp_path):
    compiler_log = tmp_path / "fwd_sm90a_bf16_hd64-20260101-000000.log"
    compiler_log.write_text("fwd_sm90a_bf16_hd64\nkey fields: {}\n\n" + NVCC_OUTPUT)
    worker_log = tmp_path / "worker.log"
    worker_log.write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "flashjit.jit.build.BuildError: flashjit: compiling fwd_sm90a_bf16_hd64 failed; the "
        f"compiler output is in {compiler_log}. To report it, rerun with FLASHJIT_VERBOSE=1\n")
    assert failure_summary(worker_log) == (
        'k.cu(1): error: identifier "undefined_name" is undefined', compiler_log)
    compiler_log.unlink()  # gone: the worker log is all there is
    assert failure_summary(worker_log) == (
        "flashjit.jit.build.BuildError: flashjit: compiling fwd_sm90a_bf16_hd64 failed; the "
        f"compiler output is in {compiler_log}. To report it, rerun with FLASHJIT_VERBOSE=1",
        worker_log)


def test_failure_summary_without_compiler_output(tmp_path):
    worker_log = tmp_path / "worker.log"
    worker_log.write_text(
        "Traceback (most recent call last):\n"
        "flashjit.jit.build.BuildError: flashjit: nvcc not found (set CUDA_HOME) to build x\n"
        "/site-packages/torch/_subclasses/functional_tensor.py:368: UserWarning: no NumPy\n")
    assert failure_summary(worker_log) == (
        "flashjit.jit.build.BuildError: flashjit: nvcc not found (set CUDA_HOME) to build x",
        worker_log)
    worker_log.write_text("Killed\n")
    assert failure_summary(worker_log) == (None, worker_log)
    assert failure_summary(tmp_path / "missing.log") == (None, tmp_path / "missing.log")


def test_default_jobs_is_positive():
    assert default_jobs() >= 1


def test_info(cache_copy):
    result = run_python(["-m", "flashjit", "info"], cache_copy, TORCH_CUDA_ARCH_LIST="")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0].split() == ["flashjit", flashjit.__version__]
    for label in ("torch", "nvcc", "gpu", "arch", "csrc", "cache"):
        assert any(line.startswith(label) for line in out.splitlines()), label
    assert str(cache_copy) in out and "1 entry" in out
    rows = _info_rows(cache_copy, FLASHJIT_CUDA_ARCH_LIST="9.0")
    # the family with the most buckets is "otherwise"
    assert rows["forward family"] == "sm80 (mma.sync) at head dims 32; sm90ws (wgmma+tma) otherwise"
    # sm90ws reads a block table too: no separate paged row
    assert "paged forward family" not in rows
    assert rows["backward family"] == \
        "sm80 (mma.sync) at head dims 32; sm90 (wgmma) otherwise"
    rows = _info_rows(cache_copy, FLASHJIT_CUDA_ARCH_LIST="9.0", FLASHJIT_KERNEL_FAMILY="sm90")
    assert rows["forward family"] == ("sm80 (mma.sync) at head dims 32; sm90 (wgmma) at head dims "
                                      "64, 128; sm90ws (wgmma+tma) otherwise")
    assert "paged forward family" not in rows  # sm90 reads a block table at 64/128 too
    assert rows["backward family"] == \
        "sm80 (mma.sync) at head dims 32; sm90 (wgmma) otherwise"
    rows = _info_rows(cache_copy, FLASHJIT_CUDA_ARCH_LIST="9.0", FLASHJIT_KERNEL_FAMILY="sm80")
    assert rows["forward family"] == rows["backward family"] == "sm80 (mma.sync)"
    assert "paged forward family" not in rows  # the same as the forward's: not repeated


def _info_lines(cache, **env) -> list[tuple[str, str]]:
    """``python -m flashjit info``'s rows as (name, value), in order (names repeat: warning)."""
    result = run_python(["-m", "flashjit", "info"], cache, **env)
    assert result.returncode == 0, result.stderr
    return [(name, value.strip()) for name, value in
            (line.split("  ", 1) for line in result.stdout.splitlines() if "  " in line)]


def test_info_warns_about_a_bad_kernel_family(tmp_path):
    """FLASHJIT_KERNEL_FAMILY that names no family: one warning saying why every kernel call will
    fail, no family rows that would contradict it."""
    lines = _info_lines(tmp_path / "cache", FLASHJIT_CUDA_ARCH_LIST="9.0",
                        FLASHJIT_KERNEL_FAMILY="mma", CUDA_VISIBLE_DEVICES="")
    rows = dict(lines)
    assert rows["kernel family"] == "unknown (see the warning below)"
    assert not [n for n in rows if n.endswith(" family") and n != "kernel family"], rows
    warnings = [v for n, v in lines if n == "warning"]
    assert any(w.startswith("FLASHJIT_KERNEL_FAMILY='mma' is not a kernel family: use one of")
               and w.endswith("every kernel call raises this ValueError") for w in warnings), \
        warnings


def test_info_warns_when_kernels_cannot_run(tmp_path):
    warnings = [v for n, v in _info_lines(tmp_path / "cache", TORCH_CUDA_ARCH_LIST="")
                if n == "warning"]
    no_cuda = f"torch {torch.__version__} has no CUDA support: install a CUDA build of torch"
    no_gpu = "no CUDA GPU is visible: flashjit kernels cannot run here"
    if torch.version.cuda is None:
        assert any(w.startswith(no_cuda) for w in warnings), warnings
    elif not torch.cuda.is_available():
        assert any(w.startswith(no_gpu) for w in warnings), warnings
    else:
        assert not [w for w in warnings if w.startswith((no_cuda, no_gpu))], warnings


def test_info_arch_error_has_one_prefix(tmp_path):
    rows = dict(_info_lines(tmp_path / "cache", FLASHJIT_CUDA_ARCH_LIST="7.0"))
    assert rows["arch"].startswith("cannot use FLASHJIT_CUDA_ARCH_LIST='7.0': CUDA arch '7.0' is "
                                   "older than sm80"), rows["arch"]
    if not torch.cuda.is_available():
        rows = dict(_info_lines(tmp_path / "cache", TORCH_CUDA_ARCH_LIST=""))
        assert rows["arch"].startswith("no CUDA GPU is visible, so the arch"), rows["arch"]


def test_info_shows_the_nvcc_builds_use(tmp_path):
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 99.9, V99.9.1'\n")
    nvcc.chmod(0o755)
    rows = dict(_info_lines(tmp_path / "cache", CUDA_HOME=str(toolkit)))
    assert rows["nvcc"] == f"Cuda compilation tools, release 99.9, V99.9.1 ({nvcc})"
    # a CUDA_HOME without nvcc: the message names it (not "set CUDA_HOME")
    lines = _info_lines(tmp_path / "cache", CUDA_HOME=str(tmp_path / "no-toolkit"))
    why = (f"nvcc not found: CUDA_HOME={tmp_path / 'no-toolkit'} has no bin/nvcc; point CUDA_HOME "
           "at a CUDA toolkit")
    assert dict(lines)["nvcc"] == why
    assert ("warning", f"{why} to compile kernels") in lines


def _info_rows(cache, **env) -> dict[str, str]:
    """``python -m flashjit info``'s rows, name -> value (names are padded with spaces); no GPU
    visible unless ``env`` says otherwise (an arch list must hold the visible GPU's arch)."""
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    result = run_python(["-m", "flashjit", "info"], cache, **env)
    assert result.returncode == 0, result.stderr
    return {name: value.strip() for name, value in
            (line.split("  ", 1) for line in result.stdout.splitlines() if "  " in line)}


def test_cache_list_and_clear(cache_copy):
    (cache_copy / "unrelated.txt").write_text("not ours")
    result = run_python(["-m", "flashjit", "cache", "list"], cache_copy)
    assert result.returncode == 0, result.stderr
    assert "1 entry" in result.stdout and "1 entries" not in result.stdout
    assert "selftest_cpu-" in result.stdout
    result = run_python(["-m", "flashjit", "cache", "clear"], cache_copy)
    assert result.returncode == 0, result.stderr
    assert entries(cache_copy) == [] and not list(cache_copy.glob("*.lock"))
    assert (cache_copy / "unrelated.txt").exists()  # only flashjit's own files go
    result = run_python(["-m", "flashjit", "cache", "list"], cache_copy)
    assert "0 entries" in result.stdout


def test_import_is_cheap(tmp_path):
    code = ("import sys, flashjit, flashjit.jit\n"
            "assert 'torch.utils.cpp_extension' not in sys.modules\n")
    result = run_python(["-c", code], tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "cache").exists()



def test_prebuild_list_options_accumulate():
    """A repeated list option adds to the list (it used to keep the last use); the first use
    replaces the default."""
    from flashjit.prebuild import specs_from_args

    args = _parser().parse_args(["--arch", "9.0", "--arch", "8.0", "--kernel", "bwd", "--kernel",
                                 "fwd", "--head-dim", "64", "--head-dim", "128", "--dtype",
                                 "bf16", "--dtype", "fp16"])
    assert (args.arch, args.kernel, args.head_dim, args.dtype) == (
        ["9.0", "8.0"], ["bwd", "fwd"], [64, 128], ["bf16", "fp16"])
    args = _parser().parse_args(["--kernel", "fwd", "--dtype", "bf16", "--head-dim", "64"])
    assert (args.kernel, args.dtype, args.head_dim) == (["fwd"], ["bf16"], [64])
    assert _parser().parse_args([]).kernel == ["fwd", "bwd", "decode"]
    args = _parser().parse_args(["--arch", "9.0", "--arch", "8.0", "--kernel", "fwd", "--kernel",
                                 "selftest", "--dtype", "bf16", "--head-dim", "64",
                                 "--causal", "no"])
    assert [s.name for s in specs_from_args(args)] == [
        "fwd_sm90a_bf16_hd64_ws", "fwd_sm80_bf16_hd64", "selftest_cpu"]


def test_prebuild_tile_flag_follows_the_tile_variables_rule(monkeypatch):
    """--tile, like FLASHJIT_FWD_TILE, reaches a paged spec of the plain one's family (on sm90a
    both are sm90ws) and leaves a paged spec of another family (here: a registry whose sm90ws
    row reads no block table) its own tile instead of reading the numbers as its own; where
    --family makes both the same family, both take it."""
    from flashjit.prebuild import specs_from_args

    def names(*argv):
        return [s.name for s in specs_from_args(_parser().parse_args(
            ["--arch", "9.0", "--kernel", "fwd", "--dtype", "bf16", "--head-dim", "64",
             "--causal", "no", "--paged", "both", *argv]))]

    by_flag = names("--tile", "128,3,2")
    monkeypatch.setenv("FLASHJIT_FWD_TILE", "128,3,2")
    assert by_flag == names() == ["fwd_sm90a_bf16_hd64_ws_t128x3x2",
                                  "fwd_sm90a_bf16_hd64_paged_ws_t128x3x2"]
    monkeypatch.setattr(registry, "REGISTRY", tuple(
        dataclasses.replace(r, paged=False) if (r.kernel, r.family) == ("fwd", "sm90ws") else r
        for r in registry.REGISTRY))
    by_flag = names("--tile", "128,3,2")
    assert by_flag == names() == ["fwd_sm90a_bf16_hd64_ws_t128x3x2",
                                  "fwd_sm90a_bf16_hd64_paged_wgmma"]
    monkeypatch.delenv("FLASHJIT_FWD_TILE")
    assert names("--family", "sm80", "--tile", "128,64,4,2") == [
        "fwd_sm90a_bf16_hd64_t128x64x4x2", "fwd_sm90a_bf16_hd64_paged_t128x64x4x2"]
    assert names("--family", "SM90", "--tile", "64,2,1") == [  # --family in any case
        "fwd_sm90a_bf16_hd64_wgmma_t64x2x1", "fwd_sm90a_bf16_hd64_paged_wgmma_t64x2x1"]


@pytest.mark.parametrize("name,value", [
    ("FLASHJIT_VERBOSE", "2"), ("FLASHJIT_LOCK_TIMEOUT", "-5"), ("FLASHJIT_KERNEL_FAMILY", "mma"),
    ("FLASHJIT_FWD_TILE", "128,x,2"), ("FLASHJIT_BWD_TILE", "1,2"), ("FLASHJIT_DECODE_TILE", "0"),
    ("FLASHJIT_CSRC_DIR", "/nonexistent"),
])
@pytest.mark.parametrize("mode", ["--list", "--dry-run", None])
def test_prebuild_checks_the_environment_up_front(monkeypatch, capsys, tmp_path, name, value,
                                                  mode):
    """A bad FLASHJIT_* value is one error line naming it (exit 2) before anything runs, whatever
    the mode and whether or not a selected kernel reads it."""
    from flashjit.prebuild import main

    monkeypatch.setenv(name, value)
    assert main(["--kernel", "selftest", *([mode] if mode else [])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {name}=") and err.count("\n") == 1, err
    assert value in err
    assert not (tmp_path / "cache").exists()


def test_prebuild_passes_the_absolute_cache_dir_to_its_workers(tmp_path):
    from flashjit.prebuild import _worker_env

    assert _worker_env(1, tmp_path / "c")["FLASHJIT_CACHE_DIR"] == str(tmp_path / "c")


def test_relative_cache_dir_is_resolved_once(tmp_path, monkeypatch):
    """A relative FLASHJIT_CACHE_DIR is made absolute where it is first read; a later chdir does
    not move the cache."""
    from flashjit.jit import cache_dir

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", f"rel-cache-{tmp_path.name}")
    assert cache_dir() == tmp_path / "a" / f"rel-cache-{tmp_path.name}"
    monkeypatch.chdir(tmp_path / "b")
    assert cache_dir() == tmp_path / "a" / f"rel-cache-{tmp_path.name}"


@pytest.mark.parametrize("args", [["-m", "flashjit", "cache", "list"],
                                  ["-m", "flashjit.prebuild", "--kernel", "selftest",
                                   "--dry-run"]])
def test_a_closed_stdout_ends_quietly(tmp_path, args):
    """``| head -0``: the reader is gone before anything is written; exit 141 (as SIGPIPE would
    end a program), no traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, *args], cwd=REPO, env=child_env(tmp_path / "c"),
                                stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert result.returncode == 141 and result.stderr == "", result.stderr


@pytest.mark.parametrize("make,why", [
    (lambda tmp: tmp / "a_file", "is a file, not a folder"),
    (lambda tmp: tmp / "a_file" / "cache", "cannot be made ({tmp}/a_file is not a folder)"),
])
@pytest.mark.parametrize("command", ["list", "clear"])
def test_cache_commands_warn_about_a_cache_dir_that_is_no_folder(tmp_path, monkeypatch, capsys,
                                                                 make, why, command):
    from flashjit.__main__ import main

    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(make(tmp_path)))
    assert main(["cache", command]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: FLASHJIT_CACHE_DIR={make(tmp_path)} "
                          + why.format(tmp=tmp_path)), err
