"""RankPool: P worker processes that form one gloo group and run named tasks on request.

Spawning torch processes costs seconds, so tests reuse one pool for many tasks. Tasks are
("module:function", kwargs) sent as JSON lines; only functions in allow-listed modules run, and
results come back as JSON, so nothing is ever unpickled. Workers die with the pool (closed stdin,
PR_SET_PDEATHSIG), so an aborted test run leaves no process behind.
"""
from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time

import torch.distributed as dist

RESULT_PREFIX = "@@streamattn-result "


_ZYGOTE = None


def _zygote():
    global _ZYGOTE
    if _ZYGOTE is None or not _ZYGOTE.alive():
        from .zygote import Zygote

        _ZYGOTE = Zygote()
    return _ZYGOTE


def _forkable(name: str, value: str) -> bool:
    """An extra environment variable a forked rank can take after the zygote started: streamattn's
    settings are read at call time; process-start ones (MALLOC_*, OMP_*, LD_*) need a process, and
    so does a TRITON_INTERPRET other than the zygote's (triton reads it when imported)."""
    if name == "TRITON_INTERPRET":
        return value == os.environ.get(name)
    return name.startswith("STREAMATTN_") or name == "POOL_VARIANT"


def close_zygote() -> None:
    """Stop the rank zygote of this process (its ranks must be closed first)."""
    global _ZYGOTE
    if _ZYGOTE is not None:
        _ZYGOTE.close()
        _ZYGOTE = None


class RankError(RuntimeError):
    """One or more ranks failed a task. .results holds every rank's reply (None if it died)."""

    def __init__(self, message, results):
        super().__init__(message)
        self.results = results


class RankPool:
    """world_size ranks on this machine (or inside namespaces via `launcher`).

    env: extra environment for the workers. launcher(rank) -> argv prefix (e.g. ip netns exec).
    store_host: address the workers use to reach the TCPStore this process hosts.
    fork: fork the ranks from a pre-imported zygote (streamattn.testing.zygote; local ranks only,
    no launcher): a pool starts in a fraction of a second instead of ~2 s of CPU per rank.
    """

    def __init__(self, world_size, *, env=None, threads=1, timeout=120.0, launcher=None,
                 store_host="127.0.0.1", bind_host=None, node_env=None, fork=False):
        self.world_size = world_size
        self.timeout = timeout
        self._store = dist.TCPStore(bind_host or store_host, 0, world_size, is_master=True,
                                    wait_for_workers=False)
        self._logs, self.procs = [], []
        base_env = dict(os.environ)
        base_env.update({"OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
        base_env.update(env or {})
        try:
            for rank in range(world_size):
                log = tempfile.TemporaryFile(mode="w+b")
                self._logs.append(log)
                flags = ["--rank", str(rank), "--world-size", str(world_size), "--store-host",
                         store_host, "--store-port", str(self._store.port), "--threads", str(threads)]
                argv = [sys.executable, "-m", "streamattn.testing.worker"] + flags
                if launcher is not None:
                    argv = list(launcher(rank)) + argv
                renv = dict(base_env)
                if node_env is not None:
                    renv.update(node_env(rank))
                if fork and launcher is None and all(_forkable(k, v) for k, v in (env or {}).items()):
                    self.procs.append(_zygote().fork(flags, renv, log.fileno()))
                    continue
                self.procs.append(subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=renv,
                    start_new_session=True))
            self.run("streamattn.testing.cases:ping", timeout=timeout)
        except BaseException:
            self.close()
            raise

    # -- tasks ------------------------------------------------------------------------------
    def run(self, fn: str, timeout=None, **kwargs) -> list:
        """Run fn(rank, world_size, **kwargs) on every rank; return the per-rank results.
        Raises RankError if any rank raised or died, with every rank's error text."""
        results = self.run_raw(fn, timeout=timeout, **kwargs)
        failed = [r for r in results if r is None or not r.get("ok")]
        if failed:
            lines = []
            for rank, r in enumerate(results):
                if r is None:
                    lines.append(f"rank {rank}: no reply (exit code {self.procs[rank].poll()})\n"
                                 f"{self.stderr_tail(rank)}")
                elif not r.get("ok"):
                    lines.append(f"rank {rank}: {r.get('type')}: {r.get('error')}")
            raise RankError(f"{fn} failed:\n" + "\n".join(lines), results)
        return [r["result"] for r in results]

    def run_raw(self, fn: str, timeout=None, **kwargs) -> list:
        """Like run, but return each rank's raw reply: {"ok", "result"|"error","type"} or None."""
        self.submit(fn, **kwargs)
        return self.collect(timeout)

    def submit(self, fn: str, **kwargs) -> None:
        """Start fn on every rank without waiting; collect() gathers the replies."""
        line = (json.dumps({"fn": fn, "kwargs": kwargs}) + "\n").encode()
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.stdin.write(line)
                    p.stdin.flush()
                except BrokenPipeError:
                    pass

    def collect(self, timeout=None) -> list:
        return self._collect(timeout or self.timeout)

    def _collect(self, timeout):
        results = [None] * self.world_size
        pending = {p.stdout.fileno(): r for r, p in enumerate(self.procs) if p.poll() is None}
        buffers = {fd: b"" for fd in pending}
        sel = selectors.DefaultSelector()
        for fd in pending:
            sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while pending and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=min(0.5, max(deadline - time.monotonic(), 0))):
                    fd = key.fd
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:  # the worker exited
                        sel.unregister(fd)
                        pending.pop(fd, None)
                        continue
                    buffers[fd] += chunk
                    while b"\n" in buffers[fd] and fd in pending:
                        raw, buffers[fd] = buffers[fd].split(b"\n", 1)
                        text = raw.decode("utf-8", "replace")
                        if text.startswith(RESULT_PREFIX):
                            results[pending.pop(fd)] = json.loads(text[len(RESULT_PREFIX):])
                            sel.unregister(fd)
        finally:
            sel.close()
        return results

    def stderr_tail(self, rank, nbytes=4000) -> str:
        log = self._logs[rank]
        try:
            log.flush()
            size = log.seek(0, os.SEEK_END)
            log.seek(max(0, size - nbytes))
            return log.read().decode("utf-8", "replace")
        except (ValueError, OSError):
            return ""

    # -- lifecycle ----------------------------------------------------------------------------
    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs) and len(self.procs) == self.world_size

    def close(self, grace=5.0) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, 9)
                except (ProcessLookupError, PermissionError):
                    p.kill()
                p.wait()
            for f in (p.stdout,):
                try:
                    f.close()
                except OSError:
                    pass
        for log in self._logs:
            log.close()
        self.procs, self._logs = [], []
        self._store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
