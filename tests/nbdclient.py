"""A small asyncio NBD client for the server-level tests, and a raw-bytes toolkit.

Written from NBD ``doc/proto.md`` independently of the server code (it shares
only the constants module), like ``tests/protocol/client.py``, but it talks to
a real server over a real socket:

* the encoders (``option``, ``go_payload``, ``request`` ...) build the bytes a
  client sends, so tests can also send broken versions of them;
* :class:`NbdClient` does the handshake and then pipelines requests: each
  request gets a cookie and a future, one reader task parses replies (simple
  and structured) and resolves the futures in the order the server answers,
  which it records in ``completion_order``.

Nothing here asserts on what the server should do; tests do that.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nbdserver.protocol import constants as c

# -- encoders (client -> server) ----------------------------------------------------------

CLIENT_FLAGS = c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES


def client_flags(flags: int = CLIENT_FLAGS) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"", *, length: int | None = None,
           magic: int = c.IHAVEOPT) -> bytes:
    """An option header and payload; `length` and `magic` override the header's fields."""
    return struct.pack(">QII", magic, opt, len(data) if length is None else length) + data


def info_payload(name: str | bytes, infos: Sequence[int] = ()) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def meta_payload(name: str | bytes, queries: Sequence[str]) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    parts = [struct.pack(">I", len(raw)), raw, struct.pack(">I", len(queries))]
    for q in queries:
        qb = q.encode()
        parts += [struct.pack(">I", len(qb)), qb]
    return b"".join(parts)


