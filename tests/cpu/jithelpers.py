"""Helpers shared by the CPU tests: child processes with a private cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A child process that loads the selftest spec through load_spec and checks x *= alpha.
SELFTEST_CHILD = """
import torch
from flashjit.jit import JitSpec, load_spec
ops = load_spec(JitSpec("selftest"))
x = torch.arange(6, dtype=torch.float32)
ops.scale_(x, 1.5)
assert torch.equal(x, torch.arange(6, dtype=torch.float32) * 1.5), x
print("selftest ok", flush=True)
"""


# A snapshot of csrc taken at session start (conftest sets it): every build in the suite
# compiles it, so edits to the checkout's csrc during a run change no key.
CSRC_SNAPSHOT: Path | None = None


def child_env(cache: Path, **extra: str) -> dict:
    """The environment of a child process: our cache and csrc snapshot, no other FLASHJIT_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHJIT_")}
    env["FLASHJIT_CACHE_DIR"] = str(cache)
    if CSRC_SNAPSHOT is not None:
        env["FLASHJIT_CSRC_DIR"] = str(CSRC_SNAPSHOT)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_python(args: list[str], cache: Path, timeout: float = 300, **extra: str):
    """Run ``python <args>`` from the repository root; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=child_env(cache, **extra),
        capture_output=True, text=True, timeout=timeout,
    )


def _default_sigint() -> None:
    """In the child before exec: SIGINT at its default, as in a process started from a terminal,
    whatever the test run inherited (a shell's background job, nohup, ignores it, and Python then
    keeps it ignored, so the tests that send it would see no effect)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_python(args: list[str], cache: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=child_env(cache, **extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=_default_sigint,
    )


def entries(cache: Path) -> list[Path]:
    """The cache's entry folders (temp folders and logs left out)."""
    return sorted(p for p in cache.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name != "logs")
