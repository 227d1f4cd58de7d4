"""Command line: ``nbd-uring serve``. The only module that exits the process."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from nbd_uring import __version__
from nbd_uring.config import (
    DEFAULT_BIND,
    DEFAULT_POLL_US,
    DEFAULT_PORT,
    Durability,
    ExportConfig,
    FaultRule,
    Ordering,
    ServerConfig,
    TlsMode,
    parse_mode,
)

if TYPE_CHECKING:
    from nbd_uring.kernel import AttachConfig
    from nbd_uring.server import Server

log = logging.getLogger("nbd_uring")

DEFAULT_SCRATCH_SIZE = 1 << 30

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}

SERVE_DESCRIPTION = """\
Serve FILE (a regular file or a block device) over the Network Block Device protocol.
Every disk I/O goes through io_uring and replies are sent as requests complete.
With no FILE, serve a 1 GiB sparse scratch disk that is deleted when the server exits."""

SERVE_EPILOG = """\
examples:
  nbd-uring serve                                   scratch disk on nbd://127.0.0.1:10809/
  nbd-uring serve disk.img --print-uri              serve an existing image
  nbd-uring serve new.img --size 4G --create        create (or extend) a sparse image
  nbd-uring serve disk.img --unix /run/disk.sock    Unix socket only
  nbd-uring serve disk.img --unix /run/disk.sock --unix-mode 0660 --unix-group disk
  nbd-uring serve disk.img --read-only --port 0 --print-uri

clients:
  nbdinfo nbd://127.0.0.1/             qemu-img info nbd://127.0.0.1:10809
  nbdcopy in.img nbd://127.0.0.1/      nbd-client 127.0.0.1 10809 /dev/nbd0 -N ''

TLS (certificates in DIR, named as libnbd and qemu expect them):
  nbd-uring serve disk.img --tls require --tls-cert DIR/server-cert.pem \
      --tls-key DIR/server-key.pem
  nbdinfo 'nbds://127.0.0.1/?tls-certificates=DIR'
"""


def parse_size(text: str) -> int:
    """Parse ``512``, ``64k``, ``1G``, ``1.5GiB`` into bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtp]?)(?:i?b)?\s*", text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1048576, 64K, 1G)")
    return int(float(m.group(1)) * _SUFFIXES[m.group(2)])


