"""`python -m streamattn.bench.gpu_check ...` (main() itself re-runs it so under torchrun, with
--no-spawn, to start one rank per GPU); see the package docstring."""
from ..exiting import exit_command
from . import main

if __name__ == "__main__":
    exit_command(main())
