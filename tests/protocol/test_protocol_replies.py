"""Reply encoders: reply_ok, reply_error, reply_read, reply_block_status; nbd_error_code."""

from __future__ import annotations

import errno
import struct

import pytest
from nbd_protocol_client import (
    DISK,
    Catalog,
    Chunk,
    Client,
    SimpleReply,
    assemble_read,
    catalog,
    parse_replies,
)

from nbdserver.protocol import Command, ExportInfo, MetaContext, Request, nbd_error_code
from nbdserver.protocol import constants as c

DONE = c.REPLY_FLAG_DONE
MAGIC = c.STRUCTURED_REPLY_MAGIC


def connect(
    *,
    structured: bool,
    meta: tuple[str, ...] = (),
    export: str = "disk",
    cat: Catalog | None = None,
) -> Client:
    client = Client(cat or catalog())
    client.go(export, [c.INFO_BLOCK_SIZE], structured=structured, meta=meta)
    client.received()
    return client


def joined(parts: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


# -- nbd_error_code -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (errno.EPERM, 1),
        (errno.EIO, 5),
        (errno.ENOMEM, 12),
        (errno.EINVAL, 22),
        (errno.ENOSPC, 28),
        (errno.EOVERFLOW, 75),
        (errno.ENOTSUP, 95),
        (errno.EOPNOTSUPP, 95),
        (errno.ESHUTDOWN, 108),
        (errno.EDQUOT, 28),
        (errno.EFBIG, 28),
        (errno.EROFS, 1),
        (errno.EBADF, 5),
        (errno.ENOENT, 5),
        (errno.EAGAIN, 5),
        (0, 5),
        (-1, 5),
        (100000, 5),
    ],
)
def test_nbd_error_code(value: int, wire: int) -> None:
    assert nbd_error_code(value) == wire


# -- reply_ok and reply_error -------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize(
    "cmd", [Command.WRITE, Command.FLUSH, Command.TRIM, Command.CACHE, Command.WRITE_ZEROES]
)
def test_reply_ok_is_simple(structured: bool, cmd: Command) -> None:
    server = connect(structured=structured).server
    req = Request(cmd, 0x0102030405060708, 0, 512)
    assert server.reply_ok(req) == (
        b"\x67\x44\x66\x98" + b"\0\0\0\0" + b"\x01\x02\x03\x04\x05\x06\x07\x08"
    )


def test_reply_ok_refuses_payload_commands() -> None:
    server = connect(structured=True, meta=("base:allocation",)).server
    with pytest.raises(ValueError):
        server.reply_ok(Request(Command.READ, 1, 0, 512))
    with pytest.raises(ValueError):
        server.reply_ok(Request(Command.BLOCK_STATUS, 1, 0, 512))


def test_reply_ok_empty_read() -> None:
    simple = connect(structured=False).server
    assert simple.reply_ok(Request(Command.READ, 1, 0, 0)) == struct.pack(
        ">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 1
    )
    structured = connect(structured=True).server
    assert structured.reply_ok(Request(Command.READ, 1, 0, 0)) == struct.pack(
        ">IHHQI", MAGIC, DONE, c.REPLY_TYPE_NONE, 1, 0
    )


@pytest.mark.parametrize(
    ("value", "wire"), [(errno.ENOSPC, 28), (errno.EIO, 5), (errno.EBADF, 5), (errno.EPERM, 1)]
)
@pytest.mark.parametrize("cmd", list(Command))
def test_reply_error_simple(value: int, wire: int, cmd: Command) -> None:
    server = connect(structured=False).server
    out = server.reply_error(Request(cmd, 9, 0, 512), value, "ignored without structured replies")
    assert out == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, wire, 9)


@pytest.mark.parametrize("cmd", [Command.READ, Command.WRITE, Command.BLOCK_STATUS])
def test_reply_error_structured(cmd: Command) -> None:
    server = connect(structured=True).server
    out = server.reply_error(Request(cmd, 9, 0, 512), errno.EIO, "disk on fire")
    assert out == (
        struct.pack(">IHHQI", MAGIC, DONE, c.REPLY_TYPE_ERROR, 9, 6 + 12)
        + struct.pack(">IH", 5, 12)
        + b"disk on fire"
    )


def test_reply_error_structured_without_message() -> None:
    server = connect(structured=True).server
    [chunk] = parse_replies(server.reply_error(Request(Command.READ, 9, 0, 512), errno.ENOMEM))
    assert isinstance(chunk, Chunk) and chunk.done
    assert chunk.error() == (12, "")


