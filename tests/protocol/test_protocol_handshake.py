"""Handshake: greeting, client flags, option haggling, metadata contexts (sans IO)."""

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
    OptionReply,
    catalog,
    client_flags,
    export_name,
    go,
    info,
    info_payload,
    list_meta,
    meta_payload,
    option,
    parse_option_replies,
    read,
    request,
    set_meta,
)

from nbdserver.protocol import (
    NEED_DATA,
    Command,
    ConnectionLimits,
    Disconnect,
    Event,
    ExportInfo,
    MetaContext,
    ProtocolViolation,
    Request,
    ServerConnection,
    State,
    TransmissionStarted,
)
from nbdserver.protocol import constants as c

# Transmission flags the three standard exports get (without structured replies).
DISK_FLAGS = (
    c.FLAG_HAS_FLAGS
    | c.FLAG_SEND_FLUSH
    | c.FLAG_SEND_FUA
    | c.FLAG_SEND_TRIM
    | c.FLAG_SEND_WRITE_ZEROES
    | c.FLAG_CAN_MULTI_CONN
    | c.FLAG_SEND_CACHE
    | c.FLAG_SEND_FAST_ZERO
)
RO_FLAGS = (
    c.FLAG_HAS_FLAGS
    | c.FLAG_READ_ONLY
    | c.FLAG_SEND_FLUSH
    | c.FLAG_SEND_FUA
    | c.FLAG_CAN_MULTI_CONN
    | c.FLAG_SEND_CACHE
)
BARE_FLAGS = c.FLAG_HAS_FLAGS | c.FLAG_ROTATIONAL


def opt_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", c.OPTION_REPLY_MAGIC, opt, rep, len(data)) + data


def violation(events: list[Event]) -> str:
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation), events
    return events[0].reason


# -- greeting and client flags ----------------------------------------------------------------


def test_greeting_bytes() -> None:
    server = ServerConnection(catalog())
    assert server.data_to_send() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert server.data_to_send() == b""
    assert server.state is State.CLIENT_FLAGS
    assert server.next_event() is NEED_DATA
    assert server.export is None and not server.structured_replies


def test_client_flags_split_bytes() -> None:
    client = Client(catalog(), flags=None)
    assert client.send(client_flags(3), step=1) == []
    assert client.server.state is State.OPTIONS


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flags_end_the_connection(flags: int) -> None:
    client = Client(catalog(), flags=None)
    assert "client flags" in violation(client.send(client_flags(flags)))
    assert client.server.state is State.CLOSED
    assert client.send(go("disk")) == []
    assert client.received() == b""


def test_client_without_fixed_newstyle_is_served() -> None:
    client = Client(catalog(), flags=0)
    started = client.go("disk")
    assert started.export is DISK


# -- NBD_OPT_EXPORT_NAME ----------------------------------------------------------------------


def test_export_name_no_zeroes() -> None:
    client = Client(catalog())
    events = client.send(export_name("disk"))
    assert events == [TransmissionStarted(DISK, False, ())]
    assert client.received() == struct.pack(">QH", DISK.size, DISK_FLAGS)
    assert client.server.state is State.TRANSMISSION
    assert client.server.export is DISK
    assert not client.server.block_sizes_negotiated


def test_export_name_with_zeroes() -> None:
    client = Client(catalog(), flags=c.FLAG_C_FIXED_NEWSTYLE)
    client.send(export_name("ro"))
    assert client.received() == struct.pack(">QH", RO.size, RO_FLAGS) + bytes(124)


def test_export_name_default_export() -> None:
    client = Client(catalog())
    assert client.send(export_name("")) == [TransmissionStarted(DISK, False, ())]


def test_export_name_unknown_export_is_violation() -> None:
    client = Client(catalog())
    assert "unknown export" in violation(client.send(export_name("nope")))
    assert client.received() == b""
    assert client.server.state is State.CLOSED


def test_export_name_too_long_decided_from_header() -> None:
    client = Client(catalog())
    header = option(c.OPT_EXPORT_NAME, length=4097)
    assert "too long" in violation(client.send(header))


def test_export_name_longest_allowed() -> None:
    name = "n" * 4096
    client = Client(Catalog(ExportInfo(name, size=512)))
    [event] = client.send(export_name(name))
    assert isinstance(event, TransmissionStarted)


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"di\x00sk"])
def test_export_name_invalid_string_is_violation(raw: bytes) -> None:
    client = Client(catalog())
    violation(client.send(export_name(raw)))


