"""Transmission: request parsing, validation, payload handling, DISC and EOF (sans IO)."""

from __future__ import annotations

import struct

import pytest
from nbd_protocol_client import (
    BARE,
    DISK,
    RO,
    Catalog,
    Chunk,
    Client,
    SimpleReply,
    catalog,
    disc,
    export_name,
    read,
    request,
    write,
)

from nbdserver.protocol import (
    NEED_DATA,
    WRITE_DISCARD_LIMIT,
    Command,
    Disconnect,
    ExportInfo,
    ProtocolViolation,
    Request,
    State,
)
from nbdserver.protocol import constants as c

FUA = c.CMD_FLAG_FUA
NO_HOLE = c.CMD_FLAG_NO_HOLE
DF = c.CMD_FLAG_DF
REQ_ONE = c.CMD_FLAG_REQ_ONE
FAST_ZERO = c.CMD_FLAG_FAST_ZERO


def connect(
    name: str = "disk",
    *,
    structured: bool = False,
    block_size: bool = True,
    meta: tuple[str, ...] = (),
    cat: Catalog | None = None,
) -> Client:
    client = Client(cat or catalog())
    infos = [c.INFO_BLOCK_SIZE] if block_size else []
    client.go(name, infos, structured=structured, meta=meta)
    client.received()
    return client


def only_error(client: Client) -> int:
    """The error of the single reply the core queued (simple or structured)."""
    [reply] = client.replies()
    if isinstance(reply, SimpleReply):
        assert reply.data == b""
        return reply.error
    assert reply.done
    return reply.error()[0]


# -- valid requests become events -------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags"),
    [
        (Command.READ, 0, 4096, 0),
        (Command.READ, 512, 512, FUA),
        (Command.READ, DISK.size - 512, 512, DF),
        (Command.FLUSH, 0, 0, 0),
        (Command.FLUSH, 0, 0, FUA),
        (Command.TRIM, 4096, 1 << 19, FUA),
        (Command.TRIM, 0, DISK.size, 0),  # over max_block: no payload, so allowed
        (Command.CACHE, 0, 4096, 0),
        (Command.WRITE_ZEROES, 0, 8192, 0),
        (Command.WRITE_ZEROES, 0, 8192, NO_HOLE | FAST_ZERO | FUA),
        (Command.BLOCK_STATUS, 0, DISK.size, 0),
        (Command.BLOCK_STATUS, 512, 512, REQ_ONE),
    ],
)
def test_valid_request_is_event(cmd: Command, offset: int, length: int, flags: int) -> None:
    client = connect(structured=True, meta=("base:allocation",))
    [event] = client.send(request(cmd, 0xDEADBEEFCAFE, offset, length, flags))
    assert event == Request(cmd, 0xDEADBEEFCAFE, offset, length, flags)
    assert type(event) is Request
    assert client.received() == b""


def test_write_is_event_with_data() -> None:
    client = connect()
    payload = bytes(range(256)) * 4
    [event] = client.send(write(3, 1024, payload, FUA))
    assert event == Request(Command.WRITE, 3, 1024, 1024, FUA, memoryview(payload))
    assert event.fua and not event.df
    assert client.received() == b""


def test_cookie_is_opaque_64_bits() -> None:
    client = connect()
    [event] = client.send(read(2**64 - 1, 0, 512))
    assert isinstance(event, Request) and event.handle == 2**64 - 1


def test_request_flag_properties() -> None:
    client = connect(structured=True, meta=("base:allocation",))
    [zero, status, rd] = client.send(
        request(c.CMD_WRITE_ZEROES, 1, 0, 512, NO_HOLE | FAST_ZERO)
        + request(c.CMD_BLOCK_STATUS, 2, 0, 512, REQ_ONE)
        + read(3, 0, 512, DF)
    )
    assert isinstance(zero, Request) and zero.no_hole and zero.fast_zero and not zero.fua
    assert isinstance(status, Request) and status.req_one
    assert isinstance(rd, Request) and rd.df


# -- invalid requests are answered by the core ------------------------------------------------

E = {"EPERM": c.EPERM, "EINVAL": c.EINVAL, "ENOSPC": c.ENOSPC, "EOVERFLOW": c.EOVERFLOW}