def test_reply_error_message_cut_on_character_boundary() -> None:
    server = connect(structured=True).server
    message = "é" * 3000  # 6000 bytes of UTF-8
    out = server.reply_error(Request(Command.READ, 9, 0, 512), errno.EIO, message)
    [chunk] = parse_replies(out)
    assert isinstance(chunk, Chunk)
    code, text = chunk.error()
    assert code == 5
    assert text == "é" * 2048 and len(text.encode()) == 4096


# -- reply_read: simple replies -------------------------------------------------------------------


def test_reply_read_simple_single_chunk_no_copy() -> None:
    server = connect(structured=False).server
    data = memoryview(bytes(range(256)) * 2)
    out = server.reply_read(Request(Command.READ, 4, 1024, 512), [(1024, 512, data)])
    assert out[0] == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 4)
    assert out[1] is data
    assert len(out) == 2


def test_reply_read_simple_bytearray_not_copied() -> None:
    server = connect(structured=False).server
    data = bytearray(b"q" * 512)
    out = server.reply_read(Request(Command.READ, 4, 0, 512), [(0, 512, data)])
    assert isinstance(out[1], memoryview) and out[1].obj is data


def test_reply_read_simple_holes_are_zeros() -> None:
    server = connect(structured=False).server
    a = b"a" * 512
    b = memoryview(b"b" * 1024)
    chunks = [(0, 512, a), (512, 1024, None), (1536, 1024, b), (2560, 512, None)]
    out = server.reply_read(Request(Command.READ, 4, 0, 3072), chunks)
    assert out[0] == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 4)
    assert joined(out[1:]) == a + bytes(1024) + b"b" * 1024 + bytes(512)
    assert any(part is b for part in out)
    [reply] = parse_replies(out, {4: 3072})
    assert reply == SimpleReply(0, 4, a + bytes(1024) + b"b" * 1024 + bytes(512))


def test_reply_read_simple_large_hole() -> None:
    big = ExportInfo("big", size=1 << 30, max_block=1 << 25)
    server = connect(structured=False, export="big", cat=Catalog(big)).server
    length = 3 * 1024 * 1024 + 512
    out = server.reply_read(Request(Command.READ, 4, 0, length), [(0, length, None)])
    assert sum(len(p) for p in out[1:]) == length
    assert joined(out[1:]) == bytes(length)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize(
    "chunks",
    [
        [],
        [(0, 256, b"x" * 256)],  # short
        [(0, 512, b"x" * 511)],  # data length differs
        [(0, 256, b"x" * 256), (300, 256, b"x" * 256)],  # gap
        [(512, 512, b"x" * 512)],  # wrong start
        [(0, 1024, None)],  # too long
        [(0, 256, None), (256, 512, b"x" * 512)],  # too long, several chunks
    ],
)
def test_reply_read_bad_chunks_raise(
    structured: bool, chunks: list[tuple[int, int, bytes | None]]
) -> None:
    server = connect(structured=structured).server
    with pytest.raises(ValueError):
        server.reply_read(Request(Command.READ, 1, 0, 512), chunks)


# -- reply_read: structured replies ---------------------------------------------------------------


def test_reply_read_structured_single_chunk_exact() -> None:
    server = connect(structured=True).server
    data = memoryview(b"d" * 512)
    out = server.reply_read(Request(Command.READ, 4, 1024, 512), [(1024, 512, data)])
    assert out == [
        struct.pack(">IHHQIQ", MAGIC, DONE, c.REPLY_TYPE_OFFSET_DATA, 4, 520, 1024),
        data,
    ]
    assert out[1] is data


def test_reply_read_structured_data_hole_data() -> None:
    server = connect(structured=True).server
    a, b = b"a" * 512, memoryview(b"b" * 512)
    chunks = [(0, 512, a), (512, 1024, None), (1536, 512, b)]
    out = server.reply_read(Request(Command.READ, 4, 0, 2048), chunks)
    assert joined(out) == (
        struct.pack(">IHHQIQ", MAGIC, 0, c.REPLY_TYPE_OFFSET_DATA, 4, 520, 0)
        + a
        + struct.pack(">IHHQIQI", MAGIC, 0, c.REPLY_TYPE_OFFSET_HOLE, 4, 12, 512, 1024)
        + struct.pack(">IHHQIQ", MAGIC, DONE, c.REPLY_TYPE_OFFSET_DATA, 4, 520, 1536)
        + b"b" * 512
    )
    assert any(part is b for part in out)
    replies = [r for r in parse_replies(out) if isinstance(r, Chunk)]
    assert len(replies) == 3
    assert assemble_read(replies, 0, 2048) == a + bytes(1024) + b"b" * 512


