"""Triton kernels: attention forward with LSE, LSE merge, all-to-all pack/unpack."""
