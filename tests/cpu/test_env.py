"""Environment switches: on/off flags, FLASHJIT_LOCK_TIMEOUT, and info's warnings for bad values."""

from __future__ import annotations

import time

import pytest

from test_cli import _info_lines

from flashjit.jit import JitSpec, ensure_built, env
from flashjit.jit.cache import CacheEntry, digest_key, key_fields
from flashjit.jit.lock import BuildLock, LockTimeoutError

OFF = ["", "0", "false", "FALSE", "No", "off", " off "]
ON = ["1", "true", "True", "YES", "on", " 1 "]
BAD = ["2", "flase", "enable", "y", "-1", "0.0"]


@pytest.mark.parametrize("name", ["FLASHJIT_VERBOSE", "FLASHJIT_DISABLE_JIT"])
def test_flags_accept_the_usual_spellings(monkeypatch, name):
    read = env.verbose_enabled if name == "FLASHJIT_VERBOSE" else env.jit_disabled
    assert read() is False  # unset
    for value in OFF:
        monkeypatch.setenv(name, value)
        assert read() is False, value
    for value in ON:
        monkeypatch.setenv(name, value)
        assert read() is True, value


@pytest.mark.parametrize("value", BAD)
def test_a_bad_flag_names_the_variable_its_value_and_the_spellings(monkeypatch, value):
    monkeypatch.setenv("FLASHJIT_VERBOSE", value)
    with pytest.raises(ValueError) as err:
        env.verbose_enabled()
    message = str(err.value)
    assert message.startswith(f"FLASHJIT_VERBOSE={value!r} is not an on/off value")
    for word in ("'1'", "'true'", "'yes'", "'on'", "'0'", "'false'", "'no'", "'off'"):
        assert word in message, word


def test_verbose_false_is_the_same_cache_key_as_unset(monkeypatch):
    spec = JitSpec("fwd", "sm80", "fp16", 64)
    unset = digest_key(key_fields(spec))
    for value in ("false", "off", "no", "0"):
        monkeypatch.setenv("FLASHJIT_VERBOSE", value)
        assert digest_key(key_fields(spec)) == unset, value
    monkeypatch.setenv("FLASHJIT_VERBOSE", "on")
    assert digest_key(key_fields(spec)) != unset


def test_disable_jit_off_and_bad(monkeypatch):
    spec = JitSpec("fwd", "sm90a", "bf16", 128)  # not in the (empty) cache
    monkeypatch.setenv("FLASHJIT_DISABLE_JIT", "maybe")
    with pytest.raises(ValueError, match="FLASHJIT_DISABLE_JIT='maybe'"):
        ensure_built(spec)
    monkeypatch.setenv("FLASHJIT_DISABLE_JIT", "off")
    assert not env.jit_disabled()


@pytest.mark.parametrize("value, seconds", [
    (None, env.DEFAULT_LOCK_TIMEOUT_S), ("", env.DEFAULT_LOCK_TIMEOUT_S),
    (" ", env.DEFAULT_LOCK_TIMEOUT_S), ("0", 0.0), ("2.5", 2.5), (" 60 ", 60.0), ("1e3", 1000.0),
])
def test_lock_timeout_values(monkeypatch, value, seconds):
    if value is not None:
        monkeypatch.setenv("FLASHJIT_LOCK_TIMEOUT", value)
    assert env.lock_timeout() == seconds


@pytest.mark.parametrize("value", ["abc", "-5", "-0.1", "nan", "inf", "-inf", "1e999", "5s"])
def test_a_bad_lock_timeout_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("FLASHJIT_LOCK_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"^FLASHJIT_LOCK_TIMEOUT={value!r} is not a number of "
                                         "seconds: use a finite number >= 0"):
        env.lock_timeout()


