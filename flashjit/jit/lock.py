"""The per-entry build lock: one builder per key across processes (and hosts sharing a cache).

A ``filelock.FileLock`` (flock on Linux) next to the entry; the OS releases it when its holder
dies, however it dies. The holder writes who it is into a side file so that waiters can say
whom they wait for; waiting is bounded by FLASHJIT_LOCK_TIMEOUT.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time

import filelock

from . import env
from .cache import CacheEntry
from .log import logger

_REMIND_EVERY_S = 60.0


class LockTimeoutError(TimeoutError):
    """Waited FLASHJIT_LOCK_TIMEOUT seconds for another process's build."""


class BuildLock:
    """``with BuildLock(entry):`` holds the entry's build lock, waiting at most ``timeout``
    seconds for another holder (default: env.lock_timeout(), which raises ValueError for a bad
    FLASHJIT_LOCK_TIMEOUT); 0 does not wait. A ``timeout`` that is not a finite number >= 0
    raises ValueError; waiting longer raises LockTimeoutError."""

    def __init__(self, entry: CacheEntry, timeout: float | None = None) -> None:
        self.entry = entry
        self.timeout = env.lock_timeout() if timeout is None else float(timeout)
        if not math.isfinite(self.timeout) or self.timeout < 0:
            raise ValueError(f"BuildLock: timeout must be a finite number >= 0, got {timeout!r}")
        self._lock = filelock.FileLock(str(entry.lock_path))

    def holder(self) -> str:
        try:
            return self.entry.owner_path.read_text().strip() or "an unknown process"
        except OSError:
            return "an unknown process"

    def __enter__(self) -> BuildLock:
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            self._wait()
        self.entry.owner_path.write_text(
            f"{socket.gethostname()} pid {os.getpid()} since "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}\n"
        )
        return self

    def _wait(self) -> None:
        start = time.monotonic()
        logger.info("waiting for %s, which is building %s (lock %s)",
                    self.holder(), self.entry.spec_name, self.entry.lock_path)
        while True:
            left = self.timeout - (time.monotonic() - start)
            if not left > 0:  # also ends the wait if the arithmetic ever gives nan
                raise LockTimeoutError(
                    f"flashjit: gave up after {self.timeout:.0f} s waiting for the build lock "
                    f"{self.entry.lock_path} (held by {self.holder()}). If no build of "
                    f"{self.entry.spec_name} is running, that process is stuck: end it, or set "
                    "FLASHJIT_LOCK_TIMEOUT to wait longer."
                )
            try:
                self._lock.acquire(timeout=min(left, _REMIND_EVERY_S))
                return
            except filelock.Timeout:
                logger.info("still waiting for %s (%.0f s so far)", self.holder(),
                            time.monotonic() - start)

    def __exit__(self, *exc) -> None:
        try:
            self.entry.owner_path.unlink(missing_ok=True)
        finally:
            self._lock.release()