def test_export_name_after_structured_reply_advertises_df() -> None:
    client = Client(catalog())
    client.structured()
    [started] = client.send(export_name("disk"))
    assert started == TransmissionStarted(DISK, True, ())
    assert client.received() == struct.pack(">QH", DISK.size, DISK_FLAGS | c.FLAG_SEND_DF)


# -- NBD_OPT_ABORT ----------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort(data: bytes) -> None:
    client = Client(catalog())
    assert client.send(option(c.OPT_ABORT, data)) == [Disconnect()]
    assert client.received() == opt_reply(c.OPT_ABORT, c.REP_ACK)
    assert client.server.state is State.CLOSED
    assert client.send(go("disk")) == []
    assert client.received() == b""


def test_abort_acts_on_header_alone() -> None:
    client = Client(catalog())
    assert client.send(option(c.OPT_ABORT, length=100)) == [Disconnect()]


# -- NBD_OPT_LIST -----------------------------------------------------------------------------


def test_list_exact_bytes() -> None:
    client = Client(Catalog(DISK, BARE))
    assert client.send(option(c.OPT_LIST)) == []
    expected = (
        opt_reply(c.OPT_LIST, c.REP_SERVER, b"\x00\x00\x00\x04disk" + b"the main disk")
        + opt_reply(c.OPT_LIST, c.REP_SERVER, b"\x00\x00\x00\x04bare")
        + opt_reply(c.OPT_LIST, c.REP_ACK)
    )
    assert client.received() == expected


def test_list_descriptions() -> None:
    client = Client(catalog())
    _, replies = client.option(option(c.OPT_LIST))
    assert [r.server() for r in replies[:-1]] == [
        ("disk", "the main disk"),
        ("ro", ""),
        ("bare", ""),
    ]
    assert replies[-1].type == c.REP_ACK


def test_list_empty_catalog() -> None:
    client = Client(Catalog())
    _, replies = client.option(option(c.OPT_LIST))
    assert [r.type for r in replies] == [c.REP_ACK]


def test_list_with_data_is_invalid() -> None:
    client = Client(catalog())
    _, [reply] = client.option(option(c.OPT_LIST, b"x"))
    assert reply.type == c.REP_ERR_INVALID and reply.option == c.OPT_LIST
    client.go("disk")


# -- NBD_OPT_INFO and NBD_OPT_GO --------------------------------------------------------------


def infos_of(replies: list[OptionReply]) -> dict[int, tuple[object, ...]]:
    result = {}
    for reply in replies[:-1]:
        kind, fields = reply.info()
        assert kind not in result, "information type sent twice"
        result[kind] = fields
    return result


@pytest.mark.parametrize("opt", [c.OPT_INFO, c.OPT_GO])
def test_info_go_minimal_reply(opt: int) -> None:
    client = Client(catalog())
    client.send(option(opt, info_payload("disk")))
    expected = (
        opt_reply(opt, c.REP_INFO, struct.pack(">HIII", c.INFO_BLOCK_SIZE, 512, 4096, 64 * 1024))
        + opt_reply(opt, c.REP_INFO, struct.pack(">HQH", c.INFO_EXPORT, DISK.size, DISK_FLAGS))
        + opt_reply(opt, c.REP_ACK)
    )
    assert client.received() == expected


@pytest.mark.parametrize("opt", [c.OPT_INFO, c.OPT_GO])
@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ([], {c.INFO_EXPORT, c.INFO_BLOCK_SIZE}),
        ([c.INFO_NAME], {c.INFO_EXPORT, c.INFO_BLOCK_SIZE, c.INFO_NAME}),
        ([c.INFO_DESCRIPTION], {c.INFO_EXPORT, c.INFO_BLOCK_SIZE, c.INFO_DESCRIPTION}),
        ([c.INFO_BLOCK_SIZE], {c.INFO_EXPORT, c.INFO_BLOCK_SIZE}),
        ([c.INFO_EXPORT], {c.INFO_EXPORT, c.INFO_BLOCK_SIZE}),
        ([999, c.INFO_NAME, c.INFO_NAME], {c.INFO_EXPORT, c.INFO_BLOCK_SIZE, c.INFO_NAME}),
        (
            [c.INFO_NAME, c.INFO_DESCRIPTION, c.INFO_BLOCK_SIZE],
            {c.INFO_EXPORT, c.INFO_BLOCK_SIZE, c.INFO_NAME, c.INFO_DESCRIPTION},
        ),
    ],
)
def test_info_go_each_type(opt: int, requested: list[int], expected: set[int]) -> None:
    client = Client(catalog())
    events, replies = client.option(option(opt, info_payload("", requested)))
    assert replies[-1].type == c.REP_ACK and replies[-1].option == opt
    assert all(r.option == opt for r in replies)
    infos = infos_of(replies)
    assert set(infos) == expected
    assert infos[c.INFO_EXPORT] == (DISK.size, DISK_FLAGS)
    assert infos[c.INFO_BLOCK_SIZE] == (512, 4096, 64 * 1024)
    if c.INFO_NAME in infos:
        assert infos[c.INFO_NAME] == ("disk",)  # the canonical name of the default export
    if c.INFO_DESCRIPTION in infos:
        assert infos[c.INFO_DESCRIPTION] == ("the main disk",)
    if opt == c.OPT_INFO:
        assert events == []
        assert client.server.state is State.OPTIONS
    else:
        assert events == [TransmissionStarted(DISK, False, ())]
        assert client.server.state is State.TRANSMISSION
        assert client.server.block_sizes_negotiated == (c.INFO_BLOCK_SIZE in requested)