def _mode(text: str) -> int:
    try:
        return parse_mode(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fault_rule(text: str) -> FaultRule:
    try:
        return FaultRule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbd-uring",
        description="A Network Block Device server on io_uring.",
    )
    parser.add_argument("--version", action="version", version=f"nbd-uring {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve a file or block device",
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("file", nargs="?", metavar="FILE", help="file or block device to serve")
    serve.add_argument("--size", type=parse_size, help="export size (bytes, or 64K, 1G, ...)")
    serve.add_argument(
        "--create", action="store_true", help="create FILE (sparse) or extend it to --size"
    )
    serve.add_argument("-r", "--read-only", action="store_true", help="refuse all writes")
    serve.add_argument(
        "-e", "--export-name", default="", metavar="NAME", help="export name (default: '')"
    )
    serve.add_argument("--description", default="", help="description shown to clients")
    serve.add_argument(
        "-b", "--bind", metavar="ADDR", help=f"TCP address to listen on (default {DEFAULT_BIND})"
    )
    serve.add_argument(
        "-p", "--port", type=int, metavar="N", help=f"TCP port (default {DEFAULT_PORT}; 0 = any)"
    )
    serve.add_argument(
        "-U", "--unix", metavar="PATH",
        help="listen on this Unix socket only (add --port/--bind for TCP too)",
    )
    serve.add_argument(
        "--unix-mode", type=_mode, metavar="MODE",
        help="permission bits of the --unix socket, in octal (e.g. 0660; default: the umask)",
    )
    serve.add_argument(
        "--unix-group", metavar="GROUP", help="group (name or number) of the --unix socket"
    )
    serve.add_argument(
        "--print-uri", action="store_true", help="print the export's URI on stdout when ready"
    )
    serve.add_argument(
        "--handshake-timeout", type=float, metavar="SECONDS",
        help="drop clients that have not chosen an export by then (default 10)",
    )
    serve.add_argument(
        "-c", "--config", metavar="FILE",
        help="TOML configuration (server settings and any number of exports); the options "
        "here override its [server] settings",
    )
    serve.add_argument(
        "--allow", action="append", metavar="CIDR",
        help="accept TCP clients only from these networks or addresses (repeatable)",
    )
    serve.add_argument(
        "--max-connections", type=int, metavar="N", help="refuse clients beyond N at once"
    )
    serve.add_argument(
        "--idle-timeout", type=float, metavar="SECONDS",
        help="close connections that send no request for this long (none in flight)",
    )
    serve.add_argument(
        "--poll-us", type=int, metavar="MICROSECONDS",
        help="after answering the only connected client, poll its socket this long before "
        "sleeping: saves a wake-up per request at queue depth 1 (default 50, 0: never)",
    )
    serve.add_argument(
        "--lane", action=argparse.BooleanOptionalAction, default=None,
        help="answer plain READs and WRITEs in C, request to reply, without Python "
        "(default on; never with TLS or --metrics)",
    )
    serve.add_argument(
        "--max-bytes-in-flight", type=parse_size, metavar="SIZE",
        help="per connection: READ and WRITE bytes in flight (replies not yet sent included) "
        "before the server stops reading that client's socket (default 128M, at least 32M)",
    )
    serve.add_argument(
        "--max-requests-in-flight", type=int, metavar="N",
        help="per connection: requests in flight before the server stops reading (default 256)",
    )
    serve.add_argument(
        "--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at /metrics there"
    )
    serve.add_argument("--pidfile", metavar="PATH", help="write the process id there once ready")
    serve.add_argument(
        "--tls", choices=[m.value for m in TlsMode],
        help="off (default): refuse STARTTLS; on: offer TLS, plaintext clients welcome; "
        "require: only STARTTLS and ABORT before TLS",
    )
    serve.add_argument("--tls-cert", metavar="PEM", help="server certificate (chain)")
    serve.add_argument("--tls-key", metavar="PEM", help="server private key")
    serve.add_argument(
        "--tls-ca", metavar="PEM", help="CA certificate(s) that sign client certificates"
    )
    serve.add_argument(
        "--tls-verify-peer", action="store_true", default=None,
        help="require a client certificate signed by --tls-ca",
    )
    serve.add_argument(
        "--allow-tls-name", action="append", metavar="CN",
        help="serve the export only to TLS clients whose certificate has this subject common "
        "name (repeatable; implies --tls-verify-peer semantics: needs it and --tls-ca)",
    )
    serve.add_argument(
        "--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long connections may finish their requests (default 30)",
    )
    serve.add_argument(
        "--run", metavar="CMD",
        help="captive mode: once listening, run CMD in a shell with $uri (and $unixsocket) set, "
        "then shut down and exit with its status",
    )
    serve.add_argument(
        "--ordering", choices=[o.value for o in Ordering], default=Ordering.STRICT.value,
        help="strict (default): a request overlapping an earlier unfinished one waits for it, "
        "across all connections; kernel: submit everything at once and let io_uring decide",
    )
    serve.add_argument(
        "--durability", choices=[d.value for d in Durability], default=Durability.FLUSH.value,
        help="sync: every write is durable before its reply; flush (default): durable when "
        "FUA or FLUSH asks; writeback: reply once received, I/O errors reported at next FLUSH",
    )
    serve.add_argument(
        "--writeback-limit", type=parse_size, default=64 << 20, metavar="SIZE",
        help="bytes of replied-to writes not yet on disk (writeback mode; default 64M); "
        "past it writes are replied to when they complete",
    )
    serve.add_argument(
        "--fua", choices=["link", "dsync"], default="link",
        help="how a FUA write is made durable: a linked fdatasync (default) or RWF_DSYNC",
    )
    serve.add_argument(
        "--inline-writes", action="store_true",
        help="do small plain writes with pwrite(2) at once instead of through io_uring "
        "(faster on ext4, whose buffered writes io_uring serialises in one worker thread)",
    )
    serve.add_argument(
        "--direct", action="store_true",
        help="open the file with O_DIRECT (bypass the page cache); clients must then use the "
        "advertised minimum block size (512, or the device's logical block size)",
    )
    serve.add_argument(
        "--fault", action="append", default=[], type=_fault_rule, metavar="RULE",
        help="inject delays or errors, for debugging: OP[@START-END][:delay=D][:error=E][:prob=P]"
        " with OP read|write|flush|trim|zero|any, e.g. 'write@0-1M:delay=200ms' (repeatable)",
    )
    serve.add_argument(
        "--fault-seed", type=int, metavar="N", help="seed for --fault prob= (reproducible runs)"
    )
    serve.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log each connection and each failed request (-vv: debug)",
    )
    check = sub.add_parser(
        "check-config",
        help="check a configuration file",
        description="Parse and validate a TOML configuration file; errors name the line.",
    )
    check.add_argument("config", metavar="FILE")
    check.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    _add_kernel_commands(sub)
    return parser


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(asctime)s nbd-uring[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )


