"""``python -m streamattn.topology [SPEC | MACHINE | FILE.json] [--json] [--list]``

Prints a topology (the matrix and legend, or its JSON). Without an argument: resolves it like the
library does (``$STREAMATTN_TOPOLOGY``, else a single-process probe). The full operator CLI is
``streamattn probe``; this entry point needs no process group.
"""
from __future__ import annotations

import argparse
import sys

from .machines import list_machines
from .probe import resolve_topology


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m streamattn.topology", description=__doc__.split("\n")[0])
    ap.add_argument("source", nargs="?", help="emulation spec (2x4:inter=1Gbit/s), machine name or .json file")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the matrix")
    ap.add_argument("--list", action="store_true", help="list the shipped machines")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(list_machines()))
        return 0
    try:
        t = resolve_topology(topology=a.source)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(t.to_json(indent=1) if a.json else t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
