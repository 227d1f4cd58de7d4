"""Small helpers around the python3-libnbd binding (``import nbd``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    import nbd
except ImportError:  # the tests using it are marked requires("nbd")
    nbd = None


@contextmanager
def connect(uri: str, *, strict: bool = True) -> Iterator[Any]:
    """A connected libnbd handle; ``strict=False`` lets libnbd send requests it would
    normally refuse client-side (out-of-range, unsupported flags...), so that the *server*
    has to answer them."""
    assert nbd is not None
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.connect_uri(uri)
    try:
        yield h
    except BaseException:
        # Do not nbd_shutdown (it waits for in-flight commands, possibly forever if the
        # server lost one): close the socket at once.
        abandon(h)
        raise
    try:
        h.shutdown()
    except nbd.Error:
        abandon(h)


def abandon(h: Any) -> None:
    """Close a libnbd handle and its socket immediately, without NBD_CMD_DISC."""
    if hasattr(h, "_o"):
        h.__del__()
        del h._o


def nbd_errno(exc: BaseException) -> str | None:
    """The errno name of a failed libnbd call (e.g. ``"EINVAL"``)."""
    assert nbd is not None
    assert isinstance(exc, nbd.Error), exc
    errno: str | None = exc.errno
    return errno


def wait_all(h: Any, cookies: list[int], timeout_s: float = 60.0) -> None:
    """Wait until every aio command in ``cookies`` completed (raises if one failed)."""
    import time

    deadline = time.monotonic() + timeout_s
    pending = set(cookies)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} aio commands still pending after {timeout_s}s")
        for cookie in list(pending):
            if h.aio_command_completed(cookie):
                pending.discard(cookie)
        if pending:
            h.poll(1000)