async def _run(
    config: ServerConfig, export_name: str, args: argparse.Namespace
) -> int:
    from nbd_uring.server import Server
    from nbd_uring.server.systemd import listen_fds, notify

    # Listening for signals from the start: a SIGTERM during startup must not skip cleanup
    # (and a SIGHUP must not kill the process; it is handled once the server runs).
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        inherited = listen_fds()
        if inherited:
            log.info("socket activation: serving %d inherited socket(s)", len(inherited))
        server = Server(config, listen_sockets=inherited)
        status = 0
        try:
            async with trio.open_nursery() as nursery:
                addresses = await nursery.start(server.serve)
                for address in addresses:
                    log.info("listening on %s", address.uri(export_name))
                if args.print_uri:
                    print(addresses[0].uri(export_name), flush=True)
                if args.pidfile:
                    _write_pidfile(args.pidfile)
                notify("READY=1")
                reload = partial(_reload, server, args)
                if args.run:
                    status = await _captive(args.run, addresses, export_name, signals, reload)
                else:
                    async for signum in signals:
                        if signum == signal.SIGHUP:
                            reload()
                            continue
                        log.info("%s received, shutting down", signal.Signals(signum).name)
                        break
                notify("STOPPING=1")
                server.begin_shutdown()
                with trio.move_on_after(args.shutdown_timeout) as drain:
                    await server.drained()
                if drain.cancelled_caught:
                    log.warning(
                        "clients still connected after %.0f s: closing them", args.shutdown_timeout
                    )
                nursery.cancel_scope.cancel()
        finally:
            server.close()
            if args.pidfile:
                with contextlib.suppress(OSError):
                    os.unlink(args.pidfile)
    return status


def _write_pidfile(path: str) -> None:
    """Written only once the server listens, so its presence means ready (as with nbdkit)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _reload(server: Server, args: argparse.Namespace) -> None:
    """SIGHUP: re-read --config (command-line options still override it) and apply it; a
    file that does not parse or validate is logged and the running configuration stays."""
    from nbd_uring.server.systemd import notify

    if args.config is None:
        log.warning("SIGHUP received, but there is no --config to reload; ignored")
        return
    log.warning("SIGHUP received, reloading %s", args.config)
    notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        server.reload(_config_from_file(args))
    except (OSError, ValueError) as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
    finally:
        notify("READY=1")


async def _captive(
    command: str,
    addresses: Sequence[Any],
    export_name: str,
    signals: Any,
    reload: Callable[[], None] | None = None,
) -> int:
    """nbdkit's --run: the server lives exactly as long as ``command``."""
    env = dict(os.environ, uri=addresses[0].uri(export_name))
    for address in addresses:
        if address.family == socket.AF_UNIX:
            env["unixsocket"] = str(address.address)
    result: list[int] = []

    async def run_command(cancel: trio.CancelScope) -> None:
        proc = await trio.run_process(command, shell=True, env=env, check=False)
        result.append(proc.returncode)
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_command, nursery.cancel_scope)
        async for signum in signals:
            if signum == signal.SIGHUP and reload is not None:
                reload()
                continue
            log.info("%s received, stopping --run command", signal.Signals(signum).name)
            nursery.cancel_scope.cancel()
            break
    code = result[0] if result else 128 + signal.SIGTERM
    return code if code >= 0 else 128 - code


