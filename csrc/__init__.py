"""csrc/: CUDA C++ for NVSHMEM device-initiated exchange. See README.md and build.py.

An ``__init__.py`` so that setup.py may install this folder as ``streamattn.csrc`` (with its .cu,
.cpp, .h files as package data) and the transport can ``from streamattn.csrc import build``.
Importing it needs nothing (no torch, no CUDA).
"""
