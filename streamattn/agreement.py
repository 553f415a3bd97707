"""Per-call agreement: every rank of a group takes the same path on every call.

Why: a plan cache keyed by each rank's *local* shape lets ranks decide differently (67 tokens on 4
ranks are 17/17/17/16: the rank holding 16 tokens may have seen 16 before and skip the metadata
exchange the others start; every rank then waits until the timeout). So the decision is taken from
data every rank holds identically:

1. Each call, every rank sends every other rank its *signature*: a few int64s — its local shape
   and options (validate.FIELDS), the settings that change what runs (config, agreed=True), its
   plan-cache generation for the group and whether it wants a full check (STREAMATTN_VALIDATE,
   malformed input). Transport.all_gather_small (tag TAG_SIG): on the shm transport the node's
   rows are read from a board in shared memory (no message per peer), and other nodes' rows
   travel between the nodes' leaders (their lowest ranks), one small message per pair of nodes;
   on a two-sided transport one small message per peer.
2. The gathered signatures are identical on every rank, so the cache key (all ranks' rows) and
   the decision "cached / full metadata exchange / raise" are too.
3. Caches are per group, filled in the same order everywhere; their generation (inserts so far)
   travels in the signature, and if it ever differs (a cache cleared on one rank only) every rank
   drops the group's entries and plans afresh: a mismatch costs a re-plan, never a hang.

Agreed settings that differ raise the same ValueError on every rank, naming each rank's value.
"""
from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict

import torch

from . import config, tags
from .validate import FIELDS, field_values

TAG_SIG = tags.SIG
SIG_MAGIC, SIG_VERSION = 0x53494731, 1   # "SIG1"
AGREED = tuple(name for name, s in config.SETTINGS.items() if s.agreed)
# Row layout: magic, version, generation, wants_full, *FIELDS, *AGREED settings.
_GEN, _FULL, _FIELDS0 = 2, 3, 4
_SET0 = _FIELDS0 + len(FIELDS)
ROW = _SET0 + len(AGREED)
_CHECKED = tuple(n for n, s in config.SETTINGS.items()
                 if not s.agreed and s.scope in ("library", "probe"))
CACHE_SIZE = 64  # plans kept per group


def _code(setting, value) -> int:
    """An agreed setting's value as one int64 (equal values, equal codes)."""
    if setting.kind == "choice":
        return setting.choices.index(value)
    if setting.kind == "int" or setting.kind == "flag":
        return int(value)
    if setting.kind == "float":
        return struct.unpack("<q", struct.pack("<d", float(value)))[0]
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _show(setting, code: int) -> str:
    if code == _INVALID:
        return "(invalid)"
    if setting.kind == "choice":
        return repr(setting.choices[code]) if setting.choices[code] else "(unset)"
    if setting.kind == "float":
        return f"{struct.unpack('<d', struct.pack('<q', code))[0]:g}"
    if setting.kind in ("int", "flag"):
        return str(code)
    return f"(text, hash {code & 0xFFFFFFFF:08x})"


_INVALID = -(2**63)


class Settings:
    """The agreed settings of this call, read once (so a call never sees two values)."""

    __slots__ = ("values", "codes", "error")

    def __init__(self):
        self.values, self.codes, self.error = {}, [], None
        for name in AGREED:
            s = config.SETTINGS[name]
            try:
                v = s.read()
                code = _code(s, v)
            except ValueError as exc:
                self.error = self.error or str(exc)
                v, code = s.default, _INVALID
            self.values[name] = v
            self.codes.append(code)
        for name in _CHECKED:  # not agreed, but an invalid value must fail on every rank, not one
            try:
                config.SETTINGS[name].read()
            except ValueError as exc:
                self.error = self.error or str(exc)


def signature(err, q, k, layout, causal, scale, joint_len, joint_strategy, algorithm, u, r,
              settings: Settings, generation: int, comm_dtype=None) -> torch.Tensor:
    """This rank's signature row (int64, ROW entries). `err`: its local input error or None."""
    if err is None and scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    wants_full = int(bool(err) or settings.error is not None or config.validate_every_call())
    row = [SIG_MAGIC, SIG_VERSION, generation, wants_full]
    row += field_values(err or settings.error, q, k, layout, causal, scale, joint_len,
                        joint_strategy, algorithm, u, r, comm_dtype)
    row += settings.codes
    return torch.tensor(row, dtype=torch.int64)


class PlanCache(OrderedDict):
    """(group token, agreed key) -> (Problem, Plan), least recently used last; at most CACHE_SIZE
    plans per group, evicted per group (so one group's calls never evict another's plans, which
    could differ between ranks that belong to different groups)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.generations: dict = {}

    def generation(self, token) -> int:
        return self.generations.get(token, 0)

    def lookup(self, token, key):
        found = self.get((token, key))
        if found is not None:
            self.move_to_end((token, key))
        return found

    def put(self, token, key, value) -> None:
        self[(token, key)] = value
        self.generations[token] = self.generation(token) + 1
        mine = [k for k in self if k[0] == token]
        for k in mine[: max(0, len(mine) - CACHE_SIZE)]:
            del self[k]

    def drop(self, token) -> None:
        """Forget a group's plans (its generation restarts at 0)."""
        for k in [k for k in self if k[0] == token]:
            del self[k]
        self.generations.pop(token, None)

    def clear(self) -> None:
        super().clear()
        if hasattr(self, "generations"):
            self.generations.clear()


def exchange(transport, row: torch.Tensor, cache: PlanCache, token):
    """Collective over the group: gather every rank's signature row. Returns (key, full):
    key identifies the call on every rank; full=True means every rank must run the full metadata
    exchange (a miss, a malformed input somewhere, STREAMATTN_VALIDATE=every on some rank).
    Raises the same ValueError on every rank when agreed settings differ."""
    rows = transport.all_gather_small(row, TAG_SIG)
    rows = [[int(x) for x in r.tolist()] for r in rows]
    for r, vals in enumerate(rows):
        if len(vals) != ROW or vals[0] != SIG_MAGIC or vals[1] != SIG_VERSION:
            raise ValueError(f"streamattn.attention: rank {r} sent an unrecognised call signature "
                             "(different streamattn versions on the ranks?)")
    full = any(vals[_FULL] for vals in rows)
    if len({vals[_GEN] for vals in rows}) > 1:
        # The ranks' caches for this group diverged: start over together.
        cache.drop(token)
        full = True
    if not any(vals[_FIELDS0] for vals in rows):  # malformed input is reported first, by the full exchange
        _check_settings(rows)
    key = tuple(tuple(vals[_FIELDS0:]) for vals in rows)
    return key, full or cache.lookup(token, key) is None


def _check_settings(rows) -> None:
    for i, name in enumerate(AGREED):
        codes = [vals[_SET0 + i] for vals in rows]
        if len(set(codes)) > 1:
            s = config.SETTINGS[name]
            shown = ", ".join(f"rank {r}: {_show(s, c)}" for r, c in enumerate(codes))
            raise ValueError(f"streamattn.attention: ranks disagree on {name} ({shown}); it changes "
                             "what a call runs, so every rank must set it the same")

