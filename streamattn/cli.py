"""`streamattn` command line: each subcommand lives in streamattn/commands/<name>.py and exposes
add_arguments(parser) and run(args) -> exit code."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "spawn local CPU ranks, run every algorithm on a DiT-like shape, check against float64",
    "probe": "detect this machine's topology (links, bandwidths) and print it",
    "plan": "show the plan the planner picks for a shape and topology, with --explain",
    "bench": "benchmark algorithms side by side (local ranks, torchrun, or an emulated cluster)",
    "launch": "run a torchrun job on an emulated multi-node cluster (namespaces, shaped links; root)",
    "settings": "list every STREAMATTN_* setting: current value, default, valid range",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="streamattn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    loaded = {}
    for name, help_text in COMMANDS.items():
        try:
            mod = importlib.import_module(f"streamattn.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"streamattn.commands.{name}":
                raise
            continue  # not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        loaded[name] = mod
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(loaded[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