def _check_config(args: argparse.Namespace) -> int:
    from nbd_uring.configfile import ConfigError, load_config_file

    try:
        config = load_config_file(args.config)
    except ConfigError as exc:
        print(f"nbd-uring: {exc}", file=sys.stderr)
        return 1
    names = ", ".join(repr(e.name) for e in config.exports)
    print(f"{args.config}: OK ({len(config.exports)} export(s): {names})")
    return 0


def _config_from_file(args: argparse.Namespace) -> ServerConfig:
    from nbd_uring.configfile import load_config_file

    if args.file is not None:
        raise ValueError("give either FILE or --config, not both")
    config = load_config_file(args.config)
    if args.allow_tls_name:
        raise ValueError("--allow-tls-name is for a single FILE; use allow-tls-names per export")
    overrides: dict[str, Any] = {}
    if args.unix is not None:
        overrides["unix_path"] = args.unix
        if args.port is None and args.bind is None:
            overrides["port"] = overrides["bind"] = None
    if args.port is not None:
        overrides["port"] = args.port
        overrides["bind"] = args.bind or config.bind or DEFAULT_BIND
    elif args.bind is not None:
        overrides["bind"] = args.bind
        overrides["port"] = config.port or DEFAULT_PORT
    for field, value in (
        ("handshake_timeout_s", args.handshake_timeout),
        ("max_connections", args.max_connections),
        ("idle_timeout_s", args.idle_timeout),
        ("poll_us", args.poll_us),
        ("lane", args.lane),
        ("metrics", args.metrics),
        ("allow", tuple(args.allow) if args.allow else None),
        ("tls", TlsMode(args.tls) if args.tls else None),
        ("tls_cert", args.tls_cert),
        ("tls_key", args.tls_key),
        ("tls_ca", args.tls_ca),
        ("tls_verify_peer", args.tls_verify_peer),
        ("max_bytes_in_flight", args.max_bytes_in_flight),
        ("max_in_flight", args.max_requests_in_flight),
        ("unix_mode", args.unix_mode),
        ("unix_group", args.unix_group),
    ):
        if value is not None:
            overrides[field] = value
    return dataclasses.replace(config, **overrides)


def _in_flight_limits(args: argparse.Namespace) -> dict[str, int]:
    """The per-connection back-pressure limits given on the command line (others default)."""
    limits = {}
    if args.max_bytes_in_flight is not None:
        limits["max_bytes_in_flight"] = args.max_bytes_in_flight
    if args.max_requests_in_flight is not None:
        limits["max_in_flight"] = args.max_requests_in_flight
    return limits


def _exit_on_signal(signum: int, _frame: object) -> None:
    """Until Trio listens for signals, SIGTERM/SIGINT still unwind through the cleanup."""
    raise SystemExit(128 + signum)


