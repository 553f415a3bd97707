"""Every message tag streamattn sends, declared in one table.

A tag names one exchange of one call so that messages of different exchanges between the same pair
never match. Single tags serve one message kind; a family owns a block of BLOCK tags and adds a step
or chunk index (< HALF) to its base; the Triton packing path of Ulysses sends Q separately at
tag + Q_OFFSET (the upper half of the same block). The ranges are checked disjoint at import, and
the emulated NCCL transport (transport/inorder.py) uses its own space above all of them.
Tags 5-9 are left to the tests' raw transport exchanges. The single tags keep the values of the
first release: with the failure mailbox moved to tag 2, a gloo receive posted there got another
776-byte message in CI (a collision whose source was not found), so 2 stays unused.
"""
from __future__ import annotations

BLOCK = 1 << 16
HALF = BLOCK // 2
Q_OFFSET = HALF

# -- single tags --------------------------------------------------------------------------------
META = 1               # api: the full metadata exchange of a new call shape (validate.encode)
FAIL = 4999               # transport/torch_dist: failure reports (FailureMailbox)
RATE = 3               # api/planner: agreed CPU compute rate, memory bandwidth, calibration
SIG = 4                # agreement: the per-call signature
ULYSSES_JOINT = 12     # ulysses: all-gather of the joint output heads
RING_JOINT = 13        # ring: all-gather of the finished joint rows
TORUS_JOINT = 14       # torus: the same for Torus
JOINT_FOLD = 15        # joint_fold: all-gather of the folded joint output rows
JOINT_FOLD_LSE = 16    # joint_fold (with_lse, the op): all-gather of the folded joint LSE rows
RING_BWD_JOINT = 6990    # ring_backward: joint-token gradient partials (all-gathered, or their
                         # chunks reduce-scattered)
RING_BWD_JOINT_SUM = 6991  # ring_backward: all-gather of the summed chunks
STALE_LENS = 4998        # stale: sequence lengths of the ranks, once per layer and generation
DIFFUSERS_GATHER = 4996  # integrations.diffusers: gather of the sharded output
SHM_BOOTSTRAP = 2       # transport/onesided: heap names and pids of the node's ranks, barrier; kernel ids
DEVICE_BOOTSTRAP = 4990  # transport/device: the same for the stream-ordered transport
DIFFUSERS_GRAD = 4993    # integrations.diffusers: joint-output and parameter gradient sums
AUTOTUNE = 4991          # api: each rank's measured trial times (streamattn.autotune)

# -- families: base + index, index < HALF ---------------------------------------------------------
RING_STEP = 1 * BLOCK        # ring: K/V of step t
ZIGZAG_STEP = 2 * BLOCK      # zigzag ring: K/V of step t
TORUS_QKV = 3 * BLOCK        # torus: exchange k of q, k, v sub-slices
TORUS_OUT = 4 * BLOCK        # torus: outputs sent home (paired by shift k)
TORUS_RING = 5 * BLOCK       # torus: ring-of-teams step
ULYSSES = 6 * BLOCK          # ulysses: chunk c scatters at +2c, gathers at +2c+1 (c = 0 unchunked)
ULYSSES_LSE = 7 * BLOCK      # ulysses (with_lse): +0 the LSE heads, +1 the joint LSE
ULYSSES_BWD = 8 * BLOCK      # ulysses_backward: +0 q,k,v +1 dO +2 O +3 LSE +4 dQ +5 dK +6 dV +7 joint
RING_BWD_KV = 9 * BLOCK      # ring_backward: K/V of step t
RING_BWD_DKV = 10 * BLOCK    # ring_backward: dK/dV accumulators of step t
STALE = 11 * BLOCK           # stale: layer i at +2i (K/V) and +2i+1 (joint partials)

TESTS = (5, 9)               # reserved for the tests' raw exchanges

# Exchanges that agree on what a call does rather than move its data; the span recorder files
# their waits under "agree", every other wait under "wait" (intra/inter by the peer's node).
AGREEMENT = frozenset({META, RATE, SIG, AUTOTUNE})
INORDER_BASE = 1 << 22       # transport/inorder.py's own tags start here

_SINGLES = {k: v for k, v in dict(globals()).items()
            if k.isupper() and isinstance(v, int) and v < BLOCK and k not in ("HALF", "Q_OFFSET")}
_FAMILIES = {k: v for k, v in dict(globals()).items()
             if k.isupper() and isinstance(v, int) and BLOCK <= v < INORDER_BASE and k != "BLOCK"}


def ranges() -> list:
    """[(first, last, name)] of every declared tag range, sorted."""
    out = [(v, v, k) for k, v in _SINGLES.items()]
    out += [(v, v + BLOCK - 1, k) for k, v in _FAMILIES.items()]
    out.append((TESTS[0], TESTS[1], "TESTS"))
    return sorted(out)


def _check() -> None:
    rs = ranges()
    for (a0, a1, an), (b0, b1, bn) in zip(rs, rs[1:]):
        assert a1 < b0, f"message tags {an} [{a0}, {a1}] and {bn} [{b0}, {b1}] overlap"
    assert rs[-1][1] < INORDER_BASE


_check()
