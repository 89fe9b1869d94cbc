"""Running a test worker on several processes with torchrun (torch.distributed.run), for the
context-parallel tests (tests/cpu/test_context_parallel_cpu.py, tests/gpu/test_context_parallel.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def run_ranks(worker: Path, nproc: int, timeout: float, extra_env=None) -> tuple[int, str]:
    """torchrun `worker` on nproc processes: (exit status, stdout + stderr). On timeout torchrun
    gets SIGTERM first (its agent then stops the workers, which it starts in their own session),
    SIGKILL only after a grace period; the status is then -1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", str(nproc), str(worker)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return -1, f"timed out after {timeout} s\n{out}"


def say(line: str) -> None:
    """One line of a worker to stdout in a single write (atomic on a pipe below 4 KiB), so the
    lines of ranks sharing torchrun's stdout never run into one another."""
    sys.stdout.flush()
    os.write(1, (line[:4000] + "\n").encode())
