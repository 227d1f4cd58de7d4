"""TLS after NBD_OPT_STARTTLS: an ``ssl.SSLObject`` over memory BIOs on the non-blocking socket.

:class:`TlsTransport` stands in for the connection's raw socket (``recv_into``, ``sendmsg``,
``fileno``), so the transmission loop runs unchanged over TLS, and plaintext connections keep
their plain socket with no extra layer at all. Memory BIOs rather than ``SSLSocket`` because the
reader and writer share one non-blocking descriptor driven by Trio's readiness waits: the
transport never blocks, and says ``BlockingIOError`` exactly when the socket would.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from typing import cast

import trio

from nbd_uring.config import ServerConfig

Buffer = bytes | bytearray | memoryview

# Ciphertext read from the socket per receive, and plaintext encrypted per sendmsg: bounds the
# ciphertext a slow client can leave queued in the transport.
RECV_CHUNK = 256 * 1024
SEND_CHUNK = 256 * 1024


class TlsError(Exception):
    """The TLS handshake failed: the message says why, for the log."""


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; ``setting`` names the culprit
    (``tls_cert``, ``tls_key`` or ``tls_ca``)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def server_context(config: ServerConfig) -> ssl.SSLContext:
    """The server's SSLContext, or TlsConfigError saying which file is unusable and why."""
    assert config.tls_cert is not None and config.tls_key is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    files = [("tls_cert", "certificate", config.tls_cert), ("tls_key", "key", config.tls_key)]
    if config.tls_ca is not None:
        files.append(("tls_ca", "CA certificate", config.tls_ca))
    for setting, what, path in files:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TlsConfigError(setting, f"TLS {what} {path}: {exc.strerror}") from None
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except ssl.SSLError as exc:
        raise TlsConfigError(
            "tls_cert",
            f"cannot load TLS certificate {config.tls_cert} with key {config.tls_key}: "
            f"{_reason(exc)}",
        ) from None
    if config.tls_ca is not None:
        try:
            context.load_verify_locations(cafile=config.tls_ca)
        except ssl.SSLError as exc:
            raise TlsConfigError(
                "tls_ca", f"cannot load TLS CA certificates {config.tls_ca}: {_reason(exc)}"
            ) from None
    context.verify_mode = ssl.CERT_REQUIRED if config.tls_verify_peer else ssl.CERT_NONE
    # NBD has no use for TLS session resumption: no tickets to queue after the handshake.
    context.num_tickets = 0
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


