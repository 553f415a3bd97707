"""The rows of a run (printed as measured, the JSON rewritten after each) and the watchdog that
ends a case no timeout reaches."""
from __future__ import annotations

import json
import os
import sys
import threading


class Results:
    """Rows printed as soon as they are added (rank 0) and the JSON rewritten atomically after each
    one, so a run that is killed or hangs keeps everything measured so far."""

    WIDTH = 46

    def __init__(self, json_path=None, echo=True):
        self.rows = []  # dicts: section, check, status, detail
        self.env = {}
        self.json_path = json_path
        self.echo = echo
        self.code = None

    def add(self, section, check, status, detail=""):
        row = {"section": section, "check": check, "status": status, "detail": detail}
        self.rows.append(row)
        self.save()  # before the print: a row on the screen is already in the JSON (kill -9 safe)
        if self.echo and len(self.rows) == 1:
            print(f"{'section':<8} {'check':<{self.WIDTH}} {'status':<6} detail", flush=True)
        if self.echo:
            print(f"{section:<8} {check:<{self.WIDTH}} {status:<6} {detail}", flush=True)

    def save(self):
        if not self.json_path:
            return
        from streamattn.files import write_private

        write_private(self.json_path, json.dumps({"code": self.code, "complete": self.code is not None,
                                                  "env": self.env, "rows": self.rows}, indent=1),
                      ".gpu_check.")

    @property
    def failed(self):
        return [r for r in self.rows if r["status"] in ("FAIL", "ERROR", "TIMEOUT")]

    def summary(self):
        counts = {s: sum(r["status"] == s for r in self.rows)
                  for s in ("PASS", "FAIL", "ERROR", "TIMEOUT", "SKIP", "N/A")}
        return f"{len(self.rows)} checks: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)


class Watchdog:
    """Ends the process if one case runs longer than `seconds` (a hang inside a kernel or a
    collective that no timeout reaches): records a TIMEOUT row first, so the JSON keeps it."""

    def __init__(self, res, seconds):
        self.res, self.seconds = res, seconds
        self.timer = None

    def __call__(self, section, check):
        self.cancel()
        if self.seconds and self.seconds > 0:
            self.timer = threading.Timer(self.seconds, self._fire, args=(section, check))
            self.timer.daemon = True
            self.timer.start()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()

    def cancel(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fire(self, section, check):
        try:
            self.res.code = 124
            self.res.add(section, check, "TIMEOUT", f"no result after {self.seconds:.0f}s: ending the run "
                         "(rows so far are kept)")
        finally:
            sys.stdout.flush()
            os._exit(124)


def short(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
