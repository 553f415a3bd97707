"""How a sequence is split over the ranks in the contiguous layout (the zigzag layout builds on it:
streamattn.zigzag). Rank r holds the r-th slice; slices are as even as possible and the first ranks
take one token more: 4097 tokens on 4 ranks are 1025/1024/1024/1024."""
from __future__ import annotations

import itertools

import torch


def split_lengths(total: int, world: int) -> list:
    """Tokens per rank (or per chunk): `world` integers summing to `total`, the first
    total % world of them one larger."""
    base, extra = divmod(total, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def group_lengths(seq_lens, groups) -> list:
    """Tokens each Ulysses group holds (the ring's blocks): the sum of its members' shard lengths."""
    return [sum(seq_lens[m] for m in g) for g in groups]


def ring_runs(seg_lens, chunks: int) -> int:
    """Token runs each ring step's block is cut into when `chunks` are asked for: at most the
    shortest block's length (no empty runs), 1 = unchunked. Same on every rank (seg_lens are)."""
    return max(1, min(chunks, min(seg_lens))) if seg_lens else 1


# Token runs are cut in whole multiples of this many keys where the block allows: attention
# kernels take keys in vector-wide tiles and finish a partial tile on a slow path. Measured with
# torch's CPU flash kernel (one thread, 256 query rows x 12 heads x 32): 47 keys 0.78 ms, 48 keys
# 0.37 ms, 12 keys 0.47 ms, 16 keys 0.18 ms; the same in bfloat16 and at head dim 64 and 128. The
# tapered cut of a 128-token block into 4 runs (46, 47, 23, 12 keys) took 3.2x the whole block's
# kernel time, cut in 16s (48, 48, 16, 16) 1.8x (each call's fixed part).
KEY_GRANULE = 16


def run_granule(total: int, runs: int) -> int:
    """The unit a block of `total` tokens is cut into `runs` runs in: KEY_GRANULE when the block
    holds one per run, else 1 (tokens)."""
    return KEY_GRANULE if total >= KEY_GRANULE * runs else 1


def run_lengths(total: int, runs: int) -> list:
    """Tokens of each of the `runs` token runs a ring step's block of `total` tokens travels in, in
    sending order: equal, except that the last two are a half and a quarter of the others
    (weights 4, ..., 4, 2, 1). Each run is attended once it has arrived, so after the block's last
    byte the call still attends its last run: a short last run shortens that exposed tail. A block
    with a KEY_GRANULE per run is cut in whole granules (the first run also takes the remainder,
    total % KEY_GRANULE), a shorter one in tokens; equal runs (split_lengths) where the taper
    would leave a run empty."""
    if runs <= 1:
        return [total]
    g = run_granule(total, runs)
    units, rem = divmod(total, g)
    cum = list(itertools.accumulate([4] * (runs - 2) + [2, 1]))
    edges = [0] + [(2 * units * c + cum[-1]) // (2 * cum[-1]) for c in cum]  # rounded
    lens = [b - a for a, b in zip(edges, edges[1:])]
    if min(lens) == 0:
        lens = split_lengths(units, runs)
    lens = [n * g for n in lens]
    lens[0] += rem
    return lens


def run_pieces(total: int, runs: int, first: int = 0, lead: int = 0) -> list:
    """The token runs of a ring block of `total` tokens as the block rows each covers: for run i a
    list of (start, n). The block is read from token `first` on, wrapping around to its start (a
    run across the wrap has two ranges), cut as run_lengths cuts it except that the run boundary
    nearest `lead` tokens in moves to the last point at or before `lead` that keeps the run
    before it a whole number of granules (run_lengths), when no run empties. USP starts each
    member's block at its own `lead` tokens, which it holds before the Ulysses all-to-all has
    finished: the runs that end by then go on the wire first."""
    ends = list(itertools.accumulate(run_lengths(total, runs)))
    if 0 < lead < total and runs > 1:
        g = run_granule(total, runs)
        k = min(range(runs - 1), key=lambda i: (abs(ends[i] - lead), i))
        before = ends[k - 1] if k else 0
        # run k keeps its granules; run 0 also keeps the block's remainder (total % g)
        base = before + (0 if k else total % g)
        at = base + (lead - base) // g * g if lead >= base else lead
        if before < at < ends[k + 1]:
            ends[k] = at
    out, pos = [], first % total if total else 0
    for a, b in zip([0] + ends, ends):
        n = b - a
        m = min(n, total - pos)
        out.append([(pos, m)] + ([(0, n - m)] if n > m else []))
        pos = (pos + n) % total if total else 0
    return out


def run_size(pieces) -> int:
    """Tokens of one run of run_pieces (the sum of its ranges)."""
    return sum(n for _, n in pieces)


def run_within(pieces, start: int, stop: int) -> bool:
    """Every range of one run of run_pieces lies in block rows [start, stop)."""
    return all(start <= s and s + n <= stop for s, n in pieces)


def run_starts(seq_lens, groups, j: int, causal: bool) -> tuple:
    """(first, lead) of run_pieces for every block of the ring joining member j of each Ulysses
    group (USP; plain ring: groups of one): each block read from member j's own tokens on, the runs
    cut where those end; causal: from the block's first token (its masks want every run one
    contiguous range), cut where member 0's tokens end."""
    first = [0 if causal else sum(seq_lens[m] for m in g[:j]) for g in groups]
    lead = [seq_lens[g[j]] if not causal or j == 0 else 0 for g in groups]
    return first, lead


def shard(x: torch.Tensor, lens, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s slice of the full sequence x (sequence along `dim`) split by `lens` (a view)."""
    start, stop = shard_rows(lens, rank)
    return x.narrow(dim, start, stop - start)


def shard_rows(lens, rank: int) -> tuple:
    """(start, stop): the sequence rows rank `rank` holds when the sequence is split by `lens`."""
    start = sum(lens[:rank])
    return start, start + lens[rank]


# Joint (text) tokens folded into the sequence (streamattn.algorithms.joint_fold): which rows each
# rank takes, and the joint-free problem that results.
def can_fold(problem) -> bool:
    """The joint tokens can be folded into the sequence: there are some, and the attention is
    neither causal nor in the zigzag layout (both order the keys)."""
    return problem.joint_len > 0 and not problem.causal and not problem.zigzag


def fold_lengths(problem) -> list:
    """Text rows rank r takes: T split as evenly as possible, the extra rows on the last ranks (the
    contiguous image split gives its extra tokens to the first ones)."""
    return split_lengths(problem.joint_len, problem.world_size)[::-1]


def folded_problem(problem):
    """The joint-free problem the folded schedule runs: rank r holds seq_lens[r] + fold_lengths[r]
    tokens."""
    import dataclasses

    return dataclasses.replace(problem, joint_len=0, seq_lens=tuple(
        s + t for s, t in zip(problem.seq_lens, fold_lengths(problem))))