class TlsTransport:
    """Non-blocking TLS over a non-blocking socket, with the socket methods the connection uses.

    ``sendmsg`` encrypts plaintext and reports it accepted even when part of its ciphertext is
    still queued here; :meth:`unflushed` pushes that queue and says whether any is left, so the
    writer waits for writability until it is empty.
    """

    def __init__(self, context: ssl.SSLContext, fileno: int) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=True)
        # Same descriptor, no dup: close() detaches it, only the owner's socket closes it.
        self._sock = socket.socket(fileno=fileno)
        self._pending = memoryview(b"")
        """Ciphertext the socket has not accepted yet."""
        self._eof = False
        self._error: OSError | None = None
        """Why the socket stopped taking ciphertext, raised by the next sendmsg."""

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def peer_common_name(self) -> str | None:
        """The verified client certificate's subject CN, if the client presented one."""
        cert = self._ssl.getpeercert()
        if not cert:
            return None
        subject = cast(tuple[tuple[tuple[str, str], ...], ...], cert.get("subject", ()))
        for rdn in subject:
            for key, value in rdn:
                if key == "commonName":
                    return value
        return None

    def describe(self) -> str:
        """``TLSv1.3 TLS_AES_256_GCM_SHA384``, and the client's CN when it has one, for the log."""
        cipher = self._ssl.cipher()
        text = f"{self._ssl.version()} {cipher[0] if cipher else '?'}"
        name = self.peer_common_name
        return f"{text}, client certificate CN={name}" if name else text

    def _fill(self) -> None:
        """Move ciphertext from the socket into the TLS engine; BlockingIOError if none."""
        data = self._sock.recv(RECV_CHUNK)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
            self._eof = True

    def _push(self) -> bool:
        """Send queued ciphertext without waiting; True once none is left."""
        if self._out.pending:
            fresh = self._out.read()
            self._pending = memoryview(bytes(self._pending) + fresh if self._pending else fresh)
        while self._pending:
            try:
                sent = self._sock.send(self._pending)
            except BlockingIOError:
                return False
            self._pending = self._pending[sent:]
        return True

    def unflushed(self) -> bool:
        """Push queued ciphertext; True if some is still waiting for the socket. A dead socket
        has nothing waiting: the error is kept for the next sendmsg, and the reader sees it
        too, so the writer never has to handle it here."""
        try:
            return not self._push()
        except OSError as exc:
            self._error = exc
            self._pending = memoryview(b"")
            return False

    def recv_into(self, buffer: memoryview | bytearray) -> int:
        """Decrypted bytes into ``buffer``; 0 at end of stream; BlockingIOError when no whole
        TLS record is available. ``ssl.SSLError`` (an OSError) for a corrupt stream."""
        while True:
            try:
                return cast(int, self._ssl.read(len(buffer), buffer))
            except ssl.SSLWantReadError:
                if self._eof:
                    return 0
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0
            self._fill()
            if self._out.pending:  # e.g. a KeyUpdate answer
                self._push()

    def sendmsg(self, buffers: Iterable[Buffer]) -> int:
        """Encrypt up to SEND_CHUNK bytes of ``buffers``; how many were taken. BlockingIOError
        while earlier ciphertext is still queued, so the queue stays bounded."""
        if self._error is not None:
            raise self._error
        if not self._push():
            raise BlockingIOError
        taken = 0
        for buffer in buffers:
            view = memoryview(buffer)
            if not view.nbytes:
                continue
            take = min(view.nbytes, SEND_CHUNK - taken)
            taken += self._ssl.write(view.cast("B")[:take])
            if taken >= SEND_CHUNK:
                break
        self._push()
        return taken

    async def handshake(self) -> None:
        """The server side of the TLS handshake; TlsError says why it failed."""
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                self._push_quietly()  # the alert tells the client why
                raise TlsError(_reason(exc)) from None
            await self._flush()
            if self._eof:
                raise TlsError("client closed the connection during the TLS handshake")
            try:
                self._fill()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
        await self._flush()

    async def _flush(self) -> None:
        while not self._push():
            await trio.lowlevel.wait_writable(self._sock)

    def _push_quietly(self) -> None:
        try:
            self._push()
        except OSError:
            pass

    def close(self) -> None:
        """Send close_notify if the socket takes it at once, and let go of the descriptor
        (the connection's Trio socket owns and closes it)."""
        try:
            self._ssl.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        self._push_quietly()
        self._sock.detach()


class TlsSocket:
    """The Trio-socket methods negotiation and the slow paths await (``recv``, ``recv_into``,
    ``send``), over a :class:`TlsTransport`. Each call checkpoints, as Trio's own do."""

    def __init__(self, transport: TlsTransport) -> None:
        self.transport = transport

    async def recv_into(self, buffer: memoryview | bytearray) -> int:
        transport = self.transport
        while True:
            try:
                n = transport.recv_into(buffer)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(transport)
                continue
            await trio.lowlevel.checkpoint()
            return n

    async def recv(self, nbytes: int) -> bytes:
        buffer = bytearray(nbytes)
        n = await self.recv_into(buffer)
        return bytes(buffer[:n])

    async def send(self, data: Buffer) -> int:
        """Encrypt and send some of ``data``; returns once its ciphertext is all out."""
        transport = self.transport
        while True:
            try:
                n = transport.sendmsg([data])
                break
            except BlockingIOError:
                await trio.lowlevel.wait_writable(transport)
        while transport.unflushed():
            await trio.lowlevel.wait_writable(transport)
        await trio.lowlevel.checkpoint()
        return n


def _reason(exc: ssl.SSLError) -> str:
    """``certificate verify failed: unable to get local issuer certificate`` rather than the
    errno-tuple text of the exception."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"client certificate verification failed: {exc.verify_message}"
    reason = exc.reason or str(exc)
    return reason.replace("_", " ").lower() if reason.isupper() else reason
