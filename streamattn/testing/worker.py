"""One rank of a RankPool: joins the gloo group, then runs JSON tasks read from stdin.

Only functions from ALLOWED modules run. Results are written to stdout as one JSON line with a
prefix, so stray prints cannot corrupt the protocol.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib
import json
import signal
import sys
import traceback

ALLOWED = ("streamattn.testing.", "streamattn.bench.", "streamattn.examples.")
RESULT_PREFIX = "@@streamattn-result "


def die_with_parent():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _resolve(name: str):
    module, _, func = name.partition(":")
    if not module.startswith(ALLOWED) or not func or func.startswith("_"):
        raise ValueError(f"task {name!r} is not an allowed streamattn task")
    return getattr(importlib.import_module(module), func)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--store-host", required=True)
    ap.add_argument("--store-port", type=int, required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    die_with_parent()

    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    store = dist.TCPStore(args.store_host, args.store_port, args.world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world_size,
                            timeout=datetime.timedelta(seconds=600))
    out = sys.stdout
    sys.stdout = sys.stderr  # anything a task prints goes to the log, not the protocol
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            task = json.loads(line)
            result = _resolve(task["fn"])(args.rank, args.world_size, **task.get("kwargs", {}))
            reply = {"ok": True, "result": result}
        except BaseException as exc:  # report everything; the pool decides
            if isinstance(exc, KeyboardInterrupt):
                raise
            reply = {"ok": False, "type": type(exc).__name__, "error": str(exc),
                     "traceback": traceback.format_exc()}
        out.write(RESULT_PREFIX + json.dumps(reply) + "\n")
        out.flush()
    try:
        dist.destroy_process_group()
    except Exception:
        pass


if __name__ == "__main__":
    main()
