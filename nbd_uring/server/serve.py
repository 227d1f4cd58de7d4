"""The server: listeners, one reaper task for the ring, and a task per client connection.

Every connection to every export shares one ring and one file descriptor per export, so
requests from all clients meet in one submission queue in the order they were read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import ssl
import stat
import tempfile
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from nbd_uring.config import ExportConfig, ServerConfig, TlsMode, group_id
from nbd_uring.engine.buffers import BufferPool
from nbd_uring.engine.export import Export
from nbd_uring.engine.faults import FaultInjector
from nbd_uring.engine.ring import STALL_CHECK_S, Ring
from nbd_uring.protocol import (
    ExportInfo,
    OptionError,
    Rep,
    TransmissionFlag,
    transmission_flags_for,
)
from nbd_uring.server.connection import Connection, set_nodelay
from nbd_uring.server.metrics import Collector, Stats, serve_metrics
from nbd_uring.server.tls import server_context

log = logging.getLogger("nbd_uring.server")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Export settings a reload applies to new connections without reopening the file; a change
# of any other setting replaces the export (its current clients are drained).
_METADATA_FIELDS = frozenset({"description", "allow", "max_connections"})
# Server settings bound at start: a reload that changes them logs "needs a restart".
_RESTART_FIELDS = (
    "bind",
    "port",
    "unix_path",
    "unix_mode",
    "unix_group",
    "ring_entries",
    "lane",
    "metrics",
    "tls",
    "tls_cert",
    "tls_key",
    "tls_ca",
    "tls_verify_peer",
)


class ExportState:
    """What the versions of one export that share a backend share across a reload: a change
    of description, allow list or limits makes a new :class:`ServedExport` around the same
    state, so connections that chose the old version are still counted, drained and closed
    with it."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.connections: set[Connection] = set()
        """Connections in transmission on this backend."""
        self.retired: str | None = None
        """Why the export is going away (removed or replaced by a reload); None while served."""
        self.closing = False
        """Its last client is gone and the file is being synced and closed."""


@dataclass(frozen=True, slots=True)
class ServedExport:
    """An export as the protocol describes it, bound to the storage that backs it."""

    info: ExportInfo
    backend: Export
    config: ExportConfig
    state: ExportState = dataclasses.field(
        default_factory=lambda: ExportState(Stats("")), compare=False
    )
    allow: tuple[Network, ...] = ()


class TlsClient(Protocol):
    """What export policy needs to know of a client's TLS state (a Connection)."""

    tls_established: bool
    tls_name: str | None


@dataclass(frozen=True, slots=True)
class ListenAddress:
    family: socket.AddressFamily
    address: Any
    tls: bool = False
    """TLS is required: the URI scheme is ``nbds``."""

    @property
    def uri_base(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        if self.family == socket.AF_UNIX:
            return f"{scheme}+unix://{{export}}?socket={self.address}"
        host, port = self.address[0], self.address[1]
        if self.family == socket.AF_INET6:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}{{export}}"

    def uri(self, export_name: str) -> str:
        return self.uri_base.format(export="/" + urllib.parse.quote(export_name))


def _open_export(ring: Ring, cfg: ExportConfig, stats: Stats | None = None) -> ServedExport:
    backend = Export(
        ring,
        cfg.path,
        read_only=cfg.read_only,
        size=cfg.size,
        create=cfg.create,
        ordering=cfg.ordering,
        durability=cfg.durability,
        writeback_limit=cfg.writeback_limit,
        faults=FaultInjector(cfg.faults, cfg.fault_seed) if cfg.faults else None,
        fua_dsync=cfg.fua_dsync,
        inline_writes=cfg.inline_writes,
        direct=cfg.direct,
    )
    info = ExportInfo(
        name=cfg.name,
        size=backend.size,
        flags=transmission_flags_for(read_only=cfg.read_only, can_cache=True, can_fast_zero=True),
        description=cfg.description,
    )
    if backend.direct:
        # O_DIRECT needs aligned requests: advertise the alignment and refuse clients that do
        # not ask for it (the tail past the last whole block is the engine's business).
        info = dataclasses.replace(
            info,
            min_block=backend.block_size,
            preferred_block=max(4096, backend.block_size),
            block_size_required=True,
        )
    return ServedExport(
        info=info,
        backend=backend,
        config=cfg,
        state=ExportState(stats or Stats(cfg.name)),
        allow=_networks(cfg.allow),
    )


