"""Signals and child processes for the emulated cluster: hold back Ctrl-C while namespaces are built
or torn down, and signal a child's whole process group without ever hitting a reused PID."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Dict, List

SIGNALS = tuple(
    s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None
)


def killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_proc(p: subprocess.Popen, sig: int) -> None:
    """Signal an unreaped child and its process group (its own group when start_new_session)."""
    if p.returncode is not None:
        return  # reaped: its PID may belong to someone else now
    killpg(p.pid, sig)
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        pass


def exited_unreaped(p: subprocess.Popen) -> bool:
    """Has the child exited? Checked without reaping it (waitid WNOWAIT)."""
    if p.returncode is not None:
        return True
    try:
        r = os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return r is not None


class deferred_signals:
    """Hold back SIGINT/SIGTERM/SIGHUP for the duration of a critical section (main thread only).

    Python-level rather than ``pthread_sigmask``: a process-directed signal may be taken by any
    thread (torch starts several), and Python then runs the handler in the main thread anyway.
    On exit the handlers in ``saved`` are installed (callers may edit it) and held signals are
    re-delivered with ``signal.raise_signal``. Ignored signals are left alone.
    """

    def __enter__(self):
        self.saved: Dict[int, object] = {}
        self.pending: List[int] = []
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                prev = signal.getsignal(s)
                if prev is signal.SIG_IGN or prev is None:
                    continue
                self.saved[s] = prev
                signal.signal(s, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        self.pending.append(signum)

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(self.pending):
            signal.raise_signal(s)
