"""check_request: one test per rule of the COMMAND_SPECS table, each quoting the spec."""

import pytest

from nbd_uring.protocol import (
    COMMAND_SPECS,
    MAX_PAYLOAD,
    Cmd,
    CmdFlag,
    ExportInfo,
    NbdErrno,
    Request,
    RequestError,
    TransmissionFlag,
    check_request,
    transmission_flags_for,
)

SIZE = 1 << 20
RW = ExportInfo("rw", SIZE, transmission_flags_for(read_only=False))
RO = ExportInfo("ro", SIZE, transmission_flags_for(read_only=True))
BARE = ExportInfo(
    "bare",
    SIZE,
    transmission_flags_for(
        read_only=False, can_flush=False, can_fua=False, can_trim=False, can_write_zeroes=False
    ),
)
CACHING = ExportInfo("cache", SIZE, RW.flags | TransmissionFlag.SEND_CACHE)
ALIGNED = ExportInfo("aligned", SIZE + 512, RW.flags, min_block=4096, max_block=1 << 20)

ALL_COMMANDS_ON_RW = [Cmd.READ, Cmd.WRITE, Cmd.DISC, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES]
RANGED = [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES]


def req(command: int, offset: int = 0, length: int = 0, flags: int = 0) -> Request:
    return Request(cookie=7, command=command, flags=flags, offset=offset, length=length)


def refused(request: Request, export: ExportInfo = RW) -> RequestError:
    with pytest.raises(RequestError) as info:
        check_request(request, export)
    return info.value


@pytest.mark.parametrize(
    "request_",
    [
        req(Cmd.READ, 0, 4096),
        req(Cmd.READ, SIZE - 1, 1),
        req(Cmd.WRITE, SIZE - MAX_PAYLOAD // 64, MAX_PAYLOAD // 64, CmdFlag.FUA),
        req(Cmd.DISC),
        req(Cmd.FLUSH),
        req(Cmd.TRIM, 0, SIZE),
        req(Cmd.WRITE_ZEROES, 512, 512, CmdFlag.NO_HOLE | CmdFlag.FUA),
    ],
)
def test_valid_requests_pass(request_: Request) -> None:
    check_request(request_, RW)


@pytest.mark.parametrize("command", [*RANGED, Cmd.CACHE])
@pytest.mark.parametrize("offset", [0, SIZE])
def test_zero_length_requests_are_accepted(command: Cmd, offset: int) -> None:
    """ "The client SHOULD NOT request a read length of 0; the behavior of a server on such a
    request is unspecified although the server SHOULD NOT disconnect." (Likewise for write, trim
    and write zeroes.)
    """
    check_request(req(command, offset, 0), CACHING)


@pytest.mark.parametrize("command", [Cmd.BLOCK_STATUS, Cmd.RESIZE, 9, 0x7FFF, 0xFFFF])
def test_unknown_or_unsupported_commands_are_einval(command: int) -> None:
    """ "The server SHOULD return NBD_EINVAL if it receives an unknown command." BLOCK_STATUS
    without a metadata context selected: "Servers SHOULD reply with NBD_EINVAL to clients sending
    NBD_CMD_BLOCK_STATUS without selecting at least one metadata context"; RESIZE is experimental.
    """
    error = refused(req(command, 0, 512))
    assert error.nbd_errno is NbdErrno.EINVAL
    if command == Cmd.BLOCK_STATUS:
        assert "NBD_OPT_SET_META_CONTEXT" in error.message
    elif command in (9, 0x7FFF, 0xFFFF):
        assert error.message == f"unknown command {command}"
    else:
        assert error.message == f"NBD_CMD_{Cmd(command).name} is not supported by this server"


@pytest.mark.parametrize(
    ("command", "needs"),
    [
        (Cmd.FLUSH, "SEND_FLUSH"),
        (Cmd.TRIM, "SEND_TRIM"),
        (Cmd.WRITE_ZEROES, "SEND_WRITE_ZEROES"),
        (Cmd.CACHE, "SEND_CACHE"),
    ],
)
def test_commands_not_advertised_are_einval(command: Cmd, needs: str) -> None:
    """ "A client MUST NOT send a flush request unless NBD_FLAG_SEND_FLUSH was set in the
    transmission flags field." (Likewise trim and write zeroes.) For CACHE: "A server MAY
    advertise NBD_FLAG_SEND_CACHE even if the command has no effect or always fails with
    NBD_EINVAL".
    """
    error = refused(req(command), BARE)
    assert error.nbd_errno is NbdErrno.EINVAL
    assert f"NBD_FLAG_{needs}" in error.message


def test_cache_is_accepted_when_advertised() -> None:
    check_request(req(Cmd.CACHE, 0, 4096, CmdFlag.FUA), CACHING)


@pytest.mark.parametrize("command", ALL_COMMANDS_ON_RW)
def test_fua_is_accepted_on_every_command_when_advertised(command: Cmd) -> None:
    """NBD_CMD_FLAG_FUA: "This flag is valid for all commands, provided NBD_FLAG_SEND_FUA has
    been negotiated, in which case the server MUST accept all commands with this bit set (even by
    ignoring the bit)."
    """
    check_request(req(command, flags=CmdFlag.FUA), RW)


@pytest.mark.parametrize("command", [Cmd.READ, Cmd.WRITE, Cmd.DISC, Cmd.FLUSH])
def test_fua_without_send_fua_is_einval(command: Cmd) -> None:
    """ "The server SHOULD return NBD_EINVAL if it receives an unknown command flag." FUA is
    only valid "provided NBD_FLAG_SEND_FUA has been negotiated".
    """
    export = ExportInfo("nofua", SIZE, RW.flags & ~TransmissionFlag.SEND_FUA)
    error = refused(req(command, flags=CmdFlag.FUA), export)
    assert error.nbd_errno is NbdErrno.EINVAL
    assert "FUA" in error.message


@pytest.mark.parametrize("command", [c for c in ALL_COMMANDS_ON_RW if c != Cmd.WRITE_ZEROES])
def test_no_hole_is_only_valid_on_write_zeroes(command: Cmd) -> None:
    """ "bit 1, NBD_CMD_FLAG_NO_HOLE; valid during NBD_CMD_WRITE_ZEROES." "It also SHOULD return
    NBD_EINVAL if it receives a request with a flag not explicitly documented as applicable to the
    given request."
    """
    error = refused(req(command, flags=CmdFlag.NO_HOLE))
    assert error.nbd_errno is NbdErrno.EINVAL
    assert error.message.startswith(f"NBD_CMD_{command.name} does not accept command flags NO_HOLE")


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (Cmd.READ, CmdFlag.DF),
        (Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO),
        (Cmd.READ, CmdFlag.REQ_ONE),
        (Cmd.WRITE, CmdFlag.PAYLOAD_LEN),
        (Cmd.READ, 1 << 6),
        (Cmd.WRITE, 1 << 15),
    ],
)
def test_unsupported_and_unknown_flags_are_einval(command: Cmd, flag: int) -> None:
    """DF: "MUST NOT be set unless the transmission flags include NBD_FLAG_SEND_DF". FAST_ZERO:
    "If the server did not advertise NBD_FLAG_SEND_FAST_ZERO, then it ... SHOULD fail with
    NBD_EINVAL if the NBD_CMD_FLAG_FAST_ZERO flag was set." Unknown flags: "SHOULD return
    NBD_EINVAL if it receives an unknown command flag".
    """
    error = refused(req(command, 0, 512, flag))
    assert error.nbd_errno is NbdErrno.EINVAL
    assert f"flags={flag:#x}" in error.message


