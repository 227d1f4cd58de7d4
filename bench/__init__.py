"""Benchmark of nbd-uring against nbdkit, qemu-nbd and nbd-server (issue 7): ``python -m bench``."""