def test_info_description_omitted_when_empty() -> None:
    client = Client(catalog())
    _, replies = client.option(info("bare", [c.INFO_DESCRIPTION, c.INFO_NAME]))
    infos = infos_of(replies)
    assert c.INFO_DESCRIPTION not in infos
    assert infos[c.INFO_NAME] == ("bare",)


@pytest.mark.parametrize(
    ("export", "flags"), [(DISK, DISK_FLAGS), (RO, RO_FLAGS), (BARE, BARE_FLAGS)]
)
def test_transmission_flags(export: ExportInfo, flags: int) -> None:
    client = Client(catalog())
    _, replies = client.option(info(export.name))
    assert infos_of(replies)[c.INFO_EXPORT] == (export.size, flags)
    client.structured()
    _, replies = client.option(info(export.name))
    assert infos_of(replies)[c.INFO_EXPORT] == (export.size, flags | c.FLAG_SEND_DF)


def test_fast_zero_needs_write_zeroes() -> None:
    export = ExportInfo("z", size=4096, can_zero=False, can_fast_zero=True)
    client = Client(Catalog(export))
    _, replies = client.option(info("z"))
    _, flags = infos_of(replies)[c.INFO_EXPORT]
    assert isinstance(flags, int)
    assert not flags & (c.FLAG_SEND_FAST_ZERO | c.FLAG_SEND_WRITE_ZEROES)


@pytest.mark.parametrize("opt", [c.OPT_INFO, c.OPT_GO])
def test_info_go_unknown_export(opt: int) -> None:
    client = Client(catalog())
    events, [reply] = client.option(option(opt, info_payload("nope", [c.INFO_NAME])))
    assert events == []
    assert reply.type == c.REP_ERR_UNKNOWN and reply.option == opt
    assert "nope" in reply.data.decode()
    assert client.server.state is State.OPTIONS
    client.go("disk")


def test_info_then_go_same_information() -> None:
    client = Client(catalog())
    _, info_replies = client.option(info("disk", [c.INFO_NAME]))
    _, go_replies = client.option(go("disk", [c.INFO_NAME]))
    assert [r.data for r in info_replies] == [r.data for r in go_replies]


MALFORMED_INFO = {
    "empty": b"",
    "too short": b"\x00\x00\x00\x00\x00",
    "name length past the end": b"\x00\x00\x00\x09disk\x00\x00",
    "name length huge": b"\xff\xff\xff\xff" + bytes(2),
    "missing info list": struct.pack(">I", 4) + b"disk" + struct.pack(">H", 1),
    "count too small": struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 0, 3),
    "odd trailing byte": struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, 3) + b"x",
    "bad utf-8": struct.pack(">I", 2) + b"\xc3\x28" + struct.pack(">H", 0),
    "NUL in name": struct.pack(">I", 3) + b"a\x00b" + struct.pack(">H", 0),
}


@pytest.mark.parametrize("opt", [c.OPT_INFO, c.OPT_GO])
@pytest.mark.parametrize("payload", MALFORMED_INFO.values(), ids=MALFORMED_INFO.keys())
def test_info_go_malformed(opt: int, payload: bytes) -> None:
    client = Client(catalog())
    events, [reply] = client.option(option(opt, payload))
    assert events == []
    assert reply.type == c.REP_ERR_INVALID and reply.option == opt
    assert reply.data  # a message for the human
    client.go("disk")