def _networks(allow: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(a, strict=False) for a in allow)


def _allowed(address: str | None, networks: tuple[Network, ...]) -> bool:
    """Unix-socket peers (no address) are governed by the socket's file permissions."""
    if not networks or address is None:
        return True
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class Server:
    """Owns the ring and the exports; serves listeners, or sockets handed over already
    negotiated. ``listen_sockets`` (systemd socket activation) replace the configured ones."""

    def __init__(
        self, config: ServerConfig, *, listen_sockets: Sequence[socket.socket] = ()
    ) -> None:
        self.config = config
        self._inherited = list(listen_sockets)
        self._allow = _networks(config.allow)
        self.tls_context: ssl.SSLContext | None = None
        """None: TLS off, STARTTLS is refused."""
        if config.tls is not TlsMode.OFF:
            self.tls_context = server_context(config)
        self.tls_required = config.tls is TlsMode.REQUIRE
        self.connections = 0
        self.draining = False
        """Set by :meth:`begin_shutdown`: new requests get ESHUTDOWN, options ERR_SHUTDOWN."""
        self._transmitting_changed = trio.Event()
        self._accept_scope = trio.CancelScope()
        self.export_connections: Counter[str] = Counter()
        self.stats: dict[str, Stats] = {}
        """Per-export counters for --metrics, keyed by name; a reload adds and removes keys."""
        self.ring = Ring(config.ring_entries, lane=config.lane)
        self.pool = BufferPool()
        self.exports_by_name: dict[str, ServedExport] = {}
        self._retiring: dict[ExportState, ServedExport] = {}
        """Removed or replaced exports whose clients are still being drained, by their state
        (shared by every version of one export, which its connections may hold)."""
        self._nursery: trio.Nursery | None = None
        try:
            for cfg in config.exports:
                served = _with_tls(config, _open_export(self.ring, cfg))
                self.exports_by_name[cfg.name] = served
                self.stats[cfg.name] = served.state.stats
        except BaseException:
            self.close()
            raise
        self.default_export = self.exports_by_name[config.exports[0].name]
        self.addresses: list[ListenAddress] = []
        self._accepted = 0

    def lookup_info(self, name: str) -> ExportInfo | None:
        """The protocol's export lookup: "" names the default export."""
        served = self.exports_by_name.get(name)
        if served is None and name == "":
            served = self.default_export
        return served.info if served is not None else None

    def list_infos(self) -> Sequence[ExportInfo]:
        return [served.info for served in self.exports_by_name.values()]

    def policy_for(
        self, address: str | None, client: TlsClient | None = None
    ) -> tuple[Callable[[str], ExportInfo | None], Callable[[], Sequence[ExportInfo]]]:
        """The export lookup and listing one client may see: exports whose allow list
        excludes ``address``, or (once TLS is up) whose TLS name list excludes the client
        certificate's CN, or that are at their connection limit, are refused with ERR_POLICY
        (and not listed when the address or name is the reason). Before TLS, exports that
        need it are left to the handshake, which answers ERR_TLS_REQD."""

        def unlisted(served: ServedExport) -> str | None:
            name = served.config.name
            if not _allowed(address, served.allow):
                return f"export {name!r} is not available to {address}"
            names = served.config.allow_tls_names
            if names and client is not None and client.tls_established:
                if client.tls_name not in names:
                    who = f"CN={client.tls_name}" if client.tls_name else "without a CN"
                    return f"export {name!r} is not available to the TLS client {who}"
            return None

        def refusal(served: ServedExport) -> str | None:
            name = served.config.name
            reason = unlisted(served)
            if reason is not None:
                return reason
            limit = served.config.max_connections
            if limit is not None and self.export_connections[name] >= limit:
                return f"export {name!r} has reached its limit of {limit} connections"
            return None

        def lookup(name: str) -> ExportInfo | None:
            served = self.exports_by_name.get(name)
            if served is None and name == "":
                served = self.default_export
            if served is None:
                return None
            reason = refusal(served)
            if reason is not None:
                raise OptionError(Rep.ERR_POLICY, reason)
            return served.info

        def listing() -> Sequence[ExportInfo]:
            return [
                served.info for served in self.exports_by_name.values() if unlisted(served) is None
            ]

        return lookup, listing

    def resolve(self, info: ExportInfo) -> ServedExport | None:
        """The export a finished handshake chose (``info`` as negotiated: its flags may have
        gained SEND_DF). A reload between the lookup and here may have replaced it: then the
        new version if the client would see no difference, else the retiring old one (which
        drains the connection at once), else None and the caller closes the connection."""
        for served in (*self.exports_by_name.values(), *self._retiring.values()):
            if _same_geometry(served.info, info):
                return served
        return None

    def export_chosen(self, served: ServedExport, connection: Connection) -> Stats | None:
        """Count a connection in transmission; returns the export's per-request counters
        when metrics are on (None keeps the request path free of them)."""
        state = served.state
        stats = state.stats
        state.connections.add(connection)
        self.export_connections[served.config.name] += 1
        stats.connections += 1
        stats.connections_total += 1
        if self.draining:
            connection.begin_drain("the server is shutting down")
        elif state.retired is not None:
            connection.begin_drain(state.retired)
        return stats if self.config.metrics is not None else None

    def export_released(self, served: ServedExport, connection: Connection) -> None:
        state = served.state
        state.connections.discard(connection)
        self.export_connections[served.config.name] -= 1
        state.stats.connections -= 1
        if state.retired is not None and not state.connections:
            self._close_retired(served)
        self._transmitting_changed.set()
        self._transmitting_changed = trio.Event()

    def begin_shutdown(self) -> None:
        """Stop accepting; connections finish what they have in flight and close."""
        if self.draining:
            return
        self.draining = True
        self._accept_scope.cancel()
        for served in (*self.exports_by_name.values(), *self._retiring.values()):
            for connection in list(served.state.connections):
                connection.begin_drain("the server is shutting down")

    async def drained(self) -> None:
        """Return once no connection is in transmission (negotiating ones do not count: they
        are only answered ERR_SHUTDOWN and closed with the server)."""
        while sum(self.export_connections.values()):
            await self._transmitting_changed.wait()

    def close(self) -> None:
        """Wait for the ring to finish in-flight I/O, make every write durable, close files."""
        self.ring.close()
        for served in (*self.exports_by_name.values(), *self._retiring.values()):
            _sync_and_close(served)
        self._retiring.clear()

    # -- reload -------------------------------------------------------------------------

    def reload(self, config: ServerConfig) -> None:
        """Apply a new configuration (SIGHUP): open added exports, retire removed ones and
        those whose storage settings changed (their clients are drained: requests in flight
        are answered, new ones get ESHUTDOWN, then the connection closes and the file is
        synced and closed), and let description, allow list and limits apply to new
        connections. Listeners and the ring stay as they are; a change to them is logged.

        Every added or replaced export is opened before anything changes, so a file that
        cannot be opened leaves the running configuration as it was (the error propagates).
        """
        old = self.config
        for field in _RESTART_FIELDS:
            if getattr(old, field) != getattr(config, field):
                log.warning(
                    "reload: %s changed (%r -> %r); this needs a restart and is ignored",
                    field.replace("_", "-"), getattr(old, field), getattr(config, field),
                )
        config = dataclasses.replace(config, **{f: getattr(old, f) for f in _RESTART_FIELDS})
        wanted = {cfg.name: cfg for cfg in config.exports}
        opened: dict[str, ServedExport] = {}
        updated: dict[str, ServedExport] = {}
        try:
            for name, cfg in wanted.items():
                current = self.exports_by_name.get(name)
                if current is not None and current.config == cfg:
                    continue
                if current is not None and _metadata_only(current.config, cfg):
                    updated[name] = _with_tls(
                        config,
                        dataclasses.replace(
                            current,
                            config=cfg,
                            info=dataclasses.replace(current.info, description=cfg.description),
                            allow=_networks(cfg.allow),
                        ),
                    )
                    continue
                stats = current.state.stats if current is not None else None
                opened[name] = _with_tls(config, _open_export(self.ring, cfg, stats))
        except BaseException:
            for served in opened.values():
                served.backend.close()
            raise
        removed = [s for name, s in self.exports_by_name.items() if name not in wanted]
        replaced = [self.exports_by_name[name] for name in opened if name in self.exports_by_name]
        exports: dict[str, ServedExport] = {}
        for name in wanted:
            exports[name] = opened.get(name) or updated.get(name) or self.exports_by_name[name]
        self.exports_by_name = exports
        self.default_export = exports[config.exports[0].name]
        self.config = config
        self._allow = _networks(config.allow)
        for served in removed:
            del self.stats[served.config.name]
            log.warning("reload: export %r removed", served.config.name)
            self._retire(served, "the export was removed from the configuration")
        for served in replaced:
            log.warning("reload: export %r replaced (storage settings changed)", served.config.name)
            self._retire(served, "the export was changed by a reload")
        for name, served in opened.items():
            self.stats[name] = served.state.stats
            if name not in {s.config.name for s in replaced}:
                log.warning("reload: export %r added (%s)", name, served.config.path)
        for name in updated:
            log.warning("reload: export %r changed (description, allow list or limits)", name)

    def _retire(self, served: ServedExport, reason: str) -> None:
        state = served.state
        state.retired = reason
        if not state.connections:
            self._retiring[state] = served
            self._close_retired(served)
            return
        log.info(
            "export %r: draining %d connection(s)", served.config.name, len(state.connections)
        )
        self._retiring[state] = served
        for connection in list(state.connections):
            connection.begin_drain(reason)

    def _close_retired(self, served: ServedExport) -> None:
        """Once its last client is gone: let the export's I/O finish, sync it, close it."""
        retiring = self._retiring.get(served.state)
        if retiring is None or served.state.closing:
            return
        if self._nursery is None or self.ring.closed:
            return  # Server.close does it
        served.state.closing = True
        self._nursery.start_soon(self._finish_retired, retiring)

    async def _finish_retired(self, served: ServedExport) -> None:
        backend = served.backend
        if not served.config.read_only:
            # A FLUSH waits for every write received before it (replied to or not, on any
            # connection), then fdatasyncs: after it nothing of this export's is left to do.
            synced = trio.Event()
            errors: list[int] = []

            def flushed(err: int) -> None:
                errors.append(err)
                synced.set()

            backend.flush(flushed)
            self.ring.submit()
            await synced.wait()
            if errors[0]:
                log.error(
                    "export %r: final fdatasync failed: %s",
                    served.config.name, os.strerror(errors[0]),
                )
        # Reads still in the ring hold the file, but one waiting for ring space holds only the
        # descriptor number, which must not be reused under it.
        fds = [fd for fd in (backend.fd, backend._tail_fd) if fd >= 0]
        while any(self.ring.uses_fd(fd) for fd in fds):  # noqa: ASYNC110 (no event for it)
            await trio.sleep(0.01)
        if self._retiring.pop(served.state, None) is None:
            return  # the server closed it meanwhile
        backend.close()
        log.info("export %r: closed", served.config.name)

    async def serve(self, *, task_status: trio.TaskStatus[list[ListenAddress]]) -> None:
        listeners = await self._open_listeners()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._reaper_task)
                if self.config.metrics is not None:
                    host, _, port = self.config.metrics.rpartition(":")
                    collector = Collector(self.stats, deferred_errors=self._deferred_errors)
                    bound = await nursery.start(
                        serve_metrics, host.strip("[]") or "127.0.0.1", int(port), collector
                    )
                    log.info("metrics on http://%s:%d/metrics", host or "127.0.0.1", bound)
                nursery.start_soon(self._accept_all, listeners, nursery)
                task_status.started(self.addresses)
        finally:
            for sock in listeners:
                sock.close()
            if self.config.unix_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.config.unix_path)

    def _deferred_errors(self, name: str) -> int:
        served = self.exports_by_name.get(name)
        return 0 if served is None else served.backend.deferred_errors_total

    async def _open_listeners(self) -> list[trio.socket.SocketType]:
        cfg = self.config
        socks: list[trio.socket.SocketType] = []
        if self._inherited:
            if cfg.unix_mode is not None or cfg.unix_group is not None:
                log.warning(
                    "socket activation: unix-mode and unix-group are ignored (the socket unit's "
                    "SocketMode= and SocketGroup= set them)"
                )
            for inherited in self._inherited:
                sock = trio.socket.from_stdlib_socket(inherited)
                socks.append(sock)
                self.addresses.append(
                    ListenAddress(sock.family, sock.getsockname(), self.tls_required)
                )
            return socks
        try:
            if cfg.unix_path is not None:
                _remove_stale_socket(cfg.unix_path)
                sock = trio.socket.from_stdlib_socket(
                    _listen_unix(cfg.unix_path, cfg.unix_mode, cfg.unix_group)
                )
                socks.append(sock)
                self.addresses.append(
                    ListenAddress(socket.AF_UNIX, cfg.unix_path, self.tls_required)
                )
            if cfg.port is not None:
                infos = await trio.socket.getaddrinfo(
                    cfg.bind, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
                for family, type_, proto, _name, addr in infos:
                    sock = trio.socket.socket(family, type_, proto)
                    socks.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    await sock.bind(addr)
                    sock.listen(128)
                    self.addresses.append(
                        ListenAddress(family, sock.getsockname(), self.tls_required)
                    )
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        return socks

    async def _accept_all(
        self, listeners: list[trio.socket.SocketType], connections: trio.Nursery
    ) -> None:
        with self._accept_scope:
            async with trio.open_nursery() as nursery:
                for sock in listeners:
                    nursery.start_soon(self._accept_task, sock, connections)
        for sock in listeners:
            sock.close()

    async def _reaper_task(self) -> None:
        ring = self.ring
        while True:
            if ring.deferred and ring.in_flight:
                with trio.move_on_after(STALL_CHECK_S):
                    await trio.lowlevel.wait_readable(ring.eventfd)
            else:
                await trio.lowlevel.wait_readable(ring.eventfd)
            ring.reap()

    async def _accept_task(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, addr = await listener.accept()
            except OSError as exc:
                # EMFILE and friends: the listener stays, the server stays up.
                log.warning("accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            self._accepted += 1
            peer = _describe_peer(listener.family, addr, self._accepted)
            address = None if listener.family == socket.AF_UNIX else str(addr[0])
            if not _allowed(address, self._allow):
                log.warning("%s: refused: address not in the server's allow list", peer)
                sock.close()
                continue
            limit = self.config.max_connections
            if limit is not None and self.connections >= limit:
                log.warning("%s: refused: server is at its limit of %d connections", peer, limit)
                sock.close()
                continue
            set_nodelay(sock)
            log.info("%s: connected", peer)
            self.connections += 1
            nursery.start_soon(self._counted_connection_task, sock, peer)

    async def _counted_connection_task(self, sock: trio.socket.SocketType, peer: str) -> None:
        try:
            await self._connection_task(sock, peer)
        finally:
            self.connections -= 1

    async def serve_connected(
        self,
        socks: Sequence[trio.socket.SocketType],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve sockets whose handshake already happened elsewhere (``nbd-uring attach`` hands
        the kernel the other ends): each starts in transmission on the default export. Returns
        once every one of them has closed."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reaper_task)
            async with trio.open_nursery() as connections:
                for number, sock in enumerate(socks):
                    connections.start_soon(
                        self._connection_task, sock, f"kernel#{number}", self.default_export
                    )
                task_status.started()
            nursery.cancel_scope.cancel()

    async def _connection_task(
        self, sock: trio.socket.SocketType, peer: str, export: ServedExport | None = None
    ) -> None:
        try:
            await Connection(self, sock, peer).run(export)
        except Exception:
            # A bug must cost one connection, never the server.
            log.exception("%s: connection failed", peer)
            sock.close()


def _same_geometry(a: ExportInfo, b: ExportInfo) -> bool:
    """Whether a client that negotiated ``b`` may be served by ``a``: the same name, size,
    block sizes and flags (but for SEND_DF, which depends on the negotiation)."""
    df = TransmissionFlag.SEND_DF
    return a.flags & ~df == b.flags & ~df and a == dataclasses.replace(
        b, flags=a.flags, description=a.description
    )


def _with_tls(config: ServerConfig, served: ServedExport) -> ServedExport:
    """Mark the export's info as TLS-only when the configuration makes it so."""
    needed = config.export_needs_tls(served.config)
    if served.info.tls_required == needed:
        return served
    return dataclasses.replace(served, info=dataclasses.replace(served.info, tls_required=needed))


def _metadata_only(old: ExportConfig, new: ExportConfig) -> bool:
    """True when only settings that need no reopening (and no draining) differ."""
    return all(
        getattr(old, f.name) == getattr(new, f.name)
        for f in dataclasses.fields(ExportConfig)
        if f.name not in _METADATA_FIELDS
    )


def _sync_and_close(served: ServedExport) -> None:
    if served.backend.fd >= 0 and not served.config.read_only:
        try:
            os.fdatasync(served.backend.fd)
        except OSError as exc:
            log.error("fdatasync of %s at shutdown failed: %s", served.config.path, exc)
    served.backend.close()


def _listen_unix(path: str, mode: int | None, group: str | None) -> socket.socket:
    """A listening Unix socket at ``path`` that is never reachable more widely than ``mode``
    and ``group`` say. With either given, it is bound under umask 0777 (the file appears with
    no permission bits) inside a fresh private directory next to ``path``, given its group and
    mode there, and only then renamed to ``path`` and made to listen: nobody can swap the file
    between the bind and the chmod, even in a directory others can write to. (Where the
    private path would be too long for a socket address, it is bound at ``path`` itself.) The
    umask is process-wide, but nothing else creates files while the server starts."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound: str | None = None
    private: str | None = None
    try:
        if mode is None and group is None:
            sock.bind(path)
            bound = path
        else:
            where = path
            parent = os.path.dirname(os.path.abspath(path))
            candidate = tempfile.mkdtemp(prefix=".nbd-uring-", dir=parent)
            if len(os.fsencode(os.path.join(candidate, "s"))) < 108:
                private, where = candidate, os.path.join(candidate, "s")
            else:
                os.rmdir(candidate)
            umask = os.umask(0o777)
            try:
                sock.bind(where)
                bound = where
            finally:
                os.umask(umask)
            if group is not None:
                try:
                    os.chown(where, -1, group_id(group), follow_symlinks=False)
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"cannot give {path} to group {group!r}: {exc.strerror}"
                    ) from None
            os.chmod(where, 0o777 & ~umask if mode is None else mode)
            if private is not None:
                os.rename(where, path)
                bound = path
        sock.listen(128)
    except BaseException:
        sock.close()
        if bound is not None:
            with contextlib.suppress(OSError):
                os.unlink(bound)
        raise
    finally:
        if private is not None:
            with contextlib.suppress(OSError):
                os.rmdir(private)
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


def _describe_peer(family: int, addr: Any, number: int) -> str:
    if family == socket.AF_UNIX:
        return f"unix#{number}"
    if family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    return f"{addr[0]}:{addr[1]}"
