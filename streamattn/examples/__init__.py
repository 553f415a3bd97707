"""Runnable examples (`python -m streamattn.examples.tiny_flux --nproc 4`) and the multi-rank
tasks they and the tests run through `streamattn.testing.RankPool`."""
