"""A tiny in-memory NBD client for the protocol tests.

Client and server are joined in memory (as in h11's tests): the encoders here
build the bytes a client sends, the decoders parse what the server core
produced, and :class:`Client` feeds one into the other. It is written from
``doc/proto.md`` independently of the server code, so that the tests check the
server against the spec rather than against itself; it shares only the
constants module.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nbdserver.protocol import (
    NEED_DATA,
    ConnectionLimits,
    Event,
    ExportInfo,
    Request,
    ServerConnection,
    TransmissionStarted,
)
from nbdserver.protocol import constants as c

# -- exports and a catalog ------------------------------------------------------------------

KiB = 1024
MiB = 1024 * KiB

# Aligned export with small max_block (oversize requests are cheap to build) and two contexts.
DISK = ExportInfo(
    "disk",
    size=1 * MiB,
    description="the main disk",
    min_block=512,
    pref_block=4096,
    max_block=64 * KiB,
    meta_contexts=("base:allocation", "qemu:allocation-depth"),
)
# Read-only; the can_* defaults are True but write-type features must not be advertised.
RO = ExportInfo("ro", size=64 * KiB, read_only=True)
# Every optional feature off, unaligned size, no description.
BARE = ExportInfo(
    "bare",
    size=1000,
    can_flush=False,
    can_fua=False,
    can_trim=False,
    can_zero=False,
    can_fast_zero=False,
    can_cache=False,
    can_multi_conn=False,
    rotational=True,
    min_block=1,
    pref_block=512,
    max_block=4096,
    meta_contexts=(),
)


class Catalog:
    """An ExportCatalog over a fixed list; "" is the first export."""

    def __init__(self, *exports: ExportInfo) -> None:
        self.exports = list(exports)

    def lookup(self, name: str) -> ExportInfo | None:
        if name == "":
            return self.exports[0] if self.exports else None
        for export in self.exports:
            if export.name == name:
                return export
        return None

    def list_exports(self) -> Iterable[ExportInfo]:
        return list(self.exports)


def catalog() -> Catalog:
    return Catalog(DISK, RO, BARE)


# -- encoders (client -> server) -----------------------------------------------------------


def client_flags(flags: int = c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"", *, length: int | None = None) -> bytes:
    """An option; `length` overrides the header's length field."""
    return struct.pack(">QII", c.IHAVEOPT, opt, len(data) if length is None else length) + data


def export_name(name: str | bytes) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return option(c.OPT_EXPORT_NAME, raw)


def info_payload(name: str | bytes, infos: Sequence[int] = ()) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def go(name: str | bytes = "", infos: Sequence[int] = ()) -> bytes:
    return option(c.OPT_GO, info_payload(name, infos))


def info(name: str | bytes = "", infos: Sequence[int] = ()) -> bytes:
    return option(c.OPT_INFO, info_payload(name, infos))


def meta_payload(name: str | bytes, queries: Sequence[str | bytes]) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    parts = [struct.pack(">I", len(raw)), raw, struct.pack(">I", len(queries))]
    for query in queries:
        q = query.encode() if isinstance(query, str) else query
        parts += [struct.pack(">I", len(q)), q]
    return b"".join(parts)


def list_meta(name: str | bytes = "", queries: Sequence[str | bytes] = ()) -> bytes:
    return option(c.OPT_LIST_META_CONTEXT, meta_payload(name, queries))


def set_meta(name: str | bytes = "", queries: Sequence[str | bytes] = ()) -> bytes:
    return option(c.OPT_SET_META_CONTEXT, meta_payload(name, queries))


def request(
    cmd: int,
    cookie: int = 1,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    data: bytes = b"",
    *,
    magic: int = c.REQUEST_MAGIC,
) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data