# (id, export, structured, block sizes, cmd, offset, length, flags, expected error)
INVALID = [
    ("unknown command", "disk", False, True, 9, 0, 512, 0, "EINVAL"),
    ("command RESIZE", "disk", False, True, c.CMD_RESIZE, 0, 0, 0, "EINVAL"),
    ("command 0xffff", "disk", False, True, 0xFFFF, 0, 0, 0, "EINVAL"),
    ("unknown flag bit 5", "disk", False, True, c.CMD_READ, 0, 512, 1 << 5, "EINVAL"),
    ("unknown flag bit 15", "disk", False, True, c.CMD_READ, 0, 512, 1 << 15, "EINVAL"),
    ("FUA not advertised", "bare", False, True, c.CMD_READ, 0, 1, FUA, "EINVAL"),
    ("NO_HOLE on READ", "disk", False, True, c.CMD_READ, 0, 512, NO_HOLE, "EINVAL"),
    ("NO_HOLE on TRIM", "disk", False, True, c.CMD_TRIM, 0, 512, NO_HOLE, "EINVAL"),
    ("DF without structured", "disk", False, True, c.CMD_READ, 0, 512, DF, "EINVAL"),
    ("DF on WRITE_ZEROES", "disk", True, True, c.CMD_WRITE_ZEROES, 0, 512, DF, "EINVAL"),
    ("REQ_ONE on READ", "disk", False, True, c.CMD_READ, 0, 512, REQ_ONE, "EINVAL"),
    ("FAST_ZERO on TRIM", "disk", False, True, c.CMD_TRIM, 0, 512, FAST_ZERO, "EINVAL"),
    (
        "FAST_ZERO not advertised",
        "nofast",
        False,
        True,
        c.CMD_WRITE_ZEROES,
        0,
        512,
        FAST_ZERO,
        "EINVAL",
    ),
    ("FLAG on FLUSH", "disk", False, True, c.CMD_FLUSH, 0, 0, NO_HOLE, "EINVAL"),
    ("FLAG on CACHE", "disk", False, True, c.CMD_CACHE, 0, 512, REQ_ONE, "EINVAL"),
    ("READ past end", "disk", False, True, c.CMD_READ, DISK.size - 512, 1024, 0, "EINVAL"),
    ("READ starting past end", "disk", False, True, c.CMD_READ, DISK.size, 512, 0, "EINVAL"),
    ("READ offset overflow", "disk", False, True, c.CMD_READ, 2**64 - 512, 1024, 0, "EINVAL"),
    ("TRIM past end", "disk", False, True, c.CMD_TRIM, DISK.size, 512, 0, "EINVAL"),
    ("CACHE past end", "disk", False, True, c.CMD_CACHE, DISK.size - 512, 1024, 0, "EINVAL"),
    ("WRITE_ZEROES past end", "disk", False, True, c.CMD_WRITE_ZEROES, DISK.size, 512, 0, "ENOSPC"),
    (
        "WRITE_ZEROES overflow",
        "disk",
        False,
        True,
        c.CMD_WRITE_ZEROES,
        2**64 - 512,
        1024,
        0,
        "ENOSPC",
    ),
    ("zero-length READ past end", "disk", False, True, c.CMD_READ, DISK.size + 512, 0, 0, "EINVAL"),
    ("TRIM read-only", "ro", False, True, c.CMD_TRIM, 0, 512, 0, "EPERM"),
    ("WRITE_ZEROES read-only", "ro", False, True, c.CMD_WRITE_ZEROES, 0, 512, 0, "EPERM"),
    ("FLUSH not advertised", "bare", False, True, c.CMD_FLUSH, 0, 0, 0, "EINVAL"),
    ("TRIM not advertised", "bare", False, True, c.CMD_TRIM, 0, 1, 0, "EINVAL"),
    ("WRITE_ZEROES not advertised", "bare", False, True, c.CMD_WRITE_ZEROES, 0, 1, 0, "EINVAL"),
    ("CACHE not advertised", "bare", False, True, c.CMD_CACHE, 0, 1, 0, "EINVAL"),
    ("FLUSH with offset", "disk", False, True, c.CMD_FLUSH, 512, 0, 0, "EINVAL"),
    ("FLUSH with length", "disk", False, True, c.CMD_FLUSH, 0, 512, 0, "EINVAL"),
    ("READ over max_block simple", "disk", False, True, c.CMD_READ, 0, 128 * 1024, 0, "EINVAL"),
    (
        "READ over max_block structured",
        "disk",
        True,
        True,
        c.CMD_READ,
        0,
        128 * 1024,
        0,
        "EOVERFLOW",
    ),
    (
        "READ over max_block no block sizes",
        "disk",
        False,
        False,
        c.CMD_READ,
        0,
        65 * 1024,
        0,
        "EINVAL",
    ),
    ("BLOCK_STATUS without contexts", "disk", True, True, c.CMD_BLOCK_STATUS, 0, 512, 0, "EINVAL"),
    ("BLOCK_STATUS simple replies", "disk", False, True, c.CMD_BLOCK_STATUS, 0, 512, 0, "EINVAL"),
    ("READ unaligned offset", "disk", False, True, c.CMD_READ, 1, 512, 0, "EINVAL"),
    ("READ unaligned length", "disk", False, True, c.CMD_READ, 0, 511, 0, "EINVAL"),
    ("TRIM unaligned", "disk", False, True, c.CMD_TRIM, 256, 512, 0, "EINVAL"),
    ("WRITE_ZEROES unaligned", "disk", False, True, c.CMD_WRITE_ZEROES, 0, 100, 0, "EINVAL"),
    ("CACHE unaligned", "disk", False, True, c.CMD_CACHE, 0, 100, 0, "EINVAL"),
    ("zero-length READ unaligned", "disk", False, True, c.CMD_READ, 100, 0, 0, "EINVAL"),
    ("structured unknown command", "disk", True, True, 8, 0, 0, 0, "EINVAL"),
    ("structured READ past end", "disk", True, True, c.CMD_READ, DISK.size, 512, 0, "EINVAL"),
    ("structured TRIM read-only", "ro", True, True, c.CMD_TRIM, 0, 512, 0, "EPERM"),
    ("structured bad flag", "disk", True, True, c.CMD_FLUSH, 0, 0, DF, "EINVAL"),
    ("structured CACHE unaligned", "disk", True, True, c.CMD_CACHE, 1, 512, 0, "EINVAL"),
]


