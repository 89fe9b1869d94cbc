"""Build specs into the cache ahead of time, in parallel, e.g. on a login node without a GPU.

    python -m flashjit.prebuild --arch 8.0 9.0 --dtype bf16 --head-dim 64 128 --causal both
    python -m flashjit.prebuild --kernel selftest
    python -m flashjit.prebuild --arch sm90a --list      # names only, builds nothing
    python -m flashjit.prebuild --arch sm90a --family sm80   # mma.sync fwd and bwd on Hopper too
    python -m flashjit.prebuild --arch sm90a --window both --softcap yes   # variant specs
    python -m flashjit.prebuild --arch sm90a --kernel fwd --paged yes   # paged K/V (prefill)
    python -m flashjit.prebuild --arch sm90a --kernel dropout_mask   # the test-only mask kernel

Each ``--arch`` argument is one binary: ``--arch 8.0 9.0`` builds an sm80 and an sm90a binary
per spec, ``--arch '8.0;9.0'`` one sm80-sm90a binary (what FLASHJIT_CUDA_ARCH_LIST='8.0;9.0'
loads). Without ``--arch``: FLASHJIT_CUDA_ARCH_LIST, else TORCH_CUDA_ARCH_LIST, else the GPU's.
Each build runs in its own process through the same cache and lock as first use, with its
output kept in a log file under the cache's logs/ folder. List options may be repeated
(``--arch 9.0 --arch 8.0`` is ``--arch 9.0 8.0``). Ctrl-C, SIGTERM or SIGHUP stop every build
(each worker, its ninja and compilers) and exit with 128 + the signal's number after one line,
``prebuild: interrupted``; the cache stays consistent (a stopped build publishes nothing).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from .jit import env as jit_env
from .jit import registry
from .jit.arch import NoGpuError, current_arch, parse_arch_list
from .jit.env import (KERNEL_FAMILIES, nvcc_gpu_codes, nvcc_path, nvcc_unsupported_archs,
                      nvcc_version)
from .jit.spec import (ATTENTION_KERNELS, DTYPES, HEAD_DIM_BUCKETS, KERNELS, VARIANTS, JitSpec,
                       head_dim_bucket, with_tile_override)
from .jit.workers import StopSignals, Workers, interrupt_after_children

_GIB = 1 << 30
_MEMORY_PER_JOB = 4 * _GIB  # nvcc on one attention kernel peaks at a few GB
_CHOICES = {"yes": (True,), "no": (False,), "both": (False, True)}


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _positive_int(text: str) -> int:
    """argparse type of --jobs: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def default_jobs() -> int:
    """min(CPUs, available memory / 4 GB), at least 1."""
    memory = _available_memory()
    by_memory = _cpu_count() if memory is None else memory // _MEMORY_PER_JOB
    return max(1, min(_cpu_count(), by_memory))


_EXAMPLES = """\
examples:
  python -m flashjit.prebuild --arch 8.0 9.0 --dtype bf16 --head-dim 64 128
      an sm80 and an sm90a binary for each bf16 spec at head dims 64 and 128
  python -m flashjit.prebuild --arch '8.0;9.0'
      every spec as one binary that runs on both sm80 and sm90a
  python -m flashjit.prebuild --arch sm90a --list
      the spec names only; builds nothing
  python -m flashjit.prebuild --arch sm90a --family sm80
      the mma.sync kernels on Hopper too
  python -m flashjit.prebuild --arch sm90a --dtype bf16 --head-dim 128 --window yes --sink both
      sliding-window specs, with and without attention sinks
  python -m flashjit.prebuild --arch sm90a --kernel fwd --dtype bf16 --head-dim 128 --paged yes
      the forward reading K/V through a block table (flash_attn_with_kvcache's chunked
      prefill on a paged cache)
  python -m flashjit.prebuild --arch sm90a --kernel dropout_mask
      the test-only dropout-mask kernel (flashjit.testing.dropout_mask)
  python -m flashjit.prebuild --kernel selftest
      the CPU-only test op: checks the C++ toolchain, needs no GPU, CUDA torch or nvcc
"""


