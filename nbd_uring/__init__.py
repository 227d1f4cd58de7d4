"""nbd-uring: a Network Block Device server that does its disk I/O through io_uring."""

__version__ = "0.1.0"
