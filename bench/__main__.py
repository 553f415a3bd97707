"""`python -m streamattn.bench ...` (also `torchrun --nproc-per-node N -m streamattn.bench ...`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