@pytest.mark.parametrize(
    ("export", "structured", "block_size", "cmd", "offset", "length", "flags", "error"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_request_answered_by_core(
    export: str,
    structured: bool,
    block_size: bool,
    cmd: int,
    offset: int,
    length: int,
    flags: int,
    error: str,
) -> None:
    nofast = ExportInfo("nofast", size=DISK.size, can_fast_zero=False)
    client = connect(
        export, structured=structured, block_size=block_size, cat=Catalog(DISK, RO, BARE, nofast)
    )
    assert client.send(request(cmd, 42, offset, length, flags)) == []
    [reply] = client.replies()
    assert reply.cookie == 42
    if structured:  # every error is a structured ERROR chunk with a message
        assert isinstance(reply, Chunk) and reply.done
        code, message = reply.error()
        assert message
    else:
        assert isinstance(reply, SimpleReply)
        code = reply.error
    assert code == E[error]
    # the connection goes on
    [event] = client.send(read(43, 0, 512))
    assert isinstance(event, Request) and event.handle == 43


def test_structured_error_exact_bytes() -> None:
    client = connect(structured=True)
    client.send(read(5, 0, 100))
    message = b"request not aligned to the minimum block size"
    assert client.received() == (
        struct.pack(
            ">IHHQI",
            c.STRUCTURED_REPLY_MAGIC,
            c.REPLY_FLAG_DONE,
            c.REPLY_TYPE_ERROR,
            5,
            6 + len(message),
        )
        + struct.pack(">IH", c.EINVAL, len(message))
        + message
    )


def test_simple_error_exact_bytes() -> None:
    client = connect()
    client.send(read(5, 0, 100))
    assert client.received() == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, c.EINVAL, 5)


def test_alignment_not_enforced_without_block_size_request() -> None:
    client = connect(block_size=False)
    [event] = client.send(read(1, 1, 3))
    assert event == Request(Command.READ, 1, 1, 3)


def test_alignment_not_enforced_after_export_name() -> None:
    client = Client(catalog())
    client.send(export_name("disk"))
    client.received()
    [event] = client.send(write(1, 3, b"abc"))
    assert isinstance(event, Request) and bytes(event.data or b"") == b"abc"


def test_unaligned_tail_of_unaligned_export_is_reachable() -> None:
    odd = ExportInfo("odd", size=4096 + 100, min_block=512)
    client = connect("odd", cat=Catalog(odd))
    [event] = client.send(read(1, 4096, 100))
    assert event == Request(Command.READ, 1, 4096, 100)
    client.send(read(2, 4096, 50))
    assert only_error(client) == c.EINVAL


def test_write_read_only_discards_payload() -> None:
    client = connect("ro")
    events = client.send(write(9, 0, b"x" * 4096) + read(10, 0, 512))
    assert events == [Request(Command.READ, 10, 0, 512)]
    assert only_error(client) == c.EPERM


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (DISK.size - 512, 1024, c.ENOSPC),  # past the end
        (2**64 - 512, 1024, c.ENOSPC),  # offset + length overflows 64 bits
        (0, 100, c.EINVAL),  # unaligned
    ],
)
def test_invalid_write_discards_payload(offset: int, length: int, expected: int) -> None:
    client = connect()
    data = request(c.CMD_WRITE, 9, offset, length, 0, b"\xaa" * length) + read(10, 0, 512)
    events = client.send(data)
    assert events == [Request(Command.READ, 10, 0, 512)]
    assert only_error(client) == expected


