"""Worker processes that a signal stops as a whole, for prebuild.

Each worker runs in a session of its own, so a terminal's Ctrl-C reaches only the parent, which
stops every worker once (Workers.stop): SIGTERM to each worker's process group, which holds the
worker and its ninja; ninja, on that signal, stops the compilers it started (they run in groups of
their own) and waits for them. StopSignals turns SIGINT, SIGTERM and SIGHUP into an exception in
the parent's main thread, so that it gets to do that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time


class Workers:
    """The worker processes of a run (run() from any thread), each in a session of its own, and
    stop() to end them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self._stopping = False

    def run(self, args: list[str], out, env: dict) -> int | None:
        """Run the command ``args`` (stdout and stderr to the file ``out``, no stdin) to its end:
        its exit status (negative: the signal that ended it), None if stop() came first."""
        with self._lock:
            if self._stopping:
                return None
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            self._running.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._running.discard(proc)

    def stop(self, grace_s: float = 10.0) -> None:
        """Start no more workers; SIGTERM the running ones' process groups (each worker and its
        ninja, which stops its compilers) and wait for the groups to end, SIGKILL after
        ``grace_s``."""
        with self._lock:
            self._stopping = True
            groups = [proc.pid for proc in self._running]
        for pgid in groups:
            _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while groups and time.monotonic() < deadline:
            groups = [g for g in groups if _signal_group(g, 0)]
            time.sleep(0.05)
        for pgid in groups:
            _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid`` (0: only look); False once it has no process."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_children() -> list[int]:
    """The pids of this process's children that have not exited (zombies excluded), from /proc;
    empty where /proc cannot tell."""
    me = str(os.getpid())
    children = []
    try:
        procs = os.listdir("/proc")
    except OSError:
        return []
    for name in procs:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # state, ppid, ...
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            children.append(int(name))
    return children


def interrupt_after_children(grace_s: float = 5.0):
    """A signal handler for a worker: wait up to ``grace_s`` for the worker's children (its
    ninja) to exit, then raise KeyboardInterrupt. Workers.stop signals the worker's whole
    process group, so ninja got the same signal and is stopping the compilers it started, which
    run in process groups of their own; raising at once would let the build's subprocess call
    SIGKILL ninja before it had passed the signal on, leaving those compilers running (seen on a
    loaded machine: Python's subprocess waits only 0.25 s)."""

    def handler(signum, frame):
        deadline = time.monotonic() + grace_s
        while _live_children() and time.monotonic() < deadline:
            time.sleep(0.02)
        raise KeyboardInterrupt

    return handler


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP (``signum``) reached the process (StopSignals); a
    KeyboardInterrupt, so what stops on Ctrl-C stops on it too. Exit status: 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """``with StopSignals():`` in the main thread, SIGINT, SIGTERM and SIGHUP raise Interrupted
    once (later ones are ignored, so that stopping the builds is not cut short); a signal that
    was ignored when prebuild started (nohup, a background job) stays ignored."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> StopSignals:
        self._old = {}
        self._raised = False
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) != signal.SIG_IGN:
                    self._old[signum] = signal.signal(signum, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if not self._raised:
            self._raised = True
            raise Interrupted(signum)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