def request(cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0,
            data: bytes = b"", *, magic: int = c.REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data


def handshake_bytes(export: str = "", *, structured: bool = True,
                    meta: Sequence[str] = ("base:allocation",)) -> bytes:
    """Everything a client sends to enter transmission with GO, in one piece."""
    out = client_flags()
    if structured:
        out += option(c.OPT_STRUCTURED_REPLY)
        if meta:
            out += option(c.OPT_SET_META_CONTEXT, meta_payload(export, meta))
    return out + option(c.OPT_GO, info_payload(export, (c.INFO_BLOCK_SIZE,)))


# -- replies ------------------------------------------------------------------------------


class NbdReplyError(Exception):
    """The server answered a request with an error; `code` is the NBD wire error."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(f"NBD error {code}: {message}" if message else f"NBD error {code}")
        self.code = code
        self.message = message


class OptionError(Exception):
    def __init__(self, opt: int, rep: int, message: str) -> None:
        super().__init__(f"option {opt} refused with 0x{rep:08x}: {message}")
        self.opt = opt
        self.rep = rep


class ServerClosed(Exception):
    """The server closed the connection (EOF) before a complete reply."""


@dataclass
class OptionReply:
    option: int
    type: int
    data: bytes


@dataclass
class ExportDetails:
    """What GO told us about the export."""

    size: int = 0
    flags: int = 0
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 32 << 20
    contexts: dict[str, int] = field(default_factory=dict)  # name -> id
    structured: bool = False


@dataclass
class _Pending:
    cookie: int
    cmd: int
    offset: int
    length: int
    future: asyncio.Future[object]
    data: bytearray | None = None  # READ: the assembled data
    covered: int = 0  # READ: bytes covered by data/hole chunks
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    error: NbdReplyError | None = None


# -- the client ---------------------------------------------------------------------------


class NbdClient:
    """One connection. ``await NbdClient.connect(path)`` then ``await handshake(...)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.handshake_flags = 0
        self.export = ExportDetails()
        self._cookies = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._reader_task: asyncio.Task[None] | None = None
        self.completion_order: list[int] = []
        self.eof = asyncio.Event()
        self.reader_error: BaseException | None = None

    @classmethod
    async def connect(cls, path: str | Path, *, timeout: float = 10.0,
                      limit: int = 1 << 26) -> NbdClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=limit), timeout)
        return cls(reader, writer)

    @classmethod
    async def connect_tcp(cls, host: str, port: int, *, timeout: float = 10.0,
                          limit: int = 1 << 26) -> NbdClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=limit), timeout)
        return cls(reader, writer)

    # -- raw I/O ------------------------------------------------------------------------

    async def recv_exact(self, n: int, timeout: float = 10.0) -> bytes:
        try:
            return await asyncio.wait_for(self.reader.readexactly(n), timeout)
        except asyncio.IncompleteReadError as e:
            raise ServerClosed(f"EOF after {len(e.partial)} of {n} bytes") from None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_until_eof(self, timeout: float = 10.0) -> bytes:
        """Everything the server still sends, up to EOF (raises TimeoutError if none)."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()

    # -- handshake ------------------------------------------------------------------------

    async def greeting(self) -> int:
        data = await self.recv_exact(18)
        magic, opt_magic, flags = struct.unpack(">QQH", data)
        if magic != c.NBDMAGIC or opt_magic != c.IHAVEOPT:
            raise AssertionError(f"bad greeting {data!r}")
        self.handshake_flags = flags
        return int(flags)

    async def recv_option_reply(self) -> OptionReply:
        magic, opt, kind, length = struct.unpack(">QIII", await self.recv_exact(20))
        if magic != c.OPTION_REPLY_MAGIC:
            raise AssertionError(f"bad option reply magic 0x{magic:x}")
        data = await self.recv_exact(length) if length else b""
        return OptionReply(opt, kind, data)

    async def option(self, opt: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option; return its replies up to the final ACK (raises OptionError)."""
        await self.send(option(opt, data))
        replies = []
        while True:
            reply = await self.recv_option_reply()
            if reply.option != opt:
                raise AssertionError(f"reply for option {reply.option}, sent {opt}")
            if reply.type & c.REP_FLAG_ERROR:
                raise OptionError(opt, reply.type, reply.data.decode(errors="replace"))
            replies.append(reply)
            if reply.type == c.REP_ACK or opt == c.OPT_STRUCTURED_REPLY:
                return replies

    async def list_exports(self) -> list[str]:
        names = []
        for reply in await self.option(c.OPT_LIST):
            if reply.type == c.REP_SERVER:
                (n,) = struct.unpack_from(">I", reply.data)
                names.append(reply.data[4:4 + n].decode())
        return names

    async def handshake(self, export: str = "", *, structured: bool = True,
                        meta: Sequence[str] = ("base:allocation",),
                        start_reader: bool = True) -> ExportDetails:
        """Greeting, client flags, (structured replies, meta contexts), GO."""
        await self.greeting()
        await self.send(client_flags())
        details = ExportDetails(structured=structured)
        if structured:
            await self.option(c.OPT_STRUCTURED_REPLY)
            if meta:
                for reply in await self.option(c.OPT_SET_META_CONTEXT,
                                               meta_payload(export, meta)):
                    if reply.type == c.REP_META_CONTEXT:
                        (ident,) = struct.unpack_from(">I", reply.data)
                        details.contexts[reply.data[4:].decode()] = ident
        for reply in await self.option(c.OPT_GO, info_payload(export, (c.INFO_BLOCK_SIZE,))):
            if reply.type != c.REP_INFO:
                continue
            (kind,) = struct.unpack_from(">H", reply.data)
            if kind == c.INFO_EXPORT:
                details.size, details.flags = struct.unpack_from(">QH", reply.data, 2)
            elif kind == c.INFO_BLOCK_SIZE:
                details.min_block, details.pref_block, details.max_block = \
                    struct.unpack_from(">III", reply.data, 2)
        self.export = details
        if start_reader:
            self.start_reader()
        return details

    # -- transmission -----------------------------------------------------------------------

    def start_reader(self) -> None:
        self._reader_task = asyncio.ensure_future(self._read_replies())

    def submit(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
               data: bytes = b"", cookie: int | None = None) -> asyncio.Future[object]:
        """Queue one request (no drain: many can be pipelined); its future gets the result:
        bytes for READ, {context id: extents} for BLOCK_STATUS, None otherwise."""
        if cookie is None:
            cookie = next(self._cookies)
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if cmd == c.CMD_WRITE:
            length = len(data)
        pending = _Pending(cookie, cmd, offset, length, fut)
        if cmd == c.CMD_READ:
            pending.data = bytearray(length)
        if cmd != c.CMD_DISC:
            self._pending[cookie] = pending
        self.writer.write(request(cmd, cookie, offset, length, flags, data))
        if self.eof.is_set():
            self._fail_pending(ServerClosed("connection already closed"))
        return fut

    async def drain(self) -> None:
        await self.writer.drain()

    async def call(self, cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0,
                   data: bytes = b"", timeout: float = 30.0) -> object:
        fut = self.submit(cmd, offset, length, flags=flags, data=data)
        await self.writer.drain()
        return await asyncio.wait_for(fut, timeout)

    async def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        result = await self.call(c.CMD_READ, offset, length, flags=flags)
        assert isinstance(result, bytes)
        return result

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        await self.call(c.CMD_WRITE, offset, flags=c.CMD_FLAG_FUA if fua else 0, data=data)

    async def flush(self) -> None:
        await self.call(c.CMD_FLUSH)

    async def trim(self, offset: int, length: int) -> None:
        await self.call(c.CMD_TRIM, offset, length)

    async def zero(self, offset: int, length: int, flags: int = 0) -> None:
        await self.call(c.CMD_WRITE_ZEROES, offset, length, flags=flags)

    async def block_status(self, offset: int, length: int,
                           flags: int = 0) -> dict[int, list[tuple[int, int]]]:
        result = await self.call(c.CMD_BLOCK_STATUS, offset, length, flags=flags)
        assert isinstance(result, dict)
        return result

    async def disconnect(self, timeout: float = 10.0) -> None:
        """Send DISC and wait for the server to close the connection."""
        self.submit(c.CMD_DISC)
        await self.writer.drain()
        await asyncio.wait_for(self.eof.wait(), timeout)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- reply parsing ----------------------------------------------------------------------

    def _fail_pending(self, exc: BaseException) -> None:
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
        self._pending.clear()

    def _finish(self, p: _Pending, result: object) -> None:
        self._pending.pop(p.cookie, None)
        self.completion_order.append(p.cookie)
        if p.future.done():
            return
        if isinstance(result, BaseException):
            p.future.set_exception(result)
        else:
            p.future.set_result(result)

    async def _read_replies(self) -> None:
        try:
            while True:
                try:
                    head = await self.reader.readexactly(4)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        raise ServerClosed("EOF inside a reply header") from None
                    break
                (magic,) = struct.unpack(">I", head)
                if magic == c.SIMPLE_REPLY_MAGIC:
                    await self._simple_reply()
                elif magic == c.STRUCTURED_REPLY_MAGIC:
                    await self._chunk()
                else:
                    raise AssertionError(f"bad reply magic 0x{magic:08x}")
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self.reader_error = e
            self._fail_pending(e)
        else:
            self._fail_pending(ServerClosed("EOF with requests outstanding"))
        finally:
            self.eof.set()

    def _take(self, cookie: int) -> _Pending:
        p = self._pending.get(cookie)
        if p is None:
            raise AssertionError(f"reply for unknown cookie {cookie}")
        return p

    async def _simple_reply(self) -> None:
        error, cookie = struct.unpack(">IQ", await self.reader.readexactly(12))
        p = self._take(cookie)
        if error:
            self._finish(p, NbdReplyError(error))
        elif p.cmd == c.CMD_READ:
            self._finish(p, await self.reader.readexactly(p.length))
        else:
            self._finish(p, None)

    async def _chunk(self) -> None:
        flags, kind, cookie, length = struct.unpack(">HHQI", await self.reader.readexactly(16))
        payload = await self.reader.readexactly(length) if length else b""
        p = self._take(cookie)
        if kind == c.REPLY_TYPE_OFFSET_DATA:
            (off,) = struct.unpack_from(">Q", payload)
            data = payload[8:]
            self._place(p, off, len(data), data)
        elif kind == c.REPLY_TYPE_OFFSET_HOLE:
            off, size = struct.unpack(">QI", payload)
            self._place(p, off, size, None)
        elif kind == c.REPLY_TYPE_BLOCK_STATUS:
            (ident,) = struct.unpack_from(">I", payload)
            vals = struct.unpack_from(f">{(length - 4) // 4}I", payload, 4)
            p.extents[ident] = list(zip(vals[::2], vals[1::2], strict=True))
        elif kind & c.REPLY_TYPE_FLAG_ERROR:
            code, mlen = struct.unpack_from(">IH", payload)
            p.error = NbdReplyError(code, payload[6:6 + mlen].decode(errors="replace"))
        elif kind != c.REPLY_TYPE_NONE:
            raise AssertionError(f"unknown chunk type {kind}")
        if flags & c.REPLY_FLAG_DONE:
            if p.error is not None:
                self._finish(p, p.error)
            elif p.cmd == c.CMD_READ:
                assert p.data is not None
                if p.covered != p.length:
                    raise AssertionError(f"read reply covers {p.covered} of {p.length} bytes")
                self._finish(p, bytes(p.data))
            elif p.cmd == c.CMD_BLOCK_STATUS:
                self._finish(p, p.extents)
            else:
                self._finish(p, None)

    @staticmethod
    def _place(p: _Pending, off: int, size: int, data: bytes | None) -> None:
        assert p.data is not None, "data chunk for a request that is not a READ"
        rel = off - p.offset
        if rel < 0 or rel + size > p.length:
            raise AssertionError(f"chunk [{off}, +{size}) outside the request")
        p.data[rel:rel + size] = data if data is not None else bytes(size)
        p.covered += size


