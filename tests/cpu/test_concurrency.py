"""Many processes, one build: the per-key lock, waiting, timeouts and killed builders."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from jithelpers import SELFTEST_CHILD, entries, run_python, spawn_python

from flashjit.jit import JitSpec
from flashjit.jit.cache import CacheEntry
from flashjit.jit.lock import BuildLock

RACERS = 16


def test_racing_processes_build_once(tmp_path):
    cache = tmp_path / "cache"
    procs = [spawn_python(["-c", SELFTEST_CHILD], cache) for _ in range(RACERS)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert "selftest ok" in out
    all_stderr = "".join(err for _, err in outputs)
    assert all_stderr.count("compiling selftest_cpu") == 1, all_stderr
    assert all_stderr.count("built selftest_cpu in") == 1
    (entry,) = entries(cache)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["pid"] in {p.pid for p in procs}
    assert list(cache.glob(".tmp-*")) == []


def test_waiter_names_the_holder_and_times_out(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = CacheEntry.for_spec(JitSpec("selftest"), cache)
    with BuildLock(entry):
        result = run_python(["-c", SELFTEST_CHILD], cache, FLASHJIT_LOCK_TIMEOUT="2")
    assert result.returncode != 0
    assert f"waiting for {socket.gethostname()} pid {os.getpid()}" in result.stderr
    assert "LockTimeoutError" in result.stderr
    assert str(entry.lock_path) in result.stderr and "FLASHJIT_LOCK_TIMEOUT" in result.stderr
    assert not entry.owner_path.exists()  # released with the lock


def test_killed_builder_blocks_nothing(tmp_path):
    cache = tmp_path / "cache"
    victim = spawn_python(["-c", SELFTEST_CHILD], cache)
    try:
        deadline = time.monotonic() + 120
        # Wait until ninja runs in the victim's temp folder, then kill the Python process alone:
        # its compiler children live on, as after a real crash.
        while not list(cache.glob(".tmp-selftest_cpu-*/build.ninja")):
            assert victim.poll() is None, victim.communicate()
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        assert list(cache.glob(".tmp-*")), "the killed build should leave its temp folder"

        result = run_python(["-c", SELFTEST_CHILD], cache, FLASHJIT_LOCK_TIMEOUT="60")
        assert result.returncode == 0, result.stderr
        assert "compiling selftest_cpu" in result.stderr
        assert len(entries(cache)) == 1
        assert list(cache.glob(".tmp-*")) == []  # the dead builder's folder was cleaned up
    finally:
        try:
            os.killpg(victim.pid, signal.SIGKILL)  # its orphaned compiler, if still running
        except ProcessLookupError:
            pass