def test_go_name_too_long_is_violation() -> None:
    client = Client(catalog())
    assert "too long" in violation(client.send(go("x" * 4097)))


def test_go_respects_configured_name_limit() -> None:
    client = Client(catalog(), ConnectionLimits(max_name_length=3))
    violation(client.send(go("disk")))


def test_go_split_byte_by_byte() -> None:
    client = Client(catalog())
    data = option(c.OPT_STRUCTURED_REPLY) + set_meta("disk", ["base:allocation"]) + go("disk")
    events = client.send(data, step=1)
    ctx = MetaContext(1, "base:allocation")
    assert events == [TransmissionStarted(DISK, True, (ctx,))]
    replies = parse_option_replies(client.received())
    assert [r.type for r in replies] == [
        c.REP_ACK,
        c.REP_META_CONTEXT,
        c.REP_ACK,
        c.REP_INFO,
        c.REP_INFO,
        c.REP_ACK,
    ]


def test_options_and_first_request_in_one_chunk() -> None:
    client = Client(catalog(), flags=None)
    data = client_flags() + option(99, b"junk") + go("disk") + read(7, 0, 512)
    events = client.send(data)
    assert events == [
        TransmissionStarted(DISK, False, ()),
        Request(Command.READ, 7, 0, 512),
    ]


# -- unsupported and unknown options ----------------------------------------------------------


@pytest.mark.parametrize(
    ("opt", "data"),
    [
        (c.OPT_STARTTLS, b""),
        (c.OPT_EXTENDED_HEADERS, b""),
        (c.OPT_PEEK_EXPORT, b"disk"),
        (99, b""),
        (0, b"x" * 100),
        (0xFFFFFFFF, b"abc"),
    ],
)
def test_unsupported_option_then_go(opt: int, data: bytes) -> None:
    client = Client(catalog())
    events, [reply] = client.option(option(opt, data))
    assert events == []
    assert reply.option == opt and reply.type == c.REP_ERR_UNSUP
    started = client.go("disk")
    assert started.export is DISK
    assert not started.structured_replies


def test_starttls_unsup_exact() -> None:
    client = Client(catalog())
    client.send(option(c.OPT_STARTTLS))
    [reply] = parse_option_replies(client.received())
    assert reply.type == c.REP_ERR_UNSUP
    assert reply.data == b"TLS is not supported by this server"


# -- NBD_OPT_STRUCTURED_REPLY -----------------------------------------------------------------


def test_structured_reply() -> None:
    client = Client(catalog())
    client.send(option(c.OPT_STRUCTURED_REPLY))
    assert client.received() == opt_reply(c.OPT_STRUCTURED_REPLY, c.REP_ACK)
    assert client.server.structured_replies
    started = client.go("disk")
    assert started.structured_replies
    assert client.server.transmission_flags & c.FLAG_SEND_DF


def test_structured_reply_twice_is_invalid() -> None:
    client = Client(catalog())
    client.structured()
    _, [reply] = client.option(option(c.OPT_STRUCTURED_REPLY))
    assert reply.type == c.REP_ERR_INVALID
    assert client.server.structured_replies


def test_structured_reply_with_data_is_invalid() -> None:
    client = Client(catalog())
    _, [reply] = client.option(option(c.OPT_STRUCTURED_REPLY, b"\0"))
    assert reply.type == c.REP_ERR_INVALID
    assert not client.server.structured_replies
    assert not client.go("disk").structured_replies


# -- option framing limits --------------------------------------------------------------------


def test_option_too_long_decided_from_header() -> None:
    client = Client(catalog(), ConnectionLimits(max_option_length=1000))
    assert "over the limit" in violation(client.send(option(99, length=1001)))
    assert client.server.buffered == 0


def test_option_at_the_limit_is_fine() -> None:
    client = Client(catalog(), ConnectionLimits(max_option_length=1000))
    _, [reply] = client.option(option(99, bytes(1000)))
    assert reply.type == c.REP_ERR_UNSUP


def test_too_many_options() -> None:
    client = Client(catalog(), ConnectionLimits(max_options=3))
    for _ in range(3):
        assert client.send(option(99)) == []
    assert "more than 3 options" in violation(client.send(option(99)))


def test_bad_option_magic() -> None:
    client = Client(catalog())
    bad = struct.pack(">QII", c.NBDMAGIC, c.OPT_GO, 0)
    assert "magic" in violation(client.send(bad))


