"""The remote tier's data path: RESP2 over one socket, pipelined, with values read straight into their rows.

A KV block is megabytes, and a general client (redis-py, even with hiredis) copies each reply
three times before the caller sees it: socket buffer, parser buffer, a new bytes object. On a
machine where fresh memory is expensive that halves the throughput. Here a GET names where its
value goes (a header buffer and the block's row): the bytes are received into them with
`recv_into`, one copy from the kernel and none after. A SET's value is sent as the header and the
payload's own memory, never joined. Everything else is ordinary RESP2, parsed by hand: the tier
uses six commands (GET, SET, GETRANGE, STRLEN, AUTH, SELECT, and INFO to tell a cluster node).

Errors are values (`ErrorReply`), as the server sends them; a broken or timed-out socket raises
`WireError`, after which the connection is closed and not reused.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

READ_BUFFER = 1 << 20
_SMALL = 64 << 10  # pieces below this are joined into one send; larger ones go out as they are
# Bytes read ahead into the buffer per call: enough for many small replies, little of a large value
# (which is then received straight into its row instead of being copied out of the buffer).
_READ_AHEAD = 64 << 10
_CRLF = b"\r\n"

Buffer = Union[bytes, bytearray, memoryview]  # noqa: UP007 (a runtime alias: `|` of types needs Python 3.10 only here)
Arg = Union[Buffer, tuple[Buffer, ...]]  # noqa: UP007  one argument: a buffer, or pieces the server sees as one string


class WireError(Exception):
    """The connection failed (refused, reset, timed out, or spoke nonsense): `kind` is the fault counter."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class ErrorReply:
    """An error the server answered with, e.g. "MOVED 3999 10.0.0.2:6379" or "OOM command not allowed ..."."""

    message: str

    @property
    def code(self) -> str:
        return self.message.split(" ", 1)[0]


@dataclass(frozen=True)
class Filled:
    """A bulk reply received into the request's buffers: `length` bytes, and whether that was their size.

    When it was not (a value of another size: truncated, or not ours), the bytes were read and
    dropped and the buffers hold junk.
    """

    length: int
    fits: bool


@dataclass
class Request:
    """One command; `into`, for a command answered by one bulk string, names the buffers its bytes fill in order."""

    args: tuple[Arg, ...]
    into: tuple[memoryview, ...] | None = None

    @property
    def key(self) -> bytes:
        key = self.args[1]
        assert isinstance(key, bytes)
        return key


def _length(arg: Arg) -> int:
    if isinstance(arg, tuple):
        return sum(memoryview(p).nbytes for p in arg)
    return memoryview(arg).nbytes


