"""The per-entry build lock: one builder per key across processes (and hosts sharing a cache).

A ``filelock.FileLock`` (flock on Linux) next to the entry; the OS releases it when its holder
dies, however it dies. The holder writes who it is into a side file so that waiters can say
whom they wait for; waiting is bounded by FLASHJIT_LOCK_TIMEOUT. ``cache clear`` tries the same
lock without waiting (try_hold) and leaves an entry alone while a build holds it.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import filelock

from . import env
from .cache import CacheEntry
from .log import logger

try:
    import fcntl
except ImportError:  # not a POSIX system: try_hold cannot tell
    fcntl = None

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


@contextlib.contextmanager
def try_hold(lock_path: Path) -> Iterator[bool | None]:
    """``with try_hold(entry.lock_path) as free:`` takes a build lock without waiting (flock, as
    filelock does), for ``cache clear``. ``free`` is True while this holds it: no build of that
    entry runs, and none starts until the block ends (a lock file this made is removed again on
    exit; one removed inside the block is fine: filelock's waiters then retry on a new file).
    It is also True when there is no lock file and none can be made (a cache that cannot be
    written, where no build can run either). False: another process holds it, a build is running.
    None: it cannot be told (the file cannot be opened, or the file system has no flock)."""
    fd, made, free = None, False, None
    try:
        fd, made = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except OSError:  # it exists, or it cannot be made here (read-only, no permission)
        for flags in (os.O_RDWR, os.O_RDONLY):  # flock needs no write access
            try:
                fd = os.open(lock_path, flags)
                break
            except FileNotFoundError:
                free = True
                break
            except OSError:
                continue
    if fd is not None and fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        except OSError:
            free = None
    try:
        yield free
    finally:
        if fd is not None:
            if made and free:
                with contextlib.suppress(OSError):
                    os.unlink(lock_path)
            os.close(fd)
