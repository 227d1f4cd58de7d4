"""The Trio shell: listeners, connections and the ring's reaper."""

from nbd_uring.server.serve import ListenAddress, ServedExport, Server

__all__ = ["ListenAddress", "ServedExport", "Server"]