class Connection:
    """One socket to one server, authenticated; not thread-safe (a pool hands it to one caller at a time)."""

    def __init__(self, host: str, port: int, *, timeout: float, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, username: str | None = None, password: str | None = None,
                 db: int = 0) -> None:
        self.address = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise WireError("timeout", f"connecting to {self.address}") from None
        except OSError as e:
            raise WireError("connection", f"connecting to {self.address}: {e.strerror or e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
            except (OSError, ssl.SSLError) as e:
                sock.close()
                raise WireError("tls", f"TLS handshake with {self.address}: {e}") from None
        self._sock = sock
        self._buf = bytearray(READ_BUFFER)
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        try:
            if password is not None:
                auth: tuple[Arg, ...] = (b"AUTH", username.encode(), password.encode()) if username else (
                    b"AUTH", password.encode())
                self._expect_ok(auth, "auth")
            if db:
                self._expect_ok((b"SELECT", str(db).encode()), "error")
        except BaseException:
            self.close()
            raise

    def _expect_ok(self, args: tuple[Arg, ...], kind: str) -> None:
        request = Request(args)
        self.send([request])
        reply = self.read(request)
        if isinstance(reply, ErrorReply):
            raise WireError(kind, f"{self.address} answered {args[0].decode() if isinstance(args[0], bytes) else ''}: "
                                  f"{reply.message[:200]}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    # -- sending -------------------------------------------------------------------

    def send(self, requests: Sequence[Request]) -> None:
        """Write every request (a pipeline); large values go out from their own memory."""
        small = bytearray()
        try:
            for request in requests:
                small += b"*%d\r\n" % len(request.args)
                for arg in request.args:
                    small += b"$%d\r\n" % _length(arg)
                    for piece in arg if isinstance(arg, tuple) else (arg,):
                        if memoryview(piece).nbytes >= _SMALL:
                            if small:
                                self._sock.sendall(small)
                                small = bytearray()
                            self._sock.sendall(piece)
                        else:
                            small += piece
                    small += _CRLF
            if small:
                self._sock.sendall(small)
        except TimeoutError:
            raise WireError("timeout", f"writing to {self.address}") from None
        except OSError as e:
            raise WireError("connection", f"writing to {self.address}: {e.strerror or e}") from None

    # -- receiving -----------------------------------------------------------------

    def _fill(self) -> None:
        """Read more bytes into the buffer (compacting it first when it is full)."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            if self._start == 0:
                self._buf.extend(bytes(len(self._buf)))  # a single line longer than the buffer: grow
                self._view = memoryview(self._buf)
            else:
                rest = self._end - self._start
                self._buf[:rest] = self._buf[self._start : self._end]
                self._start, self._end = 0, rest
        try:
            n = self._sock.recv_into(self._view[self._end : self._end + _READ_AHEAD])
        except TimeoutError:
            raise WireError("timeout", f"reading from {self.address}") from None
        except OSError as e:
            raise WireError("connection", f"reading from {self.address}: {e.strerror or e}") from None
        if n == 0:
            raise WireError("connection", f"{self.address} closed the connection")
        self._end += n

    def _line(self) -> bytes:
        while True:
            i = self._buf.find(_CRLF, self._start, self._end)
            if i >= 0:
                line = bytes(self._buf[self._start : i])
                self._start = i + 2
                return line
            self._fill()

    def _take(self, out: memoryview) -> None:
        """Fill `out` with the next bytes: what is buffered first, then straight from the socket."""
        pos, need = 0, out.nbytes
        buffered = min(self._end - self._start, need)
        if buffered:
            out[:buffered] = self._view[self._start : self._start + buffered]
            self._start += buffered
            pos = buffered
        while pos < need:
            if need - pos < _SMALL:  # a short rest: through the buffer, so the next reply comes along
                self._fill()
                n = min(self._end - self._start, need - pos)
                out[pos : pos + n] = self._view[self._start : self._start + n]
                self._start += n
                pos += n
                continue
            try:
                n = self._sock.recv_into(out[pos:])
            except TimeoutError:
                raise WireError("timeout", f"reading from {self.address}") from None
            except OSError as e:
                raise WireError("connection", f"reading from {self.address}: {e.strerror or e}") from None
            if n == 0:
                raise WireError("connection", f"{self.address} closed the connection")
            pos += n

    def _skip(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, READ_BUFFER)))
        while n:
            part = scratch[: min(n, scratch.nbytes)]
            self._take(part)
            n -= part.nbytes

    def read(self, request: Request | None = None) -> Any:
        """The next reply: bytes, int, str (simple), None (nil), list, `ErrorReply`, or `Filled` for an `into` request."""
        line = self._line()
        if not line:
            raise WireError("protocol", f"empty reply line from {self.address}")
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            into = request.into if request is not None else None
            if into is not None:
                sizes = sum(v.nbytes for v in into)
                if length == sizes:
                    for view in into:
                        self._take(view)
                else:
                    self._skip(length)
                self._take(memoryview(bytearray(2)))
                return Filled(length, length == sizes)
            data = memoryview(bytearray(length))
            self._take(data)
            self._take(memoryview(bytearray(2)))
            return bytes(data)
        if kind == b"+":
            return rest.decode(errors="replace")
        if kind == b"-":
            return ErrorReply(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self.read() for _ in range(count)]
        raise WireError("protocol", f"unexpected reply {line[:40]!r} from {self.address}")


def tls_context(options: dict[str, str]) -> ssl.SSLContext:
    """The TLS context of a rediss:// URL's options (redis-py's names); the system's CAs unless ssl_ca_certs."""
    ctx = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_certfile"):
        ctx.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    reqs = options.get("ssl_cert_reqs", "required")
    check = options.get("ssl_check_hostname", "true" if reqs == "required" else "false").lower() in ("true", "yes", "1")
    ctx.check_hostname = check and reqs != "none"
    ctx.verify_mode = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}[reqs]
    return ctx
