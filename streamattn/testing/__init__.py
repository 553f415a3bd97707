"""Multi-process harness shared by the tests, the demo and the bench: a pool of real gloo ranks
that stays up across many tasks. Tasks and results cross process boundaries as JSON only."""
from .pool import RankError, RankPool

__all__ = ["RankPool", "RankError"]
