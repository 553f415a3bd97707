"""A pre-imported parent that forks the local ranks of RankPools.

Why: a rank started as `python -m streamattn.testing.worker` spends ~2 s of CPU importing torch,
and the test suite starts ~35 pools (~130 ranks) on 2 cores: 194 s of a 15-minute budget spent
waiting for them. The zygote imports torch and streamattn once (running no torch op, so no thread
pool exists yet) and forks each rank from there.

Protocol (no pickle): RankPool sends one JSON request per rank over a Unix socket, with four file
descriptors attached (socket.send_fds): the rank's stdin, stdout and stderr, and the write end of
a *status pipe*. The zygote forks; the child makes those its fds 0-2, takes the request's
environment and runs `worker.main(argv)`. The zygote answers {"pid": ...}, reaps its children on
SIGCHLD and writes each one's exit code (os.waitstatus_to_exitcode: -N for signal N, as Popen) to
its status pipe, then closes it; `ForkedRank` reads it back, so poll()/wait() behave like
subprocess.Popen's. Every child runs in its own session (killpg works) and dies with the zygote
(PR_SET_PDEATHSIG), which dies with the test process.

Ranks inside network namespaces (a RankPool with a `launcher`) are still started as processes.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

_status = {}  # pid -> write end of its status pipe (zygote side)


def _reap(signum=None, frame=None):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        fd = _status.pop(pid, None)
        if fd is not None:
            try:
                os.write(fd, str(os.waitstatus_to_exitcode(status)).encode())
            finally:
                os.close(fd)


def _child(req, fds, conn):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    conn.close()
    os.setsid()
    for target, fd in zip((0, 1, 2), fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        os.close(fd)
    for fd in list(_status.values()):
        os.close(fd)
    os.environ.clear()
    os.environ.update(req["env"])
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    from . import worker

    code = 0
    try:
        worker.main(req["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    os._exit(code)


def serve(fd: int) -> None:
    """The zygote's loop on socket `fd` (its end of the socketpair)."""
    from .worker import die_with_parent

    die_with_parent()
    import torch  # noqa: F401  the imports every rank would otherwise repeat
    import torch.distributed  # noqa: F401

    import streamattn  # noqa: F401
    from . import cases, worker  # noqa: F401

    conn = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, _reap)
    while True:
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 4)
        if not msg:
            return  # the test process closed its end
        req = json.loads(msg)
        # SIGCHLD blocked until the child's status pipe is registered: a child reaped before
        # that would lose its exit code.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        pid = os.fork()
        if pid == 0:
            _child(req, fds, conn)
        for f in fds[:3]:
            os.close(f)
        _status[pid] = fds[3]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        conn.send(json.dumps({"pid": pid}).encode())


class ForkedRank:
    """The Popen-like handle of one forked rank: pid, stdin, stdout, poll(), wait(), kill()."""

    def __init__(self, pid, stdin, stdout, status_fd):
        self.pid, self.stdin, self.stdout, self._status = pid, stdin, stdout, status_fd
        self.returncode = None

    def _read(self, timeout):
        if self.returncode is None and select.select([self._status], [], [], timeout)[0]:
            data = os.read(self._status, 64)
            os.close(self._status)
            self.returncode = int(data) if data else -9
        return self.returncode

    def poll(self):
        return self._read(0)

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._read(0.1 if deadline is None else max(0.0, min(0.1, deadline - time.monotonic()))) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"rank pid {self.pid}", timeout)
        return self.returncode

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Zygote:
    """The test process's side: start the zygote once, then fork(argv, env) -> ForkedRank."""

    def __init__(self):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message each
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "streamattn.testing.zygote",
                                      str(theirs.fileno())], pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self.conn = mine

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fork(self, argv, env, stderr_fd) -> ForkedRank:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        st_r, st_w = os.pipe()
        try:
            socket.send_fds(self.conn, [json.dumps({"argv": list(argv), "env": dict(env)}).encode()],
                            [in_r, out_w, stderr_fd, st_w])
            reply = self.conn.recv(4096)
        finally:
            for fd in (in_r, out_w, st_w):
                os.close(fd)
        if not reply:
            for fd in (in_w, out_r, st_r):
                os.close(fd)
            raise RuntimeError(f"the rank zygote exited (code {self.proc.poll()})")
        pid = json.loads(reply)["pid"]
        return ForkedRank(pid, os.fdopen(in_w, "wb"), os.fdopen(out_r, "rb"), st_r)

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
