"""The error tree of the protocol core and the one errno -> NBD error mapping.

Each error carries what the connection loop needs to act on it: a transmission error value
(:class:`RequestError`), an option reply type (:class:`OptionError`), or nothing at all because the
stream cannot be answered (:class:`ProtocolViolation`).
"""

import errno

from nbd_uring.protocol.constants import NbdErrno, Rep


class NbdError(Exception):
    """Base of every error the protocol core raises; never raised itself."""

    message: str

    def __init__(self, message: str) -> None:
        if type(self) is NbdError:
            raise TypeError("NbdError is abstract: raise one of its subclasses")
        super().__init__(message)
        self.message = message


class RequestError(NbdError):
    """A request is refused with ``nbd_errno``; the connection goes on."""

    def __init__(self, nbd_errno: NbdErrno, message: str) -> None:
        super().__init__(message)
        self.nbd_errno = nbd_errno

    def __repr__(self) -> str:
        return f"RequestError({self.nbd_errno.name}, {self.message!r})"


class OptionError(NbdError):
    """An option is refused with ``rep`` (an ``NBD_REP_ERR_*``); negotiation goes on."""

    def __init__(self, rep: Rep, message: str) -> None:
        if not rep.is_error:
            raise ValueError(f"OptionError needs an NBD_REP_ERR_* reply type, got {rep.name}")
        super().__init__(message)
        self.rep = rep

    def __repr__(self) -> str:
        return f"OptionError({self.rep.name}, {self.message!r})"


class ProtocolViolation(NbdError):
    """The peer broke the framing or a MUST: close the connection without a reply."""

    def __repr__(self) -> str:
        return f"ProtocolViolation({self.message!r})"


def _build_errno_map() -> dict[int, NbdErrno]:
    groups: tuple[tuple[NbdErrno, tuple[int, ...]], ...] = (
        (NbdErrno.EPERM, (errno.EPERM, errno.EROFS, errno.EACCES, errno.EBADF)),
        (NbdErrno.EIO, (errno.EIO,)),
        (NbdErrno.ENOMEM, (errno.ENOMEM,)),
        (NbdErrno.EINVAL, (errno.EINVAL,)),
        (NbdErrno.ENOSPC, (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)),
        (NbdErrno.EOVERFLOW, (errno.EOVERFLOW,)),
        (NbdErrno.ENOTSUP, (errno.ENOTSUP, errno.EOPNOTSUPP)),
        (NbdErrno.ESHUTDOWN, (errno.ESHUTDOWN,)),
    )
    return {os_errno: nbd for nbd, os_errnos in groups for os_errno in os_errnos}


_ERRNO_MAP = _build_errno_map()


def nbd_errno_for(os_errno: int) -> NbdErrno:
    """Map an OS errno (from a failed storage operation) to the NBD error value to reply with.

    The spec restricts replies to eight values and says the server "SHOULD map the EDQUOT and EFBIG
    errors to NBD_ENOSPC"; anything without a closer match is reported as EIO.
    """
    return _ERRNO_MAP.get(os_errno, NbdErrno.EIO)
