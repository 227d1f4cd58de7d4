"""The error tree and the single errno -> NBD error mapping."""

import errno
import subprocess
import sys

import pytest

from nbd_uring.protocol import (
    NbdErrno,
    NbdError,
    OptionError,
    ProtocolViolation,
    Rep,
    RequestError,
    nbd_errno_for,
)


def test_nbd_error_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        NbdError("boom")


def test_errors_carry_their_wire_code_and_message() -> None:
    request = RequestError(NbdErrno.ENOSPC, "no room")
    assert (request.nbd_errno, request.message, str(request)) == (
        NbdErrno.ENOSPC,
        "no room",
        "no room",
    )
    option = OptionError(Rep.ERR_UNKNOWN, "export 'x' does not exist")
    assert (option.rep, option.message) == (Rep.ERR_UNKNOWN, "export 'x' does not exist")
    violation = ProtocolViolation("bad magic")
    assert violation.message == "bad magic"
    assert all(isinstance(e, NbdError) for e in (request, option, violation))
    assert repr(request) == "RequestError(ENOSPC, 'no room')"
    assert repr(option) == "OptionError(ERR_UNKNOWN, \"export 'x' does not exist\")"
    assert repr(violation) == "ProtocolViolation('bad magic')"


def test_option_error_needs_an_error_reply_type() -> None:
    """Error replies: "There are a number of error reply types, all of which are denoted by
    having bit 31 set."
    """
    with pytest.raises(ValueError, match="NBD_REP_ERR_"):
        OptionError(Rep.ACK, "fine")


@pytest.mark.parametrize(
    ("os_errno", "expected"),
    [
        (errno.EPERM, NbdErrno.EPERM),
        (errno.EROFS, NbdErrno.EPERM),
        (errno.EACCES, NbdErrno.EPERM),
        (errno.EBADF, NbdErrno.EPERM),
        (errno.EIO, NbdErrno.EIO),
        (errno.ENOMEM, NbdErrno.ENOMEM),
        (errno.EINVAL, NbdErrno.EINVAL),
        (errno.ENOSPC, NbdErrno.ENOSPC),
        (errno.EDQUOT, NbdErrno.ENOSPC),
        (errno.EFBIG, NbdErrno.ENOSPC),
        (errno.EOVERFLOW, NbdErrno.EOVERFLOW),
        (errno.ENOTSUP, NbdErrno.ENOTSUP),
        (errno.EOPNOTSUPP, NbdErrno.ENOTSUP),
        (errno.ESHUTDOWN, NbdErrno.ESHUTDOWN),
        (errno.ENXIO, NbdErrno.EIO),
        (errno.EAGAIN, NbdErrno.EIO),
        (0, NbdErrno.EIO),
        (99999, NbdErrno.EIO),
    ],
)
def test_nbd_errno_for(os_errno: int, expected: NbdErrno) -> None:
    """The server "SHOULD map the EDQUOT and EFBIG errors to NBD_ENOSPC"; only the eight NBD
    error values may go on the wire, so everything unmapped becomes EIO.
    """
    assert nbd_errno_for(os_errno) is expected


def test_importing_the_protocol_core_pulls_in_no_io_layers() -> None:
    """The core is sans-I/O: importing it must not import trio, sockets or the ring binding."""
    code = (
        "import sys, nbd_uring.protocol; "
        "bad = {'trio', 'socket', 'nbd_uring._uring', 'nbd_uring.engine', 'nbd_uring.server', "
        "'logging'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
