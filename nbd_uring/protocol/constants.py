"""Wire constants of the NBD protocol, named as in ``doc/proto.md`` minus their prefix.

``Cmd.WRITE_ZEROES`` is ``NBD_CMD_WRITE_ZEROES`` and ``Rep.ERR_UNSUP`` is ``NBD_REP_ERR_UNSUP``, so
grepping the spec for a constant finds ours. Values marked experimental come from the
``extension-ext-header`` and ``extension-resize`` branches; they are listed so that nothing else
takes their numbers.
"""

from enum import IntEnum, IntFlag

NBD_DEFAULT_PORT = 10809

NBDMAGIC = 0x4E42444D41474943
"""``INIT_PASSWD``, ASCII ``NBDMAGIC``: first 8 bytes of every handshake."""
CLISERV_MAGIC = 0x00420281861253
"""Oldstyle handshake only (not served by nbd-uring)."""
IHAVEOPT = 0x49484156454F5054
"""ASCII ``IHAVEOPT``: newstyle greeting and the start of every option header."""
OPTION_REPLY_MAGIC = 0x3E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
NBD_EXTENDED_REQUEST_MAGIC = 0x21E41C71
NBD_EXTENDED_REPLY_MAGIC = 0x6E8A278C

MAX_STRING = 4096
"""Spec: a string "MUST be no longer than 4096 bytes" (export names, messages)."""
MAX_OPTION_LENGTH = 65536
"""Default bound on one option's data; longer options are treated as a denial of service."""
MAX_OPTIONS = 128
"""Default number of options accepted before the client chooses an export."""
MAX_PAYLOAD = 32 * 1024 * 1024
"""Advertised maximum payload: the spec's portable default of 2^25 bytes."""
MAX_META_QUERIES = 64
"""Default number of queries accepted in one NBD_OPT_LIST/SET_META_CONTEXT (ERR_TOO_BIG past it)."""
MAX_BLOCK_STATUS_EXTENTS = 1 << 20
"""Spec: servers "SHOULD NOT send more than 2^20 extents in a single reply chunk"."""
MAX_DF_READ = 65536
"""Spec: the server "MUST support unfragmented reads" of up to this many bytes."""
BASE_ALLOCATION = "base:allocation"
"""The one metadata context the spec defines."""
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096

OPTION_HEADER_SIZE = 16
OPTION_REPLY_HEADER_SIZE = 20
REQUEST_SIZE = 28
EXTENDED_REQUEST_SIZE = 32
SIMPLE_REPLY_SIZE = 16
STRUCTURED_REPLY_HEADER_SIZE = 20
EXTENDED_REPLY_HEADER_SIZE = 32
EXPORT_NAME_PADDING = 124
"""Zero bytes after a successful ``NBD_OPT_EXPORT_NAME`` reply unless both sides set NO_ZEROES."""


class HandshakeFlag(IntFlag):
    """16-bit handshake flags sent by the server after ``IHAVEOPT``."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """32-bit client flags, the client's answer to the handshake flags."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    """16-bit per-export flags sent when the client enters transmission."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12
    """Experimental (extended headers)."""


class Opt(IntEnum):
    """Option types (``NBD_OPT_*``) sent during option haggling."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    """Withdrawn; treated like any unknown option."""
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11
    """Experimental (extended headers)."""


REP_ERROR_BIT = 1 << 31
"""Every option error reply type has bit 31 set."""


class Rep(IntEnum):
    """Option reply types (``NBD_REP_*``)."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT + 1
    ERR_POLICY = REP_ERROR_BIT + 2
    ERR_INVALID = REP_ERROR_BIT + 3
    ERR_PLATFORM = REP_ERROR_BIT + 4
    ERR_TLS_REQD = REP_ERROR_BIT + 5
    ERR_UNKNOWN = REP_ERROR_BIT + 6
    ERR_SHUTDOWN = REP_ERROR_BIT + 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT + 8
    ERR_TOO_BIG = REP_ERROR_BIT + 9
    ERR_EXT_HEADER_REQD = REP_ERROR_BIT + 10
    """Experimental (extended headers)."""

    @property
    def is_error(self) -> bool:
        return bool(self & REP_ERROR_BIT)


class Info(IntEnum):
    """Information types (``NBD_INFO_*``) carried by ``NBD_REP_INFO``."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    """Request types (``NBD_CMD_*``)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8
    """Experimental (resize extension)."""


class CmdFlag(IntFlag):
    """16-bit command flags (``NBD_CMD_FLAG_*``)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5
    """Experimental (extended headers)."""


class ReplyFlag(IntFlag):
    """16-bit structured reply flags (``NBD_REPLY_FLAG_*``)."""

    DONE = 1 << 0


REPLY_TYPE_ERROR_BIT = 1 << 15
"""A structured reply chunk type with bit 15 set is an error chunk."""


class ReplyType(IntEnum):
    """Structured reply chunk types (``NBD_REPLY_TYPE_*``)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    """Experimental (extended headers)."""
    ERROR = REPLY_TYPE_ERROR_BIT + 1
    ERROR_OFFSET = REPLY_TYPE_ERROR_BIT + 2


class AllocationState(IntFlag):
    """Status flags of the ``base:allocation`` metadata context (``NBD_STATE_*``)."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class NbdErrno(IntEnum):
    """Error values of the transmission phase; the only ones a reply may carry."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108