def test_reply_read_structured_merges_adjacent_pieces() -> None:
    server = connect(structured=True).server
    a, b, z = memoryview(b"a" * 512), memoryview(b"b" * 512), memoryview(b"")
    chunks = [(0, 512, None), (512, 512, None), (1024, 512, a), (1536, 0, z), (1536, 512, b)]
    out = server.reply_read(Request(Command.READ, 4, 0, 2048), chunks)
    assert out[0] == struct.pack(">IHHQIQI", MAGIC, 0, c.REPLY_TYPE_OFFSET_HOLE, 4, 12, 0, 1024)
    assert out[1] == struct.pack(">IHHQIQ", MAGIC, DONE, c.REPLY_TYPE_OFFSET_DATA, 4, 1032, 1024)
    assert out[2] is a and out[3] is b
    assert len(out) == 4


def test_reply_read_structured_all_hole() -> None:
    server = connect(structured=True).server
    out = server.reply_read(
        Request(Command.READ, 4, 4096, 1024), [(4096, 512, None), (4608, 512, None)]
    )
    assert out == [
        struct.pack(">IHHQIQI", MAGIC, DONE, c.REPLY_TYPE_OFFSET_HOLE, 4, 12, 4096, 1024)
    ]


def test_reply_read_df_mixed_is_one_data_chunk() -> None:
    server = connect(structured=True).server
    a = memoryview(b"a" * 512)
    chunks = [(0, 512, a), (512, 512, None), (1024, 512, b"c" * 512)]
    out = server.reply_read(Request(Command.READ, 4, 0, 1536, c.CMD_FLAG_DF), chunks)
    assert out[0] == struct.pack(">IHHQIQ", MAGIC, DONE, c.REPLY_TYPE_OFFSET_DATA, 4, 1544, 0)
    assert out[1] is a
    assert joined(out[1:]) == b"a" * 512 + bytes(512) + b"c" * 512
    [chunk] = parse_replies(out)
    assert isinstance(chunk, Chunk) and chunk.offset_data() == (0, joined(out[1:]))


def test_reply_read_df_all_hole_is_one_hole_chunk() -> None:
    server = connect(structured=True).server
    chunks = [(0, 512, None), (512, 512, None)]
    out = server.reply_read(Request(Command.READ, 4, 0, 1024, c.CMD_FLAG_DF), chunks)
    assert out == [struct.pack(">IHHQIQI", MAGIC, DONE, c.REPLY_TYPE_OFFSET_HOLE, 4, 12, 0, 1024)]


def test_reply_read_df_single_data_chunk() -> None:
    server = connect(structured=True).server
    data = b"x" * 4096
    out = server.reply_read(Request(Command.READ, 4, 0, 4096, c.CMD_FLAG_DF), [(0, 4096, data)])
    assert out == [struct.pack(">IHHQIQ", MAGIC, DONE, c.REPLY_TYPE_OFFSET_DATA, 4, 4104, 0), data]


# -- reply_block_status -------------------------------------------------------------------------


def status_chunks(data: bytes) -> list[tuple[int, int, list[tuple[int, int]]]]:
    replies = parse_replies(data)
    out = []
    for reply in replies:
        assert isinstance(reply, Chunk)
        ident, extents = reply.block_status()
        out.append((reply.flags, ident, extents))
    return out


BOTH = ("base:allocation", "qemu:allocation-depth")


def test_block_status_exact_bytes() -> None:
    server = connect(structured=True, meta=("base:allocation",)).server
    out = server.reply_block_status(
        Request(Command.BLOCK_STATUS, 6, 0, 8192), {1: [(4096, 0), (4096, 3)]}
    )
    assert out == (
        struct.pack(">IHHQII", MAGIC, DONE, c.REPLY_TYPE_BLOCK_STATUS, 6, 20, 1)
        + struct.pack(">IIII", 4096, 0, 4096, 3)
    )


def test_block_status_two_contexts_done_on_last() -> None:
    client = connect(structured=True, meta=BOTH)
    assert client.server.meta_contexts == (MetaContext(1, BOTH[0]), MetaContext(2, BOTH[1]))
    out = client.server.reply_block_status(
        Request(Command.BLOCK_STATUS, 6, 0, 8192), {2: [(8192, 1)], 1: [(4096, 0), (4096, 3)]}
    )
    assert status_chunks(out) == [
        (0, 1, [(4096, 0), (4096, 3)]),
        (DONE, 2, [(8192, 1)]),
    ]