async def connect(path: str | Path, export: str = "", **kw: object) -> NbdClient:
    """A connected client in transmission phase."""
    client = await NbdClient.connect(path)
    await client.handshake(export, **kw)  # type: ignore[arg-type]
    return client


# -- blocking raw sockets (for misbehaving clients) ----------------------------------------


def raw_socket(path: str | Path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ServerClosed(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def wait_closed(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until the server closes the connection; returns what it sent (raises on timeout)."""
    s.settimeout(timeout)
    out = bytearray()
    while True:
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def raw_structured_handshake(s: socket.socket, export: str = "",
                             meta: Sequence[str] = ("base:allocation",)) -> None:
    """Blocking handshake with structured replies and `meta` contexts (all sent at once;
    the replies are read and dropped)."""
    s.sendall(handshake_bytes(export, meta=meta))
    greeting = recv_exact(s, 18)
    assert struct.unpack(">QQH", greeting)[:2] == (c.NBDMAGIC, c.IHAVEOPT), greeting
    acks = 0
    while acks < 3:  # structured replies, the meta context, GO
        magic, _opt, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
        assert magic == c.OPTION_REPLY_MAGIC
        data = recv_exact(s, length)
        if kind & c.REP_FLAG_ERROR:
            raise OptionError(c.OPT_GO, kind, data.decode(errors="replace"))
        acks += kind == c.REP_ACK


def raw_handshake(s: socket.socket, export: str = "") -> ExportDetails:
    """Blocking handshake with GO and no structured replies: (size, flags)."""
    greeting = recv_exact(s, 18)
    assert struct.unpack(">QQH", greeting)[:2] == (c.NBDMAGIC, c.IHAVEOPT), greeting
    s.sendall(client_flags() + option(c.OPT_GO, info_payload(export, (c.INFO_BLOCK_SIZE,))))
    details = ExportDetails()
    while True:
        magic, _opt, kind, length = struct.unpack(">QIII", recv_exact(s, 20))
        assert magic == c.OPTION_REPLY_MAGIC
        data = recv_exact(s, length)
        if kind & c.REP_FLAG_ERROR:
            raise OptionError(c.OPT_GO, kind, data.decode(errors="replace"))
        if kind == c.REP_ACK:
            return details
        if kind == c.REP_INFO and struct.unpack_from(">H", data)[0] == c.INFO_EXPORT:
            details.size, details.flags = struct.unpack_from(">QH", data, 2)
