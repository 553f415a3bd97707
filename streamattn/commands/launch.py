"""`streamattn launch --emulate NxG [--inter-bw R] -- <torchrun args and script>`: a multi-node
torchrun job on this one machine. Every emulated node (network namespace, shaped uplink, its own
hostname) runs `torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d --rdzv-endpoint
<node0>:<port> <args>`, as real nodes would (streamattn.bench.launcher). Needs root and netns;
without them it prints why and exits 2."""
from __future__ import annotations

import sys


def add_arguments(p) -> None:
    from ..bench.cluster import CONGESTION_CONTROL_HELP

    p.add_argument("--emulate", metavar="NxG", required=True,
                   help="N emulated nodes x G processes per node, e.g. 2x2")
    p.add_argument("--inter-bw", default="1gbit", help="each node's uplink rate (default 1gbit)")
    p.add_argument("--intra-bw", default=None, help="intra-node (lo) rate (default unshaped)")
    p.add_argument("--mtu", type=int, default=None,
                   help="MTU of the nodes' links (default 9000, jumbo frames; 1500 for a plain LAN)")
    p.add_argument("--congestion-control", default=None, metavar="NAME", help=CONGESTION_CONTROL_HELP)
    p.add_argument("--port", type=int, default=None, help="rendezvous port on node 0 (default 29500)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the job is killed")
    p.add_argument("args", nargs="*", metavar="-- ARGS",
                   help="what torchrun runs: a script and its arguments, or -m module ..., or "
                        "--no-python command ...")


def run(args) -> int:
    from ..bench.cluster import parse_congestion_control
    from ..bench.launcher import DEFAULT_PORT, ClusterUnavailable, launch_emulated, parse_shape

    try:
        n, g = parse_shape(args.emulate)
        if not args.args:
            raise ValueError("nothing to run: streamattn launch --emulate 2x2 -- -m streamattn.cli probe")
        return launch_emulated(n, g, args.args, inter_bw=args.inter_bw, intra_bw=args.intra_bw,
                               mtu=args.mtu,
                               congestion_control=parse_congestion_control(args.congestion_control),
                               port=args.port or DEFAULT_PORT, timeout=args.timeout)
    except ClusterUnavailable as e:
        print(f"streamattn launch: emulated cluster unavailable: {e.reason}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"streamattn launch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the cluster's handler already tore everything down
        print("streamattn launch: interrupted; emulated cluster removed", file=sys.stderr)
        return 130