def test_option_payload_waits_for_all_bytes() -> None:
    client = Client(catalog())
    data = go("disk")
    assert client.send(data[:-1]) == []
    assert client.received() == b""
    assert len(client.send(data[-1:])) == 1


# -- EOF during the handshake -----------------------------------------------------------------


def test_eof_before_client_flags_is_disconnect() -> None:
    client = Client(catalog(), flags=None)
    assert client.eof() == [Disconnect()]


def test_eof_inside_client_flags_is_violation() -> None:
    client = Client(catalog(), flags=None)
    client.send(b"\0\0")
    violation(client.eof())


def test_eof_between_options_is_disconnect() -> None:
    client = Client(catalog())
    client.option(option(c.OPT_LIST))
    assert client.eof() == [Disconnect()]
    assert client.server.state is State.CLOSED
    client.server.receive_data(b"more")
    assert client.server.next_event() is NEED_DATA


@pytest.mark.parametrize("cut", [1, 15, 16, 20])
def test_eof_inside_option_is_violation(cut: int) -> None:
    client = Client(catalog())
    client.send(go("disk")[:cut])
    assert "middle" in violation(client.eof())


# -- metadata contexts ------------------------------------------------------------------------


def contexts_of(replies: list[OptionReply]) -> list[tuple[int, str]]:
    assert replies[-1].type == c.REP_ACK
    return [r.meta_context() for r in replies[:-1]]


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ([], ["base:allocation", "qemu:allocation-depth"]),
        (["base:"], ["base:allocation"]),
        (["qemu:"], ["qemu:allocation-depth"]),
        (["base:allocation"], ["base:allocation"]),
        (
            ["qemu:allocation-depth", "base:allocation"],
            ["base:allocation", "qemu:allocation-depth"],
        ),
        (["base:", "base:allocation"], ["base:allocation"]),
        (["base:nonexistent"], []),
        (["x-other:thing", "nbd-server:"], []),
        (["nocolon"], []),
        ([""], []),
        (["qemu:dirty-bitmap:"], []),
    ],
)
def test_list_meta_context_queries(queries: list[str], expected: list[str]) -> None:
    client = Client(catalog())
    client.structured()
    events, replies = client.option(list_meta("disk", queries))
    assert events == []
    assert contexts_of(replies) == [(0, name) for name in expected]


def test_list_meta_context_base_allocation_always_available() -> None:
    client = Client(catalog())
    _, replies = client.option(list_meta("bare"))
    assert contexts_of(replies) == [(0, "base:allocation")]


def test_list_meta_context_exact_bytes() -> None:
    client = Client(catalog())
    client.send(list_meta("ro", ["base:"]))
    assert client.received() == (
        opt_reply(c.OPT_LIST_META_CONTEXT, c.REP_META_CONTEXT, b"\0\0\0\0base:allocation")
        + opt_reply(c.OPT_LIST_META_CONTEXT, c.REP_ACK)
    )


def test_list_meta_context_allowed_before_structured_reply() -> None:
    client = Client(catalog())
    _, replies = client.option(list_meta("disk", ["base:"]))
    assert contexts_of(replies) == [(0, "base:allocation")]


def test_list_meta_context_prefix_wildcard() -> None:
    export = ExportInfo(
        "bm", size=4096, meta_contexts=("qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b")
    )
    client = Client(Catalog(export))
    _, replies = client.option(list_meta("bm", ["qemu:dirty-bitmap:"]))
    assert contexts_of(replies) == [(0, "qemu:dirty-bitmap:a"), (0, "qemu:dirty-bitmap:b")]


@pytest.mark.parametrize("opt", [c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT])
def test_meta_context_unknown_export(opt: int) -> None:
    client = Client(catalog())
    client.structured()
    _, [reply] = client.option(option(opt, meta_payload("nope", ["base:allocation"])))
    assert reply.type == c.REP_ERR_UNKNOWN


MALFORMED_META = {
    "empty": b"",
    "too short": bytes(7),
    "name length past the end": struct.pack(">I", 50) + b"disk" + bytes(4),
    "query count too high": struct.pack(">I", 4)
    + b"disk"
    + struct.pack(">I", 2)
    + struct.pack(">I", 5)
    + b"base:",
    "query length past the end": struct.pack(">I", 4)
    + b"disk"
    + struct.pack(">I", 1)
    + struct.pack(">I", 99)
    + b"base:",
    "trailing data": meta_payload("disk", ["base:"]) + b"x",
    "query not utf-8": struct.pack(">I", 4)
    + b"disk"
    + struct.pack(">I", 1)
    + struct.pack(">I", 2)
    + b"\xff\xff",
    "query too long": meta_payload("disk", ["base:" + "a" * 4092]),
}