class _Extend(argparse.Action):
    """The parser's "extend" action: a list option that may be repeated, each use adding to the
    list (``--arch 9.0 --arch 8.0`` is ``--arch 9.0 8.0``), the first one replacing the default
    list (argparse's own "extend" would add to the default)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if current is None or current is self.default:
            current = []
        setattr(namespace, self.dest, [*current, *values])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flashjit.prebuild",
        description="Compile flashjit specs into the cache (FLASHJIT_CACHE_DIR) ahead of use. "
                    "List options may be repeated: --arch 9.0 --arch 8.0 is --arch 9.0 8.0.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.register("action", "extend", _Extend)
    p.add_argument("--kernel", nargs="+", action="extend", choices=list(KERNELS),
                   default=list(ATTENTION_KERNELS),
                   help=f"kernels to build (default: {' '.join(ATTENTION_KERNELS)}; dropout_mask "
                        "is the test-only mask kernel, selftest the CPU-only test op)")
    p.add_argument("--arch", nargs="+", action="extend", metavar="ARCH",
                   help="one binary per argument: 8.0, 9.0, sm80, sm90a, or '8.0;9.0' for one "
                        "binary holding both (default: FLASHJIT_CUDA_ARCH_LIST, else "
                        "TORCH_CUDA_ARCH_LIST, else the visible GPU's arch)")
    p.add_argument("--dtype", nargs="+", action="extend", choices=DTYPES, default=list(DTYPES),
                   help=f"data types (default: {' '.join(DTYPES)})")
    p.add_argument("--head-dim", nargs="+", action="extend", type=int,
                   default=list(HEAD_DIM_BUCKETS),
                   metavar="D", help="head dims, mapped to their buckets (default: all buckets, "
                                     f"{' '.join(map(str, HEAD_DIM_BUCKETS))})")
    p.add_argument("--causal", choices=list(_CHOICES), default="both",
                   help="causal masking: yes, no or both (default: both)")
    variant_help = {
        "window": "sliding-window attention (window_size)",
        "softcap": "logit softcapping (softcap > 0)",
        "alibi": "ALiBi biases (alibi_slopes)",
        "sink": "attention sinks (sink)",
    }
    for flag in VARIANTS:
        p.add_argument(f"--{flag}", choices=list(_CHOICES), default="no",
                       help=f"{variant_help[flag]}: yes, no or both (default: no)")
    p.add_argument("--dropout", choices=list(_CHOICES), default="no",
                   help="dropout: yes, no or both (default: no)")
    p.add_argument("--paged", choices=list(_CHOICES), default="no",
                   help="K/V read through a block table (flash_attn_with_kvcache's chunked "
                        "prefill on a paged cache; only the kernels that take it: "
                        + ", ".join(k for k in ATTENTION_KERNELS
                                    if any(r.paged for r in registry.rows(k)))
                        + "): yes, no or both (default: no)")
    p.add_argument("--family", choices=KERNEL_FAMILIES, type=str.lower,
                   help="the kernel family to prefer wherever it serves, the default elsewhere: "
                        + "; ".join(f"{r.family} {r.kernel}: {registry.describe(r)}"
                                    for r in registry.REGISTRY)
                        + " (default: as FLASHJIT_KERNEL_FAMILY, else each spec's default)")
    p.add_argument("--tile", metavar="A,B,..",
                   help="a tile instead of the launch code's per-head-dim choice, for tuning "
                        "sweeps (JitSpec.tile), in the family's own parameters: "
                        + "; ".join(f"{r.family} {r.kernel}: {','.join(r.tile_params)}"
                                    for r in registry.REGISTRY if r.tile_params)
                        + " (default: none)")
    p.add_argument("--jobs", "-j", type=_positive_int, default=None, metavar="N",
                   help="builds at once (default: one per CPU, at most one per 4 GB of "
                        "available memory)")
    p.add_argument("--list", action="store_true",
                   help="print the spec names and exit (default: build them)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each spec, whether it is cached, and its cache folder; build "
                        "nothing (default: build what is missing)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: build one spec (JSON fields)
    return p


def specs_from_args(args: argparse.Namespace) -> list[JitSpec]:
    """The cross product the arguments ask for, without duplicates, in a stable order."""
    specs: list[JitSpec] = []
    attention = [k for k in args.kernel if KERNELS[k].attention]
    arch_only = [k for k in args.kernel if KERNELS[k].arch_only]
    arches: list[str] = []
    if attention or arch_only:
        if args.arch:
            arches = ["-".join(parse_arch_list(a)) for a in args.arch]
        else:
            try:
                arches = [current_arch()]
            except NoGpuError:  # its text names only the environment variable
                raise NoGpuError(
                    "no CUDA GPU is visible; pass --arch (e.g. --arch 9.0 or --arch sm90a) to "
                    "build for a GPU elsewhere, or set FLASHJIT_CUDA_ARCH_LIST") from None
    head_dims = sorted({head_dim_bucket(d) for d in args.head_dim}) if attention else []
    flags = [_CHOICES[args.causal], *(_CHOICES[getattr(args, v)] for v in VARIANTS),
             _CHOICES[args.dropout]]
    for kernel, arch, dtype, head_dim, *variant, paged in itertools.product(
        attention, arches, args.dtype, head_dims, *flags, _CHOICES[args.paged]
    ):
        if variant[-1] and not _has_dropout(kernel):
            continue  # --dropout yes/both: only for the kernels that have dropout (not decode)
        if paged and not _takes_paged(kernel):
            continue  # --paged yes/both: only for the kernels that take it (the forward)
        if paged and variant[-1]:
            continue  # paged K/V is inference only: no call takes dropout with a block table
        spec = JitSpec(kernel, arch, dtype, head_dim, *variant,
                       family=_family(args.family, kernel, arch, head_dim, paged), paged=paged)
        # --tile, else FLASHJIT_*_TILE, under one rule (a paged spec of another family than the
        # plain one keeps its own tile)
        specs.append(with_tile_override(spec, args.tile, args.family))
    specs += [JitSpec(k, arch) for k in arch_only for arch in arches]
    specs += [JitSpec(k) for k in args.kernel if KERNELS[k].cpu_only]
    return list(dict.fromkeys(specs))


def _has_dropout(kernel: str) -> bool:
    """Whether a family of ``kernel`` implements dropout (the decode kernel does not)."""
    return any(r.dropout for r in registry.rows(kernel))


def _takes_paged(kernel: str) -> bool:
    """Whether a family of ``kernel`` reads K/V through a block table (JitSpec.paged)."""
    return any(r.paged for r in registry.rows(kernel))


def _empty_selection(args: argparse.Namespace) -> str:
    """Why specs_from_args selected nothing (kernels without the flags asked for)."""
    why = []
    attention = [k for k in args.kernel if KERNELS[k].attention]
    no_dropout = [k for k in attention if not _has_dropout(k)]
    no_paged = [k for k in attention if not _takes_paged(k)]
    if args.dropout == "yes" and no_dropout:
        why.append(f"--dropout yes: {', '.join(no_dropout)} has no dropout")
    if args.paged == "yes" and no_paged:
        why.append(f"--paged yes: {', '.join(no_paged)} takes no block table (paged K/V is a "
                   "forward spec; decoding pages through its own cache arguments)")
    if args.paged == "yes" and args.dropout == "yes":
        why.append("--paged yes with --dropout yes: paged K/V is forward-only inference, no "
                   "call takes dropout with a block table")
    return "nothing to build or list" + (" (" + "; ".join(why) + ")" if why else "")


def _family(choice: str | None, kernel: str, arch: str, head_dim: int,
            paged: bool = False) -> str | None:
    """--family for one spec: like FLASHJIT_KERNEL_FAMILY, a preference
    (registry.preferred_family); None leaves it to JitSpec (environment, then default). arch and
    head_dim are in normal form here."""
    if choice is None:
        return None
    return registry.preferred_family(kernel, arch, head_dim, choice, paged)


_WORKER_INTERRUPTED = 130  # a worker's exit status when a signal stopped its build


def _run_worker(fields_json: str) -> int:
    """Build one spec (``--worker``). SIGINT, SIGTERM and SIGHUP stop it as Ctrl-C does, so the
    build's clean-up runs (temp folder, owner file, lock), once ninja, which gets the same signal
    from the parent, has stopped its compilers (workers.interrupt_after_children); a stopped
    build exits with _WORKER_INTERRUPTED."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt_after_children())
    try:
        from .jit.build import ensure_built

        library = ensure_built(JitSpec(**json.loads(fields_json)))
    except KeyboardInterrupt as err:
        print(f"interrupted{': ' + str(err) if str(err) else ''}", flush=True)
        return _WORKER_INTERRUPTED
    print(f"library: {library}")
    return 0


