"""Compile-on-first-use: find a spec's binary in the cache or build it, then load its ops.

    ops = load_spec(JitSpec("fwd", "sm90a", "bf16", 128, causal=True))
    ops.fwd(...)

The first call for a spec in a process costs a key computation (a digest of csrc, the
toolchain versions) and, on a cache hit, one ``torch.ops.load_library``: no lock, no ninja.
Later calls are a dict lookup. A miss takes the entry's lock, builds with
``torch.utils.cpp_extension.load`` (ninja) in a temp folder and publishes it atomically.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
import threading
import time
from pathlib import Path

from . import env
from .cache import CacheEntry, ensure_writable, logs_dir
from .lock import BuildLock
from .log import logger
from .paths import csrc_dir
from .spec import JitSpec

_LIB_EXT = ".so"
_loaded: dict[JitSpec, object] = {}
_process_lock = threading.Lock()


class BuildError(RuntimeError):
    """A spec failed to compile; the message names the log with the compiler output."""


class JitDisabledError(RuntimeError):
    """FLASHJIT_DISABLE_JIT=1 and the spec is not in the cache."""


def load_spec(spec: JitSpec):
    """``torch.ops.<spec.op_namespace>`` with the spec's ops, compiling them on first use."""
    ops = _loaded.get(spec)
    if ops is not None:
        return ops
    with _process_lock:
        ops = _loaded.get(spec)
        if ops is None:
            import torch

            ensure_built(spec, load=True)
            ops = getattr(torch.ops, spec.op_namespace)
            _loaded[spec] = ops
    return ops


def ensure_built(spec: JitSpec, load: bool = False) -> Path:
    """The path of the spec's published library, building it if needed.

    With ``load``, the library is also loaded into this process (a fresh build always is:
    cpp_extension.load loads what it builds). A failed compile raises BuildError (its compiler
    output in a log under logs/), one stopped by a signal (Ctrl-C) KeyboardInterrupt; neither
    publishes anything or leaves its temp folder.
    """
    csrc = csrc_dir()
    entry = CacheEntry.for_spec(spec, csrc=csrc)
    state = entry.check()
    if state.ok:
        if not load or _try_load(state.library):
            return state.library
        state = entry.check(verify=True)
        if state.ok:  # the file is intact: the fault is in this environment, not the cache
            _load(state.library)  # raises the loader's error again, for the caller to see
            return state.library
    if env.jit_disabled():
        where = "is not in" if state.status == "missing" else f"is damaged ({state.reason}) in"
        raise JitDisabledError(
            f"flashjit: {spec.name} {where} the cache {entry.root} and FLASHJIT_DISABLE_JIT=1 "
            f"forbids compiling it. Build it with: {spec.prebuild_command()}"
        )
    ensure_writable(entry.root)
    with BuildLock(entry):
        state = entry.check(verify=True)  # another process may have built it meanwhile
        if state.ok:
            if load:
                _load(state.library)
            return state.library
        if state.status == "damaged":
            logger.warning("cache entry %s is damaged (%s); removing and rebuilding it",
                           entry.path, state.reason)
            entry.remove()
        return _build(spec, entry, csrc)


def _load(library: Path) -> None:
    import torch

    torch.ops.load_library(str(library))


def _try_load(library: Path) -> bool:
    try:
        _load(library)
    except OSError as err:
        logger.debug("loading %s failed: %s", library, err)
        return False
    return True


def _existing(spec: JitSpec, sources: list[Path]) -> list[Path]:
    """``sources``, or FileNotFoundError naming those that do not exist."""
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"flashjit: {spec.name} needs sources that do not exist: {missing}")
    return sources


def _check_cuda_toolchain(spec: JitSpec) -> None:
    import torch

    if not spec.with_cuda:
        return
    if torch.version.cuda is None:
        raise BuildError(
            f"flashjit: torch {torch.__version__} has no CUDA support, so {spec.name} cannot be "
            "built here; install a CUDA build of torch (compile_only() checks the kernels with "
            "nvcc alone)"
        )
    if env.nvcc_path() is None:
        raise BuildError(f"flashjit: {env.nvcc_missing()}, to build {spec.name}")


# what ninja prints when SIGINT, SIGTERM or SIGHUP stopped it (it stops its compilers too)
_NINJA_INTERRUPTED = "build stopped: interrupted by user"


