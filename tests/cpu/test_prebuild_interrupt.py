"""A prebuild that is interrupted, or whose cache is cleared or log folder removed while it builds:
it stops (or finishes) cleanly, and the cache stays consistent."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jithelpers import entries, run_python, spawn_python

PREBUILD = ["-m", "flashjit.prebuild", "--kernel", "selftest"]


def _wait_for_compiler(cache: Path, proc) -> Path:
    """The temp folder of the running selftest build, once ninja has started compiling in it."""
    deadline = time.monotonic() + 120
    while not (ninja := list(cache.glob(".tmp-selftest_cpu-*/build.ninja"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    time.sleep(1.0)  # the compiler runs by now
    return ninja[0].parent


def _processes_in(folder: Path) -> list[int]:
    """Live (not zombie) processes whose working directory is ``folder`` (ninja and compilers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if state != "Z" and cwd.removesuffix(" (deleted)") == str(folder):
            pids.append(int(proc.name))
    return pids


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_prebuild_its_workers_and_compilers(tmp_path, signum):
    """SIGTERM or SIGINT to prebuild alone (Ctrl-C reaches only it: its workers have sessions of
    their own): one line, exit 128 + signal, no worker, ninja or compiler left running, nothing
    half-built left in the cache; the next run builds it."""
    cache = tmp_path / "cache"
    prebuild = spawn_python(PREBUILD, cache)
    try:
        tmp = _wait_for_compiler(cache, prebuild)
        assert _processes_in(tmp), "ninja should be compiling in the temp folder"
        os.kill(prebuild.pid, signum)
        out, err = prebuild.communicate(timeout=60)
        assert prebuild.returncode == 128 + signum, err
        assert err == "prebuild: interrupted\n", err
        assert "FAILED" not in out and "FLASHJIT_VERBOSE" not in out + err
        deadline = time.monotonic() + 10
        while _processes_in(tmp) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_in(tmp) == [], "the worker's ninja or compiler is still running"
        assert not list(cache.glob(".tmp-*")) and not list(cache.glob("*.owner"))
        assert entries(cache) == []
        (log,) = (cache / "logs").glob("prebuild-*/selftest_cpu.log")
        assert "please report" not in log.read_text().lower()
        assert not list((cache / "logs").glob("selftest_cpu-*.log"))  # no compile-failure log
    finally:
        _kill_group(prebuild)
    result = run_python(PREBUILD, cache)
    assert result.returncode == 0, result.stderr
    assert len(entries(cache)) == 1


def test_cache_clear_during_a_prebuild_leaves_its_build_alone(tmp_path):
    """cache clear skips (and names) what a running build and prebuild use: the temp folder,
    the held lock, the owner file and the prebuild's log folder; the build then succeeds."""
    cache = tmp_path / "cache"
    prebuild = spawn_python(PREBUILD, cache)
    try:
        tmp = _wait_for_compiler(cache, prebuild)
        (log_dir,) = (cache / "logs").glob("prebuild-*")
        in_use = [tmp, *cache.glob("selftest_cpu-*.lock"), *cache.glob("selftest_cpu-*.owner"),
                  log_dir]
        assert len(in_use) == 4
        result = run_python(["-m", "flashjit", "cache", "clear"], cache)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"removed 0 items from {cache}; 4 in use, skipped\n")
        for path in in_use:
            assert f"  in use, skipped: {path} (" in result.stdout, path
        # "removed 0 items" says clear removed none of them; the temp folder and the owner file
        # may be gone by now all the same, taken by the build finishing meanwhile (a quick one
        # on an idle machine), so only the log folder, which outlives the build, is checked here
        assert log_dir.exists(), log_dir
        out, err = prebuild.communicate(timeout=300)
        assert prebuild.returncode == 0, out + err
        assert "built 1, cached 0, failed 0" in out
    finally:
        _kill_group(prebuild)
    assert len(entries(cache)) == 1
    result = run_python(["-m", "flashjit", "cache", "clear"], cache)  # now nothing is in use
    assert result.returncode == 0 and "in use" not in result.stdout, result.stdout
    assert entries(cache) == [] and not (cache / "logs").exists()


def test_prebuild_whose_log_folder_vanishes_finishes(tmp_path):
    """A log folder removed under a running prebuild (rm -rf, an older cache clear) costs the
    logs, not the run: no traceback, exit 0."""
    cache = tmp_path / "cache"
    prebuild = spawn_python(PREBUILD, cache)
    try:
        _wait_for_compiler(cache, prebuild)
        shutil.rmtree(cache / "logs")
        out, err = prebuild.communicate(timeout=300)
    finally:
        _kill_group(prebuild)
    assert prebuild.returncode == 0, out + err
    assert "Traceback" not in err and "built 1, cached 0, failed 0" in out
    assert len(entries(cache)) == 1


def test_a_worker_interrupt_waits_for_its_children():
    """A worker's signal handler (workers.interrupt_after_children) raises KeyboardInterrupt only
    once its child (ninja, which got the same signal and stops its compilers first) has exited,
    or after the grace time; the build's subprocess call would otherwise SIGKILL ninja at once."""
    from flashjit.jit.workers import interrupt_after_children

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.6)"])
    handler = interrupt_after_children(grace_s=10.0)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGTERM, None)
    waited = time.monotonic() - start
    assert child.poll() is not None and 0.3 < waited < 5.0, waited
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            interrupt_after_children(grace_s=0.5)(signal.SIGTERM, None)
        assert 0.4 < time.monotonic() - start < 5.0 and child.poll() is None  # gave up waiting
    finally:
        child.kill()
        child.wait()