def _build_one(spec: JitSpec, log: Path, env: dict,
               workers: Workers) -> tuple[int | None, float, str | None]:
    """Build ``spec`` in a worker process writing to ``log``: (exit status, None if stopped
    before it started; seconds; why the log could not be written, else None). The log folder is
    made again if it went (a worker then still runs, its output is dropped if it cannot be)."""
    start = time.perf_counter()
    args = [sys.executable, "-m", "flashjit.prebuild", "--worker", json.dumps(spec.fields())]
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "w")
        log_problem = None
    except OSError as err:
        out = open(os.devnull, "w")
        log_problem = f"its log {log} could not be written ({err.strerror or err})"
    with out:
        status = workers.run(args, out, env)
    return status, time.perf_counter() - start, log_problem


def missing_cuda_toolchain() -> list[str]:
    """What building a CUDA spec here lacks, in plain words; empty when nothing is missing."""
    import torch

    missing = []
    if torch.version.cuda is None:
        missing.append(f"a CUDA build of torch (torch {torch.__version__} has no CUDA support)")
    if nvcc_path() is None:
        missing.append("nvcc (set CUDA_HOME to a CUDA toolkit)")
    return missing


# gcc's "fatal error:", nvcc's "error:" and "error #20-D:", ptxas's "ptxas error   :"; not
# "-Werror=", "BuildError:" nor torch's "Error building extension 'x':"
_ERROR_LINE = re.compile(r"\berror(\s*#[\w-]+)?\s*:", re.IGNORECASE)
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception): ")  # a traceback's last line
_COMPILER_LOG = re.compile(r"compiler output is in (\S+\.log)")  # named by build.BuildError


