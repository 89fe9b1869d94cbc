"""Environment switches and the toolchain identity that goes into the cache key."""

from __future__ import annotations

import functools
import math
import os
import shutil
import subprocess
from pathlib import Path

from .paths import csrc_override_problem
from .registry import ATTENTION_KERNELS, KERNEL_FAMILIES, rows

DEFAULT_LOCK_TIMEOUT_S = 900.0
FLAG_OFF = ("", "0", "false", "no", "off")
FLAG_ON = ("1", "true", "yes", "on")


def flag(name: str) -> bool:
    """The on/off environment variable ``name``: unset or one of FLAG_OFF is False, one of
    FLAG_ON True, in any case and with surrounding blanks ignored. Anything else raises a
    ValueError naming the variable, its value and the accepted spellings (so a typo such as
    ``FLASHJIT_VERBOSE=flase`` is an error, not a silent "on")."""
    value = os.environ.get(name, "")
    word = value.strip().lower()
    if word in FLAG_OFF:
        return False
    if word in FLAG_ON:
        return True
    raise ValueError(
        f"{name}={value!r} is not an on/off value: use one of "
        f"{', '.join(repr(w) for w in FLAG_ON)} for on, "
        f"{', '.join(repr(w) for w in FLAG_OFF if w)} or empty/unset for off (any case)"
    )


def verbose_enabled() -> bool:
    """FLASHJIT_VERBOSE=1: show compiler commands and ptxas resource usage. Parsed by flag():
    a value it does not accept raises ValueError."""
    return flag("FLASHJIT_VERBOSE")


def jit_disabled() -> bool:
    """FLASHJIT_DISABLE_JIT=1: never compile; a spec missing from the cache is an error. Parsed
    by flag(): a value it does not accept raises ValueError."""
    return flag("FLASHJIT_DISABLE_JIT")


def kernel_family_preference() -> str | None:
    """FLASHJIT_KERNEL_FAMILY: a family of the registry, preferred wherever it serves (``sm80``,
    which serves everything, forces mma.sync; ``sm90`` the wgmma forward without warp
    specialisation instead of the default ``sm90ws``); None when unset or empty. Read in any
    case and with surrounding blanks ignored (``SM80`` is ``sm80``); a value naming no family
    raises ValueError naming the variable and the families."""
    value = os.environ.get("FLASHJIT_KERNEL_FAMILY", "")
    family = value.strip().lower()
    if not family:
        return None
    if family not in KERNEL_FAMILIES:
        raise ValueError(
            f"FLASHJIT_KERNEL_FAMILY={value!r} is not a kernel family: use one of "
            f"{', '.join(repr(f) for f in KERNEL_FAMILIES)} (sm80: mma.sync everywhere; sm90, "
            "sm90ws: Hopper, where they exist; any case), or leave it unset"
        )
    return family


def tile_override(kernel: str) -> str | None:
    """FLASHJIT_FWD_TILE / FLASHJIT_BWD_TILE / FLASHJIT_DECODE_TILE: a tile for every spec of that
    kernel (JitSpec.tile, e.g. '128,64,4,2' for the sm80 forward, '64,3,2' for decoding), for tuning
    sweeps; None when unset or empty. JitSpec checks it against the family's tile parameters."""
    return os.environ.get(f"FLASHJIT_{kernel.upper()}_TILE") or None


def check_tile_override(kernel: str) -> None:
    """Raise ValueError, naming the variable, when FLASHJIT_<KERNEL>_TILE (tile_override) is set
    but is no tile any family of the attention kernel ``kernel`` takes: comma-separated whole
    numbers > 0, as many as one family's tile parameters. Whether it fits the family a spec
    gets is JitSpec's check, when the tile is applied; this one needs no spec (prebuild and
    ``info`` run it up front)."""
    value = tile_override(kernel)
    if value is None:
        return
    families = [r for r in rows(kernel) if r.tile_params]
    tile = parse_tile(value)
    if tile and all(t > 0 for t in tile) and any(len(r.tile_params) == len(tile)
                                                 for r in families):
        return
    shapes = "; ".join(f"{r.family}: {','.join(r.tile_params)}" for r in families)
    raise ValueError(
        f"FLASHJIT_{kernel.upper()}_TILE={value!r} is not a tile of the {kernel} kernel: use "
        f"comma-separated whole numbers > 0, one per parameter of its family ({shapes}), or "
        "leave it unset"
    )


def parse_tile(value) -> tuple[int, ...]:
    """A tile as a tuple of ints: from "128,3,2" (blanks around the numbers ignored) or a sequence;
    () when it is not whole numbers (JitSpec and check_tile_override check length and sign)."""
    if isinstance(value, str):
        value = value.split(",")
    try:
        return tuple(int(t) for t in value)
    except (TypeError, ValueError):
        return ()


