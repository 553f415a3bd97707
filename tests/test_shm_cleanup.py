"""Issue 11, finding 7: stale-segment cleanup removes only segments streamattn made for this user."""
import os
import subprocess
import sys

import pytest

from streamattn.transport import shm


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def segments():
    made = []

    def make(header_pid=None, owner=None, name_pid=None):
        pid = name_pid or _dead_pid()
        path = os.path.join(shm.SHM_DIR, f"{shm.PREFIX}{pid}-{os.urandom(6).hex()}")
        with open(path, "wb") as f:
            f.write(shm.segment_header(header_pid) if header_pid is not None else b"\0" * 64)
            f.write(b"\0" * 4096)
        if owner is not None:
            os.chown(path, owner, owner)
        made.append(path)
        return path, pid

    yield make
    for p in made:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


@pytest.mark.skipif(not shm.supported()[0], reason="no /dev/shm on x86-64")
def test_only_own_headed_segments_are_removed(segments):
    ours, pid = segments()
    os.unlink(ours)
    ours, _ = segments(header_pid=pid, name_pid=pid)           # header of its creator: stale, ours
    bare, _ = segments()                                       # the name pattern only
    wrong, _ = segments(header_pid=12345)                      # another pid's header
    removed = shm.remove_stale_segments()
    assert os.path.basename(ours) in removed and not os.path.exists(ours)
    assert os.path.exists(bare) and os.path.exists(wrong)
    if os.geteuid() == 0:
        p2, pid2 = segments(header_pid=None)
        os.unlink(p2)
        foreign, _ = segments(header_pid=pid2, name_pid=pid2, owner=65534)  # nobody's file
        shm.remove_stale_segments()
        assert os.path.exists(foreign)
