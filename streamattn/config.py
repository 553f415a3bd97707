"""Environment settings, read at call time so tests and operators can change them per process."""
import os

DEFAULT_TIMEOUT_S = 300.0


def timeout_s() -> float:
    """STREAMATTN_TIMEOUT_S: the longest any single wait on a peer may take (default 300 s)."""
    raw = os.environ.get("STREAMATTN_TIMEOUT_S", "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"STREAMATTN_TIMEOUT_S={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"STREAMATTN_TIMEOUT_S={raw!r} must be positive")
    return value


def validate_every_call() -> bool:
    """STREAMATTN_VALIDATE=every: gather and compare metadata on every call, not only the first
    call of a shape (costs one small exchange per call; catches ranks that change shape alone)."""
    return os.environ.get("STREAMATTN_VALIDATE", "first").strip().lower() == "every"


def ulysses_chunks() -> int:
    """STREAMATTN_ULYSSES_CHUNKS: head groups Ulysses pipelines over (default 1: one all-to-all)."""
    raw = os.environ.get("STREAMATTN_ULYSSES_CHUNKS", "1")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"STREAMATTN_ULYSSES_CHUNKS={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"STREAMATTN_ULYSSES_CHUNKS={raw!r} must be >= 1")
    return value


def ulysses_chunks_override():
    """STREAMATTN_ULYSSES_CHUNKS when set (forces the chunk count), else None: the plan's."""
    return ulysses_chunks() if os.environ.get("STREAMATTN_ULYSSES_CHUNKS", "").strip() else None


def alltoall_mode() -> str:
    """STREAMATTN_ALLTOALL: how a Ulysses exchange over a whole torch (gloo) group travels:
    "p2p" (default: one send/receive per peer) or "collective" (ONE all_to_all_single; peers that
    never arrive are named through the rendezvous store on timeout)."""
    raw = os.environ.get("STREAMATTN_ALLTOALL", "p2p").strip().lower() or "p2p"
    if raw not in ("p2p", "collective"):
        raise ValueError(f"STREAMATTN_ALLTOALL={raw!r}: expected p2p or collective")
    return raw
