"""Bandwidths and times written by people: ``"20GB/s"``, ``"200mbit"``, ``"5us"``. One parser for the
topology specs, the settings and the emulated cluster's ``--inter-bw``.

Bandwidth units (case-insensitive, decimal prefixes K M G T, binary Ki Mi Gi Ti):
  bytes: ``B/s KB/s MB/s GB/s TB/s KiB/s MiB/s GiB/s TiB/s``;
  bits:  ``bit/s Kbit/s Mbit/s Gbit/s Tbit/s Kibit/s ...`` and tc's shorthands ``bit kbit mbit gbit
  tbit kibit mibit gibit tibit``.
``Gb/s``/``Mb/s`` (one letter for bits or bytes) and every ``*bps``/``*Bps`` are rejected as ambiguous
(tc reads ``mbps`` as megabytes, most people as megabits): write ``GB/s`` for bytes, ``Gbit/s`` for bits.
Time units: ``s ms us µs ns``.
"""
from __future__ import annotations

import re
from typing import Dict

_PREFIXES: Dict[str, float] = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
                               "ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}
# multiplier to bytes/s, keyed by lower-case unit
BANDWIDTH_UNITS: Dict[str, float] = {}
for _p, _f in _PREFIXES.items():
    if _p:  # a bare "b/s" would be bits to some readers, bytes to others
        BANDWIDTH_UNITS[f"{_p}b/s"] = _f
    BANDWIDTH_UNITS[f"{_p}bit/s"] = _f / 8
    BANDWIDTH_UNITS[f"{_p}bit"] = _f / 8
BANDWIDTH_UNITS["b/s"] = 1.0  # "B/s" (bytes); lower-case here because units are case-insensitive
# divisor to seconds (dividing keeps "5us" == 5e-06 exactly)
TIME_UNITS: Dict[str, float] = {"s": 1.0, "ms": 1e3, "us": 1e6, "µs": 1e6, "μs": 1e6, "ns": 1e9}
_NUM_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([^\s0-9].*?)?\s*$")


def parse_bandwidth(text: str) -> float:
    """``"20GB/s"`` -> 2e10 bytes/s; ``"1Gbit/s"`` or ``"1gbit"`` -> 1.25e8 bytes/s.

    Raises ValueError for a missing, unknown or ambiguous unit and for a rate that is not > 0.
    """
    if not isinstance(text, str):
        raise ValueError(f"bandwidth must be a string with a unit, got {text!r}")
    m = _NUM_UNIT.match(text)
    if not m or not m.group(2):
        raise ValueError(
            f"bad bandwidth {text!r}: expected a number and a unit such as 20GB/s or 1Gbit/s"
        )
    value, unit = float(m.group(1)), m.group(2).strip()
    if unit.lower().endswith("bps") or re.fullmatch(r"[KMGT]i?b/s", unit):
        head = unit[:-3]
        raise ValueError(
            f"ambiguous bandwidth unit {unit!r} in {text!r}: write {head}B/s (bytes) or "
            f"{head}bit/s (bits)"
        )
    low = unit.lower()
    if low not in BANDWIDTH_UNITS:
        raise ValueError(
            f"unknown bandwidth unit {unit!r} in {text!r}; known: GB/s, MB/s, GiB/s, Gbit/s, "
            "Mbit/s, gbit, mbit, kibit (case-insensitive)"
        )
    bw = value * BANDWIDTH_UNITS[low]
    if not 0 < bw < float("inf"):
        raise ValueError(f"bandwidth must be > 0 and finite, got {text!r}")
    return bw


def parse_time(text: str) -> float:
    """``"5us"`` -> 5e-6 seconds. Raises ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"time must be a string with a unit, got {text!r}")
    m = _NUM_UNIT.match(text)
    if not m or not m.group(2):
        raise ValueError(f"bad time {text!r}: expected a number and a unit such as 5us or 1ms")
    value, unit = float(m.group(1)), m.group(2).strip().lower()
    if unit not in TIME_UNITS:
        raise ValueError(f"unknown time unit {m.group(2)!r} in {text!r}; known: s, ms, us, ns")
    return value / TIME_UNITS[unit]
