"""Subcommands of the `streamattn` CLI, one module each."""
