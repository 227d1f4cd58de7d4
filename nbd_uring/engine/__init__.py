"""Storage: the io_uring, its buffers and the exports it serves. Knows nothing of NBD."""

from nbd_uring.engine.buffers import Buffer, BufferPool
from nbd_uring.engine.export import Export
from nbd_uring.engine.ring import Ring, RingError

__all__ = ["Buffer", "BufferPool", "Export", "Ring", "RingError"]
