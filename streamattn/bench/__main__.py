"""`python -m streamattn.bench ...` (also `torchrun --nproc-per-node N -m streamattn.bench ...`)."""
import os
import sys

from .cli import main

if __name__ == "__main__":
    rc = main()
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Inside torchrun, a non-reporting rank aborted in about 1 run in 3 here with "terminate
        # called without an active exception" after Python had finalised (faulthandler: no Python
        # frame), i.e. in a C++ static destructor once the group was destroyed. Everything is
        # written and flushed by now, so skip the static destructors (6 of 6 runs clean).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(rc or 0))
    sys.exit(rc)