def test_invalid_write_flags_discards_payload() -> None:
    client = connect()
    events = client.send(write(9, 0, b"y" * 512, DF) + read(10, 0, 512))
    assert events == [Request(Command.READ, 10, 0, 512)]
    assert only_error(client) == c.EINVAL


# -- zero-length requests -----------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES, c.CMD_CACHE])
@pytest.mark.parametrize("structured", [False, True])
def test_zero_length_answered_by_core(cmd: int, structured: bool) -> None:
    client = connect(structured=structured)
    assert client.send(request(cmd, 8, 4096, 0)) == []
    assert client.received() == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 8)


def test_zero_length_read_simple() -> None:
    client = connect()
    assert client.send(read(8, DISK.size, 0)) == []
    assert client.received() == struct.pack(">IIQ", c.SIMPLE_REPLY_MAGIC, 0, 8)


def test_zero_length_read_structured() -> None:
    client = connect(structured=True)
    assert client.send(read(8, 0, 0, DF)) == []
    assert client.received() == struct.pack(
        ">IHHQI", c.STRUCTURED_REPLY_MAGIC, c.REPLY_FLAG_DONE, c.REPLY_TYPE_NONE, 8, 0
    )


def test_zero_length_block_status_is_einval() -> None:
    client = connect(structured=True, meta=("base:allocation",))
    assert client.send(request(c.CMD_BLOCK_STATUS, 8, 0, 0)) == []
    assert only_error(client) == c.EINVAL


def test_zero_length_read_only_write_is_eperm() -> None:
    client = connect("ro")
    assert client.send(write(8, 0, b"")) == []
    assert only_error(client) == c.EPERM


# -- framing: pipelining and splits -----------------------------------------------------------


def mixed_stream() -> tuple[bytes, list[Request]]:
    parts = []
    expected = []
    for i in range(20):
        if i % 3 == 0:
            payload = bytes([i]) * (512 * (i % 4 + 1))
            parts.append(write(i, 512 * i, payload, FUA if i % 2 else 0))
            expected.append(
                Request(
                    Command.WRITE,
                    i,
                    512 * i,
                    len(payload),
                    FUA if i % 2 else 0,
                    memoryview(payload),
                )
            )
        elif i % 3 == 1:
            parts.append(read(i, 4096 * i, 4096))
            expected.append(Request(Command.READ, i, 4096 * i, 4096))
        else:
            parts.append(request(c.CMD_FLUSH, i))
            expected.append(Request(Command.FLUSH, i, 0, 0))
    return b"".join(parts), expected


def test_pipelined_requests_in_one_chunk() -> None:
    data, expected = mixed_stream()
    client = connect()
    assert client.send(data) == expected
    assert client.received() == b""
    assert client.server.buffered == 0


