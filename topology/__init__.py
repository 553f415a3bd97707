"""Topology: model, emulation specs, probe and shipped machine files."""
