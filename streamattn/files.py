"""Files streamattn writes (topology cache, calibration cache, probe output): owner-only and
atomic — a 0600 temp file in the same directory, fsynced, then renamed over the target, so a
reader never sees a partial file and a crash leaves at most a temp file that is never read."""
from __future__ import annotations

import os
import tempfile


def write_private(path: str, text: str, prefix: str = ".streamattn-") -> str:
    """Write `text` to `path` atomically with mode 0600; returns the absolute path."""
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=os.path.dirname(path))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