@pytest.mark.parametrize("step", [1, 2, 3, 7, 28, 29, 100, 511, 4096])
def test_requests_split_across_calls(step: int) -> None:
    data, expected = mixed_stream()
    client = connect()
    assert client.send(data, step=step) == expected
    assert client.server.buffered == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_input_types_are_copied(kind: type) -> None:
    data, expected = mixed_stream()
    client = connect()
    buf = bytearray(data)
    events = []
    for pos in range(0, len(buf), 1000):
        piece = bytearray(buf[pos : pos + 1000])
        client.server.receive_data(kind(piece))
        piece[:] = b"\xff" * len(piece)  # the caller reuses its buffer
        while (event := client.server.next_event()) is not NEED_DATA:
            assert isinstance(event, Request)
            if event.data is not None:
                event.data = memoryview(bytes(event.data))
            events.append(event)
    assert events == expected


def test_write_payload_split_across_many_calls() -> None:
    client = connect()
    payload = bytes(range(256)) * 256  # 64 KiB = max_block
    data = write(1, 0, payload)
    assert client.send(data[:40]) == []
    # Only what arrived is held: a header announcing a large payload costs nothing more
    # (a client that sends headers alone cannot make the server allocate their payloads).
    assert client.server.buffered == 40 - 28
    events = []
    for pos in range(40, len(data), 1000):
        events += client.send(data[pos : pos + 1000])
        assert client.server.buffered == (min(pos + 1000, len(data)) - 28) % len(payload)
    [event] = events
    assert isinstance(event, Request) and event.data is not None
    assert bytes(event.data) == payload
    assert client.server.buffered == 0


def test_write_data_is_read_only_view() -> None:
    client = connect()
    client.server.receive_data(write(1, 0, b"a" * 512)[:10])
    client.server.receive_data(write(1, 0, b"a" * 512)[10:])  # joined in a bytearray
    event = client.server.next_event()
    assert isinstance(event, Request) and event.data is not None
    assert event.data.readonly
    # A transport that keeps the view while feeding more input must not break the core.
    held = event.data
    client.server.receive_data(read(2, 0, 512)[:5])
    client.server.receive_data(read(2, 0, 512)[5:])
    assert client.server.next_event() == Request(Command.READ, 2, 0, 512)
    assert bytes(held) == b"a" * 512


def test_write_data_held_across_partial_header() -> None:
    client = connect()
    data = write(1, 0, b"b" * 512) + read(2, 0, 512)[:10]
    client.server.receive_data(data)
    first = client.server.next_event()
    assert isinstance(first, Request) and first.data is not None
    assert client.server.next_event() is NEED_DATA
    client.server.receive_data(read(2, 0, 512)[10:])
    assert client.server.next_event() == Request(Command.READ, 2, 0, 512)
    assert bytes(first.data) == b"b" * 512


# -- oversized writes -------------------------------------------------------------------------


def test_oversize_write_is_discarded_without_buffering() -> None:
    client = connect()
    length = 32 * 1024 * 1024 + 512  # over max_block (64 KiB) and over 2^25
    header = request(c.CMD_WRITE, 77, 0, length)
    assert client.send(header) == []
    assert client.received() == b""  # answered once the payload is skipped
    piece = b"\x55" * (256 * 1024)
    sent = 0
    while sent < length:
        n = min(len(piece), length - sent)
        assert client.send(piece[:n]) == []
        assert client.server.buffered == 0
        sent += n
    assert only_error(client) == c.EINVAL
    [event] = client.send(read(78, 0, 512))
    assert event == Request(Command.READ, 78, 0, 512)


def test_oversize_write_followed_by_request_in_same_chunk() -> None:
    client = connect(structured=True)
    length = 64 * 1024 + 512
    events = client.send(request(c.CMD_WRITE, 77, 0, length, 0, bytes(length)) + read(78, 0, 512))
    assert events == [Request(Command.READ, 78, 0, 512)]
    [chunk] = client.replies()
    assert isinstance(chunk, Chunk) and chunk.cookie == 77
    assert chunk.error()[0] == c.EINVAL


def test_absurd_write_is_violation_from_header() -> None:
    client = connect()
    events = client.send(request(c.CMD_WRITE, 1, 0, WRITE_DISCARD_LIMIT + 1))
    [event] = events
    assert isinstance(event, ProtocolViolation)
    assert client.server.state is State.CLOSED
    assert client.server.buffered == 0