def read(cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return request(c.CMD_READ, cookie, offset, length, flags)


def write(cookie: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return request(c.CMD_WRITE, cookie, offset, len(data), flags, data)


def disc() -> bytes:
    return request(c.CMD_DISC, 0)


# -- decoders (server -> client) -----------------------------------------------------------


def parse_greeting(data: bytes) -> int:
    """The handshake flags of the 18-byte newstyle greeting."""
    assert len(data) == 18, data
    magic, opt_magic, flags = struct.unpack(">QQH", data)
    assert magic == c.NBDMAGIC
    assert opt_magic == c.IHAVEOPT
    return int(flags)


@dataclass(frozen=True)
class OptionReply:
    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & c.REP_FLAG_ERROR)

    def info(self) -> tuple[int, tuple[object, ...]]:
        """An NBD_REP_INFO payload: (info type, fields)."""
        assert self.type == c.REP_INFO
        (kind,) = struct.unpack_from(">H", self.data)
        rest = self.data[2:]
        if kind == c.INFO_EXPORT:
            assert len(rest) == 10
            return kind, struct.unpack(">QH", rest)
        if kind == c.INFO_BLOCK_SIZE:
            assert len(rest) == 12
            return kind, struct.unpack(">III", rest)
        return kind, (rest.decode(),)

    def server(self) -> tuple[str, str]:
        """An NBD_REP_SERVER payload: (name, description)."""
        assert self.type == c.REP_SERVER
        (length,) = struct.unpack_from(">I", self.data)
        assert length <= len(self.data) - 4
        return self.data[4 : 4 + length].decode(), self.data[4 + length :].decode()

    def meta_context(self) -> tuple[int, str]:
        assert self.type == c.REP_META_CONTEXT
        (ident,) = struct.unpack_from(">I", self.data)
        return ident, self.data[4:].decode()


def parse_option_replies(data: bytes) -> list[OptionReply]:
    replies = []
    pos = 0
    while pos < len(data):
        magic, opt, kind, length = struct.unpack_from(">QIII", data, pos)
        assert magic == c.OPTION_REPLY_MAGIC, hex(magic)
        pos += 20
        payload = data[pos : pos + length]
        assert len(payload) == length, "truncated option reply"
        pos += length
        replies.append(OptionReply(opt, kind, payload))
    return replies


@dataclass(frozen=True)
class SimpleReply:
    error: int
    cookie: int
    data: bytes = b""


@dataclass(frozen=True)
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & c.REPLY_FLAG_DONE)

    def offset_data(self) -> tuple[int, bytes]:
        assert self.type == c.REPLY_TYPE_OFFSET_DATA and len(self.payload) >= 9
        (offset,) = struct.unpack_from(">Q", self.payload)
        return offset, self.payload[8:]

    def hole(self) -> tuple[int, int]:
        assert self.type == c.REPLY_TYPE_OFFSET_HOLE and len(self.payload) == 12
        offset, size = struct.unpack(">QI", self.payload)
        assert size > 0
        return offset, size

    def error(self) -> tuple[int, str]:
        assert self.type == c.REPLY_TYPE_ERROR and len(self.payload) >= 6
        code, length = struct.unpack_from(">IH", self.payload)
        assert code != 0
        assert length == len(self.payload) - 6
        return code, self.payload[6:].decode()

    def block_status(self) -> tuple[int, list[tuple[int, int]]]:
        assert self.type == c.REPLY_TYPE_BLOCK_STATUS
        assert len(self.payload) >= 12 and (len(self.payload) - 4) % 8 == 0
        (ident,) = struct.unpack_from(">I", self.payload)
        values = struct.unpack_from(f">{(len(self.payload) - 4) // 4}I", self.payload, 4)
        extents = list(zip(values[::2], values[1::2], strict=True))
        assert all(length > 0 for length, _ in extents)
        return ident, extents


Reply = SimpleReply | Chunk


def parse_replies(
    data: bytes | Sequence[bytes | memoryview], reads: dict[int, int] | None = None
) -> list[Reply]:
    """Split transmission replies; `reads` maps the cookie of each pending simple READ
    to its length (a simple reply carries no length of its own)."""
    if not isinstance(data, bytes):
        data = b"".join(bytes(part) for part in data)
    reads = reads or {}
    replies: list[Reply] = []
    pos = 0
    while pos < len(data):
        (magic,) = struct.unpack_from(">I", data, pos)
        if magic == c.SIMPLE_REPLY_MAGIC:
            _, error, cookie = struct.unpack_from(">IIQ", data, pos)
            pos += 16
            payload = b""
            if not error and cookie in reads:
                payload = data[pos : pos + reads[cookie]]
                assert len(payload) == reads[cookie], "truncated simple read reply"
                pos += reads[cookie]
            replies.append(SimpleReply(error, cookie, payload))
        elif magic == c.STRUCTURED_REPLY_MAGIC:
            _, flags, kind, cookie, length = struct.unpack_from(">IHHQI", data, pos)
            pos += 20
            payload = data[pos : pos + length]
            assert len(payload) == length, "truncated chunk"
            pos += length
            replies.append(Chunk(flags, kind, cookie, payload))
        else:
            raise AssertionError(f"bad reply magic 0x{magic:08x} at {pos}")
    return replies


