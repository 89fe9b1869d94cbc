"""The cache: loading the real selftest op, keys, damaged entries, the error paths, and listing
and clearing only what flashjit made."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jithelpers import SELFTEST_CHILD, entries, run_python

from flashjit.jit import (
    CacheDirError, JitDisabledError, JitSpec, cache_dir, csrc_dir, ensure_built, load_spec,
)
from flashjit.jit.cache import (
    CacheEntry, clear, digest_key, key_fields, list_entries, scan, sources_digest,
)
from flashjit.jit.lock import BuildLock

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
    # the cache dir itself a file: said in words, not as errno 17 (found by a new user)
    monkeypatch.setenv("FLASHJIT_CACHE_DIR", str(blocker))
    with pytest.raises(CacheDirError, match=r"FLASHJIT_CACHE_DIR=.*a_file is a file, not a "
                                            r"folder\. Set FLASHJIT_CACHE_DIR to a writable"):
        ensure_built(SELFTEST)


# ---- listing and clearing: only what flashjit made (FLASHJIT_CACHE_DIR may be a folder in use)

def _user_data(root):
    """Files and folders a user might keep in a folder used as FLASHJIT_CACHE_DIR by mistake,
    named like flashjit's own; returns their paths and contents."""
    files = {
        "logs/important.txt": "keep me",
        "logs/prebuild-notes.txt": "keep me too",
        "logs/selftest_cpu-20240101-120000.log": "a log of my own, named like a build log",
        "logs/prebuild-20240101-120000-7/results.csv": "1,2,3",
        "project-0123456789ab/manifest.json": "{}",
        "project-0123456789ab/main.py": "print('hi')",
        "my_notes-abcdef012345/todo.txt": "buy milk",
        ".tmp-foo/scratch.txt": "scratch",
        f".tmp-x-0123456789ab@{socket.gethostname()}@999999999@deadbeef/notes.txt": "mine",
        "backup-0123456789ab.lock": "a lock file of another program",
        "backup-0123456789ab.owner": "not who holds a build lock",
        "unrelated.txt": "not ours",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return {root / name: text for name, text in files.items()}


def _assert_intact(files):
    for path, text in files.items():
        assert path.read_text() == text, path


def test_user_data_named_like_entries_is_neither_listed_nor_cleared(cache_copy):
    user = _user_data(cache_copy)
    (entry,) = [e for e in entries(cache_copy) if e.name.startswith("selftest_cpu-")]
    listed = list_entries(cache_copy)
    assert [e["dirname"] for e in listed] == [entry.name] and listed[0]["ok"]
    found = scan(cache_copy)
    assert found.entries == [entry]
    assert set(found.foreign) == {cache_copy / "logs" / p for p in (
        "important.txt", "prebuild-notes.txt", "selftest_cpu-20240101-120000.log",
        "prebuild-20240101-120000-7")} | {cache_copy / p for p in (
        "project-0123456789ab", "my_notes-abcdef012345", ".tmp-foo",
        f".tmp-x-0123456789ab@{socket.gethostname()}@999999999@deadbeef",
        "backup-0123456789ab.lock", "backup-0123456789ab.owner", "unrelated.txt")}
    locks = list(cache_copy.glob("selftest_cpu-*.lock"))  # the warm cache's build lock
    assert clear(cache_copy).removed == 1 + len(locks)
    assert not entry.exists()
    _assert_intact(user)
    assert list_entries(cache_copy) == []


def _flashjit_litter(root):
    """What builds leave beside entries: a dead build's temp folder, a failed build's log, a
    prebuild folder of logs, a lock and an owner file; returns their paths."""
    entry = CacheEntry.for_spec(SELFTEST, root)
    tmp = entry.new_temp_dir()
    (tmp / "build.ninja").write_text("rule cxx\n")
    (tmp / "selftest_op.o").write_bytes(b"\x7fELF")
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    failed = logs / "selftest_cpu-20240102-120000.log"
    failed.write_text(f"selftest_cpu\nkey fields: {entry.fields}\n\nerror: boom\n")
    prebuild = logs / "prebuild-20240102-120000-4242"
    prebuild.mkdir()
    (prebuild / "selftest_cpu.log").write_text("compiling selftest_cpu\n")
    other = CacheEntry(root, "fwd_sm80_bf16_hd64", "0" * 64, {})
    other.lock_path.write_text("")
    other.owner_path.write_text("somehost pid 12 since 2024-01-01T12:00:00\n")
    return [tmp, failed, prebuild, other.lock_path, other.owner_path]


def test_clear_removes_entries_temp_folders_locks_and_logs_only(cache_copy):
    user = _user_data(cache_copy)
    litter = _flashjit_litter(cache_copy)
    (entry,) = [e for e in entries(cache_copy) if e.name.startswith("selftest_cpu-")]
    found = scan(cache_copy)
    assert found.entries == [entry]
    assert set(found.ours) == {entry, *litter} | set(cache_copy.glob("selftest_cpu-*.lock"))
    assert clear(cache_copy).removed == len(found.ours)
    assert not entry.exists() and not any(p.exists() for p in litter)
    _assert_intact(user)  # logs/ keeps the user's files, so it stays
    assert scan(cache_copy).ours == []


def test_clear_removes_logs_when_only_flashjit_logs_were_in_it(cache_copy):
    _flashjit_litter(cache_copy)
    clear(cache_copy)
    assert sorted(p.name for p in cache_copy.iterdir()) == []


def _no_manifest(entry):
    (entry / "manifest.json").unlink()


@pytest.mark.parametrize("damage", [_truncate_library, _garbage_manifest, _missing_library,
                                    _no_manifest])
def test_damaged_entry_is_listed_as_damaged_and_cleared(cache_copy, damage):
    (entry,) = entries(cache_copy)
    damage(entry)
    (listed,) = list_entries(cache_copy)
    assert listed["dirname"] == entry.name and not listed["ok"] and listed["reason"]
    result = run_python(["-m", "flashjit", "cache", "list"], cache_copy)
    assert result.returncode == 0, result.stderr
    assert "1 entry" in result.stdout and "DAMAGED" in result.stdout
    assert clear(cache_copy).removed >= 1 and not entry.exists()


def test_entries_from_before_the_marker(cache_copy):
    """An entry published before builds wrote the marker is flashjit's by its manifest (so it
    stays valid, is listed and cleared); one whose manifest is unreadable too cannot be told
    from a user's folder and is left alone."""
    (entry,) = entries(cache_copy)
    (entry / ".flashjit-entry").unlink()
    assert CacheEntry.for_spec(SELFTEST).check(verify=True).ok
    assert [e["ok"] for e in list_entries(cache_copy)] == [True]
    _garbage_manifest(entry)
    assert list_entries(cache_copy) == [] and entry in scan(cache_copy).foreign
    clear(cache_copy)
    assert entry.exists()


def test_a_build_folder_is_marked_from_the_start(tmp_path):
    """The marker is the first file of a build folder, so a build that dies at once is known as
    flashjit's; a folder named like a build folder holding a user's file is not."""
    root = tmp_path / "cache"
    root.mkdir()
    entry = CacheEntry.for_spec(SELFTEST, root)
    tmp = entry.new_temp_dir()
    assert [p.name for p in tmp.iterdir()] == [".flashjit-entry"]
    marker = json.loads((tmp / ".flashjit-entry").read_text())
    assert marker["key"] == entry.key and marker["name"] == "selftest_cpu"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # a pid of this host that no longer runs
    host = socket.gethostname()
    foreign = root / f".tmp-fwd_sm80_bf16_hd64-0123456789ab@{host}@{dead.pid}@deadbeef"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    unmarked = root / f".tmp-fwd_sm80_bf16_hd64-0123456789ac@{host}@{dead.pid}@deadbeef"
    unmarked.mkdir()
    (unmarked / "build.ninja").write_text("")  # what a build makes: flashjit's even unmarked
    entry.new_temp_dir()  # cleans up this key's dead folder and dead builders' of this host
    assert not tmp.exists() and not unmarked.exists()
    assert (foreign / "notes.txt").read_text() == "mine"
    assert scan(root).temp_dirs == list(root.glob(f".tmp-{entry.dirname}@*"))


def test_clear_leaves_what_a_running_build_or_prebuild_uses(cache_copy):
    """While a build holds an entry's lock, clear leaves that entry's items (its temp folder,
    lock and owner file) and its compile-failure logs, naming them as in use; also the log folder
    of a running prebuild. Once they are free, clear removes them."""
    entry = CacheEntry.for_spec(SELFTEST, cache_copy)
    other = CacheEntry(cache_copy, "fwd_sm80_bf16_hd64", "0" * 64, {})
    other.lock_path.write_text("")  # a free lock: cleared
    logs = cache_copy / "logs"
    logs.mkdir()
    failed_log = logs / "selftest_cpu-20240102-120000.log"
    failed_log.write_text(f"selftest_cpu\nkey fields: {entry.fields}\n\nerror: boom\n")
    prebuild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                 "flashjit.prebuild"])  # a running prebuild, by its command line
    # until the child shows that command line (a local CI run on a loaded machine once read it
    # before the child's exec: clear then saw no prebuild)
    deadline = time.monotonic() + 30
    while b"flashjit.prebuild" not in Path(f"/proc/{prebuild.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline and prebuild.poll() is None
        time.sleep(0.01)
    try:
        running = logs / f"prebuild-20240102-120000-{prebuild.pid}"
        running.mkdir()
        (running / "selftest_cpu.log").write_text("compiling\n")
        with BuildLock(entry):
            tmp = entry.new_temp_dir()
            result = clear(cache_copy)
            busy = {tmp, entry.path, entry.lock_path, entry.owner_path, failed_log, running}
            assert {path for path, _ in result.in_use} == busy
            assert all(path.exists() for path in busy)
            why = dict(result.in_use)
            assert why[tmp].startswith("a build of selftest_cpu holds its lock: ")
            assert why[running] == f"prebuild pid {prebuild.pid} is running"
            assert result.removed == 1 and not other.lock_path.exists() and result.failed == []
            shutil.rmtree(tmp)  # as the build does
    finally:
        prebuild.kill()
        prebuild.wait()
    result = clear(cache_copy)
    assert result.in_use == [] and result.failed == [] and result.removed == 4
    assert scan(cache_copy).ours == [] and not logs.exists()


def test_clear_reports_what_it_cannot_remove(cache_copy, monkeypatch, capsys):
    """A read-only file system (here: the entry's library and folder): cache clear removes the
    rest, names each item it could not remove and why, and exits 1, without a traceback."""
    import errno
    import os

    from flashjit.__main__ import main

    (entry,) = entries(cache_copy)
    (cache_copy / "logs").mkdir()
    log = cache_copy / "logs" / "selftest_cpu-20240102-120000.log"
    log.write_text("selftest_cpu\nkey fields: {}\n\nerror: boom\n")
    real_unlink, real_rmdir = os.unlink, os.rmdir

    def read_only(real, fails):
        def call(path, *args, **kwargs):
            if fails(str(path)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "unlink", read_only(real_unlink, lambda p: p.endswith(".so")))
    monkeypatch.setattr(os, "rmdir", read_only(real_rmdir, lambda p: entry.name in p))
    assert main(["cache", "clear"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"removed 2 items from {cache_copy}; 1 could not be removed\n"), out
    assert err == (f"error: could not remove {entry}: Read-only file system "
                   f"({entry / 'selftest_cpu.so'})\n")
    assert entry.exists() and not log.exists() and not list(cache_copy.glob("*.lock"))


def test_an_interrupted_compile_is_no_compile_failure(monkeypatch):
    """ninja stopped by a signal (Ctrl-C reaching it first) raises KeyboardInterrupt, not a
    BuildError asking for a bug report; no failure log, no temp folder, the lock is free."""
    from torch.utils import cpp_extension

    def interrupted(**kwargs):
        raise RuntimeError("Error building extension 'x': [1/2] c++ -c selftest_op.cpp\n"
                           "ninja: build stopped: interrupted by user.\n")

    monkeypatch.setattr(cpp_extension, "load", interrupted)
    with pytest.raises(KeyboardInterrupt, match="compiling selftest_cpu was interrupted") as err:
        ensure_built(SELFTEST)
    assert "report" not in str(err.value)
    root = cache_dir()
    assert not (root / "logs").exists() and not list(root.glob(".tmp-*"))
    with BuildLock(CacheEntry.for_spec(SELFTEST), timeout=0):
        pass