def test_block_status_req_one_keeps_one_extent_clipped() -> None:
    server = connect(structured=True, meta=BOTH).server
    req = Request(Command.BLOCK_STATUS, 6, 4096, 1024, c.CMD_FLAG_REQ_ONE)
    out = server.reply_block_status(req, {1: [(65536, 3), (512, 0)], 2: [(512, 1), (512, 2)]})
    assert status_chunks(out) == [(0, 1, [(1024, 3)]), (DONE, 2, [(512, 1)])]


def test_block_status_final_extent_may_pass_request_end() -> None:
    server = connect(structured=True, meta=("base:allocation",)).server
    req = Request(Command.BLOCK_STATUS, 6, 0, 4096)
    out = server.reply_block_status(req, {1: [(1024, 0), (8192, 3), (512, 0), (512, 1)]})
    # the extents after the one that reaches the request end are dropped
    assert status_chunks(out) == [(DONE, 1, [(1024, 0), (8192, 3)])]


def test_block_status_clipped_at_export_end() -> None:
    server = connect(structured=True, meta=("base:allocation",)).server
    req = Request(Command.BLOCK_STATUS, 6, DISK.size - 4096, 4096)
    out = server.reply_block_status(req, {1: [(1 << 40, 3)]})
    assert status_chunks(out) == [(DONE, 1, [(4096, 3)])]
    out = server.reply_block_status(req, {1: [(1024, 0), (1 << 40, 3)]})
    assert status_chunks(out) == [(DONE, 1, [(1024, 0), (3072, 3)])]


def test_block_status_huge_extent_capped_to_u32_aligned() -> None:
    huge = ExportInfo("huge", size=1 << 40, min_block=4096, max_block=1 << 25)
    server = connect(
        structured=True, meta=("base:allocation",), export="huge", cat=Catalog(huge)
    ).server
    out = server.reply_block_status(
        Request(Command.BLOCK_STATUS, 6, 0, 1 << 20), {1: [(1 << 36, 3)]}
    )
    [(_, _, [(length, flags)])] = status_chunks(out)
    assert length == (1 << 32) - 4096 and flags == 3


def test_block_status_stops_after_an_extent_clipped_at_u32() -> None:
    """Descriptors must be consecutive: after an extent cut at 2^32-1 (rounded to the
    minimum block), the backend's next extent starts where the uncut one ended, not
    where the cut one does, so the reply ends with the cut one (here a request of
    2^32-1 bytes over 8 GiB of data and then a hole: the hole was reported at 4 GiB)."""
    huge = ExportInfo("huge", size=16 << 30, min_block=512, max_block=1 << 25)
    server = connect(
        structured=True, meta=("base:allocation",), export="huge", cat=Catalog(huge)
    ).server
    out = server.reply_block_status(
        Request(Command.BLOCK_STATUS, 6, 0, (1 << 32) - 1), {1: [(8 << 30, 0), (1 << 20, 3)]}
    )
    assert status_chunks(out) == [(DONE, 1, [((1 << 32) - 512, 0)])]


def test_block_status_drops_zero_length_extents_and_may_be_short() -> None:
    server = connect(structured=True, meta=("base:allocation",)).server
    out = server.reply_block_status(
        Request(Command.BLOCK_STATUS, 6, 0, 8192), {1: [(0, 1), (512, 2), (0, 3)]}
    )
    assert status_chunks(out) == [(DONE, 1, [(512, 2)])]


def test_block_status_flags_masked_to_32_bits() -> None:
    server = connect(structured=True, meta=("base:allocation",)).server
    out = server.reply_block_status(
        Request(Command.BLOCK_STATUS, 6, 0, 512), {1: [(512, (1 << 40) | 2)]}
    )
    assert status_chunks(out) == [(DONE, 1, [(512, 2)])]


def test_block_status_many_extents_truncated() -> None:
    big = ExportInfo("big", size=1 << 40, min_block=1, max_block=1 << 25)
    server = connect(
        structured=True, meta=("base:allocation",), export="big", cat=Catalog(big)
    ).server
    extents = [(1, i & 1) for i in range((1 << 20) + 10)]
    out = server.reply_block_status(Request(Command.BLOCK_STATUS, 6, 0, 1 << 21), {1: extents})
    [(_, _, got)] = status_chunks(out)
    assert len(got) == 1 << 20


@pytest.mark.parametrize("extents", [{}, {1: []}, {1: [(0, 0)]}, {2: [(512, 0)]}, {1: [(-1, 0)]}])
def test_block_status_bad_extents_raise(extents: dict[int, list[tuple[int, int]]]) -> None:
    server = connect(structured=True, meta=("base:allocation",)).server
    with pytest.raises(ValueError):
        server.reply_block_status(Request(Command.BLOCK_STATUS, 6, 0, 512), extents)
