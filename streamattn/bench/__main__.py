"""`python -m streamattn.bench ...` (also `torchrun --nproc-per-node N -m streamattn.bench ...`)."""
from .cli import main
from .exiting import exit_command

if __name__ == "__main__":
    exit_command(main())