def assemble_read(chunks: Sequence[Chunk], offset: int, length: int) -> bytes:
    """The data a structured READ reply describes, checking the spec's rules on chunks."""
    assert chunks and chunks[-1].done
    assert not any(chunk.done for chunk in chunks[:-1])
    out = bytearray(length)
    seen = bytearray(length)
    for chunk in chunks:
        if chunk.type == c.REPLY_TYPE_NONE:
            assert chunk.payload == b""
            continue
        if chunk.type == c.REPLY_TYPE_OFFSET_DATA:
            start, data = chunk.offset_data()
            size = len(data)
        else:
            start, size = chunk.hole()
            data = bytes(size)
        assert offset <= start and start + size <= offset + length, "chunk outside the request"
        rel = start - offset
        assert not any(seen[rel : rel + size]), "overlapping chunks"
        out[rel : rel + size] = data
        seen[rel : rel + size] = b"\1" * size
    assert all(seen), "reply does not cover the request"
    return bytes(out)


# -- the joined pair --------------------------------------------------------------------------


def drain(server: ServerConnection) -> list[Event]:
    """Every event the server has ready; WRITE data is copied at once, as the contract says."""
    events: list[Event] = []
    while True:
        event = server.next_event()
        if event is NEED_DATA:
            return events
        assert not isinstance(event, type(NEED_DATA))
        if isinstance(event, Request) and event.data is not None:
            event.data = memoryview(bytes(event.data))
        events.append(event)


class Client:
    """Drives a ServerConnection from the client side, in memory."""

    def __init__(
        self,
        catalog: Catalog,
        limits: ConnectionLimits | None = None,
        *,
        flags: int | None = c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES,
    ) -> None:
        self.server = ServerConnection(catalog, limits)
        self.handshake_flags = parse_greeting(self.server.data_to_send())
        if flags is not None:
            assert self.send(client_flags(flags)) == []
            assert self.server.data_to_send() == b""

    def send(self, data: bytes, *, step: int | None = None) -> list[Event]:
        """Feed `data` (in pieces of `step` bytes if given), draining events after each piece."""
        events: list[Event] = []
        if step is None:
            self.server.receive_data(data)
            return drain(self.server)
        for pos in range(0, len(data), step):
            self.server.receive_data(data[pos : pos + step])
            events += drain(self.server)
        return events

    def eof(self) -> list[Event]:
        self.server.receive_data(b"")
        return drain(self.server)

    def received(self) -> bytes:
        return self.server.data_to_send()

    def option(self, data: bytes) -> tuple[list[Event], list[OptionReply]]:
        events = self.send(data)
        return events, parse_option_replies(self.received())

    def structured(self) -> None:
        events, replies = self.option(option(c.OPT_STRUCTURED_REPLY))
        assert events == [] and [r.type for r in replies] == [c.REP_ACK]

    def set_meta(
        self, name: str = "", queries: Sequence[str] = ("base:allocation",)
    ) -> list[tuple[int, str]]:
        events, replies = self.option(set_meta(name, queries))
        assert events == [] and replies[-1].type == c.REP_ACK, replies
        return [r.meta_context() for r in replies[:-1]]

    def go(
        self,
        name: str = "",
        infos: Sequence[int] = (),
        *,
        structured: bool = False,
        meta: Sequence[str] = (),
    ) -> TransmissionStarted:
        """Negotiate (structured replies, contexts) and enter transmission with GO."""
        if structured or meta:
            self.structured()
        if meta:
            self.set_meta(name, meta)
        events, replies = self.option(go(name, infos))
        assert replies[-1].type == c.REP_ACK, replies
        assert len(events) == 1 and isinstance(events[0], TransmissionStarted), events
        return events[0]

    def replies(self, reads: dict[int, int] | None = None) -> list[Reply]:
        return parse_replies(self.received(), reads)