def failure_summary(worker_log: Path) -> tuple[str | None, Path]:
    """The first compiler ``error:`` line of a failed build, and the log that holds it.

    The worker log holds the worker's traceback, whose BuildError names a second log under the
    cache's logs/ folder with the compiler output; that one is searched first. Without an error
    line (e.g. no CUDA torch), the worker's exception line; None if neither log says anything.
    """
    try:
        worker_text = worker_log.read_text(errors="replace")
    except OSError:
        return None, worker_log
    named = _COMPILER_LOG.search(worker_text)
    if named:
        try:
            compiler_log = Path(named.group(1))
            line = next((l for l in compiler_log.read_text(errors="replace").splitlines()
                         if _ERROR_LINE.search(l)), None)
            if line:
                return line.strip(), compiler_log
        except OSError:
            pass
    lines = worker_text.splitlines()
    line = (next((l for l in lines if _ERROR_LINE.search(l)), None)
            or next((l for l in reversed(lines) if _EXCEPTION_LINE.match(l)), None))
    return (line.strip() if line else None), worker_log


def _count(n: int, noun: str) -> str:
    """'1 spec', '2 specs', '0 specs'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _worker_env(jobs: int, root: Path) -> dict:
    """The workers' environment: FLASHJIT_DISABLE_JIT dropped (building is their job), the cache
    dir as an absolute path, MAX_JOBS (ninja's -j) a share of the CPUs unless set."""
    env = dict(os.environ)
    env.pop("FLASHJIT_DISABLE_JIT", None)
    env["FLASHJIT_CACHE_DIR"] = str(root)
    env.setdefault("MAX_JOBS", str(max(1, _cpu_count() // jobs)))  # ninja's -j in each build
    return env


def check_environment() -> None:
    """The FLASHJIT_* variables prebuild and its workers read, checked before anything runs
    (env.setting_problems): ValueError naming the first bad one. (FLASHJIT_DISABLE_JIT is not
    read: prebuild builds whatever it says.)"""
    for name, problem, _ in jit_env.setting_problems():
        if name != "FLASHJIT_DISABLE_JIT":
            raise ValueError(problem)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module doc): 0 when every spec is built or cached, 1 when a build
    failed or the cache cannot be written, 2 for bad arguments or environment variables (one
    ``error:`` line), 128 + the signal's number when interrupted."""
    args = _parser().parse_args(argv)
    if args.worker:
        return _run_worker(args.worker)
    with StopSignals():
        try:
            return _main(args)
        except KeyboardInterrupt as err:
            print("prebuild: interrupted", file=sys.stderr, flush=True)
            return 128 + getattr(err, "signum", signal.SIGINT)


def _main(args: argparse.Namespace) -> int:
    try:
        check_environment()
        specs = specs_from_args(args)
    except (ValueError, RuntimeError) as err:
        print(f"error: {str(err).removeprefix('flashjit: ')}", file=sys.stderr)
        return 2
    if not specs:
        print(f"note: {_empty_selection(args)}", file=sys.stderr)
    if args.list:
        for spec in specs:
            print(spec.name)
        return 0

    from .jit.cache import CacheDirError, CacheEntry, ensure_writable, logs_dir
    from .jit.paths import cache_dir, cache_dir_problem

    root = cache_dir()
    entries = [CacheEntry.for_spec(spec, root) for spec in specs]
    cached = [entry.check().ok for entry in entries]
    if args.dry_run:
        problem = cache_dir_problem(root)
        if problem:
            print(f"warning: {problem}: nothing can be built there", file=sys.stderr)
        for spec, entry, hit in zip(specs, entries, cached):
            print(f"{spec.name:40s} {'cached ' if hit else 'missing'} {entry.path}")
        print(f"{_count(len(specs), 'spec')}, {sum(cached)} cached, "
              f"{len(specs) - sum(cached)} to build; cache {root}")
        return 0

    todo = [spec for spec, hit in zip(specs, cached) if not hit]
    cuda_todo = [spec for spec in todo if spec.with_cuda]
    unsupported = nvcc_unsupported_archs({spec.arch for spec in cuda_todo})
    if unsupported:  # an --arch (or arch list variable) this nvcc has no SASS target for
        print(f"error: --arch: nvcc ({nvcc_version() or 'unknown version'}) cannot build for "
              f"{', '.join(unsupported)}; it builds {' '.join(nvcc_gpu_codes())}",
              file=sys.stderr)
        return 2
    missing = missing_cuda_toolchain() if cuda_todo else []
    if missing:  # every worker would fail the same way; say it once, before spawning any
        count = _count(len(cuda_todo), "CUDA spec")
        print(f"error: cannot build {count} here: building CUDA specs needs "
              f"{' and '.join(missing)}, not a GPU; --kernel selftest alone needs neither",
              file=sys.stderr)
        return 1
    log_dir = None
    if todo:  # a log folder only when something is built
        try:
            ensure_writable(root)
            log_dir = (logs_dir(root)
                       / f"prebuild-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}")
            log_dir.mkdir()
        except (CacheDirError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    jobs = max(1, args.jobs or default_jobs())
    env = _worker_env(jobs, root)
    total = len(specs)
    print(f"flashjit prebuild: {_count(total, 'spec')}, {total - len(todo)} cached, "
          f"{len(todo)} to build with {_count(jobs, 'job')}; cache {root}", flush=True)
    done = 0
    for spec, hit in zip(specs, cached):
        if hit:
            done += 1
            print(f"[{done}/{total}] {spec.name} ... cached", flush=True)

    start = time.perf_counter()
    failed: list[tuple[JitSpec, Path, str, Path]] = []
    workers = Workers()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(_build_one, spec, log_dir / f"{spec.name}.log", env, workers): spec
                   for spec in todo}
        for future in concurrent.futures.as_completed(futures):
            spec = futures[future]
            status, seconds, log_problem = future.result()
            done += 1
            log = log_dir / f"{spec.name}.log"
            ok = status == 0
            where = f"log: {log}" if log_problem is None else log_problem
            print(f"[{done}/{total}] {spec.name} ... "
                  + (f"{seconds:.1f} s" if ok else f"FAILED after {seconds:.1f} s, {where}"),
                  flush=True)
            if not ok:
                error, error_log = failure_summary(log)
                error = error or _no_error_line(status)
                print(f"    {error}", flush=True)
                failed.append((spec, log, error, error_log))
    except BaseException:  # interrupted (or stdout closed): stop every build before leaving
        workers.stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        log_dir = _drop_if_empty(log_dir)  # interrupted before any worker started

    built = len(todo) - len(failed)
    logs = f"; logs in {log_dir}" if log_dir else ""
    print(f"built {built}, cached {total - len(todo)}, failed {len(failed)} in "
          f"{time.perf_counter() - start:.1f} s{logs}", flush=True)
    for spec, log, error, error_log in failed:
        print(f"FAILED {spec.name}: {error}", file=sys.stderr)
        if error_log != log:
            print(f"  compiler output: {error_log}", file=sys.stderr)
        print(f"  build log: {log}", file=sys.stderr)
    return 1 if failed else 0


def _no_error_line(status: int | None) -> str:
    """What a failed worker's exit status says when its log names no error."""
    if status == _WORKER_INTERRUPTED:
        return "interrupted: a signal stopped its worker or ninja"
    if status is not None and status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"its worker was killed by {name}" + (" (out of memory?)" if name == "SIGKILL"
                                                      else "")
    return "no error line found"


def _drop_if_empty(log_dir: Path | None) -> Path | None:
    """``log_dir``, or None once it is removed (empty) or gone."""
    try:
        if log_dir is not None and not any(log_dir.iterdir()):
            log_dir.rmdir()
            return None
    except OSError:
        return None
    return log_dir


if __name__ == "__main__":
    from .__main__ import run_quietly_on_broken_pipe

    sys.exit(run_quietly_on_broken_pipe(main))