def _build(spec: JitSpec, entry: CacheEntry, csrc: Path) -> Path:
    """Compile and load ``spec`` in a temp folder, then publish it as ``entry``. Hold the lock.

    A failed compile raises BuildError naming a log of the compiler output; one that a signal
    stopped (ninja: "interrupted by user", e.g. Ctrl-C reaching ninja before Python) raises
    KeyboardInterrupt instead, writing no log. Either way the temp folder is removed."""
    from torch.utils import cpp_extension

    sources = _existing(spec, spec.sources(csrc))
    _check_cuda_toolchain(spec)
    tmp = entry.new_temp_dir()
    # A name unique to this attempt: cpp_extension skips building a name it has seen with the
    # same inputs in this process, even when that earlier build failed.
    ext_name = f"{spec.op_namespace}_{tmp.name.rsplit('@', 1)[1]}"
    verbose = env.verbose_enabled()
    logger.info("compiling %s for %s: a one-time cost, the result is cached in %s",
                spec.name, spec.arch, entry.root)
    start = time.perf_counter()
    try:
        try:
            cpp_extension.load(
                name=ext_name,
                sources=[str(s) for s in sources],
                extra_cflags=spec.cflags(),
                extra_cuda_cflags=spec.cuda_cflags(verbose),
                extra_include_paths=[str(csrc)],
                build_directory=str(tmp),
                verbose=verbose,
                with_cuda=spec.with_cuda,
                is_python_module=False,
            )
        except Exception as err:
            if _NINJA_INTERRUPTED in str(err):  # a signal stopped ninja: no compile error
                raise KeyboardInterrupt(
                    f"flashjit: compiling {spec.name} was interrupted ({_NINJA_INTERRUPTED}); "
                    "nothing was cached, the next use compiles it again") from err
            log = logs_dir(entry.root) / f"{spec.name}-{_timestamp()}.log"
            log.write_text(f"{spec.name}\nkey fields: {entry.fields}\n\n{err}\n")
            raise BuildError(
                f"flashjit: compiling {spec.name} failed; the compiler output is in {log}. To "
                "report it, rerun with FLASHJIT_VERBOSE=1 and attach that output and "
                "`python -m flashjit info`."
            ) from err
        seconds = time.perf_counter() - start
        library_name = spec.name + _LIB_EXT
        (tmp / f"{ext_name}{_LIB_EXT}").rename(tmp / library_name)
        for leftover in tmp.iterdir():  # objects and build.ninja: the library is all we keep
            if leftover.name != library_name:
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
        library = entry.publish(tmp, library_name, seconds)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("built %s in %.1f s", spec.name, seconds)
    return library


def _timestamp() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def compile_only(spec: JitSpec, out_dir) -> list[Path]:
    """Compile the spec's ``.cu`` sources with nvcc alone (no torch headers) into ``out_dir``.

    Checks that the kernels build for the spec's archs on a machine without a CUDA torch
    (CI). Returns the object files; raises BuildError with nvcc's output on failure.
    """
    nvcc = env.nvcc_path()
    if nvcc is None:
        raise BuildError(f"flashjit: {env.nvcc_missing()}")
    csrc = csrc_dir()
    cuda_sources = [s for s in spec.sources(csrc) if s.suffix == ".cu"]
    if not cuda_sources:
        raise ValueError(f"{spec.name} has no .cu sources to compile")
    _existing(spec, cuda_sources)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    verbose = env.verbose_enabled()
    objects = []
    for source in cuda_sources:
        obj = out_dir / f"{spec.name}_{source.stem}.o"
        cmd = [str(nvcc), "-c", str(source), "-o", str(obj), f"-I{csrc}", *spec.cuda_cflags(verbose)]
        if verbose:
            logger.info("%s", subprocess.list2cmdline(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        if verbose and (result.stdout or result.stderr):
            logger.info("%s%s", result.stdout, result.stderr)
        if result.returncode != 0:
            raise BuildError(
                f"flashjit: nvcc failed on {source.name} for {spec.name} (exit {result.returncode}):\n"
                f"{subprocess.list2cmdline(cmd)}\n{result.stdout}{result.stderr}"
            )
        objects.append(obj)
    return objects
