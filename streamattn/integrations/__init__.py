"""Integrations of streamattn into DiT engines.

`streamattn.integrations.diffusers.parallelize(transformer, group)`: sequence-parallel Flux / SD3
transformers of diffusers (optional dependency: `pip install "streamattn[diffusers]"`).
"""
