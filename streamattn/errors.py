"""Exceptions raised by streamattn. Every rank-to-rank failure names the peer."""


class StreamAttnError(RuntimeError):
    """Base class of streamattn's runtime errors (input errors are ValueError)."""


class PeerError(StreamAttnError):
    """A peer failed, closed its connection, or sent something unexpected."""

    def __init__(self, message: str, peer: int):
        super().__init__(message)
        self.peer = peer


class PeerTimeoutError(PeerError, TimeoutError):
    """A wait on a peer exceeded STREAMATTN_TIMEOUT_S."""