def test_build_lock_timeouts(tmp_path, monkeypatch):
    """A bad FLASHJIT_LOCK_TIMEOUT (nan used to wait forever) or timeout argument raises before
    any wait; 0 gives up at once when another holds the lock."""
    entry = CacheEntry(tmp_path, "selftest_cpu", "0" * 64, {})
    monkeypatch.setenv("FLASHJIT_LOCK_TIMEOUT", "nan")
    with pytest.raises(ValueError, match="FLASHJIT_LOCK_TIMEOUT='nan'"):
        BuildLock(entry)
    for bad in (float("nan"), float("inf"), -1):
        with pytest.raises(ValueError, match="finite number >= 0"):
            BuildLock(entry, timeout=bad)
    monkeypatch.setenv("FLASHJIT_LOCK_TIMEOUT", "0")
    with BuildLock(entry, timeout=1):
        start = time.monotonic()
        with pytest.raises(LockTimeoutError, match="gave up after 0 s"):
            with BuildLock(entry):
                pass
        assert time.monotonic() - start < 5


def test_info_warns_about_bad_switches_and_exits_zero(tmp_path):
    lines = _info_lines(tmp_path / "cache", FLASHJIT_VERBOSE="flase", FLASHJIT_DISABLE_JIT="2",
                        FLASHJIT_LOCK_TIMEOUT="-5", CUDA_VISIBLE_DEVICES="")
    warnings = [value for name, value in lines if name == "warning"]
    for start in ("FLASHJIT_VERBOSE='flase' is not an on/off value: use one of",
                  "FLASHJIT_DISABLE_JIT='2' is not an on/off value: use one of",
                  "FLASHJIT_LOCK_TIMEOUT='-5' is not a number of seconds"):
        assert len([w for w in warnings if w.startswith(start)]) == 1, (start, warnings)
    lines = _info_lines(tmp_path / "cache", FLASHJIT_VERBOSE="off", FLASHJIT_DISABLE_JIT="No",
                        FLASHJIT_LOCK_TIMEOUT="0")
    assert not [v for n, v in lines if n == "warning" and v.startswith("FLASHJIT_")], lines


@pytest.mark.parametrize("value,family", [("SM80", "sm80"), (" Sm90 ", "sm90"),
                                          ("SM90WS", "sm90ws"), (" ", None)])
def test_kernel_family_in_any_case(monkeypatch, value, family):
    monkeypatch.setenv("FLASHJIT_KERNEL_FAMILY", value)
    assert env.kernel_family_preference() == family


def test_tile_variables_are_checked_without_a_spec(monkeypatch):
    """check_tile_override: whole numbers > 0, as many as some family of the kernel takes."""
    for kernel, good in (("fwd", ["128,3,2", "128, 64, 4, 2"]), ("bwd", ["64"]),
                         ("decode", ["64,3,2"])):
        for value in good:
            monkeypatch.setenv(f"FLASHJIT_{kernel.upper()}_TILE", value)
            env.check_tile_override(kernel)
    for kernel, value in (("fwd", "1,2"), ("fwd", "0,3,2"), ("fwd", "a,b,c"), ("bwd", "128,3,2"),
                          ("decode", "64,3,-2")):
        monkeypatch.setenv(f"FLASHJIT_{kernel.upper()}_TILE", value)
        with pytest.raises(ValueError, match=f"^FLASHJIT_{kernel.upper()}_TILE={value!r} is not "
                                             f"a tile of the {kernel} kernel"):
            env.check_tile_override(kernel)


def test_info_warns_about_bad_tiles_csrc_and_cache_dir(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    lines = _info_lines(tmp_path / "a_file", FLASHJIT_FWD_TILE="1,2", FLASHJIT_CSRC_DIR="/nonexistent",
                        CUDA_VISIBLE_DEVICES="")
    warnings = [value for name, value in lines if name == "warning"]
    for start in ("FLASHJIT_FWD_TILE='1,2' is not a tile of the fwd kernel",
                  "FLASHJIT_CSRC_DIR=/nonexistent does not exist",
                  f"FLASHJIT_CACHE_DIR={tmp_path / 'a_file'} is a file, not a folder"):
        assert len([w for w in warnings if w.startswith(start)]) == 1, (start, warnings)
