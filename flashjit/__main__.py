"""Command line: ``python -m flashjit info`` and ``python -m flashjit cache list|clear``."""

from __future__ import annotations

import argparse
import os
import sys

from ._version import __version__
from .jit import cache as jit_cache
from .jit import env
from .jit.paths import cache_dir, cache_dir_problem, csrc_dir


def _entries(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _families(kernel: str, arch: str, paged: bool = False) -> str:
    """Which kernel family ``kernel`` (fwd or bwd; with ``paged`` the forward reading K/V through
    a block table) uses on ``arch``, per head-dim bucket, from the registry and
    FLASHJIT_KERNEL_FAMILY, e.g. 'sm90 (wgmma) at head dims 64, 128; sm80 (mma.sync) otherwise':
    "otherwise" for the family with the most buckets, where one has more than any other."""
    from .jit import registry
    from .jit.spec import HEAD_DIM_BUCKETS, JitSpec

    by_family: dict[str, list[int]] = {}
    for d in HEAD_DIM_BUCKETS:  # FLASHJIT_KERNEL_FAMILY is checked before (info's warning)
        family = JitSpec(kernel, arch, "bf16", d, paged=paged).family
        by_family.setdefault(family, []).append(d)
    # the most used family (the fallback) last, as "otherwise" when it is the only one that size
    order = sorted(by_family, key=lambda family: len(by_family[family]))
    sizes = [len(by_family[family]) for family in order]
    fallback = order[-1] if len(order) > 1 and sizes[-1] > sizes[-2] else None
    parts = []
    for family in order:
        where = ""
        if len(order) > 1:
            where = " otherwise" if family == fallback else \
                " at head dims " + ", ".join(map(str, by_family[family]))
        parts.append(f"{family} ({registry.row(kernel, family).instructions}){where}")
    return "; ".join(parts)


def _warnings(torch, nvcc) -> list[str]:
    """What stops flashjit kernels from running or compiling here, in plain words."""
    warnings = []
    if torch.version.cuda is None:
        warnings.append(f"torch {torch.__version__} has no CUDA support: install a CUDA build of "
                        "torch to run flashjit kernels")
    elif not torch.cuda.is_available():
        warnings.append("no CUDA GPU is visible: flashjit kernels cannot run here (prebuild "
                        "--arch still compiles them for a GPU elsewhere)")
    if nvcc is None:
        warnings.append(f"{env.nvcc_missing()} to compile kernels")
    return warnings


def _cache_dir_warning(root) -> str | None:
    """What is wrong with the cache dir (paths.cache_dir_problem), with what it breaks."""
    problem = cache_dir_problem(root)
    if problem is None:
        return None
    return (f"{problem}: nothing can be cached, listed or cleared there (set FLASHJIT_CACHE_DIR "
            "to a folder)")


def info() -> int:
    """Versions, GPU and arch, cache location and size: what a bug report needs."""
    import platform

    import torch

    from .jit.arch import current_arch

    root = cache_dir()
    found = jit_cache.scan(root)
    nvcc = env.nvcc_path()
    rows = [
        ("flashjit", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda}, "
                  f"cxx11 ABI {int(torch._C._GLIBCXX_USE_CXX11_ABI)})"),
        # the nvcc builds will use (CUDA_HOME, else CUDA_PATH, else PATH, else /usr/local/cuda)
        ("nvcc", f"{env.nvcc_version() or 'version unknown'} ({nvcc})" if nvcc
                 else env.nvcc_missing()),
        ("c++", env.cxx_version() or f"{env.cxx_compiler()} not found"),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            rows.append((f"gpu {i}", f"{torch.cuda.get_device_name(i)} (compute capability "
                                     f"{major}.{minor})"))
    else:
        rows.append(("gpu", "none visible"))
    try:
        env.kernel_family_preference()
        family_ok = True
    except ValueError:  # every kernel call would raise it: a warning below (setting_problems)
        family_ok = False
    try:
        arch = current_arch()
        rows.append(("arch", arch))
        if family_ok:
            rows.append(("forward family", _families("fwd", arch)))
            paged = _families("fwd", arch, paged=True)
            if paged != rows[-1][1]:  # a block table (paged KV) takes another family somewhere
                rows.append(("paged forward family", paged))
            rows.append(("backward family", _families("bwd", arch)))
        else:
            rows.append(("kernel family", "unknown (see the warning below)"))
    except RuntimeError as err:  # the reason, once: "arch  no CUDA GPU is visible, ..."
        rows.append(("arch", str(err).removeprefix("flashjit: ")))
    rows += [
        ("csrc", str(csrc_dir())),
        ("cache", str(root)),
        ("cache size", f"{_mib(found.bytes())}, {_entries(len(found.entries))}"
                       + (f" ({len(found.foreign)} other items ignored)" if found.foreign else "")),
    ]
    rows += [(name, value) for name, value in sorted(os.environ.items())
             if name.startswith("FLASHJIT_") or name in ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME")]
    warnings = _warnings(torch, nvcc)
    warnings += [f"{problem}; until then {consequence}"
                 for _, problem, consequence in env.setting_problems()]
    cache_warning = _cache_dir_warning(root)
    if cache_warning:
        warnings.append(cache_warning)
    rows += [("warning", text) for text in warnings]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _warn_about_cache_dir(root) -> None:
    warning = _cache_dir_warning(root)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def cache_list() -> int:
    """flashjit's entries in the cache dir; other files there are only counted. A cache dir that
    is no usable folder gets a warning line (stderr)."""
    root = cache_dir()
    _warn_about_cache_dir(root)
    found = jit_cache.scan(root)
    entries = jit_cache.list_entries(root, found)
    foreign = len(found.foreign)
    ignored = f" ({foreign} other items, not flashjit's, ignored)" if foreign else ""
    print(f"cache {root}: {_entries(len(entries))}{ignored}")
    for e in entries:
        if e["ok"]:
            detail = f"built {e['date']} in {e['build_seconds']:.1f} s"
        else:
            detail = f"DAMAGED (rebuilt on next use): {e['reason']}"
        print(f"  {e['dirname']:56s} {_mib(e['bytes']):>10s}  {detail}")
    return 0


def cache_clear() -> int:
    """Remove flashjit's items from the cache dir (jit.cache.clear): one line with the counts,
    one per item left in use ("in use, skipped"), one per item that could not be removed (stderr,
    with the reason). 1 when something could not be removed, else 0."""
    root = cache_dir()
    _warn_about_cache_dir(root)
    result = jit_cache.clear(root)
    summary = f"removed {result.removed} items from {root}"
    if result.in_use:
        summary += f"; {len(result.in_use)} in use, skipped"
    if result.failed:
        summary += f"; {len(result.failed)} could not be removed"
    print(summary)
    for path, why in result.in_use:
        print(f"  in use, skipped: {path} ({why})")
    for path, why in result.failed:
        print(f"error: could not remove {path}: {why}", file=sys.stderr)
    return 1 if result.failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashjit")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, GPU, arch, cache location and size")
    cache_parser = commands.add_parser("cache", help="list or clear compiled binaries")
    cache_parser.add_argument("action", choices=["list", "clear"])
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    return cache_list() if args.action == "list" else cache_clear()


def run_quietly_on_broken_pipe(main_function) -> int:
    """``main_function()``'s exit status, flushing stdout; when stdout's reader has gone (``| head``)
    141, as for a program SIGPIPE ends, with no traceback (stdout goes to /dev/null so that the
    interpreter's own flush at exit says nothing either)."""
    try:
        status = main_function()
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(run_quietly_on_broken_pipe(main))
