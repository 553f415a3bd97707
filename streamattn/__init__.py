"""streamattn: topology-aware sequence-parallel attention."""
