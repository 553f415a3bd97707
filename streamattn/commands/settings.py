"""`streamattn settings`: every STREAMATTN_* variable with its current value, default and range
(the registry in streamattn/config.py); --markdown prints the README's table."""
from __future__ import annotations

from .. import config


def _default(s) -> str:
    d = s.default
    if d == "" or d is None:
        return "unset"
    if isinstance(d, bool):
        return "1" if d else "0"
    if s.kind in ("int", "float") and d < s.low:  # a placeholder: unset means "derived"
        return "unset"
    return f"{d:g}" if isinstance(d, float) else str(d)


def table_rows() -> list:
    """One README row per setting: | `NAME` | doc | default | valid | agreed |."""
    rows = []
    for s in config.SETTINGS.values():
        rows.append(f"| `{s.name}` | {s.doc} | {_default(s)} | {s.valid()} | "
                    f"{'yes' if s.agreed else ''} |")
    return rows


def add_arguments(p) -> None:
    p.add_argument("--markdown", action="store_true", help="print the README's settings table")


def run(args) -> int:
    if args.markdown:
        print("| variable | effect | default | valid | agreed |")
        print("| --- | --- | --- | --- | --- |")
        print("\n".join(table_rows()))
        return 0
    bad = 0
    for s in config.SETTINGS.values():
        try:
            value = repr(s.read())
        except ValueError as exc:
            value, bad = f"INVALID: {exc}", bad + 1
        print(f"{s.name:28s} {value:24s} [{s.scope}{', agreed' if s.agreed else ''}] {s.doc}")
    return 1 if bad else 0
