"""``python -m streamattn.bench.utsexec HOSTNAME -- ARGV...``: run ARGV as host HOSTNAME.

Enters a new UTS namespace (``unshare(CLONE_NEWUTS)``, needs root / CAP_SYS_ADMIN), sets the
hostname there, then ``execvp``s ARGV, so every process below sees HOSTNAME and no other process on
the machine is affected. The emulated-cluster launcher (`streamattn.bench.launcher`) starts each
node's torchrun through this, inside the node's network namespace, so that nodes have distinct host
identities (`streamattn.topology.hostinfo.host_identity` = hostname + machine-id) exactly as on real
machines; nothing is declared to streamattn.
"""
from __future__ import annotations

import ctypes
import os
import socket
import sys

CLONE_NEWUTS = 0x04000000


def enter_uts(hostname: str) -> None:
    """Move this process into a fresh UTS namespace named ``hostname`` (OSError on failure)."""
    if hasattr(os, "unshare"):  # Python >= 3.12
        os.unshare(CLONE_NEWUTS)
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWUTS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWUTS): {os.strerror(err)}")
    socket.sethostname(hostname)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m streamattn.bench.utsexec HOSTNAME -- ARGV...", file=sys.stderr)
        return 2
    try:
        enter_uts(argv[0])
    except OSError as e:
        print(f"streamattn utsexec: cannot set the hostname {argv[0]!r}: {e}", file=sys.stderr)
        return 2
    os.execvp(argv[2], argv[2:])
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