def lock_timeout() -> float:
    """Seconds to wait for another process's build of the same spec (FLASHJIT_LOCK_TIMEOUT).

    Unset or empty (blanks only): DEFAULT_LOCK_TIMEOUT_S. Otherwise a finite number >= 0 (what
    ``float`` reads, e.g. ``60``, ``2.5``, ``1e3``); ``0`` does not wait: a build whose lock
    another process holds gives up at once. Anything else (``abc``, ``-5``, ``nan``, ``inf``)
    raises a ValueError naming the variable.
    """
    value = os.environ.get("FLASHJIT_LOCK_TIMEOUT", "")
    if not value.strip():
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"FLASHJIT_LOCK_TIMEOUT={value!r} is not a number of seconds: use a finite number "
            f">= 0 (0: do not wait for another process's build), or leave it unset for "
            f"{DEFAULT_LOCK_TIMEOUT_S:.0f}"
        )
    return seconds


def nvcc_path() -> Path | None:
    """The nvcc torch.utils.cpp_extension would run: $CUDA_HOME or $CUDA_PATH, else the one on
    PATH, else /usr/local/cuda (the same search as its _find_cuda_home)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None:
        found = shutil.which("nvcc")
        home = os.path.dirname(os.path.dirname(found)) if found else "/usr/local/cuda"
    nvcc = Path(home) / "bin" / "nvcc"
    return nvcc if nvcc.exists() else None


def nvcc_missing() -> str:
    """Why nvcc_path() found no nvcc, for messages: where it looked, and what to set."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return (f"nvcc not found: {name}={os.environ[name]} has no bin/nvcc; point {name} at "
                    "a CUDA toolkit")
    return ("nvcc not found (not on PATH, not in /usr/local/cuda): set CUDA_HOME to a CUDA "
            "toolkit")


def _version_line(cmd: list[str], contains: str = "") -> str | None:
    """The first output line of ``cmd`` that contains ``contains``; None if it cannot run."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.strip() for line in out.splitlines() if contains in line and line.strip()), None)


@functools.lru_cache(maxsize=None)
def _nvcc_version(path: str) -> str | None:
    return _version_line([path, "--version"], "release")


@functools.lru_cache(maxsize=None)
def _nvcc_gpu_codes(path: str) -> frozenset[str] | None:
    try:
        out = subprocess.run([path, "--list-gpu-code"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return frozenset(out.split()) or None


def nvcc_gpu_codes() -> list[str]:
    """``nvcc --list-gpu-code``'s archs (``sm_80``...), in order; empty when nvcc is missing or
    does not answer. Asked once per process per nvcc."""
    path = nvcc_path()
    codes = None if path is None else _nvcc_gpu_codes(str(path))
    return sorted(codes or (), key=lambda c: (len(c), c))


def nvcc_unsupported_archs(archs) -> list[str]:
    """The flashjit archs (``sm90a``; ``sm80-sm90a`` counts as both) among ``archs`` that this
    nvcc cannot build SASS for, by nvcc_gpu_codes (an ``a`` arch by its base, as nvcc lists
    it); empty when nvcc gives no list (its own error comes later)."""
    codes = nvcc_gpu_codes()
    if not codes:
        return []
    ones = dict.fromkeys(one for arch in archs for one in arch.split("-"))
    return [one for one in ones if "sm_" + one[2:].rstrip("af") not in codes]


def nvcc_version() -> str | None:
    """e.g. 'Cuda compilation tools, release 13.0, V13.0.88'; None without nvcc. Once per process."""
    path = nvcc_path()
    return None if path is None else _nvcc_version(str(path))


def cxx_compiler() -> str:
    """The host C++ compiler cpp_extension uses ($CXX, else c++)."""
    return os.environ.get("CXX", "c++")


@functools.lru_cache(maxsize=None)
def _cxx_version(compiler: str) -> str | None:
    return _version_line([compiler, "--version"])


def cxx_version() -> str | None:
    """First line of ``$CXX --version``, e.g. 'c++ (Debian 12.2.0-14) 12.2.0'. Once per process."""
    return _cxx_version(cxx_compiler())


def setting_problems() -> list[tuple[str, str, str]]:
    """(variable, problem, consequence) for each FLASHJIT_* setting whose value flashjit refuses:
    FLASHJIT_VERBOSE, FLASHJIT_DISABLE_JIT, FLASHJIT_LOCK_TIMEOUT, FLASHJIT_KERNEL_FAMILY, the
    tile variables of every attention kernel (their parsers raise ValueError) and
    FLASHJIT_CSRC_DIR (csrc_override_problem). ``info`` warns about each, with what it breaks;
    prebuild refuses to start on the first of those it reads."""
    checks = [
        ("FLASHJIT_VERBOSE", verbose_enabled,
         "every kernel call raises this ValueError (it is part of the cache key)"),
        ("FLASHJIT_DISABLE_JIT", jit_disabled, "every compile raises this ValueError"),
        ("FLASHJIT_LOCK_TIMEOUT", lock_timeout, "every compile raises this ValueError"),
        ("FLASHJIT_KERNEL_FAMILY", kernel_family_preference,
         "every kernel call raises this ValueError"),
        *((f"FLASHJIT_{kernel.upper()}_TILE", functools.partial(check_tile_override, kernel),
           f"every {kernel} kernel call raises a ValueError") for kernel in ATTENTION_KERNELS),
    ]
    problems = []
    for name, check, consequence in checks:
        try:
            check()
        except ValueError as err:
            problems.append((name, str(err), consequence))
    csrc = csrc_override_problem()
    if csrc:
        problems.append(("FLASHJIT_CSRC_DIR", csrc, "every compile fails (no sources)"))
    return problems
