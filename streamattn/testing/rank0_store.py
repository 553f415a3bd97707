"""A 3-rank job as torchrun starts one: rank 0 hosts the rendezvous store (tcp:// init). Rank 2
dies inside a warm ring call; every rank prints one RESULT line and exits at once. Used by
tests/test_robustness.py to check attribution and quiet stderr when the store's host exits.

    python -m streamattn.testing.rank0_store RANK PORT
"""
from __future__ import annotations

import datetime
import os
import sys


def main(rank: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                            timeout=datetime.timedelta(seconds=60))
    import streamattn
    from streamattn.algorithms import ring

    from ..sharding import shard, split_lengths

    from .cases import make_inputs

    q, k, v, _ = make_inputs(seed=2, batch=1, seq=48, heads=6, kv_heads=6, head_dim=8)
    lens = split_lengths(48, 3)
    ql, kl, vl = (shard(t, lens, rank) for t in (q, k, v))
    streamattn.attention(ql, kl, vl, algorithm="ring")
    if rank == 2:
        ring.attention_with_lse = lambda *a, **kw: os._exit(17)
    try:
        streamattn.attention(ql, kl, vl, algorithm="ring")
        print("RESULT ok -1 exact", flush=True)
    except Exception as exc:
        print(f"RESULT {type(exc).__name__} {getattr(exc, 'peer', None)} {exc}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