def _serve(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if args.config is not None:
        try:
            config = _config_from_file(args)
            return trio.run(_run, config, config.exports[0].name, args)
        except (OSError, ValueError) as exc:
            print(f"nbd-uring: {exc}", file=sys.stderr)
            return 1
    scratch_dir: str | None = None
    path, size, create = args.file, args.size, args.create
    if path is None:
        scratch_dir = tempfile.mkdtemp(prefix="nbd-uring-")
        path = os.path.join(scratch_dir, "scratch.img")
        size, create = size or DEFAULT_SCRATCH_SIZE, True
    unix_only = args.unix is not None and args.port is None and args.bind is None
    try:
        config = ServerConfig(
            exports=(
                ExportConfig(
                    path=path,
                    name=args.export_name,
                    description=args.description,
                    read_only=args.read_only,
                    size=size,
                    create=create,
                    ordering=Ordering(args.ordering),
                    durability=Durability(args.durability),
                    writeback_limit=args.writeback_limit,
                    faults=tuple(args.fault),
                    fault_seed=args.fault_seed,
                    fua_dsync=args.fua == "dsync",
                    inline_writes=args.inline_writes,
                    direct=args.direct,
                    allow_tls_names=tuple(args.allow_tls_name or ()),
                ),
            ),
            bind=None if unix_only else (args.bind or DEFAULT_BIND),
            port=None if unix_only else (DEFAULT_PORT if args.port is None else args.port),
            unix_path=args.unix,
            unix_mode=args.unix_mode,
            unix_group=args.unix_group,
            handshake_timeout_s=args.handshake_timeout or 10.0,
            max_connections=args.max_connections,
            idle_timeout_s=args.idle_timeout,
            poll_us=DEFAULT_POLL_US if args.poll_us is None else args.poll_us,
            lane=True if args.lane is None else args.lane,
            allow=tuple(args.allow or ()),
            metrics=args.metrics,
            tls=TlsMode(args.tls or "off"),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
            tls_verify_peer=bool(args.tls_verify_peer),
            **_in_flight_limits(args),
        )
        return trio.run(_run, config, args.export_name, args)
    except (OSError, ValueError) as exc:
        print(f"nbd-uring: {exc}", file=sys.stderr)
        return 1
    finally:
        if scratch_dir is not None:
            shutil.rmtree(scratch_dir, ignore_errors=True)


# -- attach / detach / list: kernel /dev/nbdX devices through netlink ---------------------

ATTACH_DESCRIPTION = """\
Serve FILE in this process and connect it to a kernel /dev/nbdN device through netlink: no
TCP, no nbd-client. Prints the device once the kernel has it, then serves it in the background
until `nbd-uring detach DEVICE` (or SIGTERM to the serving process, which detaches too).
Needs root and the kernel's nbd module (modprobe nbd)."""

ATTACH_EPILOG = """\
examples:
  nbd-uring attach disk.img                         prints e.g. /dev/nbd0
  nbd-uring attach disk.img -C 4 -b 4096 --device /dev/nbd2
  nbd-uring list
  nbd-uring detach /dev/nbd2
"""


def _add_kernel_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    attach = sub.add_parser(
        "attach",
        help="back a kernel /dev/nbdN device with a file (netlink, in-process)",
        description=ATTACH_DESCRIPTION,
        epilog=ATTACH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    attach.add_argument("file", metavar="FILE", help="file or block device to serve")
    attach.add_argument(
        "-d", "--device", metavar="/dev/nbdN", help="device to use (default: the kernel picks)"
    )
    attach.add_argument(
        "-C", "--connections", type=int, default=1, metavar="N",
        help="connections (sockets) for the kernel to spread requests over (default 1)",
    )
    attach.add_argument("-r", "--read-only", action="store_true", help="a read-only device")
    attach.add_argument(
        "-b", "--block-size", type=parse_size, default=512, metavar="B",
        help="logical block size: 512 (default), 1024, 2048 or 4096",
    )
    attach.add_argument("--size", type=parse_size, help="export size (bytes, or 64K, 1G, ...)")
    attach.add_argument(
        "--create", action="store_true", help="create FILE (sparse) or extend it to --size"
    )
    attach.add_argument(
        "--timeout", type=int, default=0, metavar="SECONDS",
        help="kernel request timeout (default 0: wait as long as it takes)",
    )
    attach.add_argument(
        "--dead-conn-timeout", type=int, metavar="SECONDS",
        help="how long the kernel waits for a dead connection to be replaced",
    )
    attach.add_argument(
        "-f", "--foreground", action="store_true",
        help="serve in the foreground (logs on stderr) instead of in the background",
    )
    attach.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv)")

    detach = sub.add_parser(
        "detach",
        help="disconnect a kernel /dev/nbdN device",
        description="Disconnect /dev/nbdN: the kernel sends NBD_CMD_DISC to its server and "
        "drops the connections, whichever server it was attached to.",
    )
    detach.add_argument("device", metavar="DEVICE", help="/dev/nbdN, nbdN or N")
    detach.add_argument(
        "--wait", type=float, default=10.0, metavar="SECONDS",
        help="wait this long for the device to be released (default 10; 0: do not wait)",
    )
    detach.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv)")

    listing = sub.add_parser(
        "list",
        help="list kernel /dev/nbdN devices",
        description="List connected /dev/nbdN devices (NBD_CMD_STATUS), whoever attached them.",
    )
    listing.add_argument("device", nargs="?", metavar="DEVICE", help="only this device")
    listing.add_argument(
        "-a", "--all", action="store_true", help="also list devices that are not connected"
    )
    listing.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv)")


