"""Is a process alive? One answer for the shm segment sweeper and the emulated cluster's sweeper."""
from __future__ import annotations


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists and has not exited (a zombie counts as dead).

    Read from /proc rather than `kill(pid, 0)`: a zombie still answers to signals, but its segments
    and namespaces are as orphaned as those of a reaped process.
    """
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError, PermissionError):
        return False
