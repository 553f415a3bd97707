"""Only the optional CUDA extension lives here; everything else is static in pyproject.toml.

STREAMATTN_BUILD_CUDA=1 pip install . also builds csrc/ as streamattn._nvshmem_ext (needs a CUDA
torch, nvcc and the NVSHMEM wheel). Without it, streamattn.csrc.build compiles on first use.
csrc/build.py is read by path here because the package is not importable while it is being built.
"""
import importlib.util
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("STREAMATTN_BUILD_CUDA") == "1":
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("streamattn_csrc_build", os.path.join(here, "csrc", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ext, cmd = build.cuda_extension()
    ext_modules, cmdclass = [ext], cmd

setup(ext_modules=ext_modules, cmdclass=cmdclass)
