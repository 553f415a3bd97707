"""Before and after the distributed rows: the csrc/ extension built once (section `setup`), then
heaps closed, NVSHMEM finalised and the process group destroyed (section `final`)."""
from __future__ import annotations

import time

from .distributed import gather
from .results import Watchdog, short


def prebuild_extension(res, rank, gloo, broken, seconds=900.0):
    """Build (or load) the csrc/ extension before the nvshmem-device cases, so a first-time nvcc
    build is not charged to one case's timeout: rank 0 builds into the shared cache, then the others
    load it. A failure drops the nvshmem-device transport with the reason."""
    import torch.distributed as dist

    watch = Watchdog(res, seconds)
    status = "ok"
    t0 = time.monotonic()
    with watch("setup", "csrc extension build/load"):
        if rank == 0:
            try:
                _csrc_build().load_extension()
            except Exception as exc:  # noqa: BLE001
                status = short(exc)
        status = gather(status, gloo)[0]
        if status == "ok" and rank != 0:
            try:
                _csrc_build().load_extension()
            except Exception as exc:  # noqa: BLE001
                status = short(exc)
        everyone = gather(status, gloo)
    bad = [f"rank {r}: {x}" for r, x in enumerate(everyone) if x != "ok"]
    if bad:
        broken.mark("nvshmem-device", bad[0])
    res.add("setup", "csrc extension build/load", "ERROR" if bad else "PASS",
            (bad[0] if bad else f"{time.monotonic() - t0:.0f}s"))
    dist.barrier(group=gloo)


def _csrc_build():
    """csrc/build.py, installed as streamattn.csrc.build."""
    from streamattn.csrc import build

    return build


def finalise(res, rank, gloo):
    """Close every transport this process created (heaps: collective, same order on every rank),
    finalise NVSHMEM if it was initialised, destroy the process group."""
    import torch.distributed as dist

    from streamattn import api

    problems = []
    for name, t in sorted(api.transports(None).items()):
        close = getattr(t, "close", None)
        if close is None:
            continue
        try:
            close()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{name}: {short(exc)}")
    try:
        from streamattn.transport import nvshmem as nv

        nv.finalize()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"nvshmem finalize: {short(exc)}")
    everyone = gather(problems, gloo)
    bad = [f"rank {r}: {p}" for r, ps in enumerate(everyone) for p in ps]
    if rank == 0:
        res.add("final", "close heaps, finalise NVSHMEM", "ERROR" if bad else "PASS", "; ".join(bad)[:300])
    dist.barrier(group=gloo)
    dist.destroy_process_group()