def _expected_errors(exc: BaseException) -> list[Exception]:
    """The user-facing errors inside ``exc`` (Trio wraps errors raised inside nurseries in
    exception groups); re-raises ``exc`` when it holds anything else."""
    from nbd_uring.kernel import KernelError

    expected = (KernelError, OSError, ValueError)
    if isinstance(exc, expected):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        leaves: list[Exception] = []
        for inner in exc.exceptions:
            leaves.extend(_expected_errors(inner))
        return leaves
    raise exc


class _Ready:
    """A ``task_status`` that hands the started value to a callback."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self._report = report

    def started(self, value: str | None = None) -> None:
        assert value is not None
        self._report(value)


def _run_attach(cfg: AttachConfig, report: Callable[[str], None]) -> int:
    from nbd_uring.kernel import attach

    try:
        trio.run(partial(attach, cfg, task_status=_Ready(report)))
    except (Exception, BaseExceptionGroup) as exc:
        for error in _expected_errors(exc):
            print(f"nbd-uring: {error}", file=sys.stderr)
        return 1
    return 0


def _in_background(run: Callable[[Callable[[str], None]], int]) -> int:
    """Fork: the child runs ``run(report)`` in a new session; once it calls ``report(text)``
    the parent prints ``text`` and exits 0, while the child, its stdio now /dev/null, goes on.
    If the child ends without reporting (its errors go to our stderr), the parent fails."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as pipe:
            ready = pipe.read().decode()
        if ready:
            print(ready, flush=True)
            return 0
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) or 1
    code = 1
    try:
        os.close(rfd)
        os.setsid()

        def report(text: str) -> None:
            os.write(wfd, text.encode())
            os.close(wfd)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)

        code = run(report)
    finally:
        os._exit(code)


def _attach(args: argparse.Namespace) -> int:
    from nbd_uring.kernel import AttachConfig, KernelError, check_kernel, parse_device

    try:
        cfg = AttachConfig(
            export=ExportConfig(
                path=args.file, read_only=args.read_only, size=args.size, create=args.create
            ),
            device=None if args.device is None else parse_device(args.device),
            connections=args.connections,
            block_size=args.block_size,
            timeout_s=args.timeout,
            dead_conn_timeout_s=args.dead_conn_timeout,
        )
        check_kernel()  # fail here, in the foreground, when the module is missing
    except (KernelError, ValueError, OSError) as exc:
        print(f"nbd-uring: {exc}", file=sys.stderr)
        return 1
    if args.foreground:
        return _run_attach(cfg, lambda device: print(device, flush=True))
    return _in_background(partial(_run_attach, cfg))


def _detach(args: argparse.Namespace) -> int:
    from nbd_uring.kernel import KernelError, NbdNetlink, device_path, parse_device

    try:
        index = parse_device(args.device)
        with NbdNetlink() as nl:
            nl.disconnect(index)
            deadline = time.monotonic() + args.wait
            while args.wait > 0:
                if not any(d.connected for d in nl.status(index)):
                    break
                if time.monotonic() > deadline:
                    print(
                        f"nbd-uring: {device_path(index)} is disconnected from its server but "
                        "still held open (mounted?)",
                        file=sys.stderr,
                    )
                    break
                time.sleep(0.05)
    except (KernelError, ValueError) as exc:
        print(f"nbd-uring: {exc}", file=sys.stderr)
        return 1
    return 0


def _list(args: argparse.Namespace) -> int:
    from nbd_uring.kernel import KernelError, NbdNetlink, parse_device

    try:
        index = None if args.device is None else parse_device(args.device)
        with NbdNetlink() as nl:
            devices = nl.status(index)
    except (KernelError, ValueError) as exc:
        print(f"nbd-uring: {exc}", file=sys.stderr)
        return 1
    for device in devices:
        if device.connected or args.all or index is not None:
            state = "connected" if device.connected else "disconnected"
            print(f"{device.path}\t{state}")
    return 0


_KERNEL_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "attach": _attach,
    "detach": _detach,
    "list": _list,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check_config(args)
    if args.command in _KERNEL_COMMANDS:
        return _KERNEL_COMMANDS[args.command](args)
    return 2
