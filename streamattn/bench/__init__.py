"""Benchmarks: sweeps, the emulated-cluster launcher, baselines (installed as streamattn.bench)."""
