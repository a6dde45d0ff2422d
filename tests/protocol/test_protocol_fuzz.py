"""Property tests: hostile input never escapes as an exception, memory stays bounded,
and how a valid stream is split across receive_data calls never changes the outcome."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_protocol_client import (
    BARE,
    DISK,
    RO,
    Catalog,
    client_flags,
    export_name,
    go,
    info,
    list_meta,
    option,
    request,
    set_meta,
)

from nbdserver.protocol import (
    NEED_DATA,
    ConnectionLimits,
    Disconnect,
    Event,
    ExportInfo,
    ProtocolViolation,
    Request,
    ServerConnection,
    State,
    TransmissionStarted,
)
from nbdserver.protocol import constants as c

LIMITS = ConnectionLimits(max_option_length=512, max_name_length=64, max_options=16)
SMALL = ExportInfo(
    "small",
    size=64 * 1024,
    min_block=512,
    max_block=4096,
    meta_contexts=("base:allocation", "qemu:allocation-depth"),
)
CATALOG = Catalog(SMALL, DISK, RO, BARE)
# Most input a core may hold once it has asked for more: a partial option payload,
# or the payload buffer of one accepted WRITE (max_block of the largest export).
BOUND = max(LIMITS.max_option_length, DISK.max_block, 28)

names = st.sampled_from(["", "small", "disk", "ro", "bare", "nope"])
queries = st.lists(
    st.sampled_from(["base:", "base:allocation", "qemu:", "qemu:allocation-depth", "x:y", "q"]),
    max_size=3,
)
infos = st.lists(st.integers(0, 5), max_size=4)

option_frames = st.one_of(
    st.builds(option, st.integers(0, 12), st.binary(max_size=24)),
    st.builds(lambda n, i: go(n, i), names, infos),
    st.builds(lambda n, i: info(n, i), names, infos),
    st.builds(lambda n, q: set_meta(n, q), names, queries),
    st.builds(lambda n, q: list_meta(n, q), names, queries),
    st.builds(export_name, names),
    st.just(option(c.OPT_STRUCTURED_REPLY)),
    st.just(option(c.OPT_LIST)),
)

offsets = st.sampled_from([0, 512, 1000, 4096, SMALL.size - 512, SMALL.size, 2**64 - 512])
lengths = st.sampled_from([0, 1, 512, 1024, 4096, 4097, 8192])


@st.composite
def request_frames(draw: st.DrawFn) -> bytes:
    cmd = draw(st.sampled_from([0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8, 77]))
    length = draw(lengths)
    data = bytes([draw(st.integers(0, 255))]) * length if cmd == c.CMD_WRITE else b""
    return request(
        cmd,
        draw(st.integers(0, 2**64 - 1)),
        draw(offsets),
        length,
        draw(st.sampled_from([0, 0, 0, 1, 2, 4, 8, 16, 32, 0x8000])),
        data,
    )


def valid_request_frames() -> st.SearchStrategy[bytes]:
    """Well-framed requests (possibly invalid ones), but no DISC and no bad magic."""
    return request_frames().filter(lambda frame: struct.unpack_from(">H", frame, 6)[0] != 2)


handshakes = st.one_of(
    st.just(client_flags() + go("small", [c.INFO_BLOCK_SIZE])),
    st.just(client_flags(1) + export_name("small")),
    st.just(
        client_flags()
        + option(c.OPT_STRUCTURED_REPLY)
        + set_meta("small", ["base:allocation", "qemu:allocation-depth"])
        + go("small", [c.INFO_BLOCK_SIZE])
    ),
    st.just(client_flags() + option(c.OPT_STRUCTURED_REPLY) + go("", [])),
)


def copy_event(event: Event) -> Event:
    if isinstance(event, Request) and event.data is not None:
        event.data = memoryview(bytes(event.data))
    return event


def run(data: bytes, cuts: list[int], *, eof: bool) -> tuple[list[Event], bytes, ServerConnection]:
    """Feed `data` cut into pieces of the sizes in `cuts` (cycled); check invariants."""
    server = ServerConnection(CATALOG, LIMITS)
    out = [server.data_to_send()]
    events: list[Event] = []
    pos = 0
    index = 0
    pieces = []
    while pos < len(data):
        size = cuts[index % len(cuts)] if cuts else len(data)
        pieces.append(data[pos : pos + size])
        pos += size
        index += 1
    if eof:
        pieces.append(b"")
    for piece in pieces:
        server.receive_data(piece)
        while True:
            event = server.next_event()
            if event is NEED_DATA:
                break
            assert isinstance(
                event, TransmissionStarted | Request | Disconnect | ProtocolViolation
            ), event
            assert not events or not isinstance(events[-1], Disconnect | ProtocolViolation), (
                "event after a terminal event"
            )
            events.append(copy_event(event))
            out.append(server.data_to_send())
        out.append(server.data_to_send())
        assert server.buffered <= BOUND, server.buffered
    if events and isinstance(events[-1], Disconnect | ProtocolViolation):
        assert server.state is State.CLOSED
        assert server.buffered == 0
    return events, b"".join(out), server


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(["none", "flags", "transmission"]),
    frames=st.lists(
        st.one_of(st.binary(max_size=64), option_frames, request_frames()), max_size=12
    ),
    cuts=st.lists(st.integers(1, 300), max_size=8),
    eof=st.booleans(),
)
def test_random_input_never_raises(
    prefix: str, frames: list[bytes], cuts: list[int], eof: bool
) -> None:
    head = {
        "none": b"",
        "flags": client_flags(),
        "transmission": client_flags() + option(c.OPT_STRUCTURED_REPLY) + go("small"),
    }[prefix]
    events, _, server = run(head + b"".join(frames), cuts, eof=eof)
    if eof:
        assert events and isinstance(events[-1], Disconnect | ProtocolViolation)
        assert server.state is State.CLOSED
    # after the end, nothing more comes out
    server.receive_data(b"\0" * 100)
    if server.state is State.CLOSED:
        assert server.next_event() is NEED_DATA
        assert server.data_to_send() == b""


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    handshake=handshakes,
    options=st.lists(
        option_frames.filter(
            lambda f: (
                struct.unpack_from(">I", f, 8)[0] not in (c.OPT_EXPORT_NAME, c.OPT_GO, c.OPT_ABORT)
            )
        ),
        max_size=4,
    ),
    requests=st.lists(valid_request_frames(), max_size=12),
    cuts=st.lists(st.integers(1, 200), min_size=1, max_size=8),
    eof=st.booleans(),
)
def test_splitting_a_valid_stream_changes_nothing(
    handshake: bytes, options: list[bytes], requests: list[bytes], cuts: list[int], eof: bool
) -> None:
    flags_end = 4
    data = handshake[:flags_end] + b"".join(options) + handshake[flags_end:] + b"".join(requests)
    whole_events, whole_out, _ = run(data, [], eof=eof)
    split_events, split_out, _ = run(data, cuts, eof=eof)
    assert split_events == whole_events
    assert split_out == whole_out
    byte_events, byte_out, _ = run(data, [1], eof=eof)
    assert byte_events == whole_events
    assert byte_out == whole_out
    # The stream is valid NBD: it reaches transmission and ends only at EOF.
    assert isinstance(whole_events[0], TransmissionStarted)
    assert not any(isinstance(e, ProtocolViolation) for e in whole_events)
    if eof:
        assert whole_events[-1] == Disconnect()
