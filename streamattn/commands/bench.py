"""`streamattn bench`: benchmark the algorithms side by side (local ranks, torchrun group, or an
emulated multi-node cluster). The implementation lives in streamattn/bench/."""
from __future__ import annotations


def add_arguments(parser) -> None:
    from ..bench.cli import add_arguments as add

    add(parser)


def run(args) -> int:
    from ..bench.cli import run as run_bench

    return run_bench(args)