def test_write_at_discard_limit_is_discarded() -> None:
    client = connect()
    assert client.send(request(c.CMD_WRITE, 1, 0, WRITE_DISCARD_LIMIT)) == []
    assert client.server.state is State.TRANSMISSION


def test_large_max_block_write_is_accepted() -> None:
    big = ExportInfo("big", size=1 << 30, max_block=WRITE_DISCARD_LIMIT * 2)
    client = connect("big", cat=Catalog(big))
    length = WRITE_DISCARD_LIMIT + 512
    assert client.send(request(c.CMD_WRITE, 1, 0, length)) == []
    assert client.server.buffered == 0  # nothing held for a payload not yet sent
    payload = bytes(length)
    assert client.send(payload[:length // 2]) == []
    [event] = client.send(payload[length // 2:])  # collected, not discarded
    assert isinstance(event, Request) and event.data is not None
    assert len(event.data) == length and client.server.buffered == 0


# -- bad magic, DISC, EOF ---------------------------------------------------------------------


def test_bad_request_magic_is_violation() -> None:
    client = connect()
    [event] = client.send(request(c.CMD_READ, 1, 0, 512, magic=0x12560953) + read(2, 0, 512))
    assert isinstance(event, ProtocolViolation) and "magic" in event.reason
    assert client.send(read(3, 0, 512)) == []
    assert client.server.next_event() is NEED_DATA


def test_extended_request_magic_is_violation() -> None:
    client = connect()
    [event] = client.send(request(c.CMD_READ, 1, 0, 512, magic=c.EXTENDED_REQUEST_MAGIC))
    assert isinstance(event, ProtocolViolation)


def test_disc_then_input_ignored() -> None:
    client = connect()
    events = client.send(read(1, 0, 512) + disc() + read(2, 0, 512))
    assert events == [Request(Command.READ, 1, 0, 512), Disconnect()]
    assert client.server.state is State.CLOSED
    assert client.send(read(3, 0, 512)) == []
    assert client.eof() == []
    assert client.server.next_event() is NEED_DATA
    assert client.received() == b""
    assert client.server.buffered == 0


@pytest.mark.parametrize("fields", [(1, 0, 0), (0, 512, 0), (0, 0, 512), (0xFFFF, 0, 0)])
def test_disc_with_junk_fields_still_disconnects(fields: tuple[int, int, int]) -> None:
    flags, offset, length = fields
    client = connect()
    assert client.send(request(c.CMD_DISC, 1, offset, length, flags)) == [Disconnect()]


def test_disc_split_byte_by_byte() -> None:
    client = connect()
    assert client.send(disc(), step=1) == [Disconnect()]


def test_eof_between_requests_is_disconnect() -> None:
    client = connect()
    client.send(read(1, 0, 512))
    assert client.eof() == [Disconnect()]
    assert client.server.state is State.CLOSED


def test_eof_after_complete_requests_in_same_batch() -> None:
    client = connect()
    client.server.receive_data(read(1, 0, 512))
    client.server.receive_data(b"")
    assert client.server.next_event() == Request(Command.READ, 1, 0, 512)
    assert client.server.next_event() == Disconnect()
    assert client.server.next_event() is NEED_DATA


@pytest.mark.parametrize("cut", [1, 27])
def test_eof_inside_request_header_is_violation(cut: int) -> None:
    client = connect()
    client.send(read(1, 0, 512)[:cut])
    [event] = client.eof()
    assert isinstance(event, ProtocolViolation)


def test_eof_inside_write_payload_is_violation() -> None:
    client = connect()
    client.send(write(1, 0, b"z" * 4096)[:1000])
    [event] = client.eof()
    assert isinstance(event, ProtocolViolation)
    assert client.server.buffered == 0


def test_eof_inside_discarded_payload_is_violation() -> None:
    client = connect("ro")
    client.send(write(1, 0, b"z" * 4096)[:1000])
    [event] = client.eof()
    assert isinstance(event, ProtocolViolation)
    assert client.received() == b""


def test_input_after_eof_is_ignored() -> None:
    client = connect()
    client.server.receive_data(b"")
    client.server.receive_data(read(1, 0, 512))
    assert client.server.next_event() == Disconnect()