@pytest.mark.parametrize("opt", [c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT])
@pytest.mark.parametrize("payload", MALFORMED_META.values(), ids=MALFORMED_META.keys())
def test_meta_context_malformed(opt: int, payload: bytes) -> None:
    client = Client(catalog())
    client.structured()
    events, [reply] = client.option(option(opt, payload))
    assert events == [] and reply.type == c.REP_ERR_INVALID
    _, replies = client.option(list_meta("disk"))
    assert len(contexts_of(replies)) == 2


def test_meta_context_name_too_long_is_violation() -> None:
    client = Client(catalog())
    client.structured()
    violation(client.send(set_meta("d" * 4097, ["base:allocation"])))


def test_set_meta_context_needs_structured_replies() -> None:
    client = Client(catalog())
    _, [reply] = client.option(set_meta("disk", ["base:allocation"]))
    assert reply.type == c.REP_ERR_INVALID and reply.option == c.OPT_SET_META_CONTEXT
    assert client.server.meta_contexts == ()


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        (["base:allocation"], [(1, "base:allocation")]),
        (["qemu:allocation-depth"], [(2, "qemu:allocation-depth")]),
        (
            ["qemu:allocation-depth", "base:allocation", "base:allocation"],
            [(1, "base:allocation"), (2, "qemu:allocation-depth")],
        ),
        (["base:"], []),  # the wildcard "MUST" be ignored by SET
        (["qemu:"], []),
        ([], []),
        (["base:unknown", "other:thing", "nocolon"], []),
    ],
)
def test_set_meta_context(queries: list[str], expected: list[tuple[int, str]]) -> None:
    client = Client(catalog())
    client.structured()
    assert client.set_meta("disk", queries) == expected
    started = client.go("disk")
    assert started.meta_contexts == tuple(MetaContext(i, n) for i, n in expected)
    assert client.server.meta_contexts == started.meta_contexts


def test_set_meta_context_exact_bytes() -> None:
    client = Client(catalog())
    client.structured()
    client.send(set_meta("disk", ["base:allocation"]))
    assert client.received() == (
        opt_reply(c.OPT_SET_META_CONTEXT, c.REP_META_CONTEXT, b"\0\0\0\1base:allocation")
        + opt_reply(c.OPT_SET_META_CONTEXT, c.REP_ACK)
    )


def test_set_meta_context_replaces_previous_even_on_failure() -> None:
    client = Client(catalog())
    client.structured()
    client.set_meta("disk", ["base:allocation", "qemu:allocation-depth"])
    assert len(client.server.meta_contexts) == 2
    client.set_meta("disk", ["qemu:allocation-depth"])
    assert client.server.meta_contexts == (MetaContext(2, "qemu:allocation-depth"),)
    _, [reply] = client.option(set_meta("nope", ["base:allocation"]))
    assert reply.type == c.REP_ERR_UNKNOWN
    assert client.server.meta_contexts == ()
    assert client.go("disk").meta_contexts == ()


def test_go_to_other_export_loses_contexts() -> None:
    client = Client(catalog())
    client.structured()
    client.set_meta("ro", ["base:allocation"])
    started = client.go("disk")
    assert started.meta_contexts == ()
    assert client.server.meta_contexts == ()
    client.send(request(c.CMD_BLOCK_STATUS, 1, 0, 512))
    [chunk] = client.replies()
    assert isinstance(chunk, Chunk) and chunk.error()[0] == c.EINVAL


def test_default_name_and_canonical_name_are_the_same_export() -> None:
    client = Client(catalog())
    client.structured()
    client.set_meta("", ["base:allocation"])
    assert client.go("disk").meta_contexts == (MetaContext(1, "base:allocation"),)


def test_export_name_keeps_contexts_for_same_export() -> None:
    client = Client(catalog())
    client.structured()
    client.set_meta("disk", ["qemu:allocation-depth"])
    [started] = client.send(export_name("disk"))
    assert started == TransmissionStarted(DISK, True, (MetaContext(2, "qemu:allocation-depth"),))


def test_info_does_not_commit_block_sizes() -> None:
    client = Client(catalog())
    client.option(info("disk", [c.INFO_BLOCK_SIZE]))
    client.go("disk")
    assert not client.server.block_sizes_negotiated
