"""`python bench/gpu_check.py ...` from a checkout: the same as `python -m streamattn.bench.gpu_check`
(the script lives in the package, streamattn/bench/gpu_check/, so an installed streamattn has it;
run_module runs the package's __main__.py)."""
import runpy

if __name__ == "__main__":
    runpy.run_module("streamattn.bench.gpu_check", run_name="__main__", alter_sys=True)