@pytest.mark.parametrize("command", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_writes_on_a_read_only_export_are_eperm(command: Cmd) -> None:
    """ "it SHOULD return NBD_EPERM if it receives a write or trim request on a read-only
    export"; for write zeroes: "It SHOULD return NBD_EPERM if it receives a write zeroes request
    on a read-only export."
    """
    export = ExportInfo("ro-all", SIZE, RO.flags | RW.flags)
    error = refused(req(command, 0, 512), export)
    assert error.nbd_errno is NbdErrno.EPERM
    assert error.message == f"NBD_CMD_{command.name} on a read-only export"


def test_reads_on_a_read_only_export_are_fine() -> None:
    check_request(req(Cmd.READ, 0, 512), RO)


@pytest.mark.parametrize(
    ("command", "errno"),
    [
        (Cmd.WRITE, NbdErrno.ENOSPC),
        (Cmd.WRITE_ZEROES, NbdErrno.ENOSPC),
        (Cmd.READ, NbdErrno.EINVAL),
        (Cmd.TRIM, NbdErrno.EINVAL),
        (Cmd.CACHE, NbdErrno.EINVAL),
    ],
)
@pytest.mark.parametrize(("offset", "length"), [(SIZE - 511, 512), (SIZE, 1), (SIZE + 1, 0)])
def test_requests_beyond_the_end(command: Cmd, errno: NbdErrno, offset: int, length: int) -> None:
    """ "The server SHOULD return NBD_ENOSPC if it receives a write request including one or more
    sectors beyond the size of the device." "The server SHOULD return NBD_ENOSPC if it receives a
    write zeroes request including one or more sectors beyond the size of the device." "It SHOULD
    return NBD_EINVAL if it receives a read or trim request including one or more sectors beyond
    the size of the device".
    """
    error = refused(req(command, offset, length), CACHING)
    assert error.nbd_errno is errno
    assert error.message == (
        f"NBD_CMD_{command.name} beyond end of export: offset={offset} length={length} size={SIZE}"
    )


@pytest.mark.parametrize("command", RANGED)
def test_offset_plus_length_does_not_wrap(command: Cmd) -> None:
    """Offsets are 64-bit and lengths 32-bit: in C, offset + length can wrap past 2^64 and look
    small. "the client MUST NOT use a length which, when added to offset, would exceed the export
    size."
    """
    export = ExportInfo("huge", 2**64 - 1, RW.flags)
    error = refused(req(command, 2**64 - 1, 4096), export)
    assert "beyond end" in error.message
    check_request(req(command, 2**64 - 4096, 4095), export)


@pytest.mark.parametrize("command", [Cmd.READ, Cmd.WRITE])
def test_payload_longer_than_max_block_is_einval(command: Cmd) -> None:
    """ "the client MUST NOT request a length larger than the maximum payload size" for
    NBD_CMD_WRITE and NBD_CMD_READ with simple replies; the server errors it cleanly rather than
    disconnecting.
    """
    export = ExportInfo("big", 1 << 30, RW.flags)
    error = refused(req(command, 0, MAX_PAYLOAD + 1), export)
    assert error.nbd_errno is NbdErrno.EINVAL
    assert error.message == (
        f"NBD_CMD_{command.name} length 33554433 exceeds maximum payload 33554432"
    )
    check_request(req(command, 0, MAX_PAYLOAD), export)


@pytest.mark.parametrize("command", [Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_effect_length_may_exceed_max_block(command: Cmd) -> None:
    """ "For commands that do not require a payload in either direction (such as NBD_CMD_TRIM or
    NBD_CMD_WRITE_ZEROES), the client MAY request an effect length larger than the maximum
    payload size; the server SHOULD NOT disconnect".
    """
    export = ExportInfo("big", 1 << 30, RW.flags)
    check_request(req(command, 0, MAX_PAYLOAD * 2), export)


@pytest.mark.parametrize("command", [Cmd.FLUSH, Cmd.DISC])
@pytest.mark.parametrize(("offset", "length"), [(1, 0), (0, 1), (SIZE, SIZE)])
def test_flush_and_disc_need_zero_offset_and_length(command: Cmd, offset: int, length: int) -> None:
    """FLUSH: "For a flush request, length and offset are reserved, and MUST be set to
    all-zero." DISC: "The values of the length and offset fields in a disconnect request MUST be
    zero."
    """
    error = refused(req(command, offset, length))
    assert error.nbd_errno is NbdErrno.EINVAL
    assert error.message == (
        f"NBD_CMD_{command.name} must have zero offset and length: offset={offset} length={length}"
    )


@pytest.mark.parametrize("command", [*RANGED, Cmd.CACHE])
@pytest.mark.parametrize(("offset", "length"), [(512, 4096), (0, 512), (4096, 4097)])
def test_unaligned_requests_are_einval(command: Cmd, offset: int, length: int) -> None:
    """ "It SHOULD return NBD_EINVAL if ... a read or write request is not aligned to advertised
    minimum block sizes." "the client MUST ensure that offset and length are integer multiples of
    any advertised minimum block size".
    """
    export = ExportInfo("aligned", SIZE, CACHING.flags, min_block=4096)
    error = refused(req(command, offset, length), export)
    assert error.nbd_errno is NbdErrno.EINVAL
    assert "minimum block size 4096" in error.message


@pytest.mark.parametrize("command", RANGED)
def test_unaligned_tail_of_an_unaligned_export_is_reachable(command: Cmd) -> None:
    """ "If a server advertises a minimum block size, the advertised export size SHOULD be an
    integer multiple of that block size, since otherwise, the client would be unable to access
    the final few bytes of the export": a request that ends exactly at the end is allowed.
    """
    check_request(req(command, SIZE, 512), ALIGNED)
    check_request(req(command, SIZE - 4096, 4096 + 512), ALIGNED)


def test_read_only_beats_range_and_flag_beats_read_only() -> None:
    """Checks run in a fixed order so a request with several faults always gets the same error."""
    assert refused(req(Cmd.WRITE, SIZE, 512), RO).nbd_errno is NbdErrno.EPERM
    export = ExportInfo("ro-trim", SIZE, RO.flags | TransmissionFlag.SEND_TRIM)
    assert refused(req(Cmd.TRIM, 0, 0, CmdFlag.NO_HOLE), export).message.startswith(
        "NBD_CMD_TRIM does not accept"
    )


def test_command_specs_cover_exactly_the_implemented_commands() -> None:
    assert set(COMMAND_SPECS) == {*ALL_COMMANDS_ON_RW, Cmd.CACHE, Cmd.BLOCK_STATUS}
    assert all(spec.name == f"NBD_CMD_{Cmd(c).name}" for c, spec in COMMAND_SPECS.items())
